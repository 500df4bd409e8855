"""Nothing lost: kill -9 / SIGTERM at random points, corrupt inputs, bad config and CLI input, a
NaN loss, a malicious .pth, and restoring an 8-device checkpoint onto fewer devices.

Training runs are subprocesses of the tiny demo (configs/demo.py) on one CPU device (the mesh
does not matter to what is tested; test_fsdp_… covers other meshes); they share one persistent
XLA compilation cache so that every restart after the first skips the compile. Everything is
local files; every subprocess has a timeout.
"""
import glob
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from miles_jax import checkpoints, parallel
from miles_jax.data import prepare, schema, synthetic
from miles_jax.models import dual_encoder
from miles_jax.train import optim
from miles_jax.train.state import create_train_state, train_state_shardings

import helpers  # noqa: E402
from helpers import apply_overrides, assert_trees_equal, final_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # the interrupted / reference runs
TMP_GLOB = "*.orbax-checkpoint-tmp*"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(d, num_train=32, num_eval=8, resolution=32, frames=4, verbose=False)
  return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _overrides(steps=STEPS, **extra):
  o = {"train.steps": steps, "train.checkpoint_every": 1, "train.log_every": 1,
       "train.eval_every": 0, "data.batch_size": 8, "optim.warmup_steps": 2,
       "data.shuffle_buffer": 16, "data.eval": "",
       "train.keep": 100}  # keep every step: the tests pick checkpoints out of a finished run
  o.update(extra)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _cmd(data_dir, workdir, *extra, module="miles_jax.train"):
  return [sys.executable, "-m", module, f"--config=configs/demo.py:{data_dir}",
          f"--workdir={workdir}", *extra]


