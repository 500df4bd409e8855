"""Self-contained exports, `embed` (video folder -> sharded index), `search` and the results page.

A tiny model is trained here (seconds) until it tells six generated clips apart by their captions,
and exported with its tokenizer; the mp4 files are written by PyAV from the synthetic dataset's
renderer. The page is rendered by a real headless chromium.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import av
import jax
import numpy as np
import optax
import pytest

from miles_jax import checkpoints, config_lib, embed, pretrained
from miles_jax.weights.torch_io import init_model_params
from miles_jax.data import prepare, synthetic
from miles_jax.evaluation import search as search_lib
from miles_jax.models import dual_encoder
from miles_jax.objectives import contrastive_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
VIDEO_FRAMES, SIDE, PAD = 12, 48, 8
# One event each, colour/shape pairs all different: a tiny model learns them in ~200 steps.
PARTS = [("red", "square", "moves left"), ("green", "circle", "grows"),
         ("blue", "triangle", "moves up"), ("yellow", "square", "shrinks"),
         ("red", "circle", "moves right"), ("green", "triangle", "appears")]
NUM_CLIPS = len(PARTS)


def _write_mp4(path, frames):
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=8)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    s.options = {"crf": "12"}
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def _config():
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.num_frames = 4
  c.data.num_frames, c.data.max_len = 4, 16
  return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Videos (48x64: a 48-px square clip between dark side bars), a broken file, captions, and an
  exported model trained until each caption's best clip is its own."""
  d = tmp_path_factory.mktemp("embed")
  vids = d / "videos"
  (vids / "sub").mkdir(parents=True)
  captions, paths = [], []
  rng = np.random.default_rng(0)
  for i, part in enumerate(PARTS):
    cap, clip = synthetic.caption([part]), synthetic.render_clip(rng, SIDE, VIDEO_FRAMES, [part])
    frames = np.zeros((VIDEO_FRAMES, SIDE, SIDE + 2 * PAD, 3), np.uint8)
    frames[:, :, PAD:PAD + SIDE] = clip
    p = str((vids / "sub" if i % 2 else vids) / f"clip{i}.mp4")
    _write_mp4(p, frames)
    captions.append(cap)
    paths.append(p)
  (vids / "broken.mp4").write_bytes(b"this is not a video" * 50)
  (vids / "notes.txt").write_text("not a video extension: ignored")
  vocab = str(d / "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join(synthetic.vocabulary()) + "\n")

  c = _config()
  c.data.tokenizer = vocab
  params = init_model_params(c.model, jax.random.PRNGKey(0))
  untrained = pretrained.Pretrained(c.model, params, checkpoints.preprocessing_record(c), vocab)
  clips = np.stack([untrained.load_video_file(p) for p in paths])
  frames = untrained.normalize(clips)
  ids, att = untrained.tokenizer.tokenize_numpy(captions)
  module = dual_encoder.build(c.model)

  def loss_fn(p):
    v = module.apply({"params": p}, frames, method=dual_encoder.DualEncoder.encode_video)["embed"]
    t = module.apply({"params": p}, ids, att, method=dual_encoder.DualEncoder.encode_text)["embed"]
    return contrastive_loss(v, t, 0.1), (t, v)

  tx = optax.adam(1e-3)

  @jax.jit
  def step(p, o):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  embed = jax.jit(lambda p: loss_fn(p)[1])

  opt = tx.init(params)
  for _ in range(800):
    params, opt, loss = step(params, opt)
    t, v = embed(params)  # the margin of the params that are exported, not the previous ones
    sim = np.asarray(pretrained.cosine_similarity(t, v))
    srt = np.sort(sim, axis=1)
    if (sim.argmax(1) == np.arange(NUM_CLIPS)).all() and (srt[:, -1] - srt[:, -2]).min() > 0.05:
      break
  else:
    raise AssertionError(f"the tiny model did not learn six clips (loss {loss})")
  export = str(d / "export")
  checkpoints.save_params(export, params, c.model)
  checkpoints.save_assets(export, c)
  return {"dir": d, "videos": str(vids), "paths": paths, "captions": captions, "export": export,
          "vocab": vocab, "clips": clips, "config": c, "params": params}


def _run(module, *args, timeout=300):
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                     text=True, env=ENV, timeout=timeout)
  return r


