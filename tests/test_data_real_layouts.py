"""The published test sets, exactly: each reader's expected size, "N of EXPECTED" from prepare,
the gallery size beside the expected one in evaluate, DiDeMo's verbatim file names and duplicate
stems, Frozen's MSR_VTT.json 1k-A caption index, img2dataset webdataset tars read in one pass.

Fixtures copy the layouts people download: LocalizingMoments' `{split}_data.json` (one entry per
moment: annotation_id, description, dl_link, num_segments, times, video), whose `video` names
are Flickr names kept verbatim by its download script (`%s/%s % (dir, video)`) and found
verbatim by CLIP4Clip's loader (os.walk file names == list entries) -- `.mov`, `.mp4`, `.avi`,
`.wmv`, `.mts`, `.3g2`, `.m4v` and names ending in a bare `.`, and stems shared by a `.mov` and
an `.mp4`; Frozen-in-Time's `annotation/MSR_VTT.json` with
`high-quality/structured-symlinks/{val_list_jsfusion.txt, jsfusion_val_caption_idx.pkl}`.
"""
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from helpers import ROOT
from miles_jax.data import pipeline, prepare, readers, schema

# DiDeMo test videos named as the download script saves them (the json's `video` verbatim).
# Real names from LocalizingMoments' data/test_data.json (its 1037 test videos include 36 .wmv,
# 31 trailing '.', 9 .mts, 2 .3g2 and 33 stems listed twice, e.g. as .mov and .mp4).
DIDEMO_TEST = [
    "50072196@N00_8317908648_9592bf11e3.mov",
    "59972430@N00_7646117928_a93152aa0f.wmv",      # Windows Media
    "33439178@N00_12280528136_b1d8fa292c.mts",     # AVCHD camcorder
    "31667813@N00_3350025080_ea55c84f81.3g2",      # phone
    "58792004@N06_8544469262_fd25eddb2e.",         # trailing '.', no extension
    "26988100@N00_5000550633_c08bd38fa0.mp4",
    "39457011@N00_5403825464_79c0f43b72.mov",      # this stem is also listed as .mp4
]
DUPLICATE = "39457011@N00_5403825464_79c0f43b72.mp4"


# each odd name in the container its extension stands for (a Flickr upload keeps its source's)
CONTAINERS = {".wmv": ("asf", "wmv2"), ".mts": ("mpegts", "libx264"), ".3g2": ("3g2", "libx264"),
              ".mov": ("mov", "libx264")}


def write_video(path, num_frames=6, h=16, w=24, fps=2, seed=0):
  import av
  fmt, codec = CONTAINERS.get(os.path.splitext(path)[1], ("mp4", "libx264"))
  yy, xx = np.mgrid[0:h, 0:w]
  with av.open(path, "w", format=fmt) as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for t in range(num_frames):
      f = np.zeros((h, w, 3), np.uint8)
      f[..., 0] = 20 + xx * 4 + 9 * t + 30 * seed
      f[..., 1] = 30 + yy * 5 + 7 * t
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def _didemo(tmp_path, with_files=True):
  """test_data.json (+ the duplicate-stem entry), test_list.txt, DiDeMo_Videos/<verbatim>."""
  vids = tmp_path / "DiDeMo_Videos"
  vids.mkdir(exist_ok=True)
  data, aid = [], 0
  for k, name in enumerate(DIDEMO_TEST + [DUPLICATE]):
    for j, (desc, times) in enumerate([("the camera pans left", [[0, 0], [0, 1], [0, 0]]),
                                       ("a child runs to the door", [[2, 3], [2, 2], [3, 3]])]):
      data.append({"annotation_id": aid, "description": f"{desc} {k}", "dl_link":
                   f"https://www.flickr.com/video_download.gne?id={name.split('_')[1]}",
                   "num_segments": 6, "times": times, "video": name})
      aid += 1
    if with_files:
      write_video(str(vids / name), seed=k % 3)
  (tmp_path / "test_data.json").write_text(json.dumps(data))
  (tmp_path / "test_list.txt").write_text("".join(n + "\n" for n in DIDEMO_TEST))
  return vids


