"""Initialisation from public weights: layouts mapped value by value, Frozen's time init, failures."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
from torch import nn  # noqa: E402

from miles_jax import checkpoints, config_lib  # noqa: E402
from miles_jax.weights import public_init  # noqa: E402
from miles_jax.weights import torch_io  # noqa: E402
from miles_jax.weights.torch_io import ConversionError  # noqa: E402
from miles_jax.models.dual_encoder import build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402
from helpers import TINY_OVERRIDES, apply_overrides  # noqa: E402
from torch_reference import RefText, randomize_  # noqa: E402

OVERRIDES = TINY_OVERRIDES


def _config(**init):
  c = config_lib.default_config()
  apply_overrides(c, OVERRIDES)
  c.init.update(init)
  return c


class TorchImageViT(nn.Module):
  """A plain pre-LN image ViT with timm's parameter names (independent reference)."""

  def __init__(self, img=32, patch=8, dim=48, depth=2, heads=3, mlp_ratio=2.0):
    super().__init__()
    self.heads = heads
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, dim))
    hidden = int(dim * mlp_ratio)
    self.blocks = nn.ModuleList()
    for _ in range(depth):
      b = nn.Module()
      b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
      b.attn = nn.Module()
      b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
      b.mlp = nn.Module()
      b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
      self.blocks.append(b)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, 5)

  def forward(self, x):  # [B, 3, H, W] -> tokens after the final norm [B, 1+N, D]
    y = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    y = torch.cat([self.cls_token.expand(len(y), -1, -1), y], 1) + self.pos_embed
    b, s, d = y.shape
    h = self.heads
    for blk in self.blocks:
      q, k, v = blk.attn.qkv(blk.norm1(y)).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
      a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, -1)
      y = y + blk.attn.proj((a @ v).transpose(1, 2).reshape(b, s, d))
      y = y + blk.mlp.fc2(nn.functional.gelu(blk.mlp.fc1(blk.norm2(y))))
    return self.norm(y)


def _random_vit(seed=0, **kw):
  vit = TorchImageViT(**kw)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in vit.named_parameters():
      base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
  return vit.eval()


