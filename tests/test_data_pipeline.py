"""pipeline.py on small shards written from numpy frames: shapes, frame sampling, process
split, determinism, resume, corrupt records, eval set."""
import os

import numpy as np
import pytest
import tensorflow as tf

from miles_jax import config_lib, masking
from miles_jax.data import pipeline, prepare, schema

SIZE, STORED = 32, 8
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "clip", "number", "zero", "one", "two", "three",
         "four", "five", "six", "seven", "eight", "nine"]
WORDS = VOCAB[6:]


def _frames(i, n=STORED, h=SIZE, w=SIZE):
  """Distinct smooth frames: a gradient whose brightness encodes (clip, frame)."""
  yy, xx = np.mgrid[0:h, 0:w]
  out = np.zeros((n, h, w, 3), np.uint8)
  for t in range(n):
    out[t, ..., 0] = (xx * 4 + 20 * t) % 256
    out[t, ..., 1] = (yy * 4 + 37 * i) % 256
    out[t, ..., 2] = 60 + 20 * t
  return out


def _caption(i):
  return f"clip number {WORDS[i % 10]}"


def _write(dirname, split, num_clips, num_shards, extra=None, labels=False):
  os.makedirs(dirname, exist_ok=True)
  shards = [[] for _ in range(num_shards)]
  for i in range(num_clips):
    ex = schema.make_example(f"vid{i:03d}", [_caption(i), f"clip {WORDS[(i + 1) % 10]}"],
                             _frames(i), fps=4.0, label=i % 3 if labels else -1)
    shards[i % num_shards].append(ex.SerializeToString())
  for j, recs in enumerate(shards):
    if extra and j == 0:
      recs = recs[:1] + extra + recs[1:]
    prepare.write_records(os.path.join(dirname, prepare.shard_name(split, j, num_shards)), recs)
  with open(os.path.join(dirname, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  return os.path.join(dirname, f"{split}-*.tfrecord")


def _config(tmp, pattern, batch=4):
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")  # img 32, patch 8
  c.data.train = pattern
  c.data.eval = pattern
  c.data.tokenizer = os.path.join(tmp, "vocab.txt")
  c.data.batch_size = batch
  c.data.eval_batch_size = 4
  c.data.shuffle_buffer = 8
  c.data.max_len = 8
  return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("shards"))
  return tmp, _write(tmp, "train", 24, 4)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_format(shards):
  tmp, pattern = shards
  c = _config(tmp, pattern)
  b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
  assert b["frames"].dtype == np.uint8 and b["frames"].shape == (4, 4, SIZE, SIZE, 3)
  assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (4, 8)
  assert b["attention_mask"].dtype == np.int32
  assert b["mvm_mask"].dtype == bool and b["mvm_mask"].shape == (4, 4 * 16)
  assert (b["mvm_mask"].sum(1) == masking.num_masked("blockwise", 4, (4, 4), 0.5)).all()
  assert b["video_index"].dtype == np.int32
  # captions tokenized in-graph: [CLS] clip ... [SEP]
  assert (b["input_ids"][:, 0] == 2).all() and (b["input_ids"][:, 1] == 4).all()


def test_train_frames_come_from_their_segments(shards):
  """With a full-frame crop, output frame t is stored frame in segment t (maybe flipped)."""
  tmp, pattern = shards
  c = _config(tmp, pattern)
  c.data.crop_scale = (1.0, 1.0)
  it = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
  ids = {int(tf.strings.to_hash_bucket_fast(f"vid{i:03d}", 2**31 - 1)): i for i in range(24)}
  for b in _take(it, 2):
    for clip, vi in zip(b["frames"], b["video_index"]):
      ref = np.stack([tf.io.decode_jpeg(schema.encode_jpeg(f)).numpy()
                      for f in _frames(ids[int(vi)])])
      flipped = (clip[0] != ref[0]).any() and (clip[0] != ref[1]).any()
      for t in range(4):
        cands = [ref[2 * t], ref[2 * t + 1]]
        if flipped:
          cands = [x[:, ::-1] for x in cands]
        assert any((clip[t] == x).all() for x in cands), (vi, t)


def test_process_split_disjoint_and_complete(shards):
  tmp, pattern = shards
  files = pipeline.list_files(pattern)
  parts = [pipeline.split_files(files, i, 2) for i in range(2)]
  assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == files
  c = _config(tmp, pattern, batch=4)
  seen = []
  for i in range(2):
    it = pipeline.make_train_iterator(c, seed=0, process_index=i, process_count=2)
    # per-host batch = 4 / 2; 12 clips per host -> 6 batches per epoch
    got = set()
    for b in _take(it, 6):
      assert b["frames"].shape[0] == 2
      got.update(b["video_index"].tolist())
    seen.append(got)
  assert len(seen[0]) == len(seen[1]) == 12
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
  with pytest.raises(ValueError, match="--num_shards"):
    pipeline.split_files(files, 0, 5)


@pytest.mark.slow
def test_deterministic_and_resumable(shards):
  tmp, pattern = shards
  c = _config(tmp, pattern)
  mk = lambda s: pipeline.make_train_iterator(c, seed=s, process_index=0, process_count=1)
  a, b = _take(mk(1), 3), _take(mk(1), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = _take(mk(2), 3)
  assert any((x["frames"] != y["frames"]).any() for x, y in zip(a, other))

  it = mk(1)
  _take(it, 4)  # 6 batches per epoch: the next 4 cross into epoch 1
  state = it.state()
  want = _take(it, 4)
  assert it.state()["epoch"] == 1
  again = mk(1)
  again.restore(state)
  for x, y in zip(want, _take(again, 4)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_corrupt_records_skipped_and_counted(tmp_path):
  tmp = str(tmp_path)
  bad_jpeg = schema.make_example("bad_jpeg", ["clip one"], jpeg_frames=[b"\xff\xd8\xff garbage"] *
                                 STORED, height=SIZE, width=SIZE)
  no_frames = schema.make_example("no_frames", ["clip two"], jpeg_frames=[])
  no_caption = schema.make_example("no_caption", ["  "], _frames(0))
  extra = [r.SerializeToString() for r in (bad_jpeg, no_frames, no_caption)]
  pattern = _write(tmp, "train", 8, 2, extra=extra)
  # truncate shard 1 in the middle of its third record: two of its 4 records survive
  path = os.path.join(tmp, prepare.shard_name("train", 1, 2))
  sizes = [len(r.numpy()) + 16 for r in tf.data.TFRecordDataset(path)]
  with open(path, "r+b") as f:
    f.truncate(sum(sizes[:2]) + sizes[2] // 2)
  c = _config(tmp, pattern, batch=1)
  c.data.shuffle_buffer = 1
  it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
  batches = _take(it, 6)  # 4 + 2 good clips in epoch 0
  ids = {int(b["video_index"][0]) for b in batches}
  want = {int(tf.strings.to_hash_bucket_fast(f"vid{i:03d}", 2**31 - 1)) for i in
          (0, 2, 4, 6, 1, 3)}
  assert ids == want
  # The 3 invalid records arrive and are counted, and so are the 2 records lost with the end of
  # shard 1: its header walk finds 2 complete records, the writer recorded 4.
  assert it.skipped == 3 + 2
  assert pipeline.complete_records(path) == (2, True)
  assert pipeline.lost_records(path) == (2, True)
  # without the writer's count the loss is "at least one", never silently zero
  os.remove(schema.record_count_file(path))
  assert pipeline.lost_records(path) == (1, False)
  assert pipeline.complete_records(os.path.join(tmp, prepare.shard_name("train", 0, 2))) == (7, False)

  # Evaluation refuses the damaged split (naming the shard and the flag) unless told otherwise.
  with pytest.raises(ValueError, match=r"train-00001-of-00002.tfrecord ends inside a record "
                     r"after 2 complete records.*allow_damaged_eval"):
    pipeline.load_eval_set(pattern, c)
  c.data.allow_damaged_eval = True
  ev = pipeline.load_eval_set(pattern, c)
  assert [s["reason"] for s in ev.skipped if s["video_id"] is None] == [
      f"truncated shard {path} after 2 records"]
  assert sorted(s["video_id"] for s in ev.skipped if s["video_id"]) == ["no_caption", "no_frames"]
  assert {s["video_id"]: s["reason"] for s in ev.skipped}["no_frames"] == "no frames"
  assert ev.failed == ["bad_jpeg"]
  assert len(ev.video_ids) == 7 and "bad_jpeg" in ev.video_ids
  assert (ev.clips[ev.video_ids.index("bad_jpeg")] == 0).all()


def test_eval_set(tmp_path):
  tmp = str(tmp_path)
  pattern = _write(tmp, "test", 5, 2, labels=True)
  c = _config(tmp, pattern)
  c.eval.frames = "frozen"  # Frozen's segment centres themselves (eval.frames "miles": below)
  ev = pipeline.load_eval_set(pattern, c)
  # shard order: shard 0 holds clips 0, 2, 4; shard 1 holds 1, 3
  assert ev.video_ids == ["vid000", "vid002", "vid004", "vid001", "vid003"]
  assert len(ev.texts) == 10 and ev.text_to_video.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  # eval captions are padded to the longest one ([CLS] clip number two [SEP]), not data.max_len
  assert ev.texts[2] == _caption(2) and ev.input_ids.shape == (10, 5)
  # a class is named by the first caption of its first video (vid000, vid004, vid002)
  assert ev.labels.tolist() == [0, 2, 1, 1, 0] and ev.class_names == [
      _caption(0), _caption(4), _caption(2)]
  # eval frames: these records carry no frame_index, so their 8 stored frames are the source;
  # Frozen's 'uniform' rule on 8 frames and 4 segments: bounds int(linspace(0, 8, 5)) =
  # 0,2,4,6,8, frame (start + end - 1) // 2 -> 0, 2, 4, 6. The square 32 px frame is the
  # centre crop, so they equal the stored JPEG decoded independently.
  for v, vid in enumerate(ev.video_ids):
    ref = [tf.io.decode_jpeg(schema.encode_jpeg(f)).numpy() for f in _frames(int(vid[3:]))]
    np.testing.assert_array_equal(ev.clips[v], np.stack([ref[0], ref[2], ref[4], ref[6]]))
  assert ev.positions["exact"]
  batches = list(ev.batches())
  assert len(batches) == 2 and batches[1]["valid"].tolist() == [True, False, False, False]
  assert batches[1]["video_index"].tolist() == [4, -1, -1, -1]
  # two hosts: disjoint clips covering all, same number of batches
  hosts = [pipeline.load_eval_set(pattern, c, process_index=i, process_count=2, batch_size=2)
           for i in range(2)]
  idx = [[i for b in h.batches() for i, ok in zip(b["video_index"], b["valid"]) if ok]
         for h in hosts]
  assert sorted(idx[0] + idx[1]) == [0, 1, 2, 3, 4] and not set(idx[0]) & set(idx[1])
  assert len(list(hosts[0].batches())) == len(list(hosts[1].batches())) == 2
  np.testing.assert_array_equal(hosts[1].clips[0], ev.clips[1])


def test_config_errors(shards):
  tmp, pattern = shards
  c = _config(tmp, pattern, batch=3)
  with pytest.raises(ValueError, match="data.batch_size"):
    pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=2)
  c.data.train = os.path.join(tmp, "nothing-*.tfrecord")
  with pytest.raises(FileNotFoundError, match="data.train"):
    pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)


def _frozen_uniform(n, t):
  """Frozen in Time's sample_frames(t, n, 'uniform'), written out here independently."""
  bounds = np.linspace(start=0, stop=n, num=min(t, n) + 1).astype(int)
  return [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(len(bounds) - 1)]


def test_eval_positions_match_frozen_uniform_in_graph():
  # includes counts where float linspace and integer division disagree (208/48, 392/24)
  for n, t in [(9, 4), (12, 4), (208, 48), (392, 24), (416, 48), (100, 16), (3, 4), (1, 4)]:
    got = pipeline.uniform_positions(tf.constant(n, tf.int64), t).numpy().tolist()
    assert got == _frozen_uniform(n, t), (n, t)
    assert prepare.uniform_indices(n, t) == _frozen_uniform(n, t), (n, t)


def test_eval_frames_from_source_positions_and_clips(tmp_path):
  """Stored frames with source indices: eval takes the segment centres of the *source* video
  (not the middles among the stored frames); K clips take sub-segment centres, clip-major."""
  tmp = str(tmp_path)
  n_src = 40
  stored_idx = sorted(set(range(0, 40, 3)) | set(_frozen_uniform(n_src, 4))
                      | set(_frozen_uniform(n_src, 8)))
  frames = np.stack([np.full((SIZE, SIZE, 3), 5 * i, np.uint8) for i in stored_idx])
  ex = schema.make_example("v", ["a very long caption " + "word " * 20], frames, fps=10.0,
                           frame_index=stored_idx, source_frames=n_src)
  os.makedirs(tmp, exist_ok=True)
  prepare.write_records(os.path.join(tmp, "test-00000-of-00001.tfrecord"),
                        [ex.SerializeToString()])
  with open(os.path.join(tmp, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB + ["a", "very", "long", "caption", "word"]) + "\n")
  c = _config(tmp, os.path.join(tmp, "test-*.tfrecord"))
  c.model.text.max_len = 64
  c.eval.frames = "frozen"
  ev = pipeline.load_eval_set(c.data.eval, c)
  brightness = ev.clips[0].mean(axis=(1, 2, 3)) / 5
  np.testing.assert_allclose(brightness, _frozen_uniform(n_src, 4), atol=0.5)  # 4,14,24,34
  assert ev.positions["exact"]
  # the eval caption keeps all 26 pieces + [CLS]/[SEP] although data.max_len is 8
  assert c.data.max_len == 8 and ev.attention_mask.sum() == 2 + 4 + 20 and ev.truncated == 0
  c.data.eval_max_len = 10
  assert pipeline.load_eval_set(c.data.eval, c).truncated == 1
  # two clips: centres of 8 segments, clip 0 = segments 0, 2, 4, 6; clip 1 = 1, 3, 5, 7
  c.data.eval_clips = 2
  ev2 = pipeline.load_eval_set(c.data.eval, c)
  u8 = _frozen_uniform(n_src, 8)
  np.testing.assert_allclose(ev2.clips[0].mean(axis=(1, 2, 3)) / 5, u8[0::2] + u8[1::2],
                             atol=0.5)
  # frames missing at the eval positions: the nearest stored frame, reported as not exact
  c.data.eval_clips, c.data.num_frames = 1, 3
  ev3 = pipeline.load_eval_set(c.data.eval, c)
  assert not ev3.positions["exact"] and ev3.positions["max_offset_frames"] >= 1
  # eval.frames "miles": each centre's previous source frame (3, 13, 23, 33), nearest stored
  c.data.num_frames, c.eval.frames = 4, "miles"
  ev4 = pipeline.load_eval_set(c.data.eval, c)
  want = [max(i - 1, 0) for i in _frozen_uniform(n_src, 4)]
  got = [min(stored_idx, key=lambda s: abs(s - w)) for w in want]
  np.testing.assert_allclose(ev4.clips[0].mean(axis=(1, 2, 3)) / 5, got, atol=0.5)
  assert ev4.positions["protocol"] == "miles"


# --- pod scale: fewer shards than hosts, another host count on resume, weighted sources ---

def _epoch_ids(it, batches):
  ids = []
  for b in _take(it, batches):
    ids += b["video_index"].tolist()
  return ids


@pytest.mark.slow
def test_fewer_shards_than_hosts_falls_back_to_record_sharding(shards, caplog):
  """4 shards, 6 hosts: a warning, and the hosts' records are disjoint and cover the set."""
  tmp, pattern = shards
  c = _config(tmp, pattern, batch=6)  # 1 clip per host per batch
  seen = []
  with caplog.at_level("WARNING"):
    for i in range(6):
      it = pipeline.make_train_iterator(c, seed=0, process_index=i, process_count=6)
      assert it.record_shard == (i, 6) and len(it.files) == 4
      seen.append(_epoch_ids(it, 4))  # 24 records / 6 hosts
  assert "record-level sharding" in caplog.text
  flat = [v for s in seen for v in s]
  assert len(flat) == 24 and len(set(flat)) == 24


@pytest.mark.slow
def test_resume_on_another_host_count_reads_nothing_twice_in_an_epoch(shards):
  """2 hosts save mid-epoch; 3 hosts resume: no error, each starts the next epoch, and within
  that epoch no record is read twice (the hosts' shares are disjoint)."""
  tmp, pattern = shards
  c = _config(tmp, pattern, batch=6)
  saved = []
  for i in range(2):
    it = pipeline.make_train_iterator(c, seed=0, process_index=i, process_count=2)
    _take(it, 2)
    saved.append(it.state())
  assert all(s["epoch"] == 0 and s["position"] > 0 for s in saved)
  seen = []
  for i in range(3):
    it = pipeline.make_train_iterator(c, seed=0, process_index=i, process_count=3)
    it.restore(pipeline.resume_state(saved, i, 3))
    assert it.state()["epoch"] == 1 and it.state()["position"] == 0
    ids = []  # this host's whole epoch 1 (hosts hold 12, 6, 6 records of the 4 files)
    for _ in range(20):
      b = next(it)
      if it.state()["epoch"] > 1:
        break
      ids += b["video_index"].tolist()
    assert ids
    seen.append(ids)
  flat = [v for s in seen for v in s]
  assert len(flat) == len(set(flat)), "a record was read twice within the epoch"
  # same host count: the exact position comes back
  assert pipeline.resume_state(saved, 1, 2) == saved[1]


@pytest.mark.slow
def test_weighted_sources_one_source_per_batch(tmp_path):
  """Videos (4 frames) and images (1-frame records) as two sources, weights 3:1: every batch
  is from one source, images stay 1-frame clips, the mix follows the weights, and the mix is
  the same on every host and resumes exactly."""
  tmp = str(tmp_path)
  # 64 of each: 8 batches per host and epoch (each epoch builds its tf.data graph anew, ~2 s)
  videos = _write(os.path.join(tmp, "v"), "train", 64, 2)
  images = _write_images(os.path.join(tmp, "i"), 64)
  c = _config(tmp, videos, batch=4)
  with open(os.path.join(tmp, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  config_lib.set_train_sources(c, [{"glob": videos, "weight": 3.0, "frames": 4},
                                   {"glob": images, "weight": 1.0, "frames": 1}])
  config_lib.validate(c)
  mk = lambda i: pipeline.make_train_iterator(c, seed=0, process_index=i, process_count=2)
  it = mk(0)
  frames = [b["frames"].shape[1] for b in _take(it, 40)]
  assert set(frames) == {1, 4}
  share = frames.count(4) / len(frames)
  assert 0.6 <= share <= 0.9, share  # weight 3:1 -> 0.75
  b = next(mk(0))
  assert b["mvm_mask"].shape[1] == b["frames"].shape[1] * 16
  # the same source per batch on the other host
  other = [b["frames"].shape[1] for b in _take(mk(1), 40)]
  assert other == frames
  # resume: state after 5 batches, the next 5 equal an uninterrupted iterator's
  a = mk(0)
  _take(a, 5)
  state = a.state()
  ref = _take(a, 5)
  r = mk(0)
  r.restore(state)
  for x, y in zip(_take(r, 5), ref):
    np.testing.assert_array_equal(x["frames"], y["frames"])
  assert pipeline.ints_to_state(pipeline.state_to_ints(state)) == state
  # a malformed source names the field
  config_lib.set_train_sources(c, [{"glob": videos, "weight": 0}])
  with pytest.raises(ValueError, match=r"data\.train\[0\]\.weight"):
    config_lib.validate(c)


def _write_images(dirname, num):
  """`num` 1-frame records (images, as prepare writes CC3M) in one shard."""
  os.makedirs(dirname, exist_ok=True)
  recs = [schema.make_example(f"img{i:03d}", [_caption(i)], _frames(100 + i)[:1]).SerializeToString()
          for i in range(num)]
  prepare.write_records(os.path.join(dirname, prepare.shard_name("train", 0, 1)), recs)
  return os.path.join(dirname, "train-*.tfrecord")