@pytest.mark.slow
def test_export_carries_tokenizer_and_preprocessing(world):
  export = world["export"]
  assert os.path.exists(os.path.join(export, "vocab.txt"))
  pre = json.load(open(os.path.join(export, checkpoints.PREPROCESSING_FILE)))
  assert (pre["num_frames"], pre["img_size"], pre["max_len"]) == (4, 32, 16)
  assert pre["frame_positions"] == "segment_centre" and pre["tokenizer"] == "vocab.txt"
  assert pre["mean"] == list(config_lib.IMAGENET_MEAN)
  m = pretrained.load(export)
  # strings: the export's tokenizer, the same as tokenizing by hand
  from miles_jax.data.tokenizers import build_tokenizer
  ids, att = build_tokenizer(world["vocab"], 16).tokenize_numpy(world["captions"][:2])
  np.testing.assert_allclose(m.encode_texts(world["captions"][:2]), m.encode_text(ids, att),
                             atol=1e-6)
  # files: decoded here by the protocol = the frames the model was trained on
  got = m.encode_video_files(world["paths"][:3])
  want = m.encode_video(pretrained.normalize_frames(world["clips"][:3]))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # without a tokenizer: a clear error naming the fix
  bare = str(world["dir"] / "bare")
  checkpoints.save_params(bare, world["params"], world["config"].model)
  with pytest.raises(pretrained.NoTokenizer, match="tokenizer="):
    pretrained.load(bare).encode_texts(["a red square"])
  with_tok = pretrained.load(bare, tokenizer=world["vocab"])
  np.testing.assert_allclose(with_tok.encode_texts(world["captions"][:2]), m.encode_text(ids, att),
                             atol=1e-6)


@pytest.mark.slow
def test_eval_frames_follow_the_protocol(world):
  """Middle frame of each of 4 equal segments of 12 (1, 4, 7, 10), centred square, 32 px."""
  path = world["paths"][0]
  with av.open(path) as c:
    decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  assert len(decoded) == VIDEO_FRAMES
  from PIL import Image
  want = np.stack([np.asarray(Image.fromarray(decoded[i][:, PAD:PAD + SIDE]).resize(
      (32, 32), Image.BOX)) for i in (1, 4, 7, 10)])
  got = prepare.eval_frames(path, 4, 32)
  assert got.shape == (4, 32, 32, 3) and got.dtype == np.uint8
  err = np.abs(got.astype(int) - want.astype(int)).mean(axis=(1, 2, 3))
  assert (err < 4).all(), err
  # a wrong frame choice (neighbouring segment middles) is far off: the check can fail
  wrong = np.stack([want[1], want[2], want[3], want[0]])
  assert (np.abs(got.astype(int) - wrong.astype(int)).mean(axis=(1, 2, 3)) > 4).any()
  # Frozen's uniform rule on 12 frames: segment bounds 0,3,6,9,12 -> (start + end - 1) // 2
  assert prepare.uniform_indices(12, 4) == [1, 4, 7, 10]


