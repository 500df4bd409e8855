"""PyTorch -> Flax conversion: key mapping, loud failures, and numerical agreement (<= 1e-4)."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")

from miles_jax import checkpoints, config_lib, pretrained  # noqa: E402
from miles_jax.weights import torch_io  # noqa: E402

import helpers  # noqa: E402  (tests/support/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import TINY_OVERRIDES, apply_overrides  # noqa: E402
from torch_reference import RefDualEncoder, randomize_  # noqa: E402

# Tiny dims on purpose unlike the defaults (set through config overrides in the CLI test).
OVERRIDES = TINY_OVERRIDES


def _config():
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  apply_overrides(c, OVERRIDES)
  return c


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A checkpoint in the released layout: {'state_dict': {'module.…': tensor}}."""
  torch.manual_seed(0)
  mc = _config().model
  ref = randomize_(RefDualEncoder(mc).eval(), seed=1)
  sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
  d = tmp_path_factory.mktemp("released")
  pth = str(d / "miles_tiny.pth")
  torch.save({"state_dict": sd, "epoch": 3}, pth)
  from safetensors.torch import save_file
  st = str(d / "miles_tiny.safetensors")
  save_file({k: v.contiguous() for k, v in sd.items()}, st)
  return ref, pth, st


def _inputs(mc, frames=4, seed=0):
  rng = np.random.default_rng(seed)
  video = rng.standard_normal((2, frames, mc.video.img_size, mc.video.img_size, 3)).astype(
      np.float32)
  ids = rng.integers(1, mc.text.vocab_size, (2, 9)).astype(np.int32)
  am = np.ones_like(ids)
  am[1, 6:] = 0
  return video, ids, am


def _torch_embed(ref, video, ids, am):
  with torch.no_grad():
    v = ref.encode_video(torch.from_numpy(video)).numpy()
    t = ref.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(am).long()).numpy()
  return v, t


def test_no_zero_left_in_reference(released):
  ref, _, _ = released
  for name, p in ref.named_parameters():
    assert (p != 0).all(), name


@pytest.mark.parametrize("fmt,kernels", [
    ("pth", "reference"), pytest.param("safetensors", "reference", marks=pytest.mark.slow),
    pytest.param("pth", "xla_cpu", marks=pytest.mark.slow)])
def test_converted_model_reproduces_pytorch(released, fmt, kernels):
  """Both kernel paths (model.kernels) reproduce the PyTorch original's embeddings."""
  ref, pth, st = released
  mc = _config().model
  mc.kernels = kernels
  model = pretrained.load(pth if fmt == "pth" else st, mc)
  for frames in (4, 2):  # fewer frames than the temporal table at inference
    video, ids, am = _inputs(mc, frames)
    tv, tt = _torch_embed(ref, video, ids, am)
    jv, jt = model.encode_video(video), model.encode_text(ids, am)
    assert np.abs(jv - tv).max() <= 1e-4, np.abs(jv - tv).max()
    assert np.abs(jt - tt).max() <= 1e-4, np.abs(jt - tt).max()
    assert np.abs(tv).max() > 0.1 and np.abs(tt).max() > 0.1  # not trivially small


@pytest.mark.slow
def test_cli_round_trip(released, tmp_path):
  ref, pth, _ = released
  out = str(tmp_path / "converted")
  args = [sys.executable, "-m", "miles_jax.convert", "--config=configs/default.py:base",
          f"--checkpoint={pth}", f"--out={out}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu")
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "converted" in r.stdout and "mask_token" in r.stdout
  # round trip: orbax params equal the torch tensors, and embeddings agree
  params, mc = checkpoints.load_params(out)
  sd = ref.state_dict()
  np.testing.assert_array_equal(params["video"]["block_1"]["timeattn"]["qkv"]["kernel"],
                                sd["video_model.blocks.1.timeattn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(params["text"]["word_embeddings"]["embedding"],
                                sd["text_model.embeddings.word_embeddings.weight"].numpy())
  model = pretrained.load(out)
  video, ids, am = _inputs(mc, 4, seed=3)
  tv, tt = _torch_embed(ref, video, ids, am)
  assert np.abs(model.encode_video(video) - tv).max() <= 1e-4
  assert np.abs(model.encode_text(ids, am) - tt).max() <= 1e-4
  # a non-empty --out is not overwritten
  r2 = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert r2.returncode == 2 and "--overwrite" in r2.stderr


def test_help_documents_the_command():
  r = subprocess.run([sys.executable, "-m", "miles_jax.convert", "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0
  for word in ("--checkpoint", "--out", "--config", "safetensors", "temporal_fill"):
    assert word in r.stdout


@pytest.mark.slow
def test_mismatches_fail_naming_keys(released):
  _, pth, _ = released
  mc = _config().model
  sd = torch_io.read_state_dict(pth)
  broken = dict(sd)
  del broken["video_model.blocks.0.attn.qkv.bias"]
  broken["video_model.head.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(torch_io.ConversionError) as e:
    torch_io.convert_state_dict(broken, mc)
  msg = str(e.value)
  assert "video_model.blocks.0.attn.qkv.bias" in msg and "video_model.head.weight" in msg
  wrong = config_lib.model_config("base")
  wrong.update(mc)
  wrong.video.width = 96
  with pytest.raises(torch_io.ConversionError, match="shape mismatch.*video_model"):
    torch_io.convert_state_dict(sd, wrong)
  # fewer temporal rows (1-frame curriculum stage): loud unless asked to zero-fill
  short = dict(sd)
  short["video_model.temporal_embed"] = sd["video_model.temporal_embed"][:, :1]
  with pytest.raises(torch_io.ConversionError, match="temporal_embed"):
    torch_io.convert_state_dict(short, mc)
  params, _ = torch_io.convert_state_dict(short, mc, temporal_fill="zeros")
  assert (params["video"]["temporal_embed"][1:] == 0).all()


@pytest.mark.slow
def test_orbax_checkpoint_of_another_architecture_is_refused(released, tmp_path):
  _, pth, _ = released
  mc = _config().model
  params, _ = torch_io.convert_state_dict(torch_io.read_state_dict(pth), mc)
  out = str(tmp_path / "m")
  checkpoints.save_params(out, params, mc)
  other = config_lib.model_config("tiny")
  with pytest.raises(checkpoints.ArchitectureMismatch, match="model.video.width"):
    checkpoints.load_params(out, other)


def test_unknown_override_is_one_error_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "miles_jax.convert", "--config.model.video.widht=3",
                      "--checkpoint=x.pth", f"--out={tmp_path / 'o'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert 'Did you mean "width"' in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "o").exists()