def _didemo_id(name):
  return name[:-1] if name.endswith(".") else os.path.splitext(name)[0]


def test_expected_sizes_of_the_published_test_sets():
  assert readers.expected_size("msrvtt", "test") == 1000
  assert readers.expected_size("msvd", "test") == 670
  assert readers.expected_size("lsmdc", "test") == 1000
  assert readers.expected_size("didemo", "test") == 1004
  assert [readers.expected_size("ucf101", f"test{k}") for k in (1, 2, 3)] == [3783, 3734, 3696]
  assert readers.expected_size("hmdb51", "test1") == 1530
  assert readers.expected_size("webvid", "train") == 0


def test_didemo_finds_verbatim_names_and_refuses_duplicate_ids(tmp_path):
  vids = _didemo(tmp_path)
  items = readers.read_items("didemo", str(tmp_path / "test_data.json"), str(vids),
                             video_list=str(tmp_path / "test_list.txt"))
  assert [i.video_id for i in items] == [_didemo_id(n) for n in DIDEMO_TEST]
  assert [i.path for i in items] == [str(vids / n) for n in DIDEMO_TEST]  # every file found
  assert all(os.path.isfile(i.path) for i in items)
  assert items[1].captions == ["the camera pans left 1 a child runs to the door 1"]
  # converted copies: <name>.mp4 or <stem>.mp4 are found too
  conv = tmp_path / "converted"
  conv.mkdir()
  os.link(vids / DIDEMO_TEST[1], conv / (_didemo_id(DIDEMO_TEST[1]) + ".mp4"))
  os.link(vids / DIDEMO_TEST[2], conv / (DIDEMO_TEST[2] + ".mp4"))
  got = readers.read_items("didemo", str(tmp_path / "test_data.json"), str(conv),
                           video_list=str(tmp_path / "test_list.txt"))
  assert got[1].path == str(conv / (_didemo_id(DIDEMO_TEST[1]) + ".mp4"))
  assert got[2].path == str(conv / (DIDEMO_TEST[2] + ".mp4"))
  assert got[0].path == str(conv / DIDEMO_TEST[0])  # absent: reported under its verbatim name
  # without the list, X.mov and X.mp4 would be two videos with one id: an error naming both
  with pytest.raises(ValueError, match="39457011@N00_5403825464_79c0f43b72.mov / "
                     "39457011@N00_5403825464_79c0f43b72.mp4"):
    readers.read_items("didemo", str(tmp_path / "test_data.json"), str(vids))


def _prepare_args(ann, media, out, *extra):
  return ["--format", "didemo", "--annotations", str(ann), "--media_dir", str(media), "--out",
          str(out), "--split", "test", "--num_shards", "1", "--resolution", "16", "--workers",
          "1", "--eval_frames", "4", *extra]


