"""The one on-disk format: a tf.train.SequenceExample per clip (images are 1-frame clips).

context:  video_id  bytes        source name, unique within a dataset
          captions  bytes list   1+ captions (several for MSR-VTT/MSVD; class name for HMDB/UCF)
          label     int64        class index, -1 when the dataset has none
          num_frames, height, width  int64   stored frames and their size
          fps       float        frame rate of the source (0 for images)
          source_frames int64    frames of the source video (0: unknown, e.g. older shards)
          expected_items int64   videos of the whole split as the benchmark publishes it
                                 (e.g. 1000 for MSR-VTT 1k-A; 0: unknown / not a benchmark)
          eval_protocol bytes    eval frames' protocol, "miles" or "frozen" (prepare.py
                                 EVAL_PROTOCOLS; "" for train frames and older shards)
sequence: frames     bytes       one JPEG per stored frame
          timestamps float       seconds of each stored frame in the source
          frame_index int64      0-based index of each stored frame in the source video
                                 (absent in older shards: the stored frames are then taken as
                                 the whole source)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

CONTEXT_FEATURES = {
    "video_id": tf.io.FixedLenFeature([], tf.string),
    "captions": tf.io.VarLenFeature(tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "num_frames": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "fps": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "source_frames": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "expected_items": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "eval_protocol": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
SEQUENCE_FEATURES = {
    "frames": tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
    "timestamps": tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    "frame_index": tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
}
DEFAULT_JPEG_QUALITY = 90


def encode_jpeg(frame: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes (4:2:0, the libjpeg default)."""
  return tf.io.encode_jpeg(tf.convert_to_tensor(frame, tf.uint8), quality=quality).numpy()


def make_example(video_id: str, captions: Sequence[str], frames=None, *,
                 jpeg_frames: Sequence[bytes] | None = None, timestamps=None, label: int = -1,
                 fps: float = 0.0, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                 height: int | None = None, width: int | None = None,
                 frame_index=None, source_frames: int = 0,
                 expected_items: int = 0, eval_protocol: str = "") -> tf.train.SequenceExample:
  """Builds a clip record from uint8 frames [K, H, W, 3] (or already-encoded `jpeg_frames`)."""
  if (frames is None) == (jpeg_frames is None):
    raise ValueError("make_example: pass exactly one of frames= or jpeg_frames=")
  if jpeg_frames is None:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"make_example({video_id!r}): frames must be uint8 [K, H, W, 3], got "
                       f"{frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    jpeg_frames = [encode_jpeg(f, jpeg_quality) for f in frames]
  elif height is None or width is None:
    shape = tf.io.extract_jpeg_shape(jpeg_frames[0]).numpy() if len(jpeg_frames) else (0, 0)
    height, width = int(shape[0]), int(shape[1])
  num = len(jpeg_frames)
  if timestamps is None:
    timestamps = [i / fps if fps else 0.0 for i in range(num)]
  if len(timestamps) != num:
    raise ValueError(f"make_example({video_id!r}): {len(timestamps)} timestamps for {num} frames")
  if frame_index is not None and len(frame_index) != num:
    raise ValueError(f"make_example({video_id!r}): {len(frame_index)} frame indices for {num} "
                     "frames")
  ex = tf.train.SequenceExample()
  ctx = ex.context.feature
  ctx["video_id"].bytes_list.value.append(video_id.encode())
  ctx["captions"].bytes_list.value.extend(c.encode() for c in captions)
  ctx["label"].int64_list.value.append(int(label))
  ctx["num_frames"].int64_list.value.append(num)
  ctx["height"].int64_list.value.append(int(height))
  ctx["width"].int64_list.value.append(int(width))
  ctx["fps"].float_list.value.append(float(fps))
  ctx["source_frames"].int64_list.value.append(int(source_frames))
  ctx["expected_items"].int64_list.value.append(int(expected_items))
  if eval_protocol:
    ctx["eval_protocol"].bytes_list.value.append(eval_protocol.encode())
  fl = ex.feature_lists.feature_list
  for jpg in jpeg_frames:
    fl["frames"].feature.add().bytes_list.value.append(jpg)
  for ts in timestamps:
    fl["timestamps"].feature.add().float_list.value.append(float(ts))
  for i in (frame_index if frame_index is not None else ()):
    fl["frame_index"].feature.add().int64_list.value.append(int(i))
  return ex


def parse_example(serialized: tf.Tensor, *, with_frames: bool = True) -> dict:
  """Parses one serialized record (graph-friendly) into a dict of dense tensors.

  captions -> string [C]; frames -> string [K] (JPEG bytes); timestamps -> float [K].
  `with_frames=False` skips the frame bytes (reading captions and labels only).
  """
  ctx, seq = tf.io.parse_single_sequence_example(
      serialized, context_features=CONTEXT_FEATURES,
      sequence_features=SEQUENCE_FEATURES if with_frames else None)
  out = dict(ctx)
  out["captions"] = tf.sparse.to_dense(ctx["captions"], default_value="")
  if with_frames:
    out.update(seq)
  return out


def read_records(path: str) -> list:
  """All records of one TFRecord file, parsed to numpy (for tests and inspection)."""
  out = []
  for raw in tf.data.TFRecordDataset(path):
    ex = parse_example(raw)
    out.append({k: v.numpy() for k, v in ex.items()})
  return out


def record_count_file(path: str) -> str:
  """The hidden file beside a shard holding how many records were written to it (so records a
  truncated shard lost can be counted exactly): DIR/.NAME.count."""
  import os
  head, name = os.path.split(path)
  return os.path.join(head, f".{name}.count")
