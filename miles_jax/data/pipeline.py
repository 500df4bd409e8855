"""TFRecord shards -> per-host numpy batches (train) and the in-memory eval set.

Train batch (per host, b = data.batch_size // process_count):
  frames          uint8 [b, T, S, S, 3]   T = data.num_frames, S = model.video.img_size
  input_ids       int32 [b, L]            L = data.max_len
  attention_mask  int32 [b, L]
  mvm_mask        bool  [b, T * N]        N = (S // patch_size)^2, frame-major, True = masked
  video_index     int32 [b]               stable hash of video_id (equal for the same video)

Every random choice (file order, shuffle, frame, crop, flip, caption, mask) is a function of
(seed, epoch, process_index, position of the record in the host's epoch stream), so a run is
reproducible and `TrainIterator.state()` / `.restore()` resume it exactly.

Hosts split the shards (every process_count-th file); with fewer shards than hosts every host
reads all shards in the same order and keeps every process_count-th record (record-level
sharding, with a warning: each host then reads all the bytes). Several weighted sources
(`data.train` as a list, config_lib.train_sources) give one iterator each; every global batch
comes from one source, picked by weight with a (seed, batch number) key that is the same on every
host, so a batch has one frame count T and the step compiles once per T.
"""
from __future__ import annotations

import dataclasses
import logging
import struct
from typing import Optional

import numpy as np
import tensorflow as tf

from miles_jax import config_lib, masking
from miles_jax.data import schema
from miles_jax.data.tokenizers import build_tokenizer

# The input pipeline runs on the host CPU: keep TensorFlow off the GPUs that JAX owns.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF already initialised its devices, or has no GPU support
  pass

AUTOTUNE = tf.data.AUTOTUNE
# random-resized-crop aspect ratios (torchvision's RandomResizedCrop default)
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)


def list_files(pattern: str, field: str = "data.train") -> list:
  """Sorted shard paths for a glob (comma-separated globs allowed)."""
  if not pattern:
    raise ValueError(f"{field} is empty: set it to a glob of TFRecord shards, e.g. "
                     "DIR/train-*.tfrecord (python -m miles_jax.data.prepare / .synthetic)")
  files = sorted({f for p in pattern.split(",") if p for f in tf.io.gfile.glob(p.strip())})
  if not files:
    raise FileNotFoundError(f"{field}={pattern} matches no files")
  return files


