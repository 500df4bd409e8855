"""Own-video search that tells the truth: queries the model cannot read, the demo model, damaged
index files, Ctrl-C, a file given as --out, and the results page layout. An untrained tiny model
(exported with the synthetic vocabulary, as launch/local.sh's demo model is) is enough here:
nothing below depends on what it ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import av
import jax
import numpy as np
import pytest

from miles_jax import checkpoints, config_lib, embed, gallery, pretrained
from miles_jax import search as search_cli
from miles_jax.convert import init_model_params
from miles_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _write_mp4(path, seed, n=6, side=32):
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=8)
    s.width, s.height, s.pix_fmt = side, side, "yuv420p"
    rng = np.random.default_rng(seed)
    for _ in range(n):
      f = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  d = tmp_path_factory.mktemp("own")
  vids = d / "videos"
  vids.mkdir()
  _write_mp4(str(vids / "v0.mp4"), 0)
  for i in range(1, 24):  # one file under many names: a gallery slow enough to interrupt
    os.link(vids / "v0.mp4", vids / f"v{i}.mp4")
  vocab = str(d / "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join(synthetic.vocabulary()) + "\n")
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.num_frames = 4
  c.data.num_frames, c.data.max_len, c.data.tokenizer = 4, 16, vocab
  export = str(d / "export")
  checkpoints.save_params(export, init_model_params(c.model, jax.random.PRNGKey(0)), c.model)
  checkpoints.save_assets(export, c)
  model = pretrained.load(export)
  index = str(d / "index")
  embed.build_index(model, str(vids), index, checkpoint=export, shard_size=8, workers=1,
                    progress=False)
  return {"dir": d, "videos": str(vids), "export": export, "model": model, "index": index}


def _run(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, env=ENV, timeout=timeout)


def _one_line_error(r, *needles):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr[-2000:]
  for n in needles:
    assert n in errors[0], errors[0]


@pytest.mark.slow
def test_queries_the_model_cannot_read(demo):
  m = demo["model"]
  for q in ("", "   \t "):
    with pytest.raises(embed.UsageError, match="is empty"):
      search_cli.check_queries(m, [q])
  for q, words in (("quantum chromodynamics", "quantum, chromodynamics"),
                   ("一只狗在跑", "一, 只, 狗, 在, 跑")):
    with pytest.raises(embed.UsageError, match=f"none of its words.*\\({words}\\)"):
      search_cli.check_queries(m, [q])
  # some words known: a warning naming the others; all known: nothing
  assert search_cli.check_queries(m, ["a red zeppelin square"]) == [
      "warning: --query='a red zeppelin square': unknown to the model, ignored: zeppelin"]
  assert search_cli.check_queries(m, ["a red square moves left"]) == []
  r = _run("miles_jax.search", f"--index={demo['index']}", "--query=quantum chromodynamics")
  _one_line_error(r, "quantum", "vocabulary")
  r = _run("miles_jax.search", f"--index={demo['index']}", "--query= ")
  _one_line_error(r, "empty")
  # a readable query: results, and the note that the demo model's rankings mean nothing
  r = _run("miles_jax.search", f"--index={demo['index']}", "--query=a red zeppelin square",
           "--k=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "unknown to the model, ignored: zeppelin" in r.stderr
  assert "tiny demo model" in r.stderr and "released" in r.stderr
  assert r.stdout.count(".mp4") == 2


def test_demo_model_is_named_and_a_real_sized_one_is_not(demo):
  note = embed.demo_model_note(demo["model"])
  assert note and "tiny demo model" in note and "32-px frames" in note
  assert "Converting and using the released weights" in note

  class RealSized:  # a bert-base vocabulary and 224-px frames
    preprocessing = {"img_size": 224}
    tokenizer_path = str(demo["dir"] / "bert_vocab.txt")

  with open(RealSized.tokenizer_path, "w") as f:
    f.write("".join(f"tok{i}\n" for i in range(30522)))
  assert embed.demo_model_note(RealSized()) is None


@pytest.mark.slow
def test_truncated_shard_is_one_line_and_embed_rebuilds_it(demo, tmp_path):
  import shutil
  index = str(tmp_path / "index")
  shutil.copytree(demo["index"], index)
  shard = embed.Index(index).shard_files()[1]
  want = embed.Index(index).embeddings()
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(embed.CorruptShard, match=os.path.basename(shard)):
    embed.Index(index).embeddings()
  r = _run("miles_jax.search", f"--index={index}", "--query=a red square")
  _one_line_error(r, shard, "rerun")
  meta = embed.build_index(demo["model"], demo["videos"], index, checkpoint=demo["export"],
                           shard_size=8, workers=1, progress=False)
  assert meta["complete"] and meta["num_embedded"] == 24
  np.testing.assert_allclose(embed.Index(index).embeddings(), want, atol=1e-6)


def test_out_file_and_non_json_index_are_one_line_errors(demo, tmp_path):
  f = tmp_path / "not_a_folder"
  f.write_text("x")
  r = _run("miles_jax.embed", f"--checkpoint={demo['export']}", f"--videos={demo['videos']}",
           f"--out={f}")
  _one_line_error(r, str(f), "folder")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "index.json").write_text("{not json")
  (bad / "files.txt").write_text("")
  r = _run("miles_jax.search", f"--index={bad}", "--query=a red square")
  _one_line_error(r, str(bad / "index.json"), "not valid JSON")
  r = _run("miles_jax.embed", f"--checkpoint={demo['export']}", f"--videos={demo['videos']}",
           f"--out={bad}")
  _one_line_error(r, str(bad / "index.json"), "not valid JSON")


def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(demo, tmp_path):
  out = str(tmp_path / "index")
  p = subprocess.Popen([sys.executable, "-m", "miles_jax.embed", f"--checkpoint={demo['export']}",
                        f"--videos={demo['videos']}", f"--out={out}", "--shard_size=1",
                        "--workers=1", "--batch_size=1", "--no_progress"], cwd=ROOT, env=ENV,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
  deadline = time.time() + 180
  while time.time() < deadline and p.poll() is None and not any(
      n.startswith("shard-") and n.endswith(".npz") and ".tmp" not in n
      for n in (os.listdir(out) if os.path.isdir(out) else [])):
    time.sleep(0.02)
  assert p.poll() is None, "embed finished before it could be interrupted"
  os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
  _, err = p.communicate(timeout=120)
  assert p.returncode == 130, err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("interrupted: ") and last.endswith(
      " of 24 shards done; run the same command to resume"), last
  done = int(last.split()[1])
  assert 1 <= done < 24
  meta = embed.build_index(demo["model"], demo["videos"], out, checkpoint=demo["export"],
                           shard_size=1, workers=1, progress=False)
  assert meta["complete"] and meta["num_embedded"] == 24


def test_page_has_no_visible_test_markup_and_scales_to_the_window(tmp_path):
  strip = gallery.strip_from_frames(np.zeros((16, 32, 32, 3), np.uint8), 96)
  page = gallery.write_page(str(tmp_path / "p.html"), "t", [
      {"query": "q", "results": [{"rank": 1, "score": 0.5, "name": "x" * 300, "jpeg": strip,
                                  "frames": 16}]}], frames_per_clip=16)
  html = open(page).read()
  assert "<pre id='render-check' hidden></pre>" in html  # in the DOM for tests, never shown
  css = html[html.index("<style>"):html.index("</style>")]
  strip_rule = css[css.index(".strip{"):css.index("}", css.index(".strip{"))]
  # a 16-frame strip is 1536 px wide: it must shrink with the window instead of scrolling
  assert "max-width:calc(100vw" in strip_rule and "height:auto" in strip_rule
  assert "overflow-wrap:anywhere" in css


def test_local_sh_closing_lines_name_embed_and_search():
  text = open(os.path.join(ROOT, "launch", "local.sh")).read()
  tail = "\n".join(l for l in text.splitlines() if l.startswith("echo"))
  assert "python -m miles_jax.embed --checkpoint=$WORKDIR/export" in tail
  assert "python -m miles_jax.search --index=$WORKDIR/index" in tail
