"""Released checkpoints as the upstream code writes them: MILES (`text_proj`) and Frozen-in-Time
(`txt_proj`) key layouts, bare state_dicts and the upstream trainers' dicts with a pickled
config object, with and without `module.` — and a pickle that would run code never runs."""
import configparser
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")

from miles_jax import config_lib, pretrained  # noqa: E402
from miles_jax.weights import torch_io  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
from helpers import TINY_OVERRIDES, apply_overrides  # noqa: E402
from torch_reference import RefDualEncoder  # noqa: E402


def _model_config():
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  apply_overrides(c, TINY_OVERRIDES)
  return c.model


def upstream_spec(mc, layout):
  """Every key (and torch shape) of the upstream model's state_dict, written from the upstream
  source: TencentARC/MCQ MILES/model/model_MILES.py + video_encoder_MILES.py (class MILES) and
  m-bain/frozen-in-time model/model.py + video_transformer.py (class FrozenInTime); the text
  model is transformers' DistilBertModel (AutoModel of distilbert-base-uncased)."""
  v, t, d, e = mc.video, mc.text, mc.video.width, mc.text.width
  n = (v.img_size // v.patch_size) ** 2
  spec = {
      # SpaceTimeTransformer: cls_token (1,1,D), pos_embed (1, patches_per_frame+1, D),
      # temporal_embed (1, num_frames, D); VideoPatchEmbed.proj = Conv2d(3, D, p, p).
      "video_model.cls_token": (1, 1, d),
      "video_model.pos_embed": (1, n + 1, d),
      "video_model.temporal_embed": (1, v.num_frames, d),
      "video_model.patch_embed.proj.weight": (d, 3, v.patch_size, v.patch_size),
      "video_model.patch_embed.proj.bias": (d,),
      "video_model.norm.weight": (d,), "video_model.norm.bias": (d,),
  }
  hidden = int(d * v.mlp_ratio)
  for i in range(v.depth):  # SpaceTimeBlock: norm1, attn, timeattn, norm2, mlp(fc1, fc2), norm3
    b = f"video_model.blocks.{i}"
    for norm in ("norm1", "norm2", "norm3"):
      spec[f"{b}.{norm}.weight"] = spec[f"{b}.{norm}.bias"] = (d,)
    for att in ("attn", "timeattn"):  # VarAttention: qkv = Linear(D, 3D), proj = Linear(D, D)
      spec[f"{b}.{att}.qkv.weight"], spec[f"{b}.{att}.qkv.bias"] = (3 * d, d), (3 * d,)
      spec[f"{b}.{att}.proj.weight"], spec[f"{b}.{att}.proj.bias"] = (d, d), (d,)
    spec[f"{b}.mlp.fc1.weight"], spec[f"{b}.mlp.fc1.bias"] = (hidden, d), (hidden,)
    spec[f"{b}.mlp.fc2.weight"], spec[f"{b}.mlp.fc2.bias"] = (d, hidden), (d,)
  # DistilBertModel: embeddings (word, position, LayerNorm, the position_ids buffer that the
  # transformers versions of 2021-22 saved), transformer.layer.N (attention q/k/v/out_lin,
  # sa_layer_norm, ffn lin1/lin2, output_layer_norm).
  spec["text_model.embeddings.word_embeddings.weight"] = (t.vocab_size, e)
  spec["text_model.embeddings.position_embeddings.weight"] = (t.max_len, e)
  spec["text_model.embeddings.position_ids"] = (1, t.max_len)
  spec["text_model.embeddings.LayerNorm.weight"] = spec[
      "text_model.embeddings.LayerNorm.bias"] = (e,)
  for i in range(t.depth):
    b = f"text_model.transformer.layer.{i}"
    for lin in ("q_lin", "k_lin", "v_lin", "out_lin"):
      spec[f"{b}.attention.{lin}.weight"], spec[f"{b}.attention.{lin}.bias"] = (e, e), (e,)
    for norm in ("sa_layer_norm", "output_layer_norm"):
      spec[f"{b}.{norm}.weight"] = spec[f"{b}.{norm}.bias"] = (e,)
    spec[f"{b}.ffn.lin1.weight"], spec[f"{b}.ffn.lin1.bias"] = (t.mlp_dim, e), (t.mlp_dim,)
    spec[f"{b}.ffn.lin2.weight"], spec[f"{b}.ffn.lin2.bias"] = (e, t.mlp_dim), (e,)
  # Projections: MILES `text_proj` / Frozen `txt_proj` = Sequential(ReLU, Linear) -> index 1;
  # `vid_proj` = Sequential(Linear) -> index 0.
  txt = {"miles": "text_proj", "frozen": "txt_proj"}[layout]
  spec[f"{txt}.1.weight"], spec[f"{txt}.1.bias"] = (mc.proj_dim, e), (mc.proj_dim,)
  spec["vid_proj.0.weight"], spec["vid_proj.0.bias"] = (mc.proj_dim, d), (mc.proj_dim,)
  return spec


# Upstream name -> name in tests/support/torch_reference.py (written from the two upstream classes; the
# reference uses Frozen's names, so only MILES's text projection differs).
UPSTREAM_TO_REFERENCE = {"miles": {"text_proj.": "txt_proj."}, "frozen": {}}


def upstream_state_dict(mc, layout, seed):
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for k, shape in upstream_spec(mc, layout).items():
    if k.endswith("position_ids"):
      sd[k] = torch.arange(shape[1])[None]
    elif "norm" in k.lower() and k.endswith("weight"):
      sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
    else:
      sd[k] = 0.2 * torch.randn(shape, generator=g)
  return sd


def reference_from_upstream(mc, sd, layout):
  renames = UPSTREAM_TO_REFERENCE[layout]
  ref_sd = {}
  for k, val in sd.items():
    for old, new in renames.items():
      if k.startswith(old):
        k = new + k[len(old):]
    ref_sd[k] = val
  ref = RefDualEncoder(mc).eval()
  ref.load_state_dict(ref_sd, strict=True)  # same names and shapes as the upstream class
  return ref


def _upstream_config_object():
  """An object of a class named parse_config.ConfigParser, as the upstream trainers pickle
  `self.config` (their own class, holding pathlib paths); the module is gone when loading."""
  mod = types.ModuleType("parse_config")

  class ConfigParser:
    pass

  ConfigParser.__module__, ConfigParser.__qualname__ = "parse_config", "ConfigParser"
  mod.ConfigParser = ConfigParser
  sys.modules["parse_config"] = mod
  obj = ConfigParser()
  obj._config = {"name": "MSRVTT", "arch": {"type": "MILES"}}
  obj.resume = pathlib.PurePosixPath("exps/models/MSRVTT/model_best.pth")
  return obj


def save_checkpoint(path, sd, style, module_prefix):
  sd = {(f"module.{k}" if module_prefix else k): v for k, v in sd.items()}
  if style == "bare":
    torch.save(sd, path)
    return
  if style == "trainer":
    config = configparser.ConfigParser()
    config["trainer"] = {"epochs": "100", "save_dir": "exps"}
  else:
    config = _upstream_config_object()
  state = {  # what upstream base/base_trainer.py _save_checkpoint writes
      "arch": "MILES", "epoch": 7, "state_dict": sd,
      "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                    "param_groups": [{"lr": 3e-5, "betas": (0.9, 0.999), "params": [0]}]},
      "monitor_best": 0.25,
      "config": config,
  }
  try:
    torch.save(state, path)
  finally:
    sys.modules.pop("parse_config", None)


@pytest.fixture(scope="module")
def init_params():
  import jax
  return torch_io.init_model_params(_model_config(), jax.random.PRNGKey(0))


def _inputs(mc, seed=0):
  rng = np.random.default_rng(seed)
  video = rng.standard_normal((2, 4, mc.video.img_size, mc.video.img_size, 3)).astype(np.float32)
  ids = rng.integers(1, mc.text.vocab_size, (2, 9)).astype(np.int32)
  am = np.ones_like(ids)
  am[1, 6:] = 0
  return video, ids, am


@pytest.mark.parametrize("layout,style,prefix,suffix", [
    ("miles", "bare", False, ".pth"),
    ("miles", "trainer", True, ".pth"),
    ("frozen", "trainer_upstream", False, ".pth.tar"),
    ("frozen", "bare", True, ".pth"),
])
def test_every_checkpoint_style_reads_the_same_tensors(tmp_path, layout, style, prefix, suffix,
                                                      init_params):
  mc = _model_config()
  sd = upstream_state_dict(mc, layout, seed=5)
  path = str(tmp_path / f"ckpt{suffix}")
  save_checkpoint(path, sd, style, prefix)
  info = {}
  read = torch_io.read_state_dict(path, info)
  assert set(read) == set(upstream_spec(mc, layout)) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(read[k], v.numpy())
  if style != "bare":
    assert info["other_entries"] == ["arch", "config", "epoch", "monitor_best", "optimizer"]
  params, report = torch_io.convert_state_dict(read, mc, init_params)
  assert report["layout"] == layout and report["converted"] == len(sd) - 1  # less position_ids
  txt = {"miles": "text_proj", "frozen": "txt_proj"}[layout]
  np.testing.assert_array_equal(params["text_proj"]["kernel"], sd[f"{txt}.1.weight"].numpy().T)


# Output parity (slow on the shared 2-core machine: the reference loops over tokens), one file
# per layout, the two styles and prefixes alternating.
@pytest.mark.parametrize("layout,style,prefix,suffix", [
    ("miles", "trainer", True, ".pth"),
    pytest.param("frozen", "trainer_upstream", False, ".pth.tar", marks=pytest.mark.slow),
])
def test_upstream_checkpoint_converts_and_matches(tmp_path, layout, style, prefix, suffix):
  mc = _model_config()
  sd = upstream_state_dict(mc, layout, seed=11)
  ref = reference_from_upstream(mc, sd, layout)
  path = str(tmp_path / f"ckpt{suffix}")
  save_checkpoint(path, sd, style, prefix)
  info = {}
  read = torch_io.read_state_dict(path, info)
  assert set(read) == set(upstream_spec(mc, layout))
  params, report = torch_io.convert_state_dict(read, mc)
  assert report["layout"] == layout and report["converted"] == len(sd) - 1  # less position_ids
  if style != "bare":
    assert info["other_entries"] == ["arch", "config", "epoch", "monitor_best", "optimizer"]
  model = pretrained.load(path, mc)
  video, ids, am = _inputs(mc)
  with torch.no_grad():
    tv = ref.encode_video(torch.from_numpy(video)).numpy()
    tt = ref.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(am).long()).numpy()
  assert np.abs(model.encode_video(video) - tv).max() <= 1e-4
  assert np.abs(model.encode_text(ids, am) - tt).max() <= 1e-4
  assert np.abs(tt).max() > 0.1 and np.abs(tv).max() > 0.1


