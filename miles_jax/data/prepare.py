r"""Raw dataset -> TFRecord shards of the clip schema (miles_jax/data/schema.py).

  python -m miles_jax.data.prepare --format=msrvtt \
      --annotations=MSRVTT_JSFUSION_test.csv --media_dir=videos/all --out=data/msrvtt \
      --split=test --num_shards=8 --resolution=256 --workers=8
  python -m miles_jax.data.prepare --format=ucf101 --annotations=ucfTrainTestlist \
      --media_dir=UCF-101 --out=data/ucf101 --split=test --fold=all   # test1/2/3-*.tfrecord

Each item is decoded with PyAV and some of its frames are kept, each with its index in the
source video (`frame_index`) and timestamp:
- train split: K evenly spaced frames (the middle frame of K equal segments; K=0 keeps all;
  default 16, so a 4-frame clip samples among 4 frames per segment);
- other splits (test, val, test1..3): the frames evaluation reads, exactly: for every T in
  `--eval_frames` (default 4,8,16) the centres of T equal segments of the source video as
  Frozen in Time's `sample_frames(..., 'uniform')` picks them (segment bounds
  `int(linspace(0, n, T+1))`, frame `(start + end - 1) // 2`), the union over the T values.
  T=4 serves 4-frame eval; 8 and 16 also serve 2 and 4 test-time clips of 4 frames.
The short side is resized to R (swscale AREA), frames are stored as JPEG. Train items are spread over the shards in a seeded random order
(`shard_order`: shard s gets every num_shards-th item of a permutation), so a shard, and a host
reading a few shards, sees a sample of the whole set rather than one stretch of the annotation
file; other splits keep annotation order (item i to shard `i % num_shards`). Shards are written
under a
temporary name and renamed when complete, with a `.{shard}.json` sidecar; a rerun skips shards
whose file and sidecar exist for the same items. Missing files, empty captions and unreadable
videos are skipped and listed in `out/report.json` (one entry per split), never fatal. Ids of
`--video_list` that the annotations lack are an error (exit 2) unless `--allow_missing`; their
count is in report.json either way. Formats and the downloaded files they read: docs/data.md.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import json
import multiprocessing as mp
import os
import sys
import time
from typing import Iterable, Optional

import numpy as np

from miles_jax import cli
from miles_jax.data import readers


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records to `path` atomically (temp name, then rename); returns count,
  which also goes to the shard's `.NAME.count` file (schema.record_count_file)."""
  import tensorflow as tf

  from miles_jax.data import schema
  tmp = path + ".tmp"
  n = 0
  with tf.io.TFRecordWriter(tmp) as w:
    for r in records:
      w.write(r)
      n += 1
  with open(schema.record_count_file(path), "w") as f:
    f.write(f"{n}\n")
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