def split_files(files: list, process_index: int, process_count: int) -> list:
  """This process's shards: every process_count-th file, starting at process_index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if len(files) < process_count:
    raise ValueError(f"{len(files)} shards for {process_count} processes: every process needs "
                     "its own shard; write more (prepare --num_shards)")
  return files[process_index::process_count]


def host_files(files: list, process_index: int, process_count: int) -> tuple:
  """(files this host reads, record shard (index, count) or None).

  Enough shards: file-level split_files. Fewer shards than hosts (e.g. 8 shards on a 64-host
  v5e-256): every host reads every file and keeps every process_count-th record.
  """
  if len(files) >= process_count:
    return split_files(files, process_index, process_count), None
  if process_index == 0:
    logging.warning("%d shards for %d processes: falling back to record-level sharding (every "
                    "host reads all shards and keeps every %d-th record); write at least %d "
                    "shards (prepare --num-shards) to give each host its own files",
                    len(files), process_count, process_count, process_count)
  return list(files), (process_index, process_count)


def mask_spec(config) -> tuple:
  """(strategy, ratio) of the per-sample video mask: mac.video_ratio when MAC trains alone."""
  objectives = {o.strip() for o in str(config.get("objectives", "")).split(",")}
  ratio = config.mask.ratio
  if "mac" in objectives and not objectives & {"miles", "mvm"}:
    ratio = config.mac.video_ratio
  return config.mask.strategy, ratio


def _geometry(config, num_frames: Optional[int] = None) -> tuple:
  v = config.model.video
  if v.img_size % v.patch_size:
    raise ValueError(f"model.video.img_size={v.img_size} is not a multiple of "
                     f"model.video.patch_size={v.patch_size}")
  grid = v.img_size // v.patch_size
  return num_frames or config.data.num_frames, v.img_size, (grid, grid)


def frame_indices(n, num_frames: int, train: bool, seed=None):
  """T indices into n stored frames: train one random frame per equal segment, eval the middle."""
  t = tf.range(num_frames)
  if not train:
    idx = ((2 * t + 1) * n) // (2 * num_frames)
  else:
    start = (t * n) // num_frames
    end = tf.maximum(((t + 1) * n) // num_frames, start + 1)
    u = tf.random.stateless_uniform([num_frames], seed)
    idx = start + tf.cast(u * tf.cast(end - start, tf.float32), tf.int32)
    idx = tf.minimum(idx, end - 1)
  return tf.minimum(idx, n - 1)


def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def decode_frames(jpegs, window, size: int, antialias: bool):
  """JPEG strings [T] -> uint8 [T, size, size, 3]: decode only the crop window, resize."""
  crops = tf.stack([tf.io.decode_and_crop_jpeg(jpegs[i], window, channels=3)
                    for i in range(jpegs.shape[0])])
  if crops.shape[1] == size and crops.shape[2] == size:
    return crops
  same = tf.logical_and(tf.equal(window[2], size), tf.equal(window[3], size))
  out = tf.cond(same, lambda: crops,
                lambda: _to_uint8(tf.image.resize(crops, [size, size], antialias=antialias)))
  return tf.ensure_shape(out, [jpegs.shape[0], size, size, 3])


def train_clip(ex: dict, seed, num_frames: int, size: int, crop_scale):
  """Random frame per segment, one random resized crop + flip shared by all frames."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  jpegs = tf.gather(ex["frames"], frame_indices(tf.size(ex["frames"]), num_frames, True,
                                                seeds[0]))
  jpegs.set_shape([num_frames])
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[1],
      min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT,
      area_range=tuple(float(s) for s in crop_scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
  frames = decode_frames(jpegs, window, size, antialias=False)
  flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
  frames = tf.cond(flip, lambda: tf.reverse(frames, axis=[2]), lambda: frames)
  caps = ex["captions"]
  pick = tf.random.stateless_uniform([], seeds[3], 0, tf.size(caps), dtype=tf.int32)
  return frames, caps[pick]


def uniform_positions(num_source, count):
  """Frozen in Time's eval frames in-graph: centres of min(count, n) equal segments of n source
  frames, bounds `int(linspace(0, n, count+1))` computed in float64 exactly as numpy does
  (prepare.uniform_indices is the numpy twin)."""
  n = tf.cast(num_source, tf.int64)
  acc = tf.maximum(tf.minimum(tf.cast(count, tf.int64), n), 1)
  step = tf.cast(n, tf.float64) / tf.cast(acc, tf.float64)
  bounds = tf.cast(tf.cast(tf.range(acc + 1), tf.float64) * step, tf.int64)
  bounds = tf.concat([bounds[:-1], [n]], 0)  # numpy sets the endpoint exactly
  return (bounds[:-1] + bounds[1:] - 1) // 2


def eval_positions(ex: dict, num_frames: int, num_clips: int = 1, protocol: str = "frozen"):
  """(stored frame positions [K*T], wanted source indices [K*T], source indices got [K*T]).

  One clip (K=1): the centres of T equal segments of the source video. K clips: the centres of
  K*T equal segments; clip k takes segments k, k+K, k+2K, ... (each clip spans the whole video,
  shifted by a sub-segment). Rows are clip-major. Each wanted index is served by the stored
  frame of nearest source index (exact when prepare stored the eval positions). Protocol
  "miles": every wanted index is one earlier (0 stays 0), the frame the MILES release's cv2
  seek decodes (prepare.miles_indices).
  """
  stored = tf.size(ex["frames"], out_type=tf.int64)
  index = ex.get("frame_index")
  source = tf.cast(ex.get("source_frames", 0), tf.int64)
  # Older shards carry no frame_index: take the stored frames as the whole source.
  index = tf.cond(tf.equal(tf.size(index, out_type=tf.int64), stored), lambda: index,
                  lambda: tf.range(stored, dtype=tf.int64))
  source = tf.where(source > 0, source, tf.reduce_max(index) + 1)
  count = num_frames * num_clips
  want = uniform_positions(source, count)
  if protocol == "miles":
    want = tf.maximum(want - 1, 0)
  want = tf.concat([want, tf.fill([count - tf.size(want)], want[-1])], 0)  # n < K*T: repeat
  want = tf.reshape(tf.transpose(tf.reshape(want, [num_frames, num_clips])), [count])
  pos = tf.argmin(tf.abs(index[None, :] - want[:, None]), axis=1)
  return pos, want, tf.gather(index, pos)


def eval_clip(ex: dict, num_frames: int, size: int, num_clips: int = 1,
              protocol: str = "frozen"):
  """Segment-centre frames (eval_positions); the centred square (short side) resized to size.
  -> (uint8 [K*T, size, size, 3], wanted source indices [K*T], got source indices [K*T]).

  "frozen": crop offsets floored, antialiased resize. "miles": torchvision's CenterCrop offsets
  (`round((h - side) / 2)`, half to even) and Resize (bilinear, no antialias), as the MILES
  release applies them to frames whose short side prepare resized by its Resize(256) rule."""
  pos, want, got = eval_positions(ex, num_frames, num_clips, protocol)
  jpegs = tf.gather(ex["frames"], pos)
  jpegs.set_shape([num_frames * num_clips])
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  side = tf.minimum(shape[0], shape[1])
  if protocol == "miles":
    half = lambda d: tf.cast(tf.round(tf.cast(d, tf.float64) / 2.0), tf.int32)  # half to even
    window = tf.stack([half(shape[0] - side), half(shape[1] - side), side, side])
    return decode_frames(jpegs, window, size, antialias=False), want, got
  window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
  return decode_frames(jpegs, window, size, antialias=True), want, got


def eval_protocol(config) -> str:
  """config eval.frames: "miles" (default) or "frozen" (prepare.EVAL_PROTOCOLS)."""
  ev = config.get("eval")
  return str(ev.get("frames", "miles")) if ev is not None else "miles"


def eval_max_len(config) -> int:
  """Caption length at evaluation: data.eval_max_len, or (0) all of model.text.max_len."""
  return int(config.data.get("eval_max_len", 0) or config.model.text.max_len)


def _parse_valid(position, raw):
  ex = schema.parse_example(raw)
  caps = ex["captions"]
  ex["captions"] = tf.boolean_mask(caps, tf.strings.length(tf.strings.strip(caps)) > 0)
  return position, ex


def _is_valid(position, ex):
  # 0-frame records and records without a caption are dropped (and counted as skipped)
  return tf.logical_and(tf.size(ex["frames"]) > 0, tf.size(ex["captions"]) > 0)


def _records(files: list, cycle_length: int = 16):
  """Records of `files`, interleaved one by one; a truncated file ends where it breaks."""
  files_ds = tf.data.Dataset.from_tensor_slices(files)
  return files_ds.interleave(
      lambda f: tf.data.TFRecordDataset(f).ignore_errors(log_warning=True),
      cycle_length=max(1, min(cycle_length, len(files))), block_length=1,
      **({"num_parallel_calls": AUTOTUNE, "deterministic": True} if len(files) > 1 else {}))


def complete_records(path: str) -> tuple[int, bool]:
  """(complete records, truncated?) of a TFRecord file, from its 12-byte record headers only.

  A truncated file ends inside a record; what was written after that point is gone and cannot
  be counted from the file itself.
  """
  size = tf.io.gfile.stat(path).length
  count, offset = 0, 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while offset < size:
      if size - offset < 12:
        return count, True
      f.seek(offset)
      (length,) = struct.unpack("<Q", f.read(8))
      offset += 12 + length + 4  # header (length, its crc), data, data crc
      if offset > size:
        return count, True
      count += 1
  return count, False


def lost_records(path: str) -> tuple[int, bool]:
  """(records a shard lost, exact?): 0 for an intact shard; for a truncated one, the records
  written (its `.NAME.count` file, schema.record_count_file) minus the complete ones left, or at
  least 1 (not exact) when no count was recorded."""
  complete, truncated = complete_records(path)
  if not truncated:
    return 0, True
  count_file = schema.record_count_file(path)
  if tf.io.gfile.exists(count_file):
    with tf.io.gfile.GFile(count_file) as f:
      return max(int(f.read().strip()) - complete, 1), True
  return 1, False


def _epoch_key(seed: int, epoch: int, process_index: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])


