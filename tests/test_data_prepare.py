"""prepare.py + readers.py on real mp4 files written here with PyAV."""
import json
import os

import av
import numpy as np
import pytest
import tensorflow as tf

from miles_jax import config_lib
from miles_jax.data import pipeline, prepare, readers, schema

# Stored frames = PyAV decode + swscale AREA resize exactly; the only loss is the q90 JPEG
# (4:2:0 chroma) of a smooth 32 px frame: observed mean abs error 1.4, max 14 (0..255 scale).
JPEG_MEAN_TOL, JPEG_MAX_TOL = 2.5, 24


def write_mp4(path, num_frames=12, h=48, w=64, fps=10, seed=0):
  """A smooth moving pattern (compresses well, frames clearly distinct)."""
  yy, xx = np.mgrid[0:h, 0:w]
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"crf": "10"}
    for t in range(num_frames):
      f = np.zeros((h, w, 3), np.uint8)
      f[..., 0] = 20 + xx * 2 + 5 * t + 20 * seed  # no wrap-around: edges would ring in JPEG
      f[..., 1] = 30 + yy * 3 + 7 * t
      f[..., 2] = 128 + 40 * np.sin((xx + yy + 3 * t) / 9.0)
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def independent_decode(path, indices, resolution):
  """PyAV decode of the chosen frames, resized the way prepare documents (swscale AREA)."""
  out = []
  with av.open(path) as c:
    for i, frame in enumerate(c.decode(video=0)):
      if i in indices:
        h, w = frame.height, frame.width
        nh, nw = (resolution, round(w * resolution / h)) if h <= w else \
            (round(h * resolution / w), resolution)
        out.append(frame.reformat(width=nw, height=nh, format="rgb24",
                                  interpolation="AREA").to_ndarray())
  return np.stack(out)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  d = tmp_path_factory.mktemp("media")
  for i in range(3):
    write_mp4(str(d / f"v{i}.mp4"), seed=i)
  write_mp4(str(d / "square.mp4"), num_frames=9, h=48, w=48)
  (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  return str(d)


def _csv(tmp, rows):
  p = os.path.join(tmp, "ann.csv")
  with open(p, "w") as f:
    f.write("video_path,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
  return p


def test_prepare_csv_fidelity_and_report(media, tmp_path):
  ann = _csv(str(tmp_path), [("v0.mp4", "a first clip"), ("v1.mp4", "a second clip"),
                             ("v0.mp4", "another caption of v0"), ("missing.mp4", "gone"),
                             ("v2.mp4", ""), ("corrupt.mp4", "broken")])
  out = str(tmp_path / "out")
  prepare.main(["--format", "csv", "--annotations", ann, "--media_dir", media, "--out", out,
                "--num_shards", "2", "--frames_per_clip", "4", "--resolution", "32",
                "--workers", "1"])
  assert sorted(os.listdir(out)) == sorted(
      [".train-00000-of-00002.tfrecord.json", ".train-00001-of-00002.tfrecord.json",
       ".train-00000-of-00002.tfrecord.count", ".train-00001-of-00002.tfrecord.count",
       "report.json", "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"])
  report = json.load(open(os.path.join(out, "report.json")))["train"]
  assert report["written"] == 2 and report["items"] == 5
  reasons = {s["video_id"]: s["reason"] for s in report["skipped"]}
  assert set(reasons) == {"missing.mp4", "v2.mp4", "corrupt.mp4"}
  assert reasons["missing.mp4"].startswith("missing file")
  assert reasons["v2.mp4"].startswith("no captions")
  assert reasons["corrupt.mp4"].startswith("unreadable media")

  recs = {r["video_id"].decode(): r for f in sorted(os.listdir(out)) if f.endswith("tfrecord")
          for r in schema.read_records(os.path.join(out, f))}
  assert set(recs) == {"v0.mp4", "v1.mp4"}
  r = recs["v0.mp4"]
  assert [c.decode() for c in r["captions"]] == ["a first clip", "another caption of v0"]
  assert r["num_frames"] == 4 and (r["height"], r["width"]) == (32, 43) and r["fps"] == 10
  # middle frames of 4 segments of 12: 1, 4, 7, 10 -> timestamps at 10 fps
  np.testing.assert_allclose(r["timestamps"], [0.1, 0.4, 0.7, 1.0], atol=1e-6)
  stored = np.stack([tf.io.decode_jpeg(j).numpy() for j in r["frames"]]).astype(int)
  ref = independent_decode(os.path.join(media, "v0.mp4"), {1, 4, 7, 10}, 32).astype(int)
  assert stored.shape == ref.shape == (4, 32, 43, 3)
  err = np.abs(stored - ref)
  assert err.mean() < JPEG_MEAN_TOL and err.max() <= JPEG_MAX_TOL, (err.mean(), err.max())


@pytest.mark.slow
def test_resume_and_parallel(media, tmp_path):
  ann = _csv(str(tmp_path), [("v0.mp4", "zero"), ("v1.mp4", "one"), ("v2.mp4", "two"),
                             ("square.mp4", "square")])
  items = readers.read_items("csv", ann, media)
  out = str(tmp_path / "out")
  first = prepare.prepare(items, out, "train", num_shards=2, frames_per_clip=2, resolution=32,
                          workers=2, verbose=False)
  assert first["written"] == 4 and first["resumed_shards"] == []
  shard = os.path.join(out, prepare.shard_name("train", 0, 2))
  mtime = os.stat(shard).st_mtime_ns
  again = prepare.prepare(items, out, "train", num_shards=2, frames_per_clip=2, resolution=32,
                          workers=1, verbose=False)
  assert again["resumed_shards"] == [prepare.shard_name("train", i, 2) for i in range(2)]
  assert again["written"] == 4 and os.stat(shard).st_mtime_ns == mtime
  # an unfinished shard (temp file only) is redone
  os.remove(shard)
  open(shard + ".tmp", "w").write("partial")
  third = prepare.prepare(items, out, "train", num_shards=2, frames_per_clip=2, resolution=32,
                          workers=1, verbose=False)
  assert third["resumed_shards"] == [prepare.shard_name("train", 1, 2)]
  assert len(schema.read_records(shard)) == 2 and not os.path.exists(shard + ".tmp")


def test_prepare_then_pipeline_frame_exact(media, tmp_path):
  """Eval pipeline frames equal the stored JPEGs decoded independently (32 px square clips)."""
  ann = _csv(str(tmp_path), [("square.mp4", "a square clip")])
  out = str(tmp_path / "out")
  prepare.prepare(readers.read_items("csv", ann, media), out, "test", num_shards=1,
                  resolution=32, verbose=False, eval_frames=(4,), eval_protocol="frozen")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\nsquare\nclip\n")
  c = config_lib.default_config()
  c.eval.frames = "frozen"
  c.model = config_lib.model_config("tiny")
  c.data.num_frames, c.data.max_len = 4, 8
  c.data.tokenizer = str(tmp_path / "vocab.txt")
  ev = pipeline.load_eval_set(os.path.join(out, "test-*.tfrecord"), c)
  rec = schema.read_records(os.path.join(out, prepare.shard_name("test", 0, 1)))[0]
  stored = np.stack([tf.io.decode_jpeg(j).numpy() for j in rec["frames"]])
  np.testing.assert_array_equal(ev.clips[0], stored)
  assert ev.input_ids[0, :5].tolist() == [2, 4, 5, 6, 3]
  # and within JPEG tolerance of the source video: Frozen's segment centres of 9 frames in 4
  # segments (bounds 0, 2, 4, 6, 9 -> frames 0, 2, 4, 7)
  assert rec["frame_index"].tolist() == [0, 2, 4, 7] and rec["source_frames"] == 9
  ref = independent_decode(os.path.join(media, "square.mp4"), {0, 2, 4, 7}, 32)
  err = np.abs(ev.clips[0].astype(int) - ref)
  assert err.mean() < JPEG_MEAN_TOL and err.max() <= JPEG_MAX_TOL


def write_counting_mp4(path, num_frames, fps=10, size=32):
  """Frame i is a flat grey of value 6*i + 8: every frame encodes its own index."""
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "0"}
    for i in range(num_frames):
      f = np.full((size, size, 3), 6 * i + 8, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def _frame_numbers(frames):
  return np.round((np.asarray(frames, float).mean(axis=(1, 2, 3)) - 8) / 6).astype(int).tolist()


def test_eval_frames_are_segment_centres_of_the_source_video(tmp_path):
  """A 40-frame video whose frames show their own index: the eval split stores Frozen's segment
  centres for every --eval-frames count, and a 4-frame eval clip is frames 4, 14, 24, 34 —
  the centres of 4 equal segments of the source (not the middles among 8 stored frames,
  7, 17, 27, 37)."""
  media = tmp_path / "media"
  media.mkdir()
  write_counting_mp4(str(media / "count.mp4"), 40)
  ann = _csv(str(tmp_path), [("count.mp4", "counting")])
  out = str(tmp_path / "out")
  prepare.main(["--format", "csv", "--annotations", ann, "--media-dir", str(media), "--out", out,
                "--split", "test", "--num-shards", "1", "--resolution", "32", "--workers", "1",
                "--eval-frames", "4,8", "--eval_protocol", "frozen"])
  rec = schema.read_records(os.path.join(out, prepare.shard_name("test", 0, 1)))[0]
  bounds4, bounds8 = np.linspace(0, 40, 5).astype(int), np.linspace(0, 40, 9).astype(int)
  centres4 = [(a + b - 1) // 2 for a, b in zip(bounds4[:-1], bounds4[1:])]
  centres8 = [(a + b - 1) // 2 for a, b in zip(bounds8[:-1], bounds8[1:])]
  assert centres4 == [4, 14, 24, 34]
  want = sorted(set(centres4) | set(centres8))
  stored = [tf.io.decode_jpeg(j).numpy() for j in rec["frames"]]
  assert rec["frame_index"].tolist() == want == _frame_numbers(stored)
  np.testing.assert_allclose(rec["timestamps"], np.array(want) / 10, atol=1e-6)
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncounting\n")
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.data.num_frames, c.data.tokenizer = 4, str(tmp_path / "vocab.txt")
  c.eval.frames = "frozen"
  ev = pipeline.load_eval_set(os.path.join(out, "test-*.tfrecord"), c)
  assert _frame_numbers(ev.clips[0]) == centres4 and ev.positions["exact"]
  # two test-time clips of 4 frames: the centres of 8 segments, alternating
  c.data.eval_clips = 2
  ev = pipeline.load_eval_set(os.path.join(out, "test-*.tfrecord"), c)
  assert _frame_numbers(ev.clips[0]) == centres8[0::2] + centres8[1::2]
  # the MILES release's protocol (the default): each centre's previous frame, which its
  # `cap.set(CAP_PROP_POS_FRAMES, index - 1)` decodes, stored and read exactly
  miles = str(tmp_path / "miles")
  assert prepare.main(["--format", "csv", "--annotations", ann, "--media-dir", str(media),
                       "--out", miles, "--split", "test", "--num-shards", "1", "--resolution",
                       "32", "--workers", "1", "--eval-frames", "4,8"]) == 0
  rec = schema.read_records(os.path.join(miles, prepare.shard_name("test", 0, 1)))[0]
  assert rec["eval_protocol"] == b"miles"
  assert rec["frame_index"].tolist() == sorted({i - 1 for i in centres4 + centres8})
  c.eval.frames, c.data.eval_clips = "miles", 1
  ev = pipeline.load_eval_set(os.path.join(miles, "test-*.tfrecord"), c)
  assert _frame_numbers(ev.clips[0]) == [3, 13, 23, 33] and ev.positions["exact"]
  # the train split stores 16 evenly spaced frames by default (4 per segment of a 4-frame clip)
  prepare.main(["--format", "csv", "--annotations", ann, "--media-dir", str(media), "--out", out,
                "--num-shards", "1", "--resolution", "32", "--workers", "1"])
  rec = schema.read_records(os.path.join(out, prepare.shard_name("train", 0, 1)))[0]
  assert rec["num_frames"] == 16
  assert rec["frame_index"].tolist() == [(2 * i + 1) * 40 // 32 for i in range(16)]


def test_msrvtt_readers(media, tmp_path):
  csv_path = tmp_path / "MSRVTT_JSFUSION_test.csv"
  csv_path.write_text("key,vid_key,video_id,sentence\nret0,msr7020,v0,a man is talking\n"
                      "ret1,msr7021,v1,a dog runs\n")
  items = readers.read_items("msrvtt", str(csv_path), media)
  assert [(i.video_id, i.captions) for i in items] == [("v0", ["a man is talking"]),
                                                       ("v1", ["a dog runs"])]
  assert items[0].path == os.path.join(media, "v0.mp4")
  js = tmp_path / "train_val_videodata.json"
  js.write_text(json.dumps({"videos": [{"video_id": "v0"}, {"video_id": "v2"}], "sentences": [
      {"video_id": "v0", "caption": "one"}, {"video_id": "v2", "caption": "two"},
      {"video_id": "v0", "caption": "three"}]}))
  (tmp_path / "list.txt").write_text("v0\n")
  items = readers.read_items("msrvtt", str(js), media, video_list=str(tmp_path / "list.txt"))
  assert [(i.video_id, i.captions) for i in items] == [("v0", ["one", "three"])]


def test_webvid_reader(media, tmp_path):
  os.makedirs(tmp_path / "vids" / "000001_000050", exist_ok=True)
  os.link(os.path.join(media, "v1.mp4"), tmp_path / "vids" / "000001_000050" / "1234.mp4")
  ann = tmp_path / "results_2M_train.csv"
  ann.write_text('videoid,contentUrl,duration,page_dir,name\n'
                 '1234,https://x/1234.mp4,PT00H00M10S,000001_000050,"Aerial view, sunset"\n'
                 '99,https://x/99.mp4,PT00H00M10S,000001_000050,lost video\n')
  items = readers.read_items("webvid", str(ann), str(tmp_path / "vids"))
  assert items[0].captions == ["Aerial view, sunset"]
  assert items[0].path == str(tmp_path / "vids" / "000001_000050" / "1234.mp4")
  rep = prepare.prepare(items, str(tmp_path / "out"), num_shards=1, frames_per_clip=2,
                        resolution=32, verbose=False)
  assert rep["written"] == 1 and rep["skipped"][0]["video_id"] == "99"


def test_ucf101_reader_labels(media, tmp_path):
  lists = tmp_path / "ucfTrainTestlist"
  lists.mkdir()
  (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 BabyCrawling\n")
  (lists / "testlist01.txt").write_text("BabyCrawling/v_BabyCrawling_g01_c01.avi\n"
                                        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
  (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
  vids = tmp_path / "UCF-101"
  for cls, name, src in [("BabyCrawling", "v_BabyCrawling_g01_c01.avi", "v0.mp4"),
                         ("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi", "v1.mp4")]:
    (vids / cls).mkdir(parents=True)
    os.link(os.path.join(media, src), vids / cls / name)  # container is sniffed, not the name
  items = readers.read_items("ucf101", str(lists), str(vids), split="test", fold=1)
  assert [(i.video_id, i.label, i.captions) for i in items] == [
      ("v_BabyCrawling_g01_c01", 1, ["baby crawling"]),
      ("v_ApplyEyeMakeup_g01_c01", 0, ["apply eye makeup"])]
  assert len(readers.read_items("ucf101", str(lists), str(vids), split="train")) == 1
  out = str(tmp_path / "out")
  prepare.prepare(items, out, "test", num_shards=1, frames_per_clip=2, resolution=32,
                  verbose=False)
  recs = schema.read_records(os.path.join(out, prepare.shard_name("test", 0, 1)))
  assert [r["label"] for r in recs] == [1, 0]


def test_other_readers(tmp_path):
  (tmp_path / "msvd.txt").write_text("# comment\nvidA_1_5 a cat plays\nvidA_1_5 a kitten\n"
                                     "vidB_2_9 a man sings\n")
  items = readers.read_items("msvd", str(tmp_path / "msvd.txt"), str(tmp_path))
  assert [(i.video_id, i.captions) for i in items] == [("vidA_1_5", ["a cat plays", "a kitten"]),
                                                       ("vidB_2_9", ["a man sings"])]
  (tmp_path / "didemo.json").write_text(json.dumps([
      {"video": "1@N0_2.mp4", "description": "a dog sits."},
      {"video": "1@N0_2.mp4", "description": "it jumps."}]))
  items = readers.read_items("didemo", str(tmp_path / "didemo.json"), str(tmp_path))
  assert items[0].captions == ["a dog sits. it jumps."] and items[0].video_id == "1@N0_2"
  (tmp_path / "lsmdc.csv").write_text(
      "0001_Movie_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.9\t"
      "00.00.54.1\tSomeone, smiling, walks in.\n")
  items = readers.read_items("lsmdc", str(tmp_path / "lsmdc.csv"), str(tmp_path))
  assert items[0].captions == ["Someone, smiling, walks in."]
  assert items[0].path.startswith(os.path.join(str(tmp_path), "0001_Movie"))
  (tmp_path / "cc3m.tsv").write_text("a photo of a cat\thttp://x/1.jpg\n")
  items = readers.read_items("cc3m", str(tmp_path / "cc3m.tsv"), str(tmp_path))
  assert items[0].is_image and items[0].captions == ["a photo of a cat"]
  hmdb = tmp_path / "splits"
  hmdb.mkdir()
  (hmdb / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
  (hmdb / "cartwheel_test_split1.txt").write_text("d.avi 2\n")
  items = readers.read_items("hmdb51", str(hmdb), str(tmp_path), split="test")
  assert [(i.video_id, i.label, i.captions[0]) for i in items] == [
      ("b", 0, "brush hair"), ("d", 1, "cartwheel")]
  with pytest.raises(ValueError, match="--format"):
    readers.read_items("kinetics", str(hmdb), str(tmp_path))


def test_image_items(tmp_path):
  img = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
  (tmp_path / "000000000.jpg").write_bytes(schema.encode_jpeg(img, 95))
  (tmp_path / "cc3m.tsv").write_text("a photo\thttp://x/1.jpg\nmissing photo\thttp://x/2.jpg\n")
  items = readers.read_items("cc3m", str(tmp_path / "cc3m.tsv"), str(tmp_path))
  rep = prepare.prepare(items, str(tmp_path / "out"), num_shards=1, frames_per_clip=4,
                        resolution=20, verbose=False)
  assert rep["written"] == 1 and rep["skipped"][0]["video_id"] == "000000001"
  rec = schema.read_records(str(tmp_path / "out" / prepare.shard_name("train", 0, 1)))[0]
  assert rec["num_frames"] == 1 and (rec["height"], rec["width"]) == (20, 30)


# ---- the files people download, in their published layouts (issue 12, item 6) ----


def _report(out):
  return json.load(open(os.path.join(out, "report.json")))


def test_frozen_msrvtt_json_with_split_files(media, tmp_path):
  """Frozen-in-Time: annotation/MSR_VTT.json ({'annotations': [{image_id, caption, id}]}) and
  high-quality/structured-symlinks/{train_list_jsfusion,val_list_jsfusion}.txt +
  jsfusion_val_caption_idx.pkl ({video_id: caption index})."""
  import pickle
  (tmp_path / "annotation").mkdir()
  ann = tmp_path / "annotation" / "MSR_VTT.json"
  ann.write_text(json.dumps({"images": [{"id": "v0"}, {"id": "v1"}, {"id": "v2"}],
                             "annotations": [
                                 {"caption": "a man talks", "image_id": "v1", "id": 0},
                                 {"caption": "a dog runs", "image_id": "v0", "id": 1},
                                 {"caption": "a man speaks", "image_id": "v1", "id": 2},
                                 {"caption": "a puppy runs", "image_id": "v0", "id": 3},
                                 {"caption": "cars", "image_id": "v2", "id": 4}]}))
  split = tmp_path / "high-quality" / "structured-symlinks"
  split.mkdir(parents=True)
  (split / "train_list_jsfusion.txt").write_text("v2\n")
  (split / "val_list_jsfusion.txt").write_text("v1\nv0\n")
  with open(split / "jsfusion_val_caption_idx.pkl", "wb") as f:
    pickle.dump({"v0": np.int64(1), "v1": 0}, f)
  items = readers.read_items("msrvtt", str(ann), media,
                             video_list=str(split / "val_list_jsfusion.txt"),
                             caption_index=str(split / "jsfusion_val_caption_idx.pkl"))
  assert [(i.video_id, i.captions) for i in items] == [("v1", ["a man talks"]),
                                                       ("v0", ["a puppy runs"])]
  items = readers.read_items("msrvtt", str(ann), media,
                             video_list=str(split / "train_list_jsfusion.txt"))
  assert [(i.video_id, i.captions) for i in items] == [("v2", ["cars"])]
  # a pickle that is not plain data is refused, never run
  marker = tmp_path / "ran"

  class Evil:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  with open(tmp_path / "evil.pkl", "wb") as f:
    pickle.dump({"v0": Evil()}, f)
  with pytest.raises(ValueError, match="refused"):
    readers.read_items("msrvtt", str(ann), media, caption_index=str(tmp_path / "evil.pkl"))
  assert not marker.exists()


def _clip4clip_msrvtt(tmp_path):
  """CLIP4Clip's msrvtt_data.zip: MSRVTT_data.json (info/videos/sentences of all 10k videos),
  MSRVTT_train.9k.csv (video_id column), MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence)."""
  data = {"info": {"year": 2016}, "videos": [
      {"category": 9, "url": "https://x", "video_id": v, "start time": 1.0, "end time": 9.0,
       "split": "train", "id": i} for i, v in enumerate(["v0", "v1", "v2"])],
      "sentences": [{"caption": "zero a", "video_id": "v0", "sen_id": 0},
                    {"caption": "two", "video_id": "v2", "sen_id": 1},
                    {"caption": "zero b", "video_id": "v0", "sen_id": 2},
                    {"caption": "one", "video_id": "v1", "sen_id": 3}]}
  (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
  (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nv2\nv0\nvideo7777\n")
  (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
      "key,vid_key,video_id,sentence\nret0,msr7020,v1,a man is talking\n")


def test_clip4clip_msrvtt_and_missing_ids(media, tmp_path):
  _clip4clip_msrvtt(tmp_path)
  missing = []
  items = readers.read_items("msrvtt", str(tmp_path / "MSRVTT_data.json"), media,
                             video_list=str(tmp_path / "MSRVTT_train.9k.csv"), missing=missing)
  assert [(i.video_id, i.captions) for i in items] == [("v2", ["two"]),
                                                       ("v0", ["zero a", "zero b"])]
  assert missing == ["video7777"]
  with pytest.raises(ValueError, match="--video_list"):
    readers.read_items("msrvtt", str(tmp_path / "MSRVTT_train.9k.csv"), media)
  out = str(tmp_path / "out")
  args = ["--format", "msrvtt", "--annotations", str(tmp_path / "MSRVTT_data.json"),
          "--media-dir", media, "--out", out, "--video_list",
          str(tmp_path / "MSRVTT_train.9k.csv"), "--num-shards", "1", "--frames-per-clip", "2",
          "--resolution", "32", "--workers", "1"]
  assert prepare.main(args) == 2 and not os.path.exists(os.path.join(out, "report.json"))
  assert prepare.main(args + ["--allow_missing"]) == 0
  rep = _report(out)["train"]
  assert rep["missing_annotations"] == {"count": 1, "video_ids": ["video7777"]}
  assert rep["written"] == 2


def test_msvd_raw_captions_pickle(media, tmp_path):
  """collaborative-experts / CLIP4Clip msvd_data: raw-captions.pkl {vid: [[tokens]]} and
  train_list.txt / val_list.txt / test_list.txt."""
  import pickle
  with open(tmp_path / "raw-captions.pkl", "wb") as f:
    pickle.dump({"v0": [["a", "cat", "plays"], ["a", "kitten"]], "v1": [["a", "man", "sings"]]},
                f)
  (tmp_path / "test_list.txt").write_text("v1\nv0\n")
  (tmp_path / "train_list.txt").write_text("v1\nv9\n")
  items = readers.read_items("msvd", str(tmp_path / "raw-captions.pkl"), media,
                             video_list=str(tmp_path / "test_list.txt"))
  assert [(i.video_id, i.captions) for i in items] == [
      ("v1", ["a man sings"]), ("v0", ["a cat plays", "a kitten"])]
  assert items[0].path == os.path.join(media, "v1.mp4")
  missing = []
  readers.read_items("msvd", str(tmp_path / "raw-captions.pkl"), media,
                     video_list=str(tmp_path / "train_list.txt"), missing=missing)
  assert missing == ["v9"]


def test_lsmdc_challenge_and_training_files(tmp_path):
  """LSMDC16: tab-separated CLIP_ID, START/END_ALIGNED, START/END_EXTRACTED, SENTENCE; the
  1,000-clip test is LSMDC16_challenge_1000_publictect.csv; training clips may repeat."""
  clip = "1004_Juno_00.00.32.849-00.00.38.975"
  times = "00.00.32.849\t00.00.38.975\t00.00.32.849\t00.00.38.975"
  (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(
      f"{clip}\t{times}\tSomeone, \"smiling\", walks in.\n")
  items = readers.read_items("lsmdc", str(tmp_path / "LSMDC16_challenge_1000_publictect.csv"),
                             str(tmp_path))
  assert [(i.video_id, i.captions) for i in items] == [(clip, ['Someone, "smiling", walks in.'])]
  assert items[0].path.startswith(os.path.join(str(tmp_path), "1004_Juno", clip))
  (tmp_path / "LSMDC16_annos_training.csv").write_text(
      f"{clip}\t{times}\tSomeone runs.\n{clip}\t{times}\tThen SOMEONE stops.\n")
  items = readers.read_items("lsmdc", str(tmp_path / "LSMDC16_annos_training.csv"), str(tmp_path))
  assert [(i.video_id, i.captions) for i in items] == [
      (clip, ["Someone runs.", "Then SOMEONE stops."])]
  (tmp_path / "bad.csv").write_text(f"{clip}\t00.00.32.849\tSomeone runs.\n")
  with pytest.raises(ValueError, match="bad.csv:1: expected 6 tab-separated"):
    readers.read_items("lsmdc", str(tmp_path / "bad.csv"), str(tmp_path))


def _jpeg(path, value):
  img = np.full((20, 30, 3), value, np.uint8)
  img[:, :10] = 255 - value
  with open(path, "wb") as f:
    f.write(schema.encode_jpeg(img, 95))


def test_cc3m_img2dataset_layouts(tmp_path):
  """img2dataset's CC3M recipe: `sed` adds the header `caption<TAB>url`; the `files` output is
  {shard:05d}/{key:09d}.jpg + .txt, the webdataset output {shard:05d}.tar with the same members."""
  import tarfile
  tsv = tmp_path / "cc3m.tsv"
  tsv.write_text("caption\turl\nfirst caption\thttp://x/a.jpg\nsecond caption\thttp://x/b.jpg\n")
  files = tmp_path / "cc3m_files"
  (files / "00000").mkdir(parents=True)
  for key, cap, val in [("000000000", "first caption", 40), ("000000001", "second caption", 200)]:
    _jpeg(files / "00000" / f"{key}.jpg", val)
    (files / "00000" / f"{key}.txt").write_text(cap)
    (files / "00000" / f"{key}.json").write_text(json.dumps({"key": key, "caption": cap}))
  items = readers.read_items("cc3m", str(tsv), str(files))
  assert [(i.video_id, i.captions, i.path) for i in items] == [
      ("000000000", ["first caption"], str(files / "00000" / "000000000.jpg")),
      ("000000001", ["second caption"], str(files / "00000" / "000000001.jpg"))]
  from_folder = readers.read_items("img2dataset", str(files), "")
  assert [(i.video_id, i.captions, i.path) for i in from_folder] == [
      (i.video_id, i.captions, i.path) for i in items]
  wds = tmp_path / "cc3m_wds"
  wds.mkdir()
  with tarfile.open(wds / "00000.tar", "w") as tf:
    for ext in ("jpg", "txt", "json"):
      for key in ("000000000", "000000001"):
        tf.add(files / "00000" / f"{key}.{ext}", arcname=f"{key}.{ext}")
  items = readers.read_items("img2dataset", str(wds), "")
  assert [(i.video_id, i.captions) for i in items] == [("000000000", ["first caption"]),
                                                       ("000000001", ["second caption"])]
  out = str(tmp_path / "out")
  rep = prepare.prepare(items, out, num_shards=1, frames_per_clip=1, resolution=20,
                        verbose=False)
  assert rep["written"] == 2 and rep["skipped"] == []
  recs = schema.read_records(os.path.join(out, prepare.shard_name("train", 0, 1)))
  for r, val in zip(recs, (40, 200)):
    px = tf_decode(r["frames"][0])
    assert abs(int(px[10, 25, 0]) - val) <= 3 and abs(int(px[10, 2, 0]) - (255 - val)) <= 3


def tf_decode(jpeg):
  return tf.io.decode_jpeg(jpeg).numpy()


def test_didemo_first_32_seconds_as_clip4clip(tmp_path):
  """DiDeMo {test_data.json, test_list.txt}; CLIP4Clip reads seconds 0..31 of each video."""
  vids = tmp_path / "DiDeMo_Videos"
  vids.mkdir()
  name = "10015567@N08_3655084291_d8b58466fa.mov"
  write_mp4(str(vids / (name + ".mp4")), num_frames=40, h=16, w=16, fps=1)
  (tmp_path / "test_data.json").write_text(json.dumps([
      {"video": name, "description": "a man walks.", "times": [[0, 0], [0, 1]],
       "annotation_id": 1},
      {"video": name, "description": "he sits.", "times": [[3, 4]], "annotation_id": 2}]))
  (tmp_path / "test_list.txt").write_text(name + "\n")
  items = readers.read_items("didemo", str(tmp_path / "test_data.json"), str(vids),
                             video_list=str(tmp_path / "test_list.txt"))
  assert [(i.video_id, i.captions) for i in items] == [
      (os.path.splitext(name)[0], ["a man walks. he sits."])]
  out = str(tmp_path / "out")
  prepare.prepare(items, out, "test", num_shards=1, frames_per_clip=4, resolution=16,
                  verbose=False)
  rec = schema.read_records(os.path.join(out, prepare.shard_name("test", 0, 1)))[0]
  # 32 frames (0..31 s at 1 fps) in 4 segments: middles 4, 12, 20, 28 (not 5, 15, 25, 35)
  np.testing.assert_allclose(rec["timestamps"], [4.0, 12.0, 20.0, 28.0], atol=1e-6)


def test_action_recognition_three_official_splits(media, tmp_path):
  """--fold all writes split-named shards test1-, test2-, test3- (UCF101's testlist0N.txt)."""
  lists = tmp_path / "ucfTrainTestlist"
  lists.mkdir()
  (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 BabyCrawling\n")
  names = {1: "v_BabyCrawling_g01_c01", 2: "v_ApplyEyeMakeup_g02_c01", 3: "v_BabyCrawling_g03_c01"}
  for fold, name in names.items():
    cls = name.split("_")[1]
    (lists / f"testlist0{fold}.txt").write_text(f"{cls}/{name}.avi\n")
    (lists / f"trainlist0{fold}.txt").write_text("")
    (tmp_path / "UCF-101" / cls).mkdir(parents=True, exist_ok=True)
    os.link(os.path.join(media, "v0.mp4"), tmp_path / "UCF-101" / cls / f"{name}.avi")
  out = str(tmp_path / "out")
  prepare.main(["--format", "ucf101", "--annotations", str(lists), "--media-dir",
                str(tmp_path / "UCF-101"), "--out", out, "--split", "test", "--fold", "all",
                "--num-shards", "1", "--resolution", "32", "--workers", "1"])
  for fold, name in names.items():
    recs = schema.read_records(os.path.join(out, f"test{fold}-00000-of-00001.tfrecord"))
    assert [r["video_id"].decode() for r in recs] == [name]
  assert set(json.load(open(os.path.join(out, "report.json")))) == {"test1", "test2", "test3"}
  assert prepare.main(["--format", "ucf101", "--annotations", str(lists), "--media-dir", media,
                       "--out", out, "--split", "test", "--fold", "4"]) == 2


def test_train_items_are_spread_over_shards_in_a_seeded_random_order():
  order = prepare.shard_order(100, "train")
  assert sorted(order.tolist()) == list(range(100))
  assert order.tolist() != list(range(100))  # not annotation order
  np.testing.assert_array_equal(order, prepare.shard_order(100, "train"))  # seeded
  # shard 0 of 8 gets items from all over the file, not the first stretch / every 8th
  first = sorted(order[0::8].tolist())
  assert first != list(range(0, 100, 8)) and max(first) - min(first) > 50
  np.testing.assert_array_equal(prepare.shard_order(10, "test"), np.arange(10))
