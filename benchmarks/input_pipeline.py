r"""B4: input pipeline throughput, TFRecord shards vs. decoding mp4 with PyAV per clip.

  python benchmarks/input_pipeline.py            # full size: 4 frames at 224^2 from 256 px
  python benchmarks/input_pipeline.py --quick    # tiny, seconds (used by a test)
  python benchmarks/input_pipeline.py --json     # last line: one JSON object with every figure

Generates its own data: N clips of procedural moving shapes (synthetic.py renderer) with
background noise at 256x340, written (a) as h264 mp4 of `--mp4-frames` frames at 25 fps and
(b) as TFRecord shards holding `--stored-frames` evenly spaced frames of the same clips as JPEG
q90, which is what `prepare --frames_per_clip=8 --resolution=256` stores.

Measured, after warm-up, median of `--runs` runs:
* tfrecord: `pipeline.build_train_dataset` — parse, random frame per segment, random resized
  crop (decode only the crop window) + flip to 224^2, uint8, caption tokenized in-graph,
  blockwise mask 0.5 — batched. Once with tf.data limited to 1 thread, once with all cores.
* mp4 (baseline, what PyTorch video loaders do per clip): PyAV open + decode the clip's frames,
  keep one random frame per segment, the same kind of random crop, resize to 224^2 (swscale).
  No tokenization or masking, so the baseline is, if anything, favoured.
"clips per CPU-second" divides clips by the process CPU time of the run (all threads), i.e.
clips/s per core, and is robust to other load on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from miles_jax import config_lib  # noqa: E402
from miles_jax.data import pipeline, prepare, schema, synthetic, tokenizers  # noqa: E402


def make_data(root: str, num_clips: int, mp4_clips: int, mp4_frames: int, stored: int,
              short: int, seed: int):
  """Writes train-*.tfrecord + vocab.txt, and clip{i}.mp4 for the first mp4_clips of the same
  clips; returns the mp4 paths."""
  rng = np.random.default_rng(seed)
  long = int(round(short * 340 / 256))
  top = (long - short) // 2
  mp4s, records = [], []
  for i in range(num_clips):
    parts = synthetic.sample_parts(rng)
    keep = prepare.middle_indices(mp4_frames, stored)
    with_mp4 = i < mp4_clips
    # clips without an mp4 are rendered at the stored frames only (rendering is slow)
    clip = synthetic.render_clip(rng, long, mp4_frames if with_mp4 else len(keep), parts)
    clip = clip[:, top:top + short]
    # texture: JPEG/h264 cost on flat synthetic frames would be unrealistically low
    clip = np.clip(clip.astype(np.int16) + rng.integers(-12, 13, clip.shape[1:]), 0, 255
                   ).astype(np.uint8)
    records.append(schema.make_example(f"clip{i:04d}", [synthetic.caption(parts)],
                                       clip[keep] if with_mp4 else clip,
                                       fps=25.0).SerializeToString())
    if not with_mp4:
      continue
    path = os.path.join(root, f"clip{i:04d}.mp4")
    with av.open(path, "w") as c:
      s = c.add_stream("libx264", rate=25)
      s.width, s.height, s.pix_fmt = long, short, "yuv420p"
      for f in clip:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
          c.mux(p)
      for p in s.encode():
        c.mux(p)
    mp4s.append(path)
  shards = 4
  for s in range(shards):
    prepare.write_records(os.path.join(root, prepare.shard_name("train", s, shards)),
                          records[s::shards])
  with open(os.path.join(root, "vocab.txt"), "w") as f:
    f.write("\n".join(synthetic.vocabulary()) + "\n")
  return mp4s


def _timed(fn, runs: int):
  """Median wall seconds and median CPU seconds of `runs` calls (after the caller's warm-up)."""
  walls, cpus = [], []
  for _ in range(runs):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return statistics.median(walls), statistics.median(cpus)


def bench_tfrecord(root, size, patch, frames, batch, clips_per_run, runs, threads):
  c = config_lib.default_config()
  c.model.video.img_size, c.model.video.patch_size = size, patch
  c.data.num_frames, c.data.batch_size, c.data.shuffle_buffer = frames, batch, 64
  c.data.train = os.path.join(root, "train-*.tfrecord")
  tok = tokenizers.build_tokenizer(os.path.join(root, "vocab.txt"), c.data.max_len)
  ds = pipeline.build_train_dataset(c, pipeline.list_files(c.data.train), tok, seed=0).repeat()
  if threads:
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(opts)
  it = ds.as_numpy_iterator()
  steps = max(1, clips_per_run // batch)
  for _ in range(steps):  # warm-up: graph, buffers, autotune
    b = next(it)
  assert b["frames"].shape == (batch, frames, size, size, 3) and b["frames"].dtype == np.uint8

  def run():
    for _ in range(steps):
      next(it)
  wall, cpu = _timed(run, runs)
  return steps * batch / wall, steps * batch / cpu


def decode_mp4_clip(path, rng, frames, size, crop_scale=(0.5, 1.0)):
  """The per-clip PyTorch-loader way: decode the clip, one random frame per segment, crop."""
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "NONE"  # one core per loader worker
    decoded = list(c.decode(stream))
  n = len(decoded)
  bounds = np.linspace(0, n, frames + 1).astype(int)
  idx = [int(rng.integers(lo, max(hi, lo + 1))) for lo, hi in zip(bounds[:-1], bounds[1:])]
  h, w = decoded[0].height, decoded[0].width
  area = rng.uniform(*crop_scale) * h * w
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  ch = int(min(h, round(np.sqrt(area / aspect))))
  cw = int(min(w, round(np.sqrt(area * aspect))))
  y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  out = []
  for i in idx:
    rgb = decoded[min(i, n - 1)].to_ndarray(format="rgb24")[y:y + ch, x:x + cw]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    out.append(frame.reformat(width=size, height=size, interpolation="BILINEAR").to_ndarray())
  clip = np.stack(out)
  if rng.random() < 0.5:
    clip = clip[:, :, ::-1]
  return clip


def bench_mp4(mp4s, size, frames, clips_per_run, runs):
  rng = np.random.default_rng(0)
  for p in mp4s[:2]:
    decode_mp4_clip(p, rng, frames, size)
  paths = [mp4s[i % len(mp4s)] for i in range(clips_per_run)]

  def run():
    for p in paths:
      decode_mp4_clip(p, rng, frames, size)
  wall, cpu = _timed(run, runs)
  return len(paths) / wall, len(paths) / cpu


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script works")
  p.add_argument("--json", action="store_true")
  p.add_argument("--clips", type=int, default=128)
  p.add_argument("--mp4-frames", type=int, default=32,
                 help="frames per mp4: 32 = 1.3 s at 25 fps, far shorter than dataset videos "
                      "(WebVid ~18 s), so the baseline is favoured")
  p.add_argument("--mp4-clips", type=int, default=32, help="clips also written as mp4")
  p.add_argument("--stored-frames", type=int, default=8)
  p.add_argument("--short-side", type=int, default=256)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--frames", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--runs", type=int, default=5)
  a = p.parse_args(argv)
  if a.quick:
    a.clips, a.mp4_clips, a.mp4_frames, a.short_side, a.size, a.batch = 8, 8, 8, 48, 32, 4
  patch = 16 if a.size % 16 == 0 else 8
  root = tempfile.mkdtemp(prefix="b4_")
  t0 = time.time()
  mp4s = make_data(root, a.clips, a.mp4_clips, a.mp4_frames, a.stored_frames, a.short_side, 0)
  gen_s = time.time() - t0
  per_run = a.clips
  tf1_wall, tf1_cpu = bench_tfrecord(root, a.size, patch, a.frames, a.batch, per_run, a.runs, 1)
  tfall_wall, tfall_cpu = bench_tfrecord(root, a.size, patch, a.frames, a.batch, per_run, a.runs,
                                         0)
  mp4_wall, mp4_cpu = bench_mp4(mp4s, a.size, a.frames, len(mp4s), a.runs)
  shutil.rmtree(root, ignore_errors=True)
  res = {
      "frames": a.frames, "size": a.size, "short_side": a.short_side, "clips": a.clips,
      "mp4_frames": a.mp4_frames, "mp4_clips": len(mp4s), "stored_frames": a.stored_frames, "runs": a.runs,
      "cpu_count": os.cpu_count(),
      "tfrecord_clips_per_s_1thread": round(tf1_wall, 1),
      "tfrecord_clips_per_cpu_s": round(tf1_cpu, 1),
      "tfrecord_clips_per_s_all_cores": round(tfall_wall, 1),
      "tfrecord_all_cores_clips_per_cpu_s": round(tfall_cpu, 1),
      "mp4_clips_per_s_1thread": round(mp4_wall, 1),
      "mp4_clips_per_cpu_s": round(mp4_cpu, 1),
      "speedup_per_cpu_s": round(tf1_cpu / mp4_cpu, 2),
      "speedup_1thread_wall": round(tf1_wall / mp4_wall, 2),
      "target_clips_per_s_per_core": 150, "target_speedup": 5.0,
      "generate_s": round(gen_s, 1),
  }
  res["meets_target"] = bool(res["tfrecord_clips_per_cpu_s"] >= 150 and
                             res["speedup_per_cpu_s"] >= 5.0)
  print(f"B4 input pipeline: {a.frames} frames at {a.size}^2 from {a.short_side} px, "
        f"{a.clips} clips, median of {a.runs} runs, {os.cpu_count()} CPUs")
  print(f"{'path':<38}{'clips/s 1 thread':>18}{'clips/CPU-s':>14}{'clips/s all':>13}")
  print(f"{'tfrecord (augment+tokenize+mask)':<38}{tf1_wall:>18.1f}{tf1_cpu:>14.1f}"
        f"{tfall_wall:>13.1f}")
  print(f"{'mp4 + PyAV per clip (decode+crop)':<38}{mp4_wall:>18.1f}{mp4_cpu:>14.1f}"
        f"{'-':>13}")
  print(f"{'ratio tfrecord / mp4':<38}{tf1_wall / mp4_wall:>18.2f}{tf1_cpu / mp4_cpu:>14.2f}")
  print(f"target: >= 150 clips/s/core and >= 5x mp4 -> "
        f"{'met' if res['meets_target'] else 'NOT met'}")
  if a.json:
    print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
