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
videos are skipped and listed in `out/report.json` (one entry per split). The run ends with
"N of EXPECTED": a split of known size (the benchmark's published test set, `--video_list`,
`--expected_items`) written short is an error (exit 2) unless `--allow_missing`. Ids of
`--video_list` that the annotations lack are an error (exit 2) unless `--allow_missing`; their
count is in report.json either way. Formats and the downloaded files they read: docs/data.md.

`--runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner [--beam_option=KEY=VALUE ...]`
runs the same shard tasks (`plan_shards`, `process_shard`) as an Apache Beam pipeline
(miles_jax/data/beam.py, the [beam] extra) instead of the process pool; `--out` may be gs://.
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Optional

import numpy as np

from miles_jax import cli, paths
from miles_jax.data import readers


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_records(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records to `path` atomically (temp name, then rename); returns count,
  which also goes to the shard's `.NAME.count` file (schema.record_count_file).

  `path` may be a URI (gs://...): the shard is written to a local temporary file and copied as
  one object through the path layer (an object appears whole when its upload ends)."""
  import tensorflow as tf

  from miles_jax.data import schema
  remote = paths.is_uri(path)
  tmp = tempfile.mkstemp(suffix=".tfrecord")[1] if remote else path + ".tmp"
  n = 0
  try:
    with tf.io.TFRecordWriter(tmp) as w:
      for r in records:
        w.write(r)
        n += 1
    if remote:
      with open(tmp, "rb") as src, paths.Path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    paths.write_text(schema.record_count_file(path), f"{n}\n")
    if not remote:
      os.replace(tmp, path)
  finally:
    if remote and os.path.exists(tmp):
      os.remove(tmp)
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


# Eval frame protocols (config eval.frames, prepare --eval_protocol):
# - "miles": what the MILES release feeds its encoder at test time: Frozen's segment centres,
#   read by `cap.set(CAP_PROP_POS_FRAMES, index - 1); cap.read()`, which decodes source frame
#   index - 1 (0 for index 0); torchvision Resize(256) (short side 256, long side `int()`,
#   bilinear, no antialias on tensors), CenterCrop(256) (offsets rounded half to even),
#   Resize(224) (bilinear, no antialias);
# - "frozen": the segment centres themselves, swscale AREA resize, floor-centred crop,
#   antialiased resize (this project's earlier protocol).
EVAL_PROTOCOLS = ("miles", "frozen")


def miles_indices(n: int, t: int) -> list:
  """The source frames the MILES release decodes for `uniform_indices(n, t)`: each one earlier
  (its seek to index - 1), frame 0 staying 0."""
  return [max(i - 1, 0) for i in uniform_indices(n, t)]


def eval_indices(n: int, counts, protocol: str = "frozen") -> list:
  """Sorted union of the eval positions for every T in `counts` (`uniform_indices`, or
  `miles_indices` for protocol "miles")."""
  pick = miles_indices if protocol == "miles" else uniform_indices
  return sorted({i for t in counts for i in pick(n, int(t))})


def choose_indices(n: int, frames_per_clip: int, eval_frames=(), protocol: str = "frozen"
                   ) -> list:
  """The source frames prepare stores: eval positions when `eval_frames`, else evenly spaced."""
  if eval_frames:
    return eval_indices(n, eval_frames, protocol)
  return middle_indices(n, frames_per_clip)


def torchvision_hw(height: int, width: int, size: int) -> tuple:
  """torchvision Resize(size)'s output (h, w): short side = size, long side
  `int(size * long / short)` (truncated, not rounded)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def bilinear_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
  """uint8/float [H, W, C] -> float64 [h, w, C]: bilinear, half-pixel centres, no antialias
  (PyTorch's interpolate(mode='bilinear', align_corners=False), which torchvision's tensor
  Resize calls; the same as tf.image.resize(antialias=False))."""
  x = np.asarray(img, np.float64)

  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo

  lo, hi, f = axis(x.shape[0], h)
  x = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
  lo, hi, f = axis(x.shape[1], w)
  return x[:, lo] * (1 - f)[None, :, None] + x[:, hi] * f[None, :, None]


def _to_rgb(frame, resolution: int, protocol: str = "frozen") -> np.ndarray:
  if protocol == "miles" and resolution > 0:
    h, w = torchvision_hw(frame.height, frame.width, resolution)
    rgb = frame.to_ndarray(format="rgb24")
    if (h, w) == rgb.shape[:2]:
      return rgb
    return np.clip(np.round(bilinear_resize(rgb, h, w)), 0, 255).astype(np.uint8)
  h, w = resized_hw(frame.height, frame.width, resolution)
  if (h, w) == (frame.height, frame.width):
    return frame.to_ndarray(format="rgb24")
  return frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()


def _decode_pass(path: str, keep: Optional[set], resolution: int, limit: int = 0,
                 protocol: str = "frozen"):
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
        frames.append(_to_rgb(frame, resolution, protocol))
        times.append(float(frame.time) if frame.time is not None else count / (fps or 1.0))
      count += 1
  return frames, times, count, fps


def decode_video(path: str, frames_per_clip: int, resolution: int, is_image: bool = False,
                 max_seconds: float = 0.0, eval_frames=(), protocol: str = "frozen"):
  """PyAV decode -> (uint8 [K, h, w, 3], timestamps [K], fps, source indices [K], source frame
  count). Raises on unreadable media.

  `max_seconds` > 0: the clip is only the source's frames before that time (DiDeMo's window).
  `protocol`: the eval frame protocol of `eval_frames` and of the resize (EVAL_PROTOCOLS)."""
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
    keep = choose_indices(n, frames_per_clip, eval_frames, protocol)
  frames, times, count, fps = _decode_pass(path, None if keep is None else set(keep), resolution,
                                           limit, protocol)
  if keep is not None and (len(frames) < min(len(keep), count) or count != n):
    # Another frame count decoded than packets counted: choose again from the true count.
    keep = choose_indices(count, frames_per_clip, eval_frames, protocol)
    frames, times, count, fps = _decode_pass(path, set(keep), resolution, limit, protocol)
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


def _frames_key(frames_per_clip: int, eval_frames, protocol: str = "frozen") -> str:
  """What a shard's frames are, so a rerun with other frame settings redoes it."""
  if eval_frames:
    key = "eval:" + ",".join(str(int(t)) for t in eval_frames)
    return key if protocol == "frozen" else f"{key}:{protocol}"
  return f"even:{int(frames_per_clip)}"


def _sidecar(out: str, name: str) -> str:
  return os.path.join(out, f".{name}.json")


def encode_item(item: "readers.Item", frames_per_clip: int, resolution: int,
                jpeg_quality: int = 90, eval_frames=(), expected_items: int = 0,
                local_path: Optional[str] = None, eval_protocol: str = "miles") -> dict:
  """One item -> {"record": serialized SequenceExample or None, "skipped": reason or None,
  "short": stored frame count when the source has fewer frames than wanted, else None}.

  The per-item step of `process_shard` (and of any other runner): never raises for bad media.
  `local_path`: the media already on local disk (e.g. read from a tar); else `item.path`.
  `eval_protocol` (with `eval_frames`): which frames and resize (EVAL_PROTOCOLS)."""
  from miles_jax.data import schema
  out = {"record": None, "skipped": None, "short": None}
  if not item.captions:
    out["skipped"] = "no captions (empty caption field)"
    return out
  if local_path == readers.MISSING or (local_path is None
                                       and not readers.media_exists(item.path)):
    out["skipped"] = f"missing file {item.path}"
    return out
  try:
    with (contextlib.nullcontext(local_path) if local_path is not None
          else readers.local_media(item.path)) as local:
      frames, times, fps, index, count = decode_video(
          local, frames_per_clip, resolution, item.is_image, item.max_seconds, eval_frames,
          eval_protocol if eval_frames else "frozen")
  except Exception as e:  # any decoder failure means: skip and report this item
    out["skipped"] = f"unreadable media: {type(e).__name__}: {e}"
    return out
  want = max(eval_frames) if eval_frames else frames_per_clip
  if want > 0 and not item.is_image and count < want:
    out["short"] = len(frames)
  out["record"] = schema.make_example(
      item.video_id, item.captions, frames, timestamps=times, label=item.label, fps=fps,
      jpeg_quality=jpeg_quality, frame_index=index, source_frames=count,
      expected_items=expected_items,
      eval_protocol=eval_protocol if eval_frames else "")
  # deterministic: map fields in key order, so a shard's bytes do not depend on the process
  # (hash seed) that wrote it — the pool and every Beam worker write identical records
  out["record"] = out["record"].SerializeToString(deterministic=True)
  return out


def process_shard(task: dict) -> dict:
  """Decodes and writes one shard (`plan_shards`' task); returns its report, also saved as the
  sidecar. The one shard writer of the process pool and of the Beam pipeline (data/beam.py)."""
  out, name, items = task["out"], task["name"], task["items"]
  written, skipped, short = [], [], []

  def records():
    for item, local in readers.iter_local_media([readers.Item(**it) for it in items]):
      res = encode_item(item, task["frames_per_clip"], task["resolution"], task["jpeg_quality"],
                        task.get("eval_frames", ()), task.get("expected_items", 0), local,
                        task.get("eval_protocol", "frozen"))
      if _progress is not None:
        with _progress.get_lock():
          _progress.value += 1
      if res["skipped"]:
        skipped.append({"video_id": item.video_id, "path": item.path, "reason": res["skipped"]})
        continue
      if res["short"] is not None:
        short.append({"video_id": item.video_id, "frames": res["short"]})
      written.append(item.video_id)
      yield res["record"]

  write_records(os.path.join(out, name), records())
  report = {"shard": name, "items": [it["video_id"] for it in items], "written": written,
            "skipped": skipped, "short": short,
            "frames": _frames_key(task["frames_per_clip"], task.get("eval_frames", ()),
                                  task.get("eval_protocol", "frozen"))}
  paths.write_text(_sidecar(out, name), json.dumps(report))
  return report


def shard_order(num_items: int, split: str, seed: int = 0) -> np.ndarray:
  """Item indices in the order they are dealt to the shards: a seeded permutation for train
  splits (annotation files are often sorted by source or date), annotation order otherwise."""
  if split.startswith("train"):
    return np.random.default_rng(np.random.SeedSequence([seed, num_items])).permutation(num_items)
  return np.arange(num_items)


def plan_shards(items: list, out: str, split: str, num_shards: int, frames_per_clip: int,
                resolution: int, jpeg_quality: int, eval_frames=(), expected_items: int = 0,
                eval_protocol: str = "miles") -> tuple:
  """The item -> shard assignment of every runner (it depends only on the item list and
  `split`, `shard_order`): (tasks for the shards still to write, sidecar reports of the shards
  already complete in `out` for the same items and frame settings)."""
  eval_frames = tuple(int(t) for t in eval_frames)
  tasks, reused = [], []
  order = shard_order(len(items), split)
  for s in range(num_shards):
    name = shard_name(split, s, num_shards)
    shard_items = [dataclass_dict(items[i]) for i in order[s::num_shards]]
    side = _sidecar(out, name)
    if paths.exists(os.path.join(out, name)) and paths.exists(side):
      done = json.loads(paths.read_text(side))
      if (done.get("items") == [it["video_id"] for it in shard_items]
          and done.get("frames") == _frames_key(frames_per_clip, eval_frames, eval_protocol)):
        reused.append(done)
        continue
    tasks.append({"out": out, "name": name, "items": shard_items,
                  "frames_per_clip": frames_per_clip, "resolution": resolution,
                  "jpeg_quality": jpeg_quality, "eval_frames": eval_frames,
                  "expected_items": int(expected_items), "eval_protocol": eval_protocol})
  return tasks, reused


def summarize(split: str, num_shards: int, num_items: int, shard_reports: list, reused: list,
              missing_annotations: Optional[list], frames: str, seconds: float,
              expected_items: int = 0) -> dict:
  """One split's report.json entry from the shard reports (sidecars) of a run, whichever runner
  wrote them: a field added here appears for the process pool and for Beam alike.
  `expected_items`: the published split's size (0: the annotated items are the expected count)."""
  all_reports = sorted(list(shard_reports) + list(reused), key=lambda r: r["shard"])
  return {
      "split": split, "num_shards": num_shards, "items": num_items,
      "written": sum(len(r["written"]) for r in all_reports),
      "skipped": [s for r in all_reports for s in r["skipped"]],
      "short": [s for r in all_reports for s in r["short"]],
      "resumed_shards": sorted(r["shard"] for r in reused),
      "missing_annotations": {"count": len(missing_annotations or []),
                              "video_ids": list(missing_annotations or [])},
      "frames": frames,
      "expected": int(expected_items) or num_items + len(missing_annotations or []),
      "expected_from": "split" if expected_items else "annotations",
      "seconds": round(seconds, 2),
  }


def prepare(items: list, out: str, split: str = "train", num_shards: int = 8,
            frames_per_clip: int = 16, resolution: int = 256, workers: int = 1,
            jpeg_quality: int = 90, verbose: bool = True,
            missing_annotations: Optional[list] = None, eval_frames=(),
            expected_items: int = 0, eval_protocol: str = "miles",
            runner: Optional[str] = None, beam_options=()) -> dict:
  """Writes `items` as shards `out/{split}-XXXXX-of-N.tfrecord`; returns the report dict.

  `expected_items`: videos of the published split (readers.expected_size), stored in every
  record and in the report; 0 = unknown, the annotated items are then the expected count.
  `eval_protocol`: the frames and resize of `eval_frames` (EVAL_PROTOCOLS), stored in every
  record.

  `missing_annotations`: video-list ids the reader found no annotation for (recorded).
  `eval_frames` (e.g. (4, 8, 16)): store the eval positions for these frame counts instead of
  `frames_per_clip` evenly spaced frames. `runner` (e.g. "DirectRunner", "DataflowRunner"):
  run the same shard tasks as an Apache Beam pipeline (data/beam.py) with `beam_options`
  (["key=value", ...]) instead of the process pool; `out` may be a gs:// URI either way."""
  eval_frames = tuple(int(t) for t in eval_frames)
  if eval_protocol not in EVAL_PROTOCOLS:
    raise ValueError(f"--eval_protocol={eval_protocol!r}: use one of {EVAL_PROTOCOLS}")
  if num_shards < 1:
    raise ValueError(f"--num_shards={num_shards} must be >= 1")
  paths.makedirs(out)
  tasks, reused = plan_shards(items, out, split, num_shards, frames_per_clip, resolution,
                              jpeg_quality, eval_frames, expected_items, eval_protocol)
  frames_key = _frames_key(frames_per_clip, eval_frames, eval_protocol)
  total = sum(len(t["items"]) for t in tasks)
  t0 = time.time()
  if runner:
    from miles_jax.data import beam
    if verbose:
      print(f"[prepare {split}] {len(tasks)} of {num_shards} shards ({total} items) on "
            f"{runner}; {len(reused)} shards already complete")
    reports = beam.run_shards("miles_jax.data.prepare:process_shard", tasks, runner,
                              beam_options, workers=workers, sidecar=_sidecar)
    return _finish(out, summarize(split, num_shards, len(items), reports, reused,
                                  missing_annotations, frames_key,
                                  time.time() - t0, expected_items), len(reused), verbose)

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
  return _finish(out, summarize(split, num_shards, len(items), reports, reused,
                                missing_annotations, frames_key,
                                time.time() - t0, expected_items), len(reused), verbose)


def _finish(out: str, report: dict, resumed: int, verbose: bool) -> dict:
  """Merges one split's report into out/report.json and prints the summary."""
  split, num_shards = report["split"], report["num_shards"]
  path = os.path.join(out, "report.json")
  merged = json.loads(paths.read_text(path)) if paths.exists(path) else {}
  merged[split] = report
  paths.write_text(path, json.dumps(merged, indent=1))
  if verbose:
    print(f"[prepare {split}] written {report['written']}/{report['items']} clips into "
          f"{num_shards} shards in {out} ({resumed} shards resumed); skipped "
          f"{len(report['skipped'])}:")
    for s in report["skipped"]:
      print(f"  skipped {s['video_id']}: {s['reason']}")
    print(f"[prepare {split}] report: {path}")
    print(f"[prepare {split}] {report['written']} of {report['expected']} expected "
          f"({'the published split' if report['expected_from'] == 'split' else 'annotated items'})"
          " written")
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
  flags.DEFINE_enum("eval_protocol", "miles", list(EVAL_PROTOCOLS), "val/test splits: "
                    "'miles' stores what the MILES release feeds its encoder (each segment "
                    "centre's previous frame, as its cv2 seek decodes it; torchvision's Resize "
                    "rounding and bilinear without antialias); 'frozen' the segment centres, "
                    "AREA-resized. Evaluate with the same config eval.frames.", flag_values=fv)
  flags.DEFINE_integer("resolution", 256, "Short side in px; 0 = native.", flag_values=fv)
  flags.DEFINE_integer("workers", cpus, "Decoding processes.", flag_values=fv)
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the stored frames.", flag_values=fv)
  flags.DEFINE_string("fold", "1", "hmdb51/ucf101 official split 1, 2, 3 or 'all'; the shards "
                      "are named {split}{fold}-*.tfrecord (test1-..., test2-..., ...).",
                      flag_values=fv)
  flags.DEFINE_string("video_list", None, "Keep only these video ids, in this order: one per "
                      "line (e.g. Frozen's val_list_jsfusion.txt, MSVD test_list.txt) or a csv "
                      "with a video_id column (CLIP4Clip's MSRVTT_train.9k.csv).", flag_values=fv)
  flags.DEFINE_bool("allow_missing", False, "Accept a partial split: --video_list ids the "
                    "annotations lack, and fewer clips written than expected (missing or "
                    "unreadable files), are counted in report.json; without it either is an "
                    "error (exit 2).", flag_values=fv)
  flags.DEFINE_string("caption_index", None, "msrvtt: Frozen's jsfusion_val_caption_idx.pkl "
                      "(one caption per video; found beside MSR_VTT.json's split lists by "
                      "default for val/test); 'none' keeps every caption.", flag_values=fv)
  flags.DEFINE_integer("expected_items", 0, "Videos the split should have; 0 = the benchmark's "
                       "published test-set size (MSR-VTT 1k-A 1000, MSVD 670, LSMDC 1000, "
                       "DiDeMo 1004, HMDB51 1530, UCF101 3783/3734/3696), else the --video_list "
                       "length. Fewer written is an error unless --allow_missing.",
                       flag_values=fv)
  flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner ("
                      "DirectRunner, DataflowRunner, FlinkRunner, SparkRunner; needs the [beam] "
                      "extra) instead of the --workers process pool: the same shards and "
                      "report.json. See docs/data.md, 'Preparing at scale with Beam'.",
                      flag_values=fv)
  flags.DEFINE_multi_string("beam_option", [], "KEY=VALUE (or KEY): a Beam pipeline option "
                            "passed on as --KEY=VALUE, e.g. project=my-project, region=us-central1, "
                            "temp_location=gs://b/tmp, setup_file=./setup.py; repeatable.",
                            flag_values=fv)
  flags.mark_flags_as_required(["format", "annotations", "media_dir", "out"], flag_values=fv)


def run(a) -> int:
  """Reads the annotations and writes the shards, for parsed flags `a`."""
  if a.runner or a.beam_option:
    from miles_jax.data import beam
    problem = beam.check(a.runner, a.beam_option)
    if problem:
      print(f"error: {problem}", file=sys.stderr)
      return 2
  eval_frames = () if a.split == "train" else tuple(
      int(t) for t in a.eval_frames.split(",") if t.strip())
  folds = [None]
  if a.format in ("hmdb51", "ucf101"):
    if a.fold not in ("1", "2", "3", "all"):
      print(f"error: --fold={a.fold}: use 1, 2, 3 or all (the three official splits)",
            file=sys.stderr)
      return 2
    folds = [1, 2, 3] if a.fold == "all" else [int(a.fold)]
  status = 0
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
    expected = a.expected_items or readers.expected_size(a.format, split)
    if not expected and a.video_list:
      expected = len(items) + len(missing)
    report = prepare(items, a.out, split, a.num_shards, a.frames_per_clip, a.resolution,
                     a.workers, a.jpeg_quality, missing_annotations=missing,
                     eval_frames=eval_frames, expected_items=expected,
                     eval_protocol=a.eval_protocol, runner=a.runner,
                     beam_options=a.beam_option)
    status = max(status, check_expected(report, a.format, a.allow_missing,
                                        os.path.join(a.out, "report.json")))
  return status


def check_expected(report: dict, fmt: str, allow_missing: bool, report_path: str) -> int:
  """0, or 2 with one line on stderr when a split of known size (report["expected_from"] ==
  "split": the benchmark's published size, --expected_items or the --video_list length) got
  fewer clips than expected (unless `allow_missing`) or more."""
  written, expected, split = report["written"], report["expected"], report["split"]
  if report.get("expected_from") != "split" or written == expected:
    return 0
  if written > expected:
    print(f"error: [prepare {split}] {written} clips written, but --format={fmt} {split} has "
          f"{expected}: pass the split's list (--video_list) or --expected_items={written} if "
          "this is another split", file=sys.stderr)
    return 2
  if allow_missing:
    print(f"warning: [prepare {split}] only {written} of {expected} expected written "
          f"(--allow_missing); recall on it does not compare with published numbers",
          file=sys.stderr)
    return 0
  print(f"error: [prepare {split}] only {written} of {expected} expected written "
        f"({expected - written} missing or unreadable, listed in {report_path}): add the files, "
        "or pass --allow_missing to keep the partial split", file=sys.stderr)
  return 2


# `main([...])` in-process (scripts, tests); `_cli()` for `python -m miles_jax.data.prepare`.
main, _cli = cli.flag_command(define_flags, run, "python -m miles_jax.data.prepare")


if __name__ == "__main__":
  _cli()