def build_train_dataset(config, files: list, tokenizer, *, seed: int, epoch: int = 0,
                        position: int = 0, process_index: int = 0, process_count: int = 1,
                        num_frames: Optional[int] = None, record_shard: Optional[tuple] = None
                        ) -> tf.data.Dataset:
  """One epoch of this host's batches, starting at record `position` of the epoch stream.

  Elements carry `_position` int64 [b] (record positions, for resuming) besides the batch.
  `record_shard=(index, count)`: keep every count-th record of `files` (read in an order shared
  by every host), starting at index. `num_frames` overrides data.num_frames (per source).
  """
  num_frames, size, grid = _geometry(config, num_frames)
  batch = config.data.batch_size // process_count
  strategy, ratio = mask_spec(config)
  masking.num_masked(strategy, num_frames, grid, ratio)  # validates before any work
  key = _epoch_key(seed, epoch, process_index)
  # record-level sharding needs one record stream for all hosts: the file order is host-free
  order_key = key if record_shard is None else _epoch_key(seed, epoch, -1 % 2**31)
  order = np.random.default_rng(order_key).permutation(len(files))
  ds = _records([files[i] for i in order])
  if record_shard is not None:
    ds = ds.shard(record_shard[1], record_shard[0])
  if config.data.shuffle_buffer > 1:
    ds = ds.shuffle(config.data.shuffle_buffer, seed=key % (2**31), reshuffle_each_iteration=False)
  ds = ds.enumerate().skip(position)  # positions count raw records, corrupt ones included
  ds = ds.map(_parse_valid, num_parallel_calls=AUTOTUNE, deterministic=True).filter(_is_valid)

  def process(position, ex):
    seed_pair = tf.stack([tf.constant(key % (2**31), tf.int64), position])
    frames, caption = train_clip(ex, seed_pair, num_frames, size, config.data.crop_scale)
    index = tf.strings.to_hash_bucket_fast(ex["video_id"], 2**31 - 1)
    return {"frames": frames, "caption": caption, "video_index": tf.cast(index, tf.int32),
            "_position": position}

  ds = ds.map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)  # undecodable JPEG etc.: the record is skipped
  ds = ds.batch(batch, drop_remainder=True)

  def finish(b):
    ids, att = tokenizer.tokenize(b.pop("caption"))
    mask = tf.numpy_function(
        lambda pos: masking.sample_masks((seed, epoch, process_index), pos, strategy,
                                         num_frames, grid, ratio),
        [b["_position"]], tf.bool, stateful=False)
    mask.set_shape([batch, num_frames * grid[0] * grid[1]])
    b.update(input_ids=ids, attention_mask=att, mvm_mask=mask)
    return b

  ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(AUTOTUNE)


