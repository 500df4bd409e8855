r"""Raw dataset -> TFRecord shards of the clip schema (miles_jax/data/schema.py).

  python -m miles_jax.data.prepare --format msrvtt \
      --annotations MSRVTT_JSFUSION_test.csv --media-dir videos/all --out data/msrvtt \
      --split test --num-shards 8 --frames-per-clip 8 --resolution 256 --workers 8

Each item is decoded with PyAV, K evenly spaced frames are kept (the middle frame of K equal
segments; K=0 keeps all), the short side is resized to R (swscale AREA), frames are stored as
JPEG. Train items are spread over the shards in a seeded random order (`shard_order`: shard s
gets every num_shards-th item of a permutation), so a shard, and a host reading a few shards,
sees a sample of the whole set rather than one stretch of the annotation file; other splits keep
annotation order (item i to shard `i % num_shards`). Shards are written under a
temporary name and renamed when complete, with a `.{shard}.json` sidecar; a rerun skips shards
whose file and sidecar exist for the same items. Missing files, empty captions and unreadable
videos are skipped and listed in `out/report.json` (one entry per split), never fatal.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Iterable, Optional

import numpy as np

from miles_jax.data import readers


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records to `path` atomically (temp name, then rename); returns count."""
  import tensorflow as tf
  tmp = path + ".tmp"
  n = 0
  with tf.io.TFRecordWriter(tmp) as w:
    for r in records:
      w.write(r)
      n += 1
  os.replace(tmp, path)
  return n


def resized_hw(height: int, width: int, resolution: int) -> tuple:
  """(h, w) with the short side = resolution, aspect kept (resolution 0: unchanged)."""
  if resolution <= 0:
    return height, width
  if height <= width:
    return resolution, max(1, int(round(width * resolution / height)))
  return max(1, int(round(height * resolution / width))), resolution


def middle_indices(n: int, k: int) -> list:
  """Middle frame of each of k equal segments of n frames (all n when k == 0 or k >= n)."""
  if k <= 0 or k >= n:
    return list(range(n))
  return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def _to_rgb(frame, resolution: int) -> np.ndarray:
  h, w = resized_hw(frame.height, frame.width, resolution)
  if (h, w) == (frame.height, frame.width):
    return frame.to_ndarray(format="rgb24")
  return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()


def _decode_pass(path: str, keep: Optional[set], resolution: int):
  import av
  frames, times, count = [], [], 0
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = float(stream.average_rate or 0.0)
    for frame in container.decode(stream):
      if keep is None or count in keep:
        frames.append(_to_rgb(frame, resolution))
        times.append(float(frame.time) if frame.time is not None else count / (fps or 1.0))
      count += 1
  return frames, times, count, fps


def decode_video(path: str, frames_per_clip: int, resolution: int, is_image: bool = False):
  """PyAV decode -> (uint8 [K, h, w, 3], timestamps [K], fps). Raises on unreadable media."""
  import av
  if is_image:
    frames, times, _, _ = _decode_pass(path, {0}, resolution)
    if not frames:
      raise ValueError("no decodable frames")
    return np.stack(frames[:1]), [0.0], 0.0
  keep = None
  if frames_per_clip > 0:
    # Count packets without decoding, then decode once keeping the chosen indices.
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      stream = container.streams.video[0]
      n = sum(1 for p in container.demux(stream) if p.size)
    keep = set(middle_indices(n, frames_per_clip))
  frames, times, count, fps = _decode_pass(path, keep, resolution)
  if keep is not None and len(frames) < min(len(keep), count):
    # Fewer frames decoded than packets counted: choose again from the true count.
    frames, times, count, fps = _decode_pass(
        path, set(middle_indices(count, frames_per_clip)), resolution)
  if not frames:
    raise ValueError("no decodable frames")
  return np.stack(frames), times, fps


_progress = None


def _init_worker(counter):
  global _progress
  _progress = counter
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def _sidecar(out: str, name: str) -> str:
  return os.path.join(out, f".{name}.json")


def process_shard(task: dict) -> dict:
  """Decodes and writes one shard; returns its report (also saved as the sidecar)."""
  from miles_jax.data import schema
  out, name, items = task["out"], task["name"], task["items"]
  written, skipped, short = [], [], []

  def records():
    for it in items:
      item = readers.Item(**it)
      reason = None
      if not item.captions:
        reason = "no captions (empty caption field)"
      elif not os.path.isfile(item.path):
        reason = f"missing file {item.path}"
      else:
        try:
          frames, times, fps = decode_video(item.path, task["frames_per_clip"],
                                            task["resolution"], item.is_image)
        except Exception as e:  # any decoder failure means: skip and report this item
          reason = f"unreadable media: {type(e).__name__}: {e}"
      if _progress is not None:
        with _progress.get_lock():
          _progress.value += 1
      if reason:
        skipped.append({"video_id": item.video_id, "path": item.path, "reason": reason})
        continue
      if task["frames_per_clip"] > 0 and not item.is_image and len(frames) < task[
          "frames_per_clip"]:
        short.append({"video_id": item.video_id, "frames": len(frames)})
      ex = schema.make_example(item.video_id, item.captions, frames, timestamps=times,
                               label=item.label, fps=fps, jpeg_quality=task["jpeg_quality"])
      written.append(item.video_id)
      yield ex.SerializeToString()

  write_records(os.path.join(out, name), records())
  report = {"shard": name, "items": [it["video_id"] for it in items], "written": written,
            "skipped": skipped, "short": short}
  with open(_sidecar(out, name), "w") as f:
    json.dump(report, f)
  return report


