"""Look inside the model: the MILES appendix's two figures as PNG files.

    python -m miles_jax.viz --checkpoint=DIR|model.pth --video=clip.mp4 \\
        --caption="a man is playing a guitar" --tokenizer=vocab.txt --out=figs
    python -m miles_jax.viz --checkpoint=DIR --shard=msrvtt-test-00000-of-00004.tfrecord \\
        --index=7 --tokenizer=vocab.txt --out=figs     # caption: the record's first one

  attention.png  the last block's cls-query spatial attention over every patch (heads averaged),
                 a heat map over each frame (appendix fig. 1);
  alignment.png  cosine similarity between each word's feature (its last-layer token through the
                 text projection) and every patch feature (last-layer patch token through the
                 video projection), one row per word over each frame (appendix fig. 2);
  maps.npz       the raw maps (attention [T, h, w], similarity [W, T, h, w], words, frames).

Frames: T evenly spaced (the middle frame of each of T equal segments, as evaluation samples),
centre square cropped and resized to model.video.img_size. `--video` may also be an image.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from miles_jax import paths as uri
from miles_jax.models.dual_encoder import DualEncoder


# ----------------------------------------------------------------------------- the maps

def similarity_maps(words, patches, num_frames: int):
  """Cosine of word features `[W, P]` with patch features `[T*N, P]` -> `[W, T, h, w]`."""
  words = np.asarray(words, np.float32)
  patches = np.asarray(patches, np.float32)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  sim = unit(words) @ unit(patches).T  # [W, T*N]
  n = patches.shape[0] // num_frames
  g = int(round(n ** 0.5))
  return sim.reshape(len(words), num_frames, g, n // g)


def inspect(model: DualEncoder, params, frames, input_ids, attention_mask) -> dict:
  """One forward pass -> `attention` `[B, T, h, w]` (last block's cls weights over patches),
  `word_features` `[B, L, P]`, `patch_features` `[B, T*N, P]`."""
  c = model.config.video
  b, t = frames.shape[:2]
  g = c.img_size // c.patch_size

  def run(p, f, ids, am):
    v, state = model.apply({"params": p}, f, method="encode_video", mutable=["intermediates"])
    weights = state["intermediates"]["video"][f"block_{c.depth - 1}"]["attn"]["cls_attention"][0]
    text = model.apply({"params": p}, ids, am, method="encode_text")
    words = model.apply({"params": p}, text["tokens"], method="project_text")
    patches = model.apply({"params": p}, v["patches"], method="project_video")
    return weights, words, patches

  weights, words, patches = jax.jit(run)(params, jnp.asarray(frames, jnp.float32),
                                         jnp.asarray(input_ids, jnp.int32),
                                         jnp.asarray(attention_mask, jnp.int32))
  weights = np.asarray(weights)  # [B, 1+T*N]: index 0 is the cls key itself
  return {"attention": weights[:, 1:].reshape(b, t, g, g), "cls_self_attention": weights[:, 0],
          "word_features": np.asarray(words), "patch_features": np.asarray(patches)}


# ----------------------------------------------------------------------------- figures

def _figure(rows: int, cols: int, caption: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols + 1.2, 2.0 * rows + 0.6),
                           squeeze=False, layout="constrained")
  fig.suptitle(textwrap.fill(caption, 60 + 20 * cols), fontsize=10)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return plt, fig, axes


def _overlay(ax, frame, heat, vmin, vmax, cmap):
  h, w = frame.shape[:2]
  ax.imshow(frame)
  # The heat map covers exactly the frame's pixels (imshow centres pixels on integers).
  return ax.imshow(heat, extent=(-0.5, w - 0.5, h - 0.5, -0.5), alpha=0.6, cmap=cmap, vmin=vmin,
                   vmax=vmax, interpolation="bilinear")


def plot_attention(frames, attention, caption: str, path: str) -> str:
  """uint8 frames `[T, H, W, 3]` + attention `[T, h, w]` -> PNG: frames over their heat maps."""
  t = len(frames)
  plt, fig, axes = _figure(2, t, f"cls attention, last block (heads averaged) — {caption}")
  # One colour scale for all frames (min..max of the clip) so frames compare; the colour bar
  # shows the weights themselves.
  vmin, vmax = float(attention.min()), float(attention.max())
  vmax = vmax if vmax > vmin else vmin + 1e-6
  for i in range(t):
    axes[0, i].imshow(frames[i])
    axes[0, i].set_title(f"frame {i}", fontsize=8)
    im = _overlay(axes[1, i], frames[i], attention[i], vmin, vmax, "jet")
    axes[1, i].set_title(f"sum {attention[i].sum():.3f}", fontsize=8)
  fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_alignment(frames, similarity, words, caption: str, path: str) -> str:
  """uint8 frames `[T, H, W, 3]` + similarity `[W, T, h, w]` -> PNG: one row per word."""
  t = len(frames)
  plt, fig, axes = _figure(1 + len(words), t, f"word-to-patch cosine similarity — {caption}")
  # Diverging colours centred on cosine 0: red aligned, blue opposed.
  vmax = max(float(np.abs(similarity).max()), 1e-6)
  vmin = -vmax
  im = None
  for i in range(t):
    axes[0, i].imshow(frames[i])
    axes[0, i].set_title(f"frame {i}", fontsize=8)
    for j, word in enumerate(words):
      im = _overlay(axes[1 + j, i], frames[i], similarity[j, i], vmin, vmax, "coolwarm")
      if i == 0:
        axes[1 + j, 0].set_ylabel(word, fontsize=9, rotation=0, ha="right", va="center")
  if im is not None:
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.01)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- inputs

def frame_indices(n: int, num_frames: int) -> np.ndarray:
  """The middle frame of each of `num_frames` equal segments of n (evaluation sampling)."""
  t = np.arange(num_frames)
  return np.minimum(((2 * t + 1) * n) // (2 * num_frames), n - 1)


def center_square(frame: np.ndarray, size: int) -> np.ndarray:
  """uint8 `[H, W, 3]` -> the centred square of the short side, resized to `size`."""
  from PIL import Image
  h, w = frame.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = Image.fromarray(frame[top:top + s, left:left + s])
  return np.asarray(img.resize((size, size), Image.BICUBIC))


def read_video(path: str, num_frames: int, size: int) -> np.ndarray:
  """A video (PyAV) or an image -> uint8 `[T, size, size, 3]` (an image gives T=1)."""
  if not uri.exists(path):
    raise FileNotFoundError(f"--video={path} does not exist")
  if uri.is_uri(path):  # gs://: decode a local copy
    with uri.local_file(path) as local:
      return read_video(local, num_frames, size)
  if path.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp")):
    from PIL import Image
    return center_square(np.asarray(Image.open(path).convert("RGB")), size)[None]
  import av
  with av.open(path) as container:
    n = sum(1 for _ in container.decode(video=0))
  if n == 0:
    raise ValueError(f"--video={path}: no decodable video frames")
  want = frame_indices(n, num_frames)
  out = {}
  with av.open(path) as container:
    for i, frame in enumerate(container.decode(video=0)):
      if i in want:
        out[i] = center_square(frame.to_ndarray(format="rgb24"), size)
  return np.stack([out[i] for i in want])


def read_shard_clip(path: str, index: int, num_frames: int, size: int):
  """Record `index` of a TFRecord shard (miles_jax.data.schema) -> (uint8 frames, captions)."""
  import tensorflow as tf
  from miles_jax.data import pipeline, schema
  if not uri.exists(path):
    raise FileNotFoundError(f"--shard={path} does not exist")
  count = 0
  for raw in tf.data.TFRecordDataset(path):
    if count == index:
      ex = schema.parse_example(raw)
      frames = pipeline.eval_clip(ex, num_frames, size)[0].numpy()
      return frames, [c.decode() for c in ex["captions"].numpy()]
    count += 1
  raise IndexError(f"--index={index}: {path} has only {count} records")


def token_strings(tokenizer_path: str, ids) -> list:
  """Token ids -> their text (vocab.txt lines, sentencepiece pieces, or the ids)."""
  if tokenizer_path.endswith(".txt"):
    with open(tokenizer_path, encoding="utf-8") as f:
      vocab = [line.rstrip("\n") for line in f]
    return [vocab[i] if i < len(vocab) else str(i) for i in ids]
  if tokenizer_path.endswith(".model"):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    return [sp.id_to_piece(int(i)) for i in ids]
  return [str(i) for i in ids]


def visualize(pretrained_model, frames_uint8, caption: str, tokenizer, tokenizer_path: str,
              out_dir: str) -> dict:
  """Both figures (+ maps.npz) for one clip and caption; returns the written paths and maps."""
  from miles_jax.pretrained import normalize_frames
  ids, mask = tokenizer.tokenize_numpy([caption])
  maps = inspect(pretrained_model.module, pretrained_model.params,
                 normalize_frames(frames_uint8)[None], ids, mask)
  special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
  keep = [i for i in range(ids.shape[1]) if mask[0, i] and ids[0, i] not in special]
  words = token_strings(tokenizer_path, [int(ids[0, i]) for i in keep])
  t = frames_uint8.shape[0]
  sim = similarity_maps(maps["word_features"][0, keep], maps["patch_features"][0], t)
  attention = maps["attention"][0]
  with uri.local_dir(out_dir) as local:  # a gs:// --out is written locally, then copied
    plot_attention(frames_uint8, attention, caption, os.path.join(local, "attention.png"))
    plot_alignment(frames_uint8, sim, words, caption, os.path.join(local, "alignment.png"))
    np.savez(os.path.join(local, "maps.npz"), attention=attention, similarity=sim,
             words=np.asarray(words), frames=frames_uint8,
             cls_self_attention=maps["cls_self_attention"][0])
  paths = {k: uri.join(out_dir, f) for k, f in
           (("attention", "attention.png"), ("alignment", "alignment.png"), ("maps", "maps.npz"))}
  return {"paths": paths, "attention": attention, "similarity": sim, "words": words}


# ----------------------------------------------------------------------------- command line

def main(argv):
  from absl import flags
  from miles_jax import pretrained
  from miles_jax.data import tokenizers

  f = flags.FLAGS
  config = f.config
  err = lambda msg: (print(f"error: {msg}", file=sys.stderr), 2)[1]
  if not f.checkpoint or not f.out:
    return err("--checkpoint and --out are required (see --help)")
  if bool(f.video) == bool(f.shard):
    return err("pass exactly one of --video (a video or image file) or --shard (+ --index)")
  tokenizer_path = f.tokenizer or config.data.tokenizer
  try:
    # An exported directory carries its own model config; a .pth uses --config's model.
    model = pretrained.load(f.checkpoint, None if uri.isdir(f.checkpoint) else config)
    v = model.config.video
    num_frames = min(f.frames or config.data.num_frames, v.num_frames)
    if f.video:
      frames, captions = read_video(f.video, num_frames, v.img_size), []
    else:
      frames, captions = read_shard_clip(f.shard, f.index, num_frames, v.img_size)
    caption = f.caption or (captions[0] if captions else "")
    if not caption:
      return err("--caption is required with --video (a shard record supplies its own)")
    max_len = min(config.data.max_len, model.config.text.max_len)
    tokenizer = tokenizers.build_tokenizer(tokenizer_path, max_len)
    result = visualize(model, frames, caption, tokenizer, tokenizer_path, f.out)
  except (FileNotFoundError, ValueError, IndexError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for name, path in result["paths"].items():
    print(f"{name}: {path}")
  return 0


def cli():
  from absl import flags
  from miles_jax import cli as cli_lib
  from miles_jax import config_lib

  cli_lib.define_config_file(
      "config", config_lib.default_config_path(),
      "Config file: its model section is used for a .pth checkpoint (an exported directory "
      "carries its own), data.tokenizer / data.max_len / data.num_frames as defaults.")
  flags.DEFINE_string("checkpoint", None, "Exported model directory (convert / train export) or "
                      "a PyTorch .pth / .safetensors in the released layout.")
  flags.DEFINE_string("video", None, "Video file (decoded with PyAV) or image file.")
  flags.DEFINE_string("shard", None, "TFRecord shard (miles_jax.data.schema) instead of --video.")
  flags.DEFINE_integer("index", 0, "Record of --shard to show.")
  flags.DEFINE_string("caption", None, "Caption to align; default: the record's first caption.")
  flags.DEFINE_string("tokenizer", None, "vocab.txt or sentencepiece .model; default "
                      "config.data.tokenizer.")
  flags.DEFINE_integer("frames", None, "Frames to sample (default config.data.num_frames, at most "
                       "model.video.num_frames).")
  flags.DEFINE_string("out", None, "Output directory for attention.png, alignment.png, maps.npz.")
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
