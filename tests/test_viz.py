"""The appendix figures on a tiny random model: maps checked against numpy, files written."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from miles_jax import checkpoints, config_lib, pretrained, viz
from miles_jax.weights import torch_io
from miles_jax.models.dual_encoder import build

import helpers  # noqa: E402  (tests/support/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "dog", "runs", "on", "the", "grass"]


@pytest.fixture(scope="module")
def tiny():
  mc = config_lib.model_config("tiny")
  params = torch_io.init_model_params(mc, jax.random.PRNGKey(0))
  return mc, params


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS
  tokens += [f"w{i}" for i in range(1000 - len(tokens))]
  path.write_text("\n".join(tokens) + "\n")
  return str(path)


def _frames(t=3, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (t, size, size, 3)).astype(np.uint8)


def test_similarity_maps_by_hand():
  words = np.array([[1.0, 0, 0], [0, 2.0, 0]])
  patches = np.zeros((2 * 4, 3))  # T=2 frames of a 2x2 grid
  patches[:, 2] = 1.0
  patches[5] = [3.0, 0, 0]  # frame 1, row 0, col 1: aligned with word 0
  patches[2] = [0, -1.0, 0]  # frame 0, row 1, col 0: opposite to word 1
  sim = viz.similarity_maps(words, patches, 2)
  assert sim.shape == (2, 2, 2, 2)
  assert sim[0, 1, 0, 1] == pytest.approx(1.0) and sim[1, 0, 1, 0] == pytest.approx(-1.0)
  assert np.count_nonzero(sim) == 2


@pytest.mark.slow
def test_attention_is_the_last_blocks_cls_row(tiny):
  """Depth 1, T=1, time branch off: recompute the cls query's weights in numpy."""
  mc, params = tiny
  mc1 = config_lib.model_config("tiny")
  mc1.video.depth = 1
  video = {k: v for k, v in params["video"].items() if k != "block_1"}
  video["block_0"] = dict(video["block_0"], timeattn=jax.tree.map(np.zeros_like,
                                                                  video["block_0"]["timeattn"]))
  p1 = dict(params, video=video)
  frames = pretrained.normalize_frames(_frames(1))[None]
  ids = np.array([[2, 5, 6, 3]], np.int32)
  maps = viz.inspect(build(mc1), p1, frames, ids, np.ones_like(ids))

  v = jax.tree.map(np.asarray, video)
  p, d, h = mc1.video.patch_size, mc1.video.width, mc1.video.num_heads
  g = mc1.video.img_size // p
  x = frames[0, 0].reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3)
  x = x @ v["patch_embed"]["kernel"].reshape(p * p * 3, d) + v["patch_embed"]["bias"]
  x = x + v["pos_embed"][1:] + v["temporal_embed"][0]
  x = np.concatenate([v["cls_token"] + v["pos_embed"][:1], x])
  ln = v["block_0"]["norm1"]
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y = y * ln["scale"] + ln["bias"]
  qkv = (y @ v["block_0"]["attn"]["qkv"]["kernel"] + v["block_0"]["attn"]["qkv"]["bias"])
  qkv = qkv.reshape(len(x), 3, h, d // h)
  logits = np.einsum("hd,khd->hk", qkv[0, 0] * (d // h) ** -0.5, qkv[:, 1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = (w / w.sum(-1, keepdims=True)).mean(0)
  np.testing.assert_allclose(maps["attention"][0, 0], w[1:].reshape(g, g), atol=1e-5)
  np.testing.assert_allclose(maps["cls_self_attention"][0], w[0], atol=1e-5)


@pytest.mark.slow
def test_maps_of_the_full_model(tiny):
  mc, params = tiny
  model = build(mc)
  frames = pretrained.normalize_frames(_frames(3))[None]
  ids = np.array([[2, 5, 6, 7, 3, 0]], np.int32)
  am = (ids > 0).astype(np.int32)
  maps = viz.inspect(model, params, frames, ids, am)
  att = maps["attention"]
  assert att.shape == (1, 3, 4, 4)
  assert (att >= 0).all() and att.sum() <= 1 + 1e-5
  np.testing.assert_allclose(att.sum() + maps["cls_self_attention"][0], 1.0, atol=1e-5)
  # The sown weights of the *last* block, not the first.
  _, state = jax.jit(lambda p, f: model.apply({"params": p}, f, method="encode_video",
                                              mutable=["intermediates"]))(params, frames)
  inter = state["intermediates"]["video"]
  np.testing.assert_allclose(att.reshape(1, -1), inter["block_1"]["attn"]["cls_attention"][0][:, 1:],
                             atol=1e-6)
  assert np.abs(att.reshape(1, -1) - inter["block_0"]["attn"]["cls_attention"][0][:, 1:]).max() > 1e-4
  # Word and patch features are the projections of the last-layer tokens (numpy recomputation).
  out = jax.jit(lambda p, f: model.apply({"params": p}, f, method="encode_video"))(params, frames)
  text = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode_text"))(
      params, ids, am)["tokens"]
  vp, tp = params["video_proj"], params["text_proj"]
  np.testing.assert_allclose(maps["patch_features"],
                             np.asarray(out["patches"]) @ vp["kernel"] + vp["bias"], atol=1e-4)
  np.testing.assert_allclose(maps["word_features"],
                             np.maximum(np.asarray(text), 0) @ tp["kernel"] + tp["bias"], atol=1e-4)


def test_figures_and_shard_input(tiny, vocab, tmp_path):
  from PIL import Image
  from miles_jax.data import schema, tokenizers
  import tensorflow as tf
  mc, params = tiny
  shard = str(tmp_path / "clips.tfrecord")
  raw = _frames(8, size=40, seed=3)[:, :, :36]  # non-square source: centre crop
  with tf.io.TFRecordWriter(shard) as w:
    w.write(schema.make_example("v0", ["x"], _frames(2, 40)).SerializeToString())
    w.write(schema.make_example("v1", ["a dog runs on the grass"], raw).SerializeToString())
  frames, captions = viz.read_shard_clip(shard, 1, 4, 32)
  assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
  assert captions == ["a dog runs on the grass"]
  with pytest.raises(IndexError, match="only 2 records"):
    viz.read_shard_clip(shard, 5, 4, 32)

  model = pretrained.Pretrained(mc, params)
  tok = tokenizers.build_tokenizer(vocab, 16)
  res = viz.visualize(model, frames, captions[0], tok, vocab, str(tmp_path / "figs"))
  assert res["words"] == WORDS  # [CLS] / [SEP] / padding left out
  assert res["similarity"].shape == (6, 4, 4, 4)
  assert (np.abs(res["similarity"]) <= 1 + 1e-5).all()
  sizes = {}
  for name in ("attention", "alignment"):
    with Image.open(res["paths"][name]) as im:
      sizes[name] = im.size
    assert 400 <= sizes[name][0] <= 2000 and 200 <= sizes[name][1] <= 2000, sizes
  assert sizes["alignment"][1] > 2 * sizes["attention"][1]  # a row per word (7 rows vs 2)
  saved = np.load(res["paths"]["maps"])
  np.testing.assert_array_equal(saved["attention"], res["attention"])


def _write_video(path, frames, fps=8):
  import av
  with av.open(path, "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for f in frames:
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


def test_read_video_samples_the_middle_of_each_segment(tmp_path):
  levels = np.arange(12) * 20  # frame i is uniformly grey 20*i
  frames = np.broadcast_to(levels[:, None, None, None], (12, 48, 64, 3)).astype(np.uint8)
  path = str(tmp_path / "v.mp4")
  _write_video(path, np.ascontiguousarray(frames))
  got = viz.read_video(path, 4, 32)
  assert got.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(viz.frame_indices(12, 4), [1, 4, 7, 10])
  np.testing.assert_allclose(got.reshape(4, -1).mean(1), levels[[1, 4, 7, 10]], atol=6)


@pytest.mark.slow
def test_cli(tiny, vocab, tmp_path):
  mc, params = tiny
  ckpt = str(tmp_path / "model")
  checkpoints.save_params(ckpt, params, mc)
  video = str(tmp_path / "v.mp4")
  _write_video(video, _frames(10, size=48, seed=5))
  out = str(tmp_path / "figs")
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "miles_jax.viz", f"--checkpoint={ckpt}",
                      f"--video={video}", "--caption=a dog runs", f"--tokenizer={vocab}",
                      f"--out={out}"], cwd=ROOT, capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  import matplotlib.image as mpimg
  maps = np.load(os.path.join(out, "maps.npz"))
  assert maps["attention"].shape == (4, 4, 4)  # [T, h, w] of the 32 px, patch 8 model
  # each figure reads back as an image with a column per frame (wider than tall) and, for the
  # alignment figure, a row per word under the frames
  att = mpimg.imread(os.path.join(out, "attention.png"))
  ali = mpimg.imread(os.path.join(out, "alignment.png"))
  assert att.shape[1] > att.shape[0] and ali.shape[1] == att.shape[1]
  assert ali.shape[0] > att.shape[0] * (1 + len(maps["words"])) / 2 * 0.8


def _panels(img, colour, tol=2):
  """Bounding boxes (y0, y1, x0, x1) of the connected-in-x runs of pixels of exactly `colour`."""
  hit = (np.abs(img.astype(int) - np.asarray(colour)).max(-1) <= tol)
  ys, xs = np.nonzero(hit)
  return hit, (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if len(ys) else None


def test_attention_png_shows_the_frames_and_the_heat_map(tmp_path):
  """Read back: the top row shows each frame (its colour, left to right in order); below each,
  the heat map's hottest cell is where the attention puts it, on a grid of the map's shape."""
  import matplotlib.image as mpimg
  import matplotlib.pyplot as plt
  colours = [(255, 0, 255), (0, 120, 90), (150, 75, 0), (90, 40, 160)]  # not in jet, not grey
  frames = np.stack([np.broadcast_to(np.uint8(c), (64, 64, 3)) for c in colours])
  hot = [(0, 1), (2, 3), (3, 0), (1, 2)]  # (row, col) of each frame's hottest cell on a 4x4 grid
  attention = np.full((4, 4, 4), 0.01, np.float32)
  for t, (r, c) in enumerate(hot):
    attention[t, r, c] = 0.5
  path = viz.plot_attention(frames, attention, "a test clip", str(tmp_path / "attention.png"))
  img = np.round(mpimg.imread(path)[..., :3] * 255).astype(np.uint8)
  cold = np.asarray(plt.get_cmap("jet")(0.0)[:3]) * 255
  for t, (colour, (r, c)) in enumerate(zip(colours, hot)):
    _, box = _panels(img, colour)
    assert box is not None, f"frame {t}'s colour is not in the figure"
    y0, y1, x0, x1 = box
    assert (y1 - y0) > 50 and abs((y1 - y0) - (x1 - x0)) <= 2  # a square frame, drawn whole
    if t:
      assert x0 > prev_x1  # frames left to right in clip order
    prev_x1 = x1
    # The overlay panel below: the frame blended with the colour map's coldest colour.
    blend = 0.6 * cold + 0.4 * np.asarray(colour)
    below = img[y1:, x0:x1]
    hit, b = _panels(below, blend, tol=4)
    assert b is not None, f"no heat map under frame {t}"
    by0, by1, bx0, bx1 = b
    side = by1 - by0
    assert abs(side - (y1 - y0)) <= 2 and abs((bx1 - bx0) - (x1 - x0)) <= 2
    panel = below[by0:by1, bx0:bx1].astype(float)
    dist = np.abs(panel - blend).sum(-1)  # how far from cold, per pixel
    cell = dist.reshape(4, side // 4, 4, side // 4).mean((1, 3)) if side % 4 == 0 else \
        np.array([[dist[i * side // 4:(i + 1) * side // 4, j * side // 4:(j + 1) * side // 4].mean()
                   for j in range(4)] for i in range(4)])
    assert np.unravel_index(cell.argmax(), cell.shape) == (r, c), (t, cell.round(1))