def shard_order(num_items: int, split: str, seed: int = 0) -> np.ndarray:
  """Item indices in the order they are dealt to the shards: a seeded permutation for train
  splits (annotation files are often sorted by source or date), annotation order otherwise."""
  if split.startswith("train"):
    return np.random.default_rng(np.random.SeedSequence([seed, num_items])).permutation(num_items)
  return np.arange(num_items)


def prepare(items: list, out: str, split: str = "train", num_shards: int = 8,
            frames_per_clip: int = 8, resolution: int = 256, workers: int = 1,
            jpeg_quality: int = 90, verbose: bool = True) -> dict:
  """Writes `items` as shards `out/{split}-XXXXX-of-N.tfrecord`; returns the report dict."""
  os.makedirs(out, exist_ok=True)
  if num_shards < 1:
    raise ValueError(f"--num-shards={num_shards} must be >= 1")
  tasks, reused = [], []
  order = shard_order(len(items), split)
  for s in range(num_shards):
    name = shard_name(split, s, num_shards)
    shard_items = [dataclass_dict(items[i]) for i in order[s::num_shards]]
    side = _sidecar(out, name)
    if os.path.isfile(os.path.join(out, name)) and os.path.isfile(side):
      with open(side) as f:
        done = json.load(f)
      if done.get("items") == [it["video_id"] for it in shard_items]:
        reused.append(done)
        continue
    tasks.append({"out": out, "name": name, "items": shard_items,
                  "frames_per_clip": frames_per_clip, "resolution": resolution,
                  "jpeg_quality": jpeg_quality})
  total = sum(len(t["items"]) for t in tasks)
  t0 = time.time()

  def show(done_shards, counter_value, final=False):
    if verbose:
      rate = counter_value / max(time.time() - t0, 1e-9)
      sys.stderr.write(f"\r[prepare {split}] shards {done_shards + len(reused)}/{num_shards} "
                       f"items {counter_value}/{total} ({rate:.1f}/s)" + ("\n" if final else ""))
      sys.stderr.flush()

  reports = []
  if workers <= 1 or len(tasks) <= 1:
    global _progress
    _progress = None
    for i, t in enumerate(tasks):
      reports.append(process_shard(t))
      show(i + 1, sum(len(r["items"]) for r in reports))
  else:
    ctx = mp.get_context("spawn")  # TensorFlow is not fork-safe
    counter = ctx.Value("i", 0)
    with ctx.Pool(min(workers, len(tasks)), _init_worker, (counter,)) as pool:
      pending = pool.imap_unordered(process_shard, tasks)
      while len(reports) < len(tasks):
        try:
          reports.append(pending.next(timeout=1.0))
        except mp.TimeoutError:
          pass
        show(len(reports), counter.value)
  show(len(reports), total, final=True)

  all_reports = sorted(reports + reused, key=lambda r: r["shard"])
  report = {
      "split": split, "num_shards": num_shards, "items": len(items),
      "written": sum(len(r["written"]) for r in all_reports),
      "skipped": [s for r in all_reports for s in r["skipped"]],
      "short": [s for r in all_reports for s in r["short"]],
      "resumed_shards": sorted(r["shard"] for r in reused),
      "seconds": round(time.time() - t0, 2),
  }
  path = os.path.join(out, "report.json")
  merged = {}
  if os.path.isfile(path):
    with open(path) as f:
      merged = json.load(f)
  merged[split] = report
  with open(path, "w") as f:
    json.dump(merged, f, indent=1)
  if verbose:
    print(f"[prepare {split}] written {report['written']}/{len(items)} clips into {num_shards} "
          f"shards in {out} ({len(reused)} shards resumed); skipped {len(report['skipped'])}:")
    for s in report["skipped"]:
      print(f"  skipped {s['video_id']}: {s['reason']}")
    print(f"[prepare {split}] report: {path}")
  return report


def dataclass_dict(item) -> dict:
  import dataclasses
  return dataclasses.asdict(item)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m miles_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True, choices=sorted(readers.READERS))
  p.add_argument("--annotations", required=True,
                 help="annotation file (csv/tsv/json/txt) or split folder (hmdb51, ucf101)")
  p.add_argument("--media-dir", required=True, help="folder holding the videos / images")
  p.add_argument("--out", required=True)
  p.add_argument("--split", default="train", choices=["train", "test"])
  p.add_argument("--num-shards", type=int, default=8)
  p.add_argument("--frames-per-clip", type=int, default=8, help="K evenly spaced; 0 = all")
  p.add_argument("--resolution", type=int, default=256, help="short side in px; 0 = native")
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
  p.add_argument("--jpeg-quality", type=int, default=90)
  p.add_argument("--fold", type=int, default=1, help="hmdb51/ucf101 split number 1-3")
  p.add_argument("--video-list", default=None,
                 help="keep only these video ids (one per line), e.g. train_list_jsfusion.txt")
  a = p.parse_args(argv)
  items = readers.read_items(a.format, a.annotations, a.media_dir, split=a.split, fold=a.fold,
                             video_list=a.video_list)
  if not items:
    p.error(f"--annotations={a.annotations} gave no items for --format={a.format}")
  prepare(items, a.out, a.split, a.num_shards, a.frames_per_clip, a.resolution, a.workers,
          a.jpeg_quality)


if __name__ == "__main__":
  main()