def test_trainer_config_is_never_constructed(tmp_path, monkeypatch):
  mc = _model_config()
  path = str(tmp_path / "trainer.pth")
  save_checkpoint(path, upstream_state_dict(mc, "miles", 0), "trainer", True)
  calls = []
  for name in ("__init__", "__setstate__", "read_dict"):
    monkeypatch.setattr(configparser.RawConfigParser, name,
                        lambda *a, _n=name, **k: calls.append(_n), raising=False)
  obj, placeholders = torch_io.load_torch_checkpoint(path)
  # protocol 2 writes Python 2's module name for configparser
  assert "ConfigParser.ConfigParser" in placeholders or "configparser.ConfigParser" in placeholders
  assert isinstance(obj["config"], torch_io.Placeholder)
  assert not isinstance(obj["config"], configparser.RawConfigParser) and calls == []
  path2 = str(tmp_path / "upstream.pth")
  save_checkpoint(path2, upstream_state_dict(mc, "frozen", 0), "trainer_upstream", False)
  obj, placeholders = torch_io.load_torch_checkpoint(path2)
  assert "parse_config.ConfigParser" in placeholders and "parse_config" not in sys.modules
  assert obj["epoch"] == 7 and obj["arch"] == "MILES"


class _Payload:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
  mc = _model_config()
  marker = tmp_path / "ran"
  sd = upstream_state_dict(mc, "miles", 0)
  for i, fn in enumerate([os.system, exec]):
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    path = str(tmp_path / f"evil{i}.pth")
    torch.save({"state_dict": sd, "config": _Payload(fn, arg)}, path)
    with pytest.raises(torch_io.ConversionError, match="refused"):
      torch_io.read_state_dict(path)
    assert not marker.exists()
  # a function of an unlisted module is never imported nor called: an inert placeholder
  helper = tmp_path / "evil_helper.py"
  helper.write_text("def touch(p):\n  open(p, 'w').close()\n")
  sys.path.insert(0, str(tmp_path))
  try:
    import evil_helper
    path = str(tmp_path / "evil2.pth")
    torch.save({"state_dict": sd, "config": _Payload(evil_helper.touch, str(marker))}, path)
    sys.modules.pop("evil_helper")
    obj, placeholders = torch_io.load_torch_checkpoint(path)
    assert placeholders == ["evil_helper.touch"] and "evil_helper" not in sys.modules
    assert isinstance(obj["config"], torch_io.Placeholder)
  finally:
    sys.path.remove(str(tmp_path))
  assert not marker.exists()
  # and a payload inside the state_dict itself is never a tensor: refused
  path = str(tmp_path / "evil3.pth")
  torch.save({"state_dict": {"video_model.norm.weight": _Payload(print, "x")}}, path)
  with pytest.raises(torch_io.ConversionError, match="not tensors: video_model.norm.weight"):
    torch_io.read_state_dict(path)