def test_prepare_didemo_prints_n_of_expected_and_refuses_a_partial_test_set(tmp_path, capsys):
  vids = _didemo(tmp_path)
  ann, lst = tmp_path / "test_data.json", f"--video_list={tmp_path / 'test_list.txt'}"
  n = len(DIDEMO_TEST)
  # every listed file found and written; the published size is 1004: a 7-video set is refused
  assert prepare.main(_prepare_args(ann, vids, tmp_path / "a", lst)) == 2
  cap = capsys.readouterr()
  assert f"{n} of 1004 expected" in cap.out and f"only {n} of 1004 expected" in cap.err
  assert prepare.main(_prepare_args(ann, vids, tmp_path / "b", lst,
                                    f"--expected_items={n}")) == 0
  assert f"{n} of {n} expected" in capsys.readouterr().out
  recs = schema.read_records(str(tmp_path / "b" / prepare.shard_name("test", 0, 1)))
  assert [r["video_id"].decode() for r in recs] == [_didemo_id(x) for x in DIDEMO_TEST]
  assert {int(r["expected_items"]) for r in recs} == {n}
  # one file gone: exit 2 naming the count, unless --allow_missing; the report says so
  os.remove(vids / DIDEMO_TEST[3])
  out = tmp_path / "c"
  assert prepare.main(_prepare_args(ann, vids, out, lst, f"--expected_items={n}")) == 2
  cap = capsys.readouterr()
  assert f"{n - 1} of {n} expected" in cap.out and "--allow_missing" in cap.err
  assert prepare.main(_prepare_args(ann, vids, out, lst, f"--expected_items={n}",
                                    "--allow_missing")) == 0
  rep = json.load(open(out / "report.json"))["test"]
  assert (rep["written"], rep["expected"]) == (n - 1, n)
  assert [s["video_id"] for s in rep["skipped"]] == [_didemo_id(DIDEMO_TEST[3])]


def test_frozen_msrvtt_json_test_split_applies_the_1k_a_caption_index(tmp_path):
  (tmp_path / "annotation").mkdir()
  ann = tmp_path / "annotation" / "MSR_VTT.json"
  ann.write_text(json.dumps({
      "info": {"year": 2016}, "images": [{"id": v} for v in ("video7020", "video9731")],
      "annotations": [{"caption": c, "image_id": v, "id": i} for i, (v, c) in enumerate([
          ("video7020", "a woman creating a fondant baby and flower"),
          ("video9731", "a man is talking about a car"),
          ("video7020", "a woman is making a cake"),
          ("video9731", "a red car is shown")])]}))
  split = tmp_path / "high-quality" / "structured-symlinks"
  split.mkdir(parents=True)
  (split / "val_list_jsfusion.txt").write_text("video9731\nvideo7020\n")
  lst = str(split / "val_list_jsfusion.txt")
  with open(split / "jsfusion_val_caption_idx.pkl", "wb") as f:
    pickle.dump({"video7020": np.int64(1), "video9731": np.int64(0)}, f)
  items = readers.read_items("msrvtt", str(ann), str(tmp_path), video_list=lst, split="test")
  assert [(i.video_id, i.captions) for i in items] == [
      ("video9731", ["a man is talking about a car"]), ("video7020", ["a woman is making a cake"])]
  # train keeps every caption; 'none' asks for every caption explicitly
  assert len(readers.read_items("msrvtt", str(ann), str(tmp_path), video_list=lst,
                                split="train")[0].captions) == 2
  assert len(readers.read_items("msrvtt", str(ann), str(tmp_path), video_list=lst,
                                split="test", caption_index="none")[0].captions) == 2
  # the index missing: an error naming it, never a silent 20k-caption test
  os.remove(split / "jsfusion_val_caption_idx.pkl")
  with pytest.raises(ValueError, match="jsfusion_val_caption_idx.pkl"):
    readers.read_items("msrvtt", str(ann), str(tmp_path), video_list=lst, split="test")
  out = tmp_path / "out"
  assert prepare.main(["--format", "msrvtt", "--annotations", str(ann), "--media_dir",
                       str(tmp_path), "--out", str(out), "--split", "test",
                       f"--video_list={lst}"]) == 2