def uniform_indices(n: int, t: int) -> list:
  """Frozen in Time's eval frames: the centre of each of t equal segments of n source frames
  (bounds `int(linspace(0, n, t+1))`, frame `(start + end - 1) // 2`; min(t, n) frames)."""
  bounds = np.linspace(0, n, min(t, n) + 1).astype(int)
  return [int((a + b - 1) // 2) for a, b in zip(bounds[:-1], bounds[1:])]


def eval_indices(n: int, counts) -> list:
  """Sorted union of `uniform_indices(n, T)` for every T in `counts`."""
  return sorted({i for t in counts for i in uniform_indices(n, int(t))})


def choose_indices(n: int, frames_per_clip: int, eval_frames=()) -> list:
  """The source frames prepare stores: eval positions when `eval_frames`, else evenly spaced."""
  return eval_indices(n, eval_frames) if eval_frames else middle_indices(n, frames_per_clip)


def _to_rgb(frame, resolution: int) -> np.ndarray:
  h, w = resized_hw(frame.height, frame.width, resolution)
  if (h, w) == (frame.height, frame.width):
    return frame.to_ndarray(format="rgb24")
  return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()


def _decode_pass(path: str, keep: Optional[set], resolution: int, limit: int = 0):
  import av
  frames, times, count = [], [], 0
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = float(stream.average_rate or 0.0)
    for frame in container.decode(stream):
      if limit and count >= limit:
        break
      if keep is None or count in keep:
        frames.append(_to_rgb(frame, resolution))
        times.append(float(frame.time) if frame.time is not None else count / (fps or 1.0))
      count += 1
  return frames, times, count, fps


def decode_video(path: str, frames_per_clip: int, resolution: int, is_image: bool = False,
                 max_seconds: float = 0.0, eval_frames=()):
  """PyAV decode -> (uint8 [K, h, w, 3], timestamps [K], fps, source indices [K], source frame
  count). Raises on unreadable media.

  `max_seconds` > 0: the clip is only the source's frames before that time (DiDeMo's window)."""
  import av
  if is_image:
    frames, times, _, _ = _decode_pass(path, {0}, resolution)
    if not frames:
      raise ValueError("no decodable frames")
    return np.stack(frames[:1]), [0.0], 0.0, [0], 1
  keep, limit = None, 0
  if frames_per_clip > 0 or eval_frames or max_seconds > 0:
    # Count packets (those before max_seconds) without decoding, then decode once keeping the
    # chosen indices.
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      stream = container.streams.video[0]
      n = sum(1 for p in container.demux(stream) if p.size and (
          max_seconds <= 0 or p.pts is None or float(p.pts * p.time_base) < max_seconds))
    limit = n if max_seconds > 0 else 0
    keep = choose_indices(n, frames_per_clip, eval_frames)
  frames, times, count, fps = _decode_pass(path, None if keep is None else set(keep), resolution,
                                           limit)
  if keep is not None and (len(frames) < min(len(keep), count) or count != n):
    # Another frame count decoded than packets counted: choose again from the true count.
    keep = choose_indices(count, frames_per_clip, eval_frames)
    frames, times, count, fps = _decode_pass(path, set(keep), resolution, limit)
  if not frames:
    raise ValueError("no decodable frames")
  index = keep if keep is not None else list(range(count))
  return np.stack(frames), times, fps, index[:len(frames)], count


def square_resize(frame: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, 3] -> its centred square of side min(h, w), area-resized to [size, size, 3]."""
  import av
  h, w = frame.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = np.ascontiguousarray(frame[top:top + s, left:left + s])
  if s == size:
    return crop
  return av.VideoFrame.from_ndarray(crop, format="rgb24").reformat(
      width=size, height=size, interpolation="AREA").to_ndarray()


def eval_frames(path: str, num_frames: int, size: int) -> np.ndarray:
  """A video file -> uint8 [num_frames, size, size, 3] by the eval protocol (export's
  preprocessing.json): the centre of each of num_frames equal segments of the whole video
  (Frozen's `uniform` rule, `uniform_indices`), each the centred square of the short side
  resized to size; a video shorter than num_frames repeats frames. Raises on unreadable media."""
  frames = decode_video(path, 0, 0, eval_frames=(num_frames,))[0]
  return np.stack([square_resize(frames[i * len(frames) // num_frames], size)
                   for i in range(num_frames)])


def strip_jpeg(frames: np.ndarray, height: int = 96, quality: int = 85) -> bytes:
  """uint8 [T, h, w, 3] -> one JPEG of the T frames side by side, each resized to `height`."""
  import io

  from PIL import Image
  tiles = [Image.fromarray(np.ascontiguousarray(f)).resize(
      (max(1, round(f.shape[1] * height / f.shape[0])), height), Image.BICUBIC) for f in frames]
  strip = Image.new("RGB", (sum(t.width for t in tiles), height))
  x = 0
  for t in tiles:
    strip.paste(t, (x, 0))
    x += t.width
  buf = io.BytesIO()
  strip.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def embed_task(task: tuple):
  """Worker of `python -m miles_jax.embed`: (path, T, size, thumb_height) ->
  (uint8 [T, size, size, 3], strip JPEG bytes, None) or (None, None, error message)."""
  path, num_frames, size, thumb = task
  try:
    frames = eval_frames(path, num_frames, size)
    return frames, strip_jpeg(frames, thumb), None
  except Exception as e:  # any decoder failure: the file is skipped and listed
    return None, None, f"{type(e).__name__}: {e}".strip()[:300]


_progress = None


def _init_worker(counter):
  global _progress
  _progress = counter
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


class _BarCounter:
  """The `_progress` counter of a serial run: `.value += 1` advances the progress bar."""

  def __init__(self, bar):
    self._bar, self._value = bar, 0

  def get_lock(self):
    import contextlib
    return contextlib.nullcontext()

  @property
  def value(self):
    return self._value

  @value.setter
  def value(self, v):
    self._bar.update(v - self._value)
    self._value = v


def _frames_key(frames_per_clip: int, eval_frames) -> str:
  """What a shard's frames are, so a rerun with other frame settings redoes it."""
  if eval_frames:
    return "eval:" + ",".join(str(int(t)) for t in eval_frames)
  return f"even:{int(frames_per_clip)}"


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
      elif not readers.media_exists(item.path):
        reason = f"missing file {item.path}"
      else:
        try:
          with readers.local_media(item.path) as local:
            frames, times, fps, index, count = decode_video(
                local, task["frames_per_clip"], task["resolution"], item.is_image,
                item.max_seconds, task.get("eval_frames", ()))
        except Exception as e:  # any decoder failure means: skip and report this item
          reason = f"unreadable media: {type(e).__name__}: {e}"
      if _progress is not None:
        with _progress.get_lock():
          _progress.value += 1
      if reason:
        skipped.append({"video_id": item.video_id, "path": item.path, "reason": reason})
        continue
      want = (max(task["eval_frames"]) if task.get("eval_frames")
              else task["frames_per_clip"])
      if want > 0 and not item.is_image and count < want:
        short.append({"video_id": item.video_id, "frames": len(frames)})
      ex = schema.make_example(item.video_id, item.captions, frames, timestamps=times,
                               label=item.label, fps=fps, jpeg_quality=task["jpeg_quality"],
                               frame_index=index, source_frames=count)
      written.append(item.video_id)
      yield ex.SerializeToString()

  write_records(os.path.join(out, name), records())
  report = {"shard": name, "items": [it["video_id"] for it in items], "written": written,
            "skipped": skipped, "short": short,
            "frames": _frames_key(task["frames_per_clip"], task.get("eval_frames", ()))}
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
            frames_per_clip: int = 16, resolution: int = 256, workers: int = 1,
            jpeg_quality: int = 90, verbose: bool = True,
            missing_annotations: Optional[list] = None, eval_frames=()) -> dict:
  """Writes `items` as shards `out/{split}-XXXXX-of-N.tfrecord`; returns the report dict.

  `missing_annotations`: video-list ids the reader found no annotation for (recorded).
  `eval_frames` (e.g. (4, 8, 16)): store the eval positions for these frame counts instead of
  `frames_per_clip` evenly spaced frames."""
  eval_frames = tuple(int(t) for t in eval_frames)
  os.makedirs(out, exist_ok=True)
  if num_shards < 1:
    raise ValueError(f"--num_shards={num_shards} must be >= 1")
  tasks, reused = [], []
  order = shard_order(len(items), split)
  for s in range(num_shards):
    name = shard_name(split, s, num_shards)
    shard_items = [dataclass_dict(items[i]) for i in order[s::num_shards]]
    side = _sidecar(out, name)
    if os.path.isfile(os.path.join(out, name)) and os.path.isfile(side):
      with open(side) as f:
        done = json.load(f)
      if (done.get("items") == [it["video_id"] for it in shard_items]
          and done.get("frames") == _frames_key(frames_per_clip, eval_frames)):
        reused.append(done)
        continue
    tasks.append({"out": out, "name": name, "items": shard_items,
                  "frames_per_clip": frames_per_clip, "resolution": resolution,
                  "jpeg_quality": jpeg_quality, "eval_frames": eval_frames})
  total = sum(len(t["items"]) for t in tasks)
  t0 = time.time()

  from miles_jax import console
  bar = console.progress(total=total, desc=f"prepare {split}", unit="video",
                         disable=not verbose or not tasks,
                         postfix=f"shards {len(reused)}/{num_shards}")

  def show(done_shards, counter_value):
    bar.update(counter_value - bar.n)
    bar.set_postfix_str(f"shards {done_shards + len(reused)}/{num_shards}", refresh=False)

  reports = []
  if workers <= 1 or len(tasks) <= 1:
    global _progress
    _progress = _BarCounter(bar)  # process_shard counts each video into the bar
    for i, t in enumerate(tasks):
      reports.append(process_shard(t))
      show(i + 1, sum(len(r["items"]) for r in reports))
    _progress = None
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
  show(len(reports), total)
  bar.close()

  all_reports = sorted(reports + reused, key=lambda r: r["shard"])
  report = {
      "split": split, "num_shards": num_shards, "items": len(items),
      "written": sum(len(r["written"]) for r in all_reports),
      "skipped": [s for r in all_reports for s in r["skipped"]],
      "short": [s for r in all_reports for s in r["short"]],
      "resumed_shards": sorted(r["shard"] for r in reused),
      "missing_annotations": {"count": len(missing_annotations or []),
                              "video_ids": list(missing_annotations or [])},
      "frames": _frames_key(frames_per_clip, eval_frames),
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


def define_flags(fv):
  """This command's flags, on the absl FlagValues `fv`."""
  from absl import flags
  cpus = max(1, os.cpu_count() or 1)
  flags.DEFINE_enum("format", None, sorted(readers.READERS), "Annotation format.", flag_values=fv)
  flags.DEFINE_string("annotations", None, "Annotation file (csv/tsv/json/txt/pkl) or split "
                      "folder (hmdb51, ucf101).", flag_values=fv)
  flags.DEFINE_string("media_dir", None, "Folder holding the videos / images.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder for the shards and report.json.", flag_values=fv)
  flags.DEFINE_enum("split", "train", ["train", "val", "test"], "Split name of the shards.",
                    flag_values=fv)
  flags.DEFINE_integer("num_shards", 8, "Number of shards.", flag_values=fv)
  flags.DEFINE_integer("frames_per_clip", 16, "Train split: K evenly spaced frames kept; "
                       "0 = all.", flag_values=fv)
  flags.DEFINE_string("eval_frames", "4,8,16", "val/test splits: store the eval frame positions "
                      "for these frame counts (Frozen's segment centres); '' = use "
                      "--frames_per_clip instead.", flag_values=fv)
  flags.DEFINE_integer("resolution", 256, "Short side in px; 0 = native.", flag_values=fv)
  flags.DEFINE_integer("workers", cpus, "Decoding processes.", flag_values=fv)
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the stored frames.", flag_values=fv)
  flags.DEFINE_string("fold", "1", "hmdb51/ucf101 official split 1, 2, 3 or 'all'; the shards "
                      "are named {split}{fold}-*.tfrecord (test1-..., test2-..., ...).",
                      flag_values=fv)
  flags.DEFINE_string("video_list", None, "Keep only these video ids, in this order: one per "
                      "line (e.g. Frozen's val_list_jsfusion.txt, MSVD test_list.txt) or a csv "
                      "with a video_id column (CLIP4Clip's MSRVTT_train.9k.csv).", flag_values=fv)
  flags.DEFINE_bool("allow_missing", False, "Go on when --video_list names ids the annotations "
                    "lack (they are counted in report.json); without it that is an error "
                    "(exit 2).", flag_values=fv)
  flags.DEFINE_string("caption_index", None, "msrvtt: Frozen's jsfusion_val_caption_idx.pkl "
                      "(one caption per video).", flag_values=fv)
  flags.mark_flags_as_required(["format", "annotations", "media_dir", "out"], flag_values=fv)


def run(a) -> int:
  """Reads the annotations and writes the shards, for parsed flags `a`."""
  eval_frames = () if a.split == "train" else tuple(
      int(t) for t in a.eval_frames.split(",") if t.strip())
  folds = [None]
  if a.format in ("hmdb51", "ucf101"):
    if a.fold not in ("1", "2", "3", "all"):
      print(f"error: --fold={a.fold}: use 1, 2, 3 or all (the three official splits)",
            file=sys.stderr)
      return 2
    folds = [1, 2, 3] if a.fold == "all" else [int(a.fold)]
  for fold in folds:
    missing: list = []
    try:
      items = readers.read_items(a.format, a.annotations, a.media_dir, split=a.split,
                                 fold=fold or 1, video_list=a.video_list, missing=missing,
                                 caption_index=a.caption_index)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if missing and not a.allow_missing:
      print(f"error: --video_list={a.video_list}: {len(missing)} listed video ids have no "
            f"annotation in --annotations={a.annotations} (first: {', '.join(missing[:5])}); "
            "use the annotation file that covers the split (e.g. MSRVTT_data.json for "
            "MSRVTT_train.9k.csv) or pass --allow_missing to go on without them",
            file=sys.stderr)
      return 2
    if not items:
      print(f"error: --annotations={a.annotations} gave no items for --format={a.format}",
            file=sys.stderr)
      return 2
    split = f"{a.split}{fold}" if fold else a.split
    prepare(items, a.out, split, a.num_shards, a.frames_per_clip, a.resolution, a.workers,
            a.jpeg_quality, missing_annotations=missing, eval_frames=eval_frames)
  return 0


# `main([...])` in-process (scripts, tests); `_cli()` for `python -m miles_jax.data.prepare`.
main, _cli = cli.flag_command(define_flags, run, "python -m miles_jax.data.prepare")


if __name__ == "__main__":
  _cli()