def test_layout_and_extra_modules_are_checked(tmp_path, init_params):
  mc = _model_config()
  sd = {k: v.numpy() for k, v in upstream_state_dict(mc, "miles", 0).items()}
  both = dict(sd, **{"txt_proj.1.weight": sd["text_proj.1.weight"]})
  with pytest.raises(torch_io.ConversionError, match="text_proj.1.weight.*txt_proj.1.weight"):
    torch_io.convert_state_dict(both, mc, init_params)
  extra = dict(sd, **{"snapshot_model.norm.weight": sd["video_model.norm.weight"]})
  with pytest.raises(torch_io.ConversionError, match="unexpected.*snapshot_model.norm.weight"):
    torch_io.convert_state_dict(extra, mc, init_params)
  _, report = torch_io.convert_state_dict(extra, mc, init_params, drop_modules=["snapshot_model"])
  assert report["dropped"] == ["snapshot_model.norm.weight"]
  with pytest.raises(torch_io.ConversionError, match="own modules"):
    torch_io.convert_state_dict(sd, mc, init_params, drop_modules=["video_model"])
  missing = dict(sd)
  del missing["text_proj.1.bias"]
  with pytest.raises(torch_io.ConversionError, match="missing.*text_proj.1.bias"):
    torch_io.convert_state_dict(missing, mc, init_params)


@pytest.mark.slow
def test_cli_converts_upstream_trainer_file(tmp_path):
  mc = _model_config()
  path = str(tmp_path / "cc-webvid2m-4f_stformer_b_16_224.pth.tar")
  save_checkpoint(path, upstream_state_dict(mc, "frozen", 3), "trainer_upstream", True)
  out = str(tmp_path / "out")
  args = [sys.executable, "-m", "miles_jax.convert", "--config=configs/default.py:base",
          f"--checkpoint={path}", f"--out={out}"] + [
              f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu")
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "frozen key layout" in r.stdout and "parse_config.ConfigParser" in r.stdout
  evil = str(tmp_path / "evil.pth")
  torch.save({"state_dict": {}, "config": _Payload(os.system, "true")}, evil)
  r = subprocess.run(args[:4] + [f"--checkpoint={evil}", f"--out={tmp_path / 'o2'}"], cwd=ROOT,
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