def _img2dataset_tar(path, n, size=8):
  """An img2dataset webdataset shard: KEY.jpg, KEY.txt, KEY.json per sample, in key order."""
  import io
  with tarfile.open(path, "w") as t:
    for i in range(n):
      key = f"{i:09d}"
      img = np.full((size, size, 3), (i * 37) % 256, np.uint8)
      for ext, data in (("jpg", schema.encode_jpeg(img, 90)),
                        ("txt", f"caption number {i}".encode()),
                        ("json", json.dumps({"key": key, "status": "success"}).encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_webdataset_tar_is_read_in_one_pass(tmp_path, monkeypatch):
  """Reading the items and preparing them opens each tar once, as a stream."""
  wds = tmp_path / "wds"
  wds.mkdir()
  _img2dataset_tar(wds / "00000.tar", 12)
  opened = []
  real_open = tarfile.open

  def counting_open(name=None, mode="r", *a, **k):
    opened.append((os.path.basename(str(name)), mode))
    return real_open(name, mode, *a, **k)

  monkeypatch.setattr(tarfile, "open", counting_open)
  items = readers.read_items("img2dataset", str(wds), "")
  assert [i.captions for i in items] == [[f"caption number {i}"] for i in range(12)]
  assert len(opened) == 1
  opened.clear()
  rep = prepare.prepare(items, str(tmp_path / "out"), num_shards=1, frames_per_clip=1,
                        resolution=8, verbose=False)
  assert rep["written"] == 12 and rep["skipped"] == []
  assert opened == [("00000.tar", "r|*")]  # one streaming pass, not one open per item
  recs = schema.read_records(str(tmp_path / "out" / prepare.shard_name("train", 0, 1)))
  got = {r["video_id"].decode(): int(tf.io.decode_jpeg(r["frames"][0]).numpy().mean())
         for r in recs}
  assert all(abs(got[f"{i:09d}"] - (i * 37) % 256) <= 2 for i in range(12))


def _with_expected(src, dst, expected):
  """Rewrites shard `src` to `dst` with context expected_items = `expected`."""
  with tf.io.TFRecordWriter(dst) as w:
    for raw in tf.data.TFRecordDataset(src):
      ex = tf.train.SequenceExample.FromString(raw.numpy())
      ex.context.feature["expected_items"].int64_list.value[:] = [expected]
      w.write(ex.SerializeToString())


@pytest.mark.slow
def test_evaluate_reports_gallery_size_beside_the_expected_one(tmp_path):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from miles_jax import checkpoints, config_lib
  from miles_jax.data import synthetic
  from miles_jax.evaluation import protocol
  from miles_jax.models import dual_encoder
  d = str(tmp_path / "syn")
  paths = synthetic.generate(d, num_train=4, num_eval=6, resolution=32, frames=4, verbose=False)
  shards = sorted(tf.io.gfile.glob(paths["eval"]))
  (tmp_path / "ev").mkdir()
  for s in shards:
    _with_expected(s, str(tmp_path / "ev" / os.path.basename(s)), 9)
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.num_frames = 4
  c.data.num_frames, c.data.max_len = 4, 16
  c.data.eval, c.data.tokenizer = str(tmp_path / "ev" / "eval-*.tfrecord"), paths["tokenizer"]
  es = pipeline.load_eval_set(c.data.eval, c)
  assert (len(es.video_ids), es.expected_videos) == (6, 9)
  line, off = protocol.gallery_check({"num_videos": 6, "num_videos_expected": 9})
  assert off and "6 videos of 9 expected" in line and "NOT comparable" in line
  assert protocol.gallery_check({"num_videos": 9, "num_videos_expected": 9}) == (
      "gallery: 9 videos of 9 expected", False)
  model = dual_encoder.build(c.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)),
                               jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32))
                    ["params"])
  export = str(tmp_path / "export")
  checkpoints.save_params(export, params, c.model)
  out = str(tmp_path / "res.json")
  r = subprocess.run([sys.executable, "-m", "miles_jax.evaluate", f"--config=configs/demo.py:{d}",
                      f"--checkpoint={export}", f"--out={out}",
                      f"--config.data.eval={c.data.eval}"], cwd=ROOT, capture_output=True,
                     text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "6 videos of 9 expected" in r.stdout and "WARNING" in r.stderr
  res = json.load(open(out))
  assert res["gallery_size"]["eval"] == {"videos": 6, "expected": 9, "differs": True}
  assert res["retrieval"]["protocol"]["num_videos_expected"] == 9