class TrainIterator:
  """Endless iterator of per-host train batches; `state()` is a small dict to checkpoint."""

  def __init__(self, config, *, seed: int, process_index: int, process_count: int,
               tokenizer=None, source: Optional[dict] = None):
    if config.data.batch_size % process_count:
      raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                       f"process_count={process_count}")
    self.config, self.seed = config, int(seed)
    self.process_index, self.process_count = process_index, process_count
    if source is None:
      sources = config_lib.train_sources(config)
      source = sources[0] if sources else {"glob": "", "frames": config.data.num_frames}
    self.num_frames = int(source["frames"])
    self.files, self.record_shard = host_files(list_files(source["glob"]), process_index,
                                               process_count)
    self.tokenizer = tokenizer or build_tokenizer(config.data.tokenizer, config.data.max_len)
    self.epoch, self.position, self.skipped = 0, 0, 0
    self._it = None
    self._yielded_this_epoch = 0
    self._lost = None  # records lost per epoch to truncated shards (counted as skipped)

  def lost_per_epoch(self) -> int:
    """Records this host's shards lost to truncation: they never reach the stream, so they are
    counted here, once per epoch (with record-level sharding, by process 0 only)."""
    if self._lost is None:
      self._lost = 0
      if self.record_shard is None or self.process_index == 0:
        for f in self.files:
          n, exact = lost_records(f)
          if n:
            logging.warning("%s is truncated: %s%d record(s) lost, counted as skipped", f,
                            "" if exact else "at least ", n)
          self._lost += n
    return self._lost

  def state(self) -> dict:
    """Where the next batch starts; JSON-serialisable."""
    return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

  def restore(self, state: dict):
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self.skipped = int(state.get("skipped", 0))
    self._it = None

  def dataset(self) -> tf.data.Dataset:
    return build_train_dataset(self.config, self.files, self.tokenizer, seed=self.seed,
                               epoch=self.epoch, position=self.position,
                               process_index=self.process_index,
                               process_count=self.process_count, num_frames=self.num_frames,
                               record_shard=self.record_shard)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      if self._it is None:
        if self.position == 0:  # a new epoch (a resumed one has counted them already)
          self.skipped += self.lost_per_epoch()
        self._it = self.dataset().as_numpy_iterator()
        self._yielded_this_epoch = 0
      try:
        b = next(self._it)
      except StopIteration:
        if self._yielded_this_epoch == 0 and self.position == 0:
          raise ValueError(
              f"process {self.process_index}: shards {self.files} hold fewer valid clips than "
              f"the per-host batch {self.config.data.batch_size // self.process_count}")
        self.epoch, self.position, self._it = self.epoch + 1, 0, None
        continue
      pos = b.pop("_position")
      # records between the previous batch and this one that did not arrive were corrupt
      self.skipped += int(pos[-1] + 1 - self.position) - len(pos)
      self.position = int(pos[-1]) + 1
      self._yielded_this_epoch += 1
      return b