@pytest.mark.slow
def test_embed_search_cli_and_page(world, tmp_path):
  index = str(tmp_path / "index")
  r = _run("miles_jax.embed", f"--checkpoint={world['export']}", f"--videos={world['videos']}",
           f"--out={index}", "--shard_size=2", "--workers=2", "--batch_size=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "6 videos embedded, 1 skipped" in r.stdout and "clips/s" in r.stdout
  assert "clip/s" in r.stderr or "clips/s" in r.stderr or "it/s" in r.stderr  # tqdm bar
  meta = json.load(open(os.path.join(index, "index.json")))
  assert meta["complete"] and meta["num_shards"] == 4 and meta["num_embedded"] == 6
  assert [os.path.basename(f["path"]) for f in meta["failed"]] == ["broken.mp4"]
  assert meta["model"]["fingerprint"] == pretrained.load(world["export"]).fingerprint()
  assert meta["protocol"]["frame_positions"] == "segment_centre"
  idx = embed.Index(index)
  paths = [idx.paths[i] for i in idx.ids()]
  assert sorted(paths) == sorted(world["paths"])
  m = pretrained.load(world["export"])
  np.testing.assert_allclose(idx.embeddings(), m.encode_video_files(paths), atol=1e-5)

  # each caption finds its own clip first; scores agree with a plain numpy cosine top-k
  html = str(tmp_path / "page" / "results.html")
  qs = world["captions"]
  r = _run("miles_jax.search", f"--index={index}", *[f"--query={q}" for q in qs], "--k=3",
           f"--query_video={world['paths'][4]}", f"--html={html}")
  assert r.returncode == 0, r.stderr[-3000:]
  blocks = r.stdout.split("query: ")[1:]
  assert len(blocks) == len(qs) + 1
  sim = pretrained.cosine_similarity(m.encode_texts(qs), idx.embeddings())
  for j, q in enumerate(qs):
    lines = blocks[j].strip().splitlines()
    assert lines[0] == q
    rows = [l.split() for l in lines[1:]]
    assert len(rows) == 3
    assert rows[0][2] == world["paths"][j], (q, rows)  # the clip whose caption it is
    order = np.argsort(-sim[j])[:3]
    assert [r_[2] for r_ in rows] == [paths[o] for o in order]
    np.testing.assert_allclose([float(r_[1]) for r_ in rows], sim[j][order], atol=2e-4)
  video_rows = [l.split() for l in blocks[-1].strip().splitlines()[1:]]
  assert video_rows[0][2] == world["paths"][4] and float(video_rows[0][1]) > 0.9999

  # the page in a real browser: every query shows k results whose images loaded
  check = _render_check(html, tmp_path)
  assert len(check) == len(qs) + 1
  for q in check:
    assert q["results"] == 3 and q["images"] == 3 and q["loaded"] == 3, q


def _render_check(html, tmp_path):
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  assert chromium, "chromium is needed (apt-get install chromium; .ci/run installs it)"
  profile = tmp_path / "chromium-profile"
  r = subprocess.run(
      [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking", "--disable-component-update",
       "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
       "--dump-dom", "file://" + os.path.abspath(html)],
      capture_output=True, text=True, timeout=120)
  m = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', r.stdout, re.S)
  assert m and m.group(1).strip(), (r.returncode, r.stderr[-2000:], r.stdout[-500:])
  import html as html_lib
  return json.loads(html_lib.unescape(m.group(1)))


@pytest.mark.slow
def test_index_resumes_after_a_kill(world, tmp_path):
  m = pretrained.load(world["export"])
  full = str(tmp_path / "full")
  embed.build_index(m, world["videos"], full, shard_size=2, workers=1, progress=False)
  # a run cut short after one shard (as a kill leaves it): partial, searchable, resumable
  part = str(tmp_path / "part")
  meta = embed.build_index(m, world["videos"], part, shard_size=2, workers=1, progress=False,
                           max_shards=1)
  assert not meta["complete"] and len(embed.Index(part).shard_files()) == 1
  first = embed.Index(part).shard_files()[0]
  stamp = os.stat(first).st_mtime_ns
  # a real SIGKILL in the middle of a CLI run, then the rerun
  p = subprocess.Popen([sys.executable, "-m", "miles_jax.embed", f"--checkpoint={world['export']}",
                        f"--videos={world['videos']}", f"--out={part}", "--shard_size=2",
                        "--workers=1", "--batch_size=1", "--no_progress"], cwd=ROOT, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None and len(embed.Index(part).shard_files()) < 2:
    time.sleep(0.05)
  if p.poll() is None:
    os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  meta = embed.build_index(m, world["videos"], part, shard_size=2, workers=1, progress=False)
  assert meta["complete"] and os.stat(first).st_mtime_ns == stamp  # finished shard not redone
  a, b = embed.Index(full), embed.Index(part)
  np.testing.assert_array_equal(a.ids(), b.ids())
  np.testing.assert_allclose(a.embeddings(), b.embeddings(), atol=1e-6)
  assert len(os.listdir(os.path.join(part, "thumbs"))) == NUM_CLIPS
  assert not [f for f in os.listdir(part) if ".tmp" in f]
  # the same folder with another shard size is refused (exit 2 on the CLI)
  with pytest.raises(embed.UsageError, match="shard size"):
    embed.build_index(m, world["videos"], part, shard_size=3, workers=1, progress=False)


def test_search_shards_matches_dense_topk():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(23, 8)).astype(np.float32)
  q = rng.normal(size=(4, 8)).astype(np.float32)
  ids = np.arange(100, 123)
  shards = [(g[s:s + 5], ids[s:s + 5]) for s in range(0, 23, 5)]
  vals, got = search_lib.search_shards(q, iter(shards), k=6, chunk_size=3)
  sim = pretrained.cosine_similarity(q, g)
  want = np.argsort(-sim, axis=1, kind="stable")[:, :6]
  np.testing.assert_array_equal(got, ids[want])
  np.testing.assert_allclose(vals, np.take_along_axis(sim, want, 1), atol=1e-5)
  vals, got = search_lib.search_shards(q, iter(shards), k=50)  # fewer than k: all of them
  assert got.shape == (4, 23) and sorted(got[0]) == list(ids)


def test_cli_errors_exit_2(world, tmp_path):
  r = _run("miles_jax.embed", f"--checkpoint={world['export']}",
           f"--videos={tmp_path / 'none'}/*.mp4", f"--out={tmp_path / 'i'}")
  assert r.returncode == 2 and "--videos" in r.stderr and "Traceback" not in r.stderr
  r = _run("miles_jax.search", f"--index={tmp_path / 'missing'}", "--query=a")
  assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_evaluate_writes_gallery_with_correct_clip_marked(world, tmp_path):
  d = str(tmp_path / "syn")
  synthetic.generate(d, num_train=2, num_eval=9, resolution=32, frames=4, verbose=False)
  out = str(tmp_path / "ev" / "res.json")
  r = _run("miles_jax.evaluate", f"--config=configs/demo.py:{d}",
           f"--checkpoint={world['export']}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  page = str(tmp_path / "ev" / "gallery.html")
  assert f"gallery: {page}" in r.stdout
  check = _render_check(page, tmp_path)
  assert len(check) == 8
  for q in check:
    # top-5, plus the correct clip with its rank when it is not among them; marked once
    assert q["results"] in (5, 6) and q["loaded"] == q["images"] == q["results"], q
    assert q["correct"] == 1, q


@pytest.mark.slow
def test_train_export_and_convert_carry_the_tokenizer(world, tmp_path):
  from miles_jax.train import loop
  c = world["config"]
  path = str(tmp_path / "export")
  loop.export(c, world["params"], path)
  assert sorted(os.listdir(path)) == ["model_config.json", "params", "preprocessing.json",
                                      "vocab.txt"]
  m = pretrained.load(path)
  np.testing.assert_allclose(m.encode_texts(world["captions"]),
                             pretrained.load(world["export"]).encode_texts(world["captions"]))
  # sentencepiece models keep their kind under a fixed name
  sp = tmp_path / "spm.model"
  shutil.copy(world["vocab"], sp)
  rec = checkpoints.save_assets(path, c, str(sp))
  assert rec["tokenizer"] == "tokenizer.model"
  assert (tmp_path / "export" / "tokenizer.model").exists()
  # convert refuses a missing --tokenizer before writing anything
  r = _run("miles_jax.convert", f"--checkpoint={tmp_path / 'x.pth'}", f"--out={tmp_path / 'o'}",
           f"--tokenizer={tmp_path / 'nope.txt'}")
  assert r.returncode == 2 and "nope.txt" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_pth_asks_for_a_tokenizer_and_convert_copies_it(world, tmp_path):
  """A released-layout .pth carries no tokenizer: text asks for one; `convert --tokenizer` (and
  `pretrained.load(..., tokenizer=)`) supply it."""
  torch = pytest.importorskip("torch", reason="needs the [torch] extra")
  from helpers import TINY_OVERRIDES, apply_overrides
  from torch_reference import RefDualEncoder, randomize_
  c = config_lib.default_config()
  apply_overrides(c, TINY_OVERRIDES)
  ref = randomize_(RefDualEncoder(c.model).eval(), seed=1)
  pth = str(tmp_path / "miles_tiny.pth")
  torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, pth)
  m = pretrained.load(pth, c)
  assert m.encode_video_files(world["paths"][:1]).shape == (1, c.model.proj_dim)
  with pytest.raises(pretrained.NoTokenizer, match=r"tokenizer='vocab.txt'"):
    m.encode_texts(["a red square"])
  want = pretrained.load(pth, c, tokenizer=world["vocab"]).encode_texts(world["captions"])
  out = str(tmp_path / "converted")
  overrides = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
  r = _run("miles_jax.convert", f"--checkpoint={pth}", f"--out={out}",
           f"--tokenizer={world['vocab']}", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(os.path.join(out, "vocab.txt"))
  np.testing.assert_allclose(pretrained.load(out).encode_texts(world["captions"]), want,
                             atol=1e-5)