def _env(cache_dir=None, devices=1):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(devices),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _run(cmd, env, timeout=300):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _steps_on_disk(workdir):
  """Complete checkpoints: orbax renames `N.orbax-checkpoint-tmp-*` to `N` once written."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _tmp_dirs(workdir, since_ns=0):
  """Half-written checkpoints (`N.orbax-checkpoint-tmp`), those created after `since_ns` only."""
  out = set()
  for t in glob.glob(os.path.join(workdir, "checkpoints", TMP_GLOB)):
    try:
      if os.stat(t).st_ctime_ns >= since_ns:
        out.add(t)
    except FileNotFoundError:  # renamed to `N` meanwhile
      pass
  return out


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _snapshot(root):
  """{relative path: (sha256, size, mtime_ns)} of every file, plus every directory."""
  out = {}
  for d, dirs, files in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root) + "/"] = None
    for n in files:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = (hashlib.sha256(f.read()).hexdigest(),
                                         os.path.getsize(p), os.stat(p).st_mtime_ns)
  return out


def _demo_config(data_dir, **overrides):
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                            "demo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return apply_overrides(mod.get_config(data_dir), overrides)


@pytest.fixture(scope="module")
def reference_run(data_dir, cache_dir, tmp_path_factory):
  """An uninterrupted run (it also fills the compilation cache the other runs reuse)."""
  wd = str(tmp_path_factory.mktemp("ref"))
  r = _run(_cmd(data_dir, wd, *_overrides()), _env(cache_dir), timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"step {STEPS}/{STEPS}" in r.stdout
  return wd


# 1 + 2. SIGTERM during the first step's compile, then kill -9 at random points ---------------

def _launch(data_dir, workdir, cache_dir, log):
  return subprocess.Popen(_cmd(data_dir, workdir, *_overrides()), cwd=ROOT, env=_env(cache_dir),
                          stdout=open(log + ".out", "w"), stderr=open(log + ".err", "w"),
                          text=True)


def _wait(p, cond, deadline, poll=0.01):
  while time.time() < deadline and p.poll() is None:
    if cond():
      return True
    time.sleep(poll)
  return False


def _read(path):
  with open(path) as f:
    return f.read()


@pytest.mark.slow
def test_sigterm_and_kill9_at_random_points_lose_nothing(data_dir, cache_dir, reference_run,
                                                         tmp_path):
  wd, logs = str(tmp_path / "wd"), str(tmp_path / "log")
  metrics = os.path.join(wd, "metrics.jsonl")

  # SIGTERM while step 1 is compiling (after the loop installed its handler): save, exit 0.
  p = _launch(data_dir, wd, cache_dir, logs + "-term")
  assert _wait(p, lambda: os.path.isdir(os.path.join(wd, "tensorboard")), time.time() + 240), \
      _read(logs + "-term.err")[-2000:]
  time.sleep(0.3)
  in_first_step = not os.path.exists(metrics)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=240) == 0, _read(logs + "-term.err")[-3000:]
  out = _read(logs + "-term.out")
  assert "SIGTERM: saved step" in out, out
  steps = _steps_on_disk(wd)
  assert steps and max(steps) < STEPS
  if in_first_step:
    assert steps == [1], steps

  # kill -9: at a random moment of start-up, after a random number of steps, and while a
  # checkpoint is being written (a `*.orbax-checkpoint-tmp*` directory exists).
  rng = random.Random(20240607)
  kinds = ["startup", "step", "tmp", "step"]  # each kind, "step" twice (suite time)
  resumed_from, killed_in_tmp = [], 0
  for i, kind in enumerate(kinds):
    expected = max(_steps_on_disk(wd), default=None)
    base, launched_ns = _lines(metrics), time.time_ns()
    if kind == "step" and (expected or 0) >= STEPS - 3:
      kind = "startup"  # keep the run from finishing before it is killed
    p = _launch(data_dir, wd, cache_dir, f"{logs}-{i}")
    deadline = time.time() + 240
    if kind == "startup":
      time.sleep(rng.uniform(0.5, 8.0))
    elif kind == "step":
      target = base + rng.randint(1, 2)
      assert _wait(p, lambda: _lines(metrics) >= target, deadline), \
          f"trial {i} ({kind}): " + _read(f"{logs}-{i}.err")[-3000:]
      time.sleep(rng.uniform(0.2, 2.0))  # async saves take ~1 s here: land before and after
    else:
      assert _wait(p, lambda: _tmp_dirs(wd, launched_ns), deadline, poll=0.002), \
          f"trial {i}: no checkpoint write seen: " + _read(f"{logs}-{i}.err")[-3000:]
    tmp_at_kill = _tmp_dirs(wd, launched_ns)
    assert p.poll() is None, f"trial {i} ({kind}) ended by itself: {_read(f'{logs}-{i}.err')}"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    out = _read(f"{logs}-{i}.out")
    if "resumed" in out:  # killed after start-up: it must have resumed from the newest step
      assert f"resumed {wd} from step {expected}" in out, (i, expected, out)
      resumed_from.append(expected)
    if kind == "tmp" and tmp_at_kill:
      killed_in_tmp += 1
      # the half-written step is not taken for a checkpoint
      half = {int(os.path.basename(t).split(".")[0]) for t in tmp_at_kill}
      complete = set(_steps_on_disk(wd))
      assert all(s in complete or s > max(complete, default=0) for s in half)
  assert killed_in_tmp >= 1, "no kill landed during a checkpoint write"
  assert len(resumed_from) >= 3, resumed_from

  expected = max(_steps_on_disk(wd))
  assert expected < STEPS, "the run finished before its last kill"
  r = _run(_cmd(data_dir, wd, *_overrides()), _env(cache_dir))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed {wd} from step {expected}" in r.stdout

  ref, ref_meta = final_state(reference_run)
  got, meta = final_state(wd)
  assert int(got.step) == STEPS and meta["data"] == ref_meta["data"]
  assert_trees_equal(got.params, ref.params)
  assert_trees_equal(got.snapshot_params, ref.snapshot_params)
  assert_trees_equal(got.opt_state, ref.opt_state)
  assert_trees_equal(got.rng, ref.rng)


# 3. corrupt inputs: prepare reports them, the pipeline skips them, training goes on -----------

def _write_mp4(path, num_frames=8, size=32):
  import av
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = size, size, "yuv420p"
    for t in range(num_frames):
      f = np.full((size, size, 3), 40 + 20 * t, np.uint8)
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


def _write_audio_only(path):
  import av
  with av.open(path, "w") as c:
    s = c.add_stream("aac", rate=8000)
    f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                   layout="mono")
    f.sample_rate = 8000
    for pkt in s.encode(f):
      c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


@pytest.mark.slow
def test_corrupt_inputs_reported_skipped_and_training_continues(data_dir, cache_dir, tmp_path):
  media, data = tmp_path / "media", tmp_path / "data"
  media.mkdir()
  data.mkdir()
  _write_mp4(str(media / "good0.mp4"))
  _write_mp4(str(media / "good1.mp4"))
  _write_audio_only(str(media / "audio_only.mp4"))  # a container without a video stream
  (media / "text.mp4").write_text("this is not a video\n")  # PyAV cannot open it
  (media / "empty.mp4").write_bytes(b"")
  _write_mp4(str(media / "nocaption.mp4"))
  ann = tmp_path / "ann.csv"
  ann.write_text("video_path,caption\n" + "".join(f"{v},{c}\n" for v, c in [
      ("good0.mp4", "a grey clip"), ("missing.mp4", "points to no file"),
      ("audio_only.mp4", "sound only"), ("text.mp4", "not a video"), ("empty.mp4", "zero bytes"),
      ("nocaption.mp4", ""), ("good1.mp4", "another grey clip")]))
  prepare.main(["--format", "csv", "--annotations", str(ann), "--media_dir", str(media),
                "--out", str(data), "--num_shards", "1", "--frames_per_clip", "4",
                "--resolution", "32", "--workers", "1"])
  report = json.load(open(data / "report.json"))["train"]
  reasons = {s["video_id"]: s["reason"] for s in report["skipped"]}
  assert report["written"] == 2 and report["items"] == 7
  assert set(reasons) == {"missing.mp4", "audio_only.mp4", "text.mp4", "empty.mp4",
                          "nocaption.mp4"}
  assert reasons["missing.mp4"].startswith("missing file")
  assert reasons["nocaption.mp4"].startswith("no captions")
  assert "no video stream" in reasons["audio_only.mp4"]
  for v in ("text.mp4", "empty.mp4"):
    assert reasons[v].startswith("unreadable media"), reasons[v]

  # the synthetic shards (one truncated mid-record) + a shard of corrupt records
  for f in glob.glob(os.path.join(data_dir, "train-*.tfrecord")) + [
      os.path.join(data_dir, "vocab.txt")]:
    shutil.copy(f, data)
  trunc = sorted(glob.glob(str(data / "train-*-of-00004.tfrecord")))[-1]
  sizes = [len(r.numpy()) + 16 for r in tf.data.TFRecordDataset(trunc)]
  with open(trunc, "r+b") as f:
    f.truncate(sum(sizes[:-2]) + sizes[-2] // 2)
  frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), np.uint8)
  bad = [schema.make_example("bad_jpeg", ["clip"], jpeg_frames=[b"\xff\xd8\xff garbage"] * 4,
                             height=32, width=32),
         schema.make_example("no_frames", ["clip"], jpeg_frames=[]),
         schema.make_example("no_caption", [], frames),
         schema.make_example("blank_caption", ["   "], frames)]
  with tf.io.TFRecordWriter(str(data / "train-corrupt.tfrecord")) as w:
    for ex in bad:
      w.write(ex.SerializeToString())
    w.write(b"not a SequenceExample at all")
    w.write(schema.make_example("good_in_corrupt_shard", ["a clip"], frames).SerializeToString())

  wd = str(tmp_path / "wd")
  r = _run(_cmd(str(data), wd, *_overrides()), _env(cache_dir))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"step {STEPS}/{STEPS}" in r.stdout
  state, meta = final_state(wd)
  assert meta["data"][0]["skipped"] >= 1, meta  # corrupt records were met, skipped and counted
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))


# 4. bad configuration / CLI input: fail before compute, overwrite nothing ---------------------

def test_unknown_config_field_is_one_clear_line(data_dir, cache_dir, tmp_path):
  wd = str(tmp_path / "wd")
  r = _run(_cmd(data_dir, wd, "--config.train.stpes=3"), _env(cache_dir), timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "error: unknown config field: 'stpes'" in r.stderr and '"steps"' in r.stderr
  assert "Traceback" not in r.stderr and not os.path.exists(wd)


@pytest.mark.slow
def test_workdir_not_writable(data_dir, cache_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory\n")
  before = _snapshot(str(tmp_path))
  wd = str(blocker / "sub")
  r = _run(_cmd(data_dir, wd, *_overrides()), _env(cache_dir), timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert f"--workdir={wd}" in r.stderr and "not writable" in r.stderr
  assert "Traceback" not in r.stderr
  assert _snapshot(str(tmp_path)) == before

  # The Python API, under a regular file with its x bit set (root, as on CI, passes
  # os.access on it: the check must see it is not a directory).
  from miles_jax.train import loop
  exe = tmp_path / "an_executable_file"
  exe.write_text("#!/bin/sh\n")
  exe.chmod(0o755)
  before = _snapshot(str(tmp_path))
  with pytest.raises(PermissionError, match="an_executable_file is not writable"):
    loop.train(_demo_config(data_dir), str(exe / "wd"))
  assert _snapshot(str(tmp_path)) == before

  # A read-only parent directory; root ignores the mode bits, so this half runs for other users.
  ro = tmp_path / "read_only"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    if not os.access(str(ro), os.W_OK):
      with pytest.raises(PermissionError, match="read_only is not writable"):
        loop.train(_demo_config(data_dir), str(ro / "wd"))
      assert os.listdir(str(ro)) == []
  finally:
    ro.chmod(0o755)


@pytest.mark.slow
def test_restart_with_another_architecture_is_refused(data_dir, cache_dir, reference_run,
                                                      tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference_run, wd)
  before = _snapshot(wd)
  r = _run(_cmd(data_dir, wd, *_overrides(steps=STEPS + 2), "--config.model.video.width=96",
                "--config.model.text.depth=3"), _env(cache_dir), timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "another architecture" in r.stderr and "Traceback" not in r.stderr
  assert "model.video.width: checkpoint 64, config 96" in r.stderr
  assert "model.text.depth: checkpoint 2, config 3" in r.stderr
  assert _snapshot(wd) == before  # config.json, checkpoints, metrics: untouched


@pytest.fixture(scope="module")
def torch_pth(data_dir, tmp_path_factory):
  """A released-layout .pth of the demo model (video width 64)."""
  torch = pytest.importorskip("torch", reason="needs the [torch] extra")
  from torch_reference import RefDualEncoder
  mc = _demo_config(data_dir).model
  sd = {f"module.{k}": v for k, v in RefDualEncoder(mc).state_dict().items()}
  path = str(tmp_path_factory.mktemp("pth") / "demo.pth")
  torch.save({"state_dict": sd}, path)
  return path


@pytest.mark.slow
def test_convert_and_evaluate_refuse_a_checkpoint_of_another_shape(data_dir, cache_dir,
                                                                   torch_pth, tmp_path):
  out = str(tmp_path / "converted")
  before = _snapshot(os.path.dirname(torch_pth))
  r = _run([sys.executable, "-m", "miles_jax.convert", f"--config=configs/demo.py:{data_dir}",
            f"--checkpoint={torch_pth}", f"--out={out}", "--config.model.video.width=96"],
           _env(cache_dir), timeout=180)
  assert r.returncode != 0 and "shape mismatch" in r.stderr, r.stderr[-3000:]
  assert "video_model.patch_embed" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(out)
  r = _run([sys.executable, "-m", "miles_jax.evaluate", f"--config=configs/demo.py:{data_dir}",
            f"--checkpoint={torch_pth}", "--config.model.video.width=96"], _env(cache_dir),
           timeout=180)
  assert r.returncode == 2 and "shape mismatch" in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert _snapshot(os.path.dirname(torch_pth)) == before  # no results/embeddings written


# 5. a NaN loss leaves the last good checkpoint byte-identical ---------------------------------

@pytest.mark.slow
def test_nan_leaves_checkpoints_byte_identical(data_dir, cache_dir, reference_run, tmp_path):
  # the reference workdir as a run stopped after step `good` (same config: no recompile)
  wd, good = str(tmp_path / "wd"), STEPS - 3
  shutil.copytree(reference_run, wd)
  ckdir = os.path.join(wd, "checkpoints")
  for s in _steps_on_disk(wd):
    if s > good:
      shutil.rmtree(os.path.join(ckdir, str(s)))
  before = _snapshot(ckdir)
  # step indices count from 0: index `good` is the first step after resuming
  r = _run(_cmd(data_dir, wd, *_overrides(**{"debug.inject_nan_at_step": good})),
           _env(cache_dir))
  assert r.returncode == 3, r.stderr[-3000:]
  assert f"resumed {wd} from step {good}" in r.stdout
  assert f"step {good + 1}: loss is nan" in r.stderr
  assert f"last good checkpoint is step {good}" in r.stderr and "Traceback" not in r.stderr
  assert _snapshot(ckdir) == before  # same files, bytes and mtimes; no half-written step


# 6. a .pth that runs code when unpickled is refused, and its payload never runs ---------------

class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


@pytest.mark.slow
def test_malicious_pth_is_refused(data_dir, cache_dir, tmp_path):
  torch = pytest.importorskip("torch", reason="needs the [torch] extra")
  marker = str(tmp_path / "PWNED")
  evil = str(tmp_path / "evil.pth")
  torch.save({"state_dict": {"video_model.cls_token": torch.zeros(1, 1, 64),
                             "x": _Payload(marker)}}, evil)
  out = str(tmp_path / "out")
  r = _run([sys.executable, "-m", "miles_jax.convert", f"--config=configs/demo.py:{data_dir}",
            f"--checkpoint={evil}", f"--out={out}"], _env(cache_dir), timeout=180)
  assert r.returncode != 0
  assert "refused to load" in r.stderr and evil in r.stderr, r.stderr[-3000:]
  assert not os.path.exists(marker), "the pickle payload ran"
  assert not os.path.exists(out)
  from miles_jax import pretrained
  from miles_jax.weights import torch_io
  with pytest.raises(torch_io.ConversionError, match="refused"):  # evaluate / init_from path
    pretrained.load(evil, _demo_config(data_dir))
  assert not os.path.exists(marker)
  # the file is really malicious: an unsafe load runs the payload
  torch.load(evil, weights_only=False)
  assert os.path.exists(marker)


# 7. a checkpoint written on 8 devices (data 2 x fsdp 4) restores onto 1, 2 and 4 devices -------

@pytest.mark.slow
def test_fsdp_checkpoint_restores_on_fewer_devices(data_dir, tmp_path):
  devices = jax.devices()
  assert len(devices) == 8
  config = _demo_config(data_dir, **{"mesh.shape": (2, 4), "mesh.axes": ("data", "fsdp")})
  model = dual_encoder.build(config.model)
  tx = optim.make_optimizer(config)[0]
  mesh8 = parallel.mesh_from_config(config)
  state = create_train_state(config, jax.random.PRNGKey(3), mesh8, model, tx)
  leaves = jax.tree_util.tree_leaves(state.params)
  assert any(not x.sharding.is_fully_replicated for x in leaves), "nothing was FSDP-sharded"
  want = jax.device_get(state)
  ck = checkpoints.TrainCheckpointer(str(tmp_path / "ck"))
  ck.save(5, state, {"step": 5}, force=True)
  ck.close()

  abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0), mesh8,
                                                       model, tx))
  for n, shape in ((1, (1, 1)), (2, (1, 2)), (4, (2, 2))):
    mesh = parallel.make_mesh(shape, ("data", "fsdp"), devices[:n])
    target = checkpoints.abstract_with_shardings(
        abstract, train_state_shardings(config, mesh, model, tx))
    ck = checkpoints.TrainCheckpointer(str(tmp_path / "ck"))
    got, meta = ck.restore(target, 5)
    ck.close()
    assert meta == {"step": 5}
    for x in jax.tree_util.tree_leaves(got):
      assert x.sharding.device_set <= set(devices[:n]), (n, x.sharding)
    assert_trees_equal(jax.device_get(got), want)