class MixedTrainIterator:
  """Batches from several sources: batch n comes from source `pick(n)`, drawn by weight with a
  (seed, n) key, identical on every host. State: {"batches": n, "sources": [state, ...]}."""

  def __init__(self, iterators: list, weights: list, seed: int):
    self.iterators = iterators
    w = np.asarray(weights, np.float64)
    self.probs = w / w.sum()
    self.seed, self.batches = int(seed), 0

  def pick(self, n: int) -> int:
    return int(np.random.default_rng([self.seed, 7919, n]).choice(len(self.probs), p=self.probs))

  def state(self) -> dict:
    return {"batches": self.batches, "sources": [it.state() for it in self.iterators]}

  def restore(self, state: dict):
    self.batches = int(state["batches"])
    for it, s in zip(self.iterators, state["sources"]):
      it.restore(s)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = next(self.iterators[self.pick(self.batches)])
    self.batches += 1
    return b


def state_to_ints(state: dict) -> list:
  """A data state as a flat int list (for a process_allgather); `ints_to_state` inverts it."""
  if "sources" in state:
    return [state["batches"]] + [int(s[k]) for s in state["sources"]
                                 for k in ("epoch", "position", "skipped")]
  return [int(state[k]) for k in ("epoch", "position", "skipped")]


def ints_to_state(values) -> dict:
  v = [int(x) for x in values]
  if len(v) == 3:
    return {"epoch": v[0], "position": v[1], "skipped": v[2]}
  return {"batches": v[0], "sources": [ints_to_state(v[i:i + 3]) for i in range(1, len(v), 3)]}