def _np(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _to_npz_layout(sd, heads=3):
  """timm names -> the ViT release's .npz names/layouts, written independently of the module."""
  d = sd["cls_token"].shape[-1]
  hd = d // heads
  out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    b, e = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    for ln, n in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      out[e + ln + "/scale"], out[e + ln + "/bias"] = sd[b + n + ".weight"], sd[b + n + ".bias"]
    w, bias = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      out[f"{e}MultiHeadDotProductAttention_1/{n}/kernel"] = (
          w[j * d:(j + 1) * d].T.reshape(d, heads, hd))
      out[f"{e}MultiHeadDotProductAttention_1/{n}/bias"] = bias[j * d:(j + 1) * d].reshape(heads, hd)
    out[f"{e}MultiHeadDotProductAttention_1/out/kernel"] = (
        sd[b + "attn.proj.weight"].T.reshape(heads, hd, d))
    out[f"{e}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{e}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
      out[f"{e}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.{fc}.bias"]
    i += 1
  return out


def _to_clip_layout(sd, proj_dim=24, seed=1):
  rng = np.random.default_rng(seed)
  d = sd["cls_token"].shape[-1]
  out = {"visual.conv1.weight": sd["patch_embed.proj.weight"],
         "visual.class_embedding": sd["cls_token"].reshape(d),
         "visual.positional_embedding": sd["pos_embed"][0],
         "visual.ln_pre.weight": 1 + rng.standard_normal(d).astype(np.float32),
         "visual.ln_pre.bias": rng.standard_normal(d).astype(np.float32),
         "visual.ln_post.weight": sd["norm.weight"], "visual.ln_post.bias": sd["norm.bias"],
         "visual.proj": rng.standard_normal((d, proj_dim)).astype(np.float32),
         "token_embedding.weight": np.zeros((9, 8), np.float32),
         "logit_scale": np.ones((), np.float32)}
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    b, r = f"blocks.{i}.", f"visual.transformer.resblocks.{i}."
    for src, dst in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
      out[r + dst + ".weight"], out[r + dst + ".bias"] = sd[b + src + ".weight"], sd[b + src + ".bias"]
    out[r + "attn.in_proj_weight"] = sd[b + "attn.qkv.weight"]
    out[r + "attn.in_proj_bias"] = sd[b + "attn.qkv.bias"]
    i += 1
  return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  from safetensors.numpy import save_file
  d = tmp_path_factory.mktemp("init")
  vit = _random_vit()
  sd = _np(vit.state_dict())
  save_file(sd, str(d / "vit.safetensors"))
  np.savez(str(d / "vit.npz"), **_to_npz_layout(sd))
  save_file(_to_clip_layout(sd), str(d / "clip.safetensors"))
  # DistilBERT as Hugging Face saves DistilBertForMaskedLM: 'distilbert.' + an MLM head.
  mc = _config().model
  text = randomize_(RefText(mc.text.vocab_size, mc.text.max_len, mc.text.width, mc.text.depth,
                            mc.text.num_heads, mc.text.mlp_dim).eval(), seed=2)
  tsd = {f"distilbert.{k}": v for k, v in _np(text.state_dict()).items()}
  tsd["vocab_projector.bias"] = np.zeros(mc.text.vocab_size, np.float32)
  tsd["vocab_transform.weight"] = np.zeros((mc.text.width, mc.text.width), np.float32)
  bert = d / "distilbert"
  bert.mkdir()
  save_file(tsd, str(bert / "model.safetensors"))
  hf = {"dim": 40, "n_layers": 2, "n_heads": 5, "hidden_dim": 72, "vocab_size": 101,
        "max_position_embeddings": 16, "activation": "gelu", "sinusoidal_pos_embds": False}
  (bert / "config.json").write_text(json.dumps(hf))
  (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                                            [f"w{i}" for i in range(97)]) + "\n")
  return {"dir": d, "vit": vit, "sd": sd, "text": text, "bert": str(bert), "hf": hf}


_REF = {}


def _init(config):
  """(fresh params, initialised params, report); fresh params cached per model config (speed)."""
  key = config.model.to_json()
  if key not in _REF:
    _REF[key] = torch_io.init_model_params(config.model, jax.random.PRNGKey(0))
  params = _REF[key]
  return params, *public_init.apply_init(params, config.model, public_init.init_config(config))


def _encode(config, params, frames):
  return build(config.model).apply({"params": params}, jnp.asarray(frames),
                                   method="encode_video")


def test_timm_values_and_time_init(sources):
  c = _config(video=str(sources["dir"] / "vit.safetensors"))
  ref, params, report = _init(c)
  sd, v = sources["sd"], params["video"]
  np.testing.assert_array_equal(v["patch_embed"]["kernel"],
                                sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["cls_token"], sd["cls_token"][0])
  np.testing.assert_array_equal(v["pos_embed"], sd["pos_embed"][0])
  for i in range(2):
    b = v[f"block_{i}"]
    np.testing.assert_array_equal(b["attn"]["qkv"]["kernel"], sd[f"blocks.{i}.attn.qkv.weight"].T)
    np.testing.assert_array_equal(b["attn"]["proj"]["bias"], sd[f"blocks.{i}.attn.proj.bias"])
    np.testing.assert_array_equal(b["norm2"]["scale"], sd[f"blocks.{i}.norm2.weight"])
    np.testing.assert_array_equal(b["mlp"]["fc2"]["kernel"], sd[f"blocks.{i}.mlp.fc2.weight"].T)
    # Frozen's time_init='zeros' and a fresh norm3.
    assert (b["timeattn"]["qkv"]["kernel"] == 0).all() and (b["timeattn"]["qkv"]["bias"] == 0).all()
    assert (b["timeattn"]["proj"]["kernel"] == 1).all() and (b["timeattn"]["proj"]["bias"] == 0).all()
    assert (b["norm3"]["scale"] == 1).all() and (b["norm3"]["bias"] == 0).all()
  np.testing.assert_array_equal(v["norm"]["bias"], sd["norm.bias"])
  assert (v["temporal_embed"] == 0).all()
  np.testing.assert_array_equal(v["mask_token"], ref["video"]["mask_token"])
  np.testing.assert_array_equal(params["text"]["word_embeddings"]["embedding"],
                                ref["text"]["word_embeddings"]["embedding"])  # untouched
  assert report["video"]["format"] == "timm"
  assert report["video"]["ignored"] == ["head.bias", "head.weight"]
  assert report["video"]["kept_initialised"] == ["video/mask_token"]


def test_npz_layout_gives_the_same_params(sources):
  a = _init(_config(video=str(sources["dir"] / "vit.safetensors")))[1]["video"]
  b, report = _init(_config(video=str(sources["dir"] / "vit.npz")))[1:]
  assert report["video"]["format"] == "vit_npz"
  jax.tree.map(np.testing.assert_array_equal, a, b["video"])


@pytest.mark.slow
def test_starts_as_the_image_vit(sources):
  """T=1: the video encoder is the image ViT; T identical frames: every frame alike."""
  c = _config(video=str(sources["dir"] / "vit.npz"))
  params = _init(c)[1]
  rng = np.random.default_rng(0)
  img = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = sources["vit"](torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
  one = _encode(c, params, img[:, None])
  np.testing.assert_allclose(one["cls"], want[:, 0], atol=1e-4)
  np.testing.assert_allclose(one["patches"], want[:, 1:], atol=1e-4)
  # T identical frames: the time branch adds 0 and temporal rows are 0, so each frame's patches
  # are alike at every depth. The cls query spreads over T copies, so only up to the first
  # block's output are the patches exactly the T=1 ones.
  three = _encode(c, params, np.repeat(img[:, None], 3, axis=1))["patches"].reshape(2, 3, 16, 48)
  for t in (1, 2):
    np.testing.assert_allclose(three[:, t], three[:, 0], atol=1e-5)
  c1 = _config()
  c1.model.video.depth = 1
  p1 = dict(params, video={k: v for k, v in params["video"].items() if k != "block_1"})
  p1["video"]["norm"] = {"scale": np.ones(48, np.float32), "bias": np.zeros(48, np.float32)}
  single = _encode(c1, p1, img[:, None])["patches"]
  clip3 = _encode(c1, p1, np.repeat(img[:, None], 3, axis=1))["patches"].reshape(2, 3, 16, 48)
  for t in range(3):
    np.testing.assert_allclose(clip3[:, t], single, atol=1e-5)


def test_norm3_copy_and_random_time_init(sources):
  c = _config(video=str(sources["dir"] / "vit.safetensors"), norm3="norm1", time_init="random")
  ref, params, _ = _init(c)
  b = params["video"]["block_1"]
  np.testing.assert_array_equal(b["norm3"]["scale"], sources["sd"]["blocks.1.norm1.weight"])
  np.testing.assert_array_equal(b["timeattn"]["qkv"]["kernel"],
                                ref["video"]["block_1"]["timeattn"]["qkv"]["kernel"])


def test_pos_embed_resized_to_the_model_grid(sources):
  c = _config(video=str(sources["dir"] / "vit.safetensors"))
  c.model.video.img_size = 48  # grid 6 from a grid-4 checkpoint
  _, params, report = _init(c)
  pos = params["video"]["pos_embed"]
  assert pos.shape == (37, 48)
  np.testing.assert_array_equal(pos[0], sources["sd"]["pos_embed"][0, 0])  # cls row kept
  assert any("4x4 -> 6x6" in n for n in report["video"]["notes"])
  # A constant table stays constant; a ramp along x stays monotone.
  const = np.concatenate([np.zeros((1, 2)), np.full((16, 2), 3.0)]).astype(np.float32)
  np.testing.assert_allclose(public_init.resize_pos_embed(const, 6)[1:], 3.0, atol=1e-5)
  ramp = np.concatenate([np.zeros((1, 1)), np.tile(np.arange(4.0), 4)[:, None]]).astype(np.float32)
  row = public_init.resize_pos_embed(ramp, 6)[1:7, 0]
  assert (np.diff(row) > 0).all()


def test_clip_mapping_and_approximations(sources):
  path = str(sources["dir"] / "clip.safetensors")
  c = _config(video=path)
  _, params, report = _init(c)
  sd, v, rep = sources["sd"], params["video"], report["video"]
  assert rep["format"] == "clip"
  np.testing.assert_array_equal(v["block_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(v["block_1"]["mlp"]["fc1"]["bias"], sd["blocks.1.mlp.fc1.bias"])
  np.testing.assert_array_equal(v["cls_token"], sd["cls_token"][0])
  np.testing.assert_array_equal(v["norm"]["scale"], sd["norm.weight"])
  assert (v["patch_embed"]["bias"] == 0).all()
  notes = " ".join(rep["notes"])
  for word in ("ln_pre", "quick-GELU", "eps", "text tower", "visual.proj not used"):
    assert word in notes, word
  # visual.proj onto video_proj on request, only when the widths fit.
  _, params, _ = _init(_config(video=path, clip_proj=True))
  np.testing.assert_array_equal(params["video_proj"]["kernel"], _to_clip_layout(sd)["visual.proj"])
  bad = _config(video=path, clip_proj=True)
  bad.model.proj_dim = 16
  with pytest.raises(ConversionError, match="clip_proj.*model.proj_dim=16"):
    _init(bad)


def test_distilbert_values_and_outputs(sources):
  c = _config(text=sources["bert"])
  ref, params, report = _init(c)
  sd = _np(sources["text"].state_dict())
  t = params["text"]
  np.testing.assert_array_equal(t["word_embeddings"]["embedding"],
                                sd["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(t["layer_1"]["attention"]["v_lin"]["kernel"],
                                sd["transformer.layer.1.attention.v_lin.weight"].T)
  np.testing.assert_array_equal(t["layer_0"]["output_layer_norm"]["bias"],
                                sd["transformer.layer.0.output_layer_norm.bias"])
  np.testing.assert_array_equal(params["video"]["pos_embed"], ref["video"]["pos_embed"])
  assert report["text"]["vocab"].endswith("vocab.txt")
  assert "vocab_projector.bias" in report["text"]["ignored"]
  ids = np.random.default_rng(1).integers(1, 101, (2, 7)).astype(np.int32)
  am = np.ones_like(ids)
  am[1, 5:] = 0
  with torch.no_grad():
    want = sources["text"](torch.from_numpy(ids).long(), torch.from_numpy(am).long()).numpy()
  got = build(c.model).apply({"params": params}, ids, am, method="encode_text")["tokens"]
  np.testing.assert_allclose(np.asarray(got)[am == 1], want[am == 1], atol=1e-4)


def test_init_from_gs_equals_local(sources, gcs):
  """init.video / init.text on gs:// (the GCS emulator on 127.0.0.1): the same params as from
  the local files, for the .npz and .safetensors video layouts and the DistilBERT folder."""
  from miles_jax import paths
  paths.copy_tree(str(sources["dir"]), "gs://bucket/init")
  for video in ("vit.npz", "vit.safetensors"):
    local = _init(_config(video=str(sources["dir"] / video), text=sources["bert"]))[1:]
    remote = _init(_config(video=f"gs://bucket/init/{video}",
                           text="gs://bucket/init/distilbert"))[1:]
    jax.tree.map(np.testing.assert_array_equal, remote[0], local[0])
    assert remote[1]["video"]["format"] == local[1]["video"]["format"]
    assert remote[1]["text"]["vocab"] == "gs://bucket/init/distilbert/vocab.txt"
  with pytest.raises(FileNotFoundError, match="config.init.text"):
    public_init.read_distilbert("gs://bucket/init/nothing_here")
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_loud_failures(sources, tmp_path):
  from safetensors.numpy import save_file
  sd = dict(sources["sd"])
  del sd["blocks.0.attn.qkv.bias"]
  sd["blocks.0.ls1.gamma"] = np.ones(48, np.float32)
  save_file(sd, str(tmp_path / "broken.safetensors"))
  with pytest.raises(ConversionError) as e:
    _init(_config(video=str(tmp_path / "broken.safetensors")))
  assert "missing (1): blocks.0.attn.qkv.bias" in str(e.value)
  assert "unexpected (1): blocks.0.ls1.gamma" in str(e.value)

  wide = _config(video=str(sources["dir"] / "vit.safetensors"))
  wide.model.video.width, wide.model.video.num_heads = 64, 4
  with pytest.raises(ConversionError, match=r"shape mismatch.*blocks\.0\.attn\.qkv\.weight"):
    _init(wide)

  npz = dict(np.load(sources["dir"] / "vit.npz"))
  del npz["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"]
  np.savez(str(tmp_path / "broken.npz"), **npz)
  with pytest.raises(ConversionError, match="encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"):
    _init(_config(video=str(tmp_path / "broken.npz")))

  save_file({"foo.weight": np.zeros(3, np.float32)}, str(tmp_path / "odd.safetensors"))
  with pytest.raises(ConversionError, match="video_format"):
    _init(_config(video=str(tmp_path / "odd.safetensors")))
  with pytest.raises(ValueError, match="config.init.video_format"):
    _init(_config(video=str(tmp_path / "odd.safetensors"), video_format="vit"))
  with pytest.raises(FileNotFoundError, match="config.init.video"):
    _init(_config(video=str(tmp_path / "absent.npz")))

  small = _config(text=sources["bert"])
  small.model.text.width, small.model.text.num_heads = 20, 5
  with pytest.raises(ConversionError, match=r"dim=40 but model.text.width=20.*--config.model.text.width=40"):
    _init(small)
  bert = tmp_path / "bert"
  bert.mkdir()
  save_file({"bert.embeddings.word_embeddings.weight": np.zeros((3, 3), np.float32)},
            str(bert / "model.safetensors"))
  with pytest.raises(ConversionError, match="BERT checkpoint"):
    _init(_config(text=str(bert)))


@pytest.mark.slow
def test_convert_cli_exports_the_initialised_model(sources, tmp_path):
  out = str(tmp_path / "init")
  base = [sys.executable, "-m", "miles_jax.convert", "--config=configs/default.py:base",
          f"--out={out}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu")
  args = base + [f"--vit={sources['dir'] / 'vit.npz'}", f"--distilbert={sources['bert']}"]
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "time_init=zeros" in r.stdout and "data.tokenizer=" in r.stdout
  params, mc = checkpoints.load_params(out)
  np.testing.assert_array_equal(params["video"]["block_1"]["attn"]["proj"]["kernel"],
                                sources["sd"]["blocks.1.attn.proj.weight"].T)
  assert (params["video"]["block_0"]["timeattn"]["proj"]["kernel"] == 1).all()
  assert mc.video.width == 48
  r = subprocess.run(base + ["--checkpoint=x.pth", f"--vit={sources['dir'] / 'vit.npz'}"],
                     cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and "alternatives" in r.stderr