def resume_state(saved: list, process_index: int, process_count: int) -> dict:
  """This host's data state from a checkpoint's per-host states.

  Same host count: its own state, the run continues exactly. Another host count: the hosts'
  streams do not map onto the new split, so every source starts its next epoch (the unread rest
  of the interrupted epoch is skipped; no record is read twice within an epoch) with a warning.
  """
  if len(saved) == process_count:
    return saved[process_index]
  if not saved:
    raise ValueError("the checkpoint holds no data position (meta['data'] is empty)")

  def next_epoch(states):
    return {"epoch": max(int(s["epoch"]) for s in states) + 1, "position": 0,
            "skipped": sum(int(s.get("skipped", 0)) for s in states)}

  if process_index == 0:
    logging.warning("the checkpoint was written by %d processes and this run has %d: every host "
                    "starts the next data epoch (the rest of the interrupted epoch is skipped)",
                    len(saved), process_count)
  if "sources" in saved[0]:
    return {"batches": int(saved[0]["batches"]),
            "sources": [next_epoch([s["sources"][i] for s in saved])
                        for i in range(len(saved[0]["sources"]))]}
  return next_epoch(saved)


def make_train_iterator(config, *, seed: int, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, tokenizer=None):
  """Train batches for this process (defaults: jax.process_index() / jax.process_count()).

  One source: a TrainIterator; several (`data.train` as a list): a MixedTrainIterator.
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  sources = config_lib.train_sources(config)
  if not sources:
    list_files("", "data.train")  # raises the "is empty" error
  tokenizer = tokenizer or build_tokenizer(config.data.tokenizer, config.data.max_len)
  # source i draws with seed + i * 1000003: sources do not share shuffles and crops
  its = [TrainIterator(config, seed=seed + i * 1_000_003, process_index=process_index,
                       process_count=process_count, tokenizer=tokenizer, source=src)
         for i, src in enumerate(sources)]
  if isinstance(config.data.train, str):
    return its[0]
  return MixedTrainIterator(its, [s["weight"] for s in sources], seed)


def read_captions(pattern: str, field: str) -> list:
  """Every non-empty caption of the shards matching `pattern`, in shard order (no frames read)."""
  out = []
  for raw in _records(list_files(pattern, field), cycle_length=1):
    ex = schema.parse_example(raw, with_frames=False)
    out.extend(c.decode("utf-8", "replace") for c in ex["captions"].numpy() if c.strip())
  return out


@dataclasses.dataclass
class EvalSet:
  """All of an eval split: texts for every video, clips for this host's share of the videos."""
  video_ids: list                 # [V] every valid video, in shard order
  texts: list                     # [C] every caption
  input_ids: np.ndarray           # int32 [C, L]
  attention_mask: np.ndarray      # int32 [C, L]
  text_to_video: np.ndarray       # int32 [C] index into video_ids
  clips: np.ndarray               # uint8 [V_local, K*T, S, S, 3] (K = data.eval_clips)
  clip_index: np.ndarray          # int32 [V_local] index into video_ids
  labels: Optional[np.ndarray]    # int32 [V], None when the dataset has no labels
  class_names: Optional[list]     # class name (its caption) per label index
  skipped: list                   # records left out: {position, video_id, reason}
  failed: list                    # video_ids whose frames did not decode (their clip is black)
  per_host: int = 0               # clips per host incl. padding (equal on every host)
  batch_size: int = 8
  num_clips: int = 1              # K test-time clips per video (rows of clips are clip-major)
  positions: Optional[dict] = None  # this host's frame positions: exact or nearest stored
  truncated: int = 0              # captions longer than the eval caption length
  expected_videos: int = 0        # videos of the published split (shards' expected_items; 0 =
                                  # unknown)

  def batches(self, batch_size: Optional[int] = None):
    """This host's clips in order, padded: {frames, video_index (-1 = pad), valid}.

    Every host yields the same number of batches (for jax.make_array_from_process_local_data).
    """
    b = batch_size or self.batch_size
    for i in range(-(-self.per_host // b)):
      sl = slice(i * b, (i + 1) * b)
      frames, index = self.clips[sl], self.clip_index[sl]
      pad = b - len(index)
      yield {
          "frames": np.concatenate([frames, np.zeros((pad,) + self.clips.shape[1:], np.uint8)]),
          "video_index": np.concatenate([index, -np.ones(pad, np.int32)]).astype(np.int32),
          "valid": np.arange(b) < len(index),
      }


def load_eval_set(pattern: str, config, tokenizer=None, *, process_index: int = 0,
                  process_count: int = 1, batch_size: Optional[int] = None) -> EvalSet:
  """Reads an eval split in shard order. Records without frames or captions are left out (on
  every host alike); a video whose JPEGs fail to decode keeps its place with a black clip."""
  num_frames, size, _ = _geometry(config)
  num_clips = int(config.data.get("eval_clips", 1) or 1)
  max_len = eval_max_len(config)
  tokenizer = tokenizer or build_tokenizer(config.data.tokenizer, max_len)
  files = list_files(pattern, "data.eval")
  records = _records(files, cycle_length=1).enumerate()

  # Pass 1: captions, labels and validity of every record (identical on every host).
  def meta(position, raw):
    _, ex = _parse_valid(position, raw)
    return {"position": position, "video_id": ex["video_id"], "label": ex["label"],
            "num_frames": tf.size(ex["frames"]), "expected": ex["expected_items"],
            "captions": tf.strings.reduce_join(ex["captions"], separator="\x00")}

  video_ids, texts, t2v, labels, valid_pos, skipped = [], [], [], [], [], []
  expected, expected_videos = 0, 0
  for m in records.map(meta, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True) \
      .as_numpy_iterator():
    for p in range(expected, int(m["position"])):
      skipped.append({"position": p, "video_id": None, "reason": "unparseable record"})
    expected = int(m["position"]) + 1
    expected_videos = max(expected_videos, int(m["expected"]))
    vid = m["video_id"].decode("utf-8", "replace")
    caps = [c for c in m["captions"].decode("utf-8", "replace").split("\x00") if c.strip()]
    reason = "no frames" if m["num_frames"] == 0 else "no captions" if not caps else None
    if reason:
      skipped.append({"position": int(m["position"]), "video_id": vid, "reason": reason})
      continue
    for c in caps:
      texts.append(c)
      t2v.append(len(video_ids))
    labels.append(int(m["label"]))
    valid_pos.append(int(m["position"]))
    video_ids.append(vid)
  # A damaged shard (truncated, or records that do not parse) shrinks the gallery and inflates
  # recall without a sign in the metrics: refuse it unless the config says otherwise.
  truncated = [(f, n) for f in files for n, cut in [complete_records(f)] if cut]
  unparseable = [s["position"] for s in skipped if s["reason"] == "unparseable record"]
  if truncated or unparseable:
    what = [f"{f} ends inside a record after {n} complete records (later records lost)"
            for f, n in truncated]
    if unparseable:
      what.append(f"{len(unparseable)} unparseable records at positions {unparseable[:10]}")
    if not config.data.get("allow_damaged_eval", False):
      raise ValueError(f"data.eval={pattern} is damaged: {'; '.join(what)}. Recall on the rest "
                       "would not compare with the full split: re-create the shards, or set "
                       "--config.data.allow_damaged_eval=True to evaluate what is readable")
    skipped.extend({"position": None, "video_id": None, "reason": f"truncated shard {f} "
                    f"after {n} records"} for f, n in truncated)
  if skipped:
    logging.warning("eval %s: %d records left out: %s", pattern, len(skipped), skipped[:10])
  if not video_ids:
    raise ValueError(f"data.eval={pattern}: no valid clips")

  # Pass 2: this host's clips (every process_count-th valid video).
  mine = list(range(process_index, len(video_ids), process_count))
  want = tf.constant([valid_pos[i] for i in mine] or [-1], tf.int64)
  local = records.filter(lambda p, r: tf.reduce_any(tf.equal(p, want)))

  protocol = eval_protocol(config)

  def clip(position, raw):
    ex = schema.parse_example(raw)
    return (position,) + eval_clip(ex, num_frames, size, num_clips, protocol) + (
        ex["eval_protocol"],)

  got, offsets, stored_as = {}, [], set()
  for p, c, want, have, prot in local.map(clip, num_parallel_calls=AUTOTUNE,
                                          deterministic=True) \
      .ignore_errors(log_warning=True).as_numpy_iterator():
    got[int(p)] = c
    offsets.append(int(np.abs(want - have).max()))
    stored_as.add(prot.decode() or "unrecorded")
  rule = "centres of equal segments of the source video (Frozen 'uniform')"
  if protocol == "miles":
    rule += ", each one frame earlier as the MILES release's cv2 seek decodes it"
  positions = {"rule": rule + (f"; {num_clips} clips, clip k = segments k, k+K, ... of K*T"
                               if num_clips > 1 else ""),
               "protocol": protocol, "shards_prepared_for": sorted(stored_as),
               "exact": all(o == 0 for o in offsets), "videos_off": sum(o > 0 for o in offsets),
               "max_offset_frames": max(offsets, default=0)}
  if stored_as - {protocol, "unrecorded"}:
    logging.warning("eval %s: config eval.frames=%s but the shards were prepared with "
                    "--eval_protocol=%s (their resize differs): prepare the split again with "
                    "--eval_protocol=%s, or set eval.frames to match", pattern, protocol,
                    ",".join(sorted(stored_as)), protocol)
  if not positions["exact"]:
    logging.warning("eval %s: %d videos lack stored frames at the eval positions (nearest stored "
                    "frame used, up to %d frames away); prepare the split with --eval_frames "
                    "covering %d", pattern, positions["videos_off"],
                    positions["max_offset_frames"], num_frames * num_clips)
  clips = np.zeros((len(mine), num_frames * num_clips, size, size, 3), np.uint8)
  failed = []
  for j, i in enumerate(mine):
    if valid_pos[i] in got:
      clips[j] = got[valid_pos[i]]
    else:
      failed.append(video_ids[i])
  if failed:
    logging.warning("eval %s: frames of %d videos did not decode (black clips): %s", pattern,
                    len(failed), failed[:10])

  ids, att = tokenizer.tokenize_numpy(texts)
  truncated = int((att.sum(1) >= max_len).sum())  # [SEP] landed in the last slot: maybe cut
  used = max(int(att.sum(1).max()), 1) if len(att) else 1
  ids, att = ids[:, :used], att[:, :used]  # padding columns change nothing (masked); drop them
  labels_arr = np.asarray(labels, np.int32)
  class_names = None
  if (labels_arr >= 0).any():
    names = {}
    for v, c in zip(t2v, texts):
      names.setdefault(labels[v], c)
    class_names = [names.get(k, f"class {k}") for k in range(int(labels_arr.max()) + 1)]
  else:
    labels_arr = None
  b = batch_size or config.data.eval_batch_size
  per_host = -(-len(video_ids) // process_count)
  return EvalSet(video_ids=video_ids, texts=texts, input_ids=ids, attention_mask=att,
                 text_to_video=np.asarray(t2v, np.int32), clips=clips,
                 clip_index=np.asarray(mine, np.int32), labels=labels_arr,
                 class_names=class_names, skipped=skipped, failed=failed,
                 per_host=per_host, batch_size=b, num_clips=num_clips, positions=positions,
                 truncated=truncated, expected_videos=expected_videos)
