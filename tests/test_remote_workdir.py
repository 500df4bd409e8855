"""Runs entirely on gs://: a GCS emulator on 127.0.0.1 (tests/support/gcs_emulator.py) and demo-sized runs
trained, evaluated and exported on gs://bucket/…, with 1 process and with 2 processes under FSDP
(killed with SIGKILL and resumed, then evaluated by 2 processes too); then the stage-1 -> stage-2
hand-off (`train.init_from` = the stage-1 workdir on gs://, another frame count). The CLIs get only
STORAGE_EMULATOR_HOST; nothing may appear on the local disk (today's bug: ./gs:/bucket/…)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from miles_jax import paths
from miles_jax.data import synthetic

import helpers  # noqa: E402  (tests/support/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(d, num_train=96, num_eval=16, resolution=32, frames=4, verbose=False)
  return d


def _env(gcs_url, devices=8, session_cache=False):
  """The CLIs' environment. The train runs of `_train` go without the test session's
  compilation cache: the trainer's own (WORKDIR/compilation_cache, on the bucket) is checked."""
  drop = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "EPATH_USE_TF",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") + (() if session_cache else
                                                  ("JAX_COMPILATION_CACHE_DIR",))
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(STORAGE_EMULATOR_HOST=gcs_url, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="", XLA_FLAGS=helpers.xla_flags(devices))
  return env


def _overrides(steps, **extra):
  o = {"train.steps": steps, "train.checkpoint_every": 2, "train.log_every": 1,
       "train.eval_every": 4, "data.batch_size": 8, "optim.warmup_steps": 2,
       "data.shuffle_buffer": 16}
  o.update(extra)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _train_cmds(data_dir, workdir, nproc, overrides):
  base = [sys.executable, "-m", "miles_jax.train", f"--config=configs/demo.py:{data_dir}",
          f"--workdir={workdir}", *overrides]
  if nproc == 1:
    return [base]
  port = helpers.free_port()
  return [base + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", "--cpu_devices=4"] for i in range(nproc)]


def _start(cmds, env):
  if len(cmds) > 1:
    env = dict(env, XLA_FLAGS=helpers.xla_flags())
  return [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for c in cmds]


def _finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out[-2000:] + err[-4000:]
  return outs


def _kill_after_checkpoint(procs, workdir, step=2, timeout=600):
  """SIGKILL every process once checkpoint `step` is committed on the bucket."""
  marker = f"{workdir}/checkpoints/{step}/commit_success.txt"
  deadline = time.time() + timeout
  while not paths.exists(marker):
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.5)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)


def _assert_nothing_local():
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path became a local folder"


def _train(gcs, data_dir, workdir, nproc, extra, kill_first=True):
  """A 4-step run on the bucket; with `kill_first`, a 60-step run SIGKILLed after its step-2
  checkpoint comes first and the 4-step run resumes it."""
  env = _env(gcs)
  if kill_first:
    _kill_after_checkpoint(_start(_train_cmds(data_dir, workdir, nproc,
                                              _overrides(60, **extra)), env), workdir)
  outs = _finish(_start(_train_cmds(data_dir, workdir, nproc, _overrides(4, **extra)), env))
  out0 = outs[0][0]
  if kill_first:
    assert f"resumed {workdir} from step" in out0, out0[-2000:]
  assert "step 4/4" in out0 and f"exported the model to {workdir}/export" in out0
  for name in ("config.json", "metrics.jsonl", "results.json", "best.json", "loss.png",
               "export/model_config.json", "best/model_config.json"):
    assert paths.exists(f"{workdir}/{name}"), name
  # the persistent compilation cache lives in the bucket too (a restart skips the compiles)
  assert list(paths.Path(f"{workdir}/compilation_cache").iterdir())
  events = [p for p in paths.Path(f"{workdir}/tensorboard").iterdir()
            if "tfevents" in p.name]
  assert events, "no TensorBoard event file on the bucket"
  rows = [json.loads(r) for r in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert max(r["step"] for r in rows if r["kind"] == "train") == 4
  _assert_nothing_local()
  return outs


def _tb_steps(workdir):
  """Steps of train/loss in the bucket's TensorBoard event files (read back through gcsfs)."""
  import tensorflow as tf
  steps = set()
  for p in paths.Path(f"{workdir}/tensorboard").iterdir():
    with paths.local_file(os.fspath(p)) as local:
      for e in tf.compat.v1.train.summary_iterator(local):
        for v in e.summary.value:
          if v.tag == "train/loss":
            steps.add(e.step)
  return steps


@pytest.mark.slow
def test_one_process_train_evaluate_export_and_stage_two_on_gcs(gcs, data_dir, tmp_path):
  wd = "gs://bucket/one"
  _train(gcs, data_dir, wd, 1, {}, kill_first=False)  # kill + resume on gs://: the 2-process test
  assert {3, 4} <= _tb_steps(wd)
  env = _env(gcs, session_cache=True)
  ev = [sys.executable, "-m", "miles_jax.evaluate", f"--config=configs/demo.py:{data_dir}"]
  r1 = subprocess.run(ev + [f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True,
                      text=True, timeout=600)
  assert r1.returncode == 0, r1.stderr[-3000:]
  r2 = subprocess.run(ev + [f"--checkpoint={wd}/export", f"--out={wd}/export_eval.json"],
                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r2.returncode == 0, r2.stderr[-3000:]
  out = [ln.split(": ", 1)[1] for ln in r1.stdout.splitlines() if ln.startswith("results: ")]
  # one file per dataset and step, named after the data folder (pytest's synthetic0, ...)
  assert len(out) == 1 and re.fullmatch(re.escape(f"{wd}/eval/") + r"synthetic\d*-step4\.json",
                                        out[0]), r1.stdout[-2000:]
  by_workdir = json.loads(paths.read_text(out[0]))
  by_export = json.loads(paths.read_text(f"{wd}/export_eval.json"))
  assert by_workdir["step"] == 4
  for k in ("t2v_R1", "t2v_R5", "v2t_R1", "t2v_MnR"):  # the export is the step-4 model
    assert by_workdir["retrieval"][k] == by_export["retrieval"][k], k
  caches = [p.name for p in paths.Path(f"{wd}/eval/embeddings").iterdir()
            if p.name.endswith(".npz")]
  assert caches, "the embedding cache was not written beside the results"
  assert "<img" in paths.read_text(f"{wd}/gallery.html")  # evaluate's page, on the bucket too
  _stage_two_from(gcs, data_dir, wd)
  _assert_nothing_local()


def _stage_two_from(gcs, data_dir, wd):
  """Stage 2 (8 frames) starts from the stage-1 workdir's newest checkpoint params, on gs://."""
  from miles_jax import checkpoints
  stage1, _ = checkpoints.read_params_host(f"{wd}/export")
  newest, _ = checkpoints.read_params_host(wd)  # the workdir: its newest checkpoint's params
  flat1, flat_newest = _flatten(stage1), _flatten(newest)
  assert flat1.keys() == flat_newest.keys()
  for k in flat1:
    np.testing.assert_array_equal(flat1[k], flat_newest[k], err_msg=k)
  # lr 0 for one step, so its step-1 params are exactly its initial params.
  wd2 = f"{wd}_stage2"
  extra = {"train.init_from": wd, "model.video.num_frames": 8, "optim.lr": 0.0,
           "train.eval_every": 0}
  outs = _finish(_start(_train_cmds(data_dir, wd2, 1, _overrides(1, **extra)),
                        _env(gcs, session_cache=True)))
  assert f"initialised params from {wd}" in outs[0][0]
  stage2, _ = checkpoints.read_params_host(wd2)
  flat2 = _flatten(stage2)
  assert flat2.keys() == flat1.keys()
  for k in flat1:
    if k == "video/temporal_embed":
      assert flat1[k].shape[0] == 4 and flat2[k].shape[0] == 8
      np.testing.assert_array_equal(flat2[k][:4], flat1[k])
      np.testing.assert_array_equal(flat2[k][4:], 0.0)  # as convert --temporal_fill=zeros
    else:
      np.testing.assert_array_equal(flat2[k], flat1[k], err_msg=k)


@pytest.mark.slow
def test_two_processes_fsdp_on_gcs_train_and_evaluate(gcs, data_dir):
  """2 processes x 4 devices, mesh (data 2, fsdp 4): killed, resumed, export/ and best/ written
  by both; then `evaluate --workdir=gs://...` on 2 processes gives the training's last eval."""
  mesh = {"mesh.shape": "(2,4)", "mesh.axes": "('data','fsdp')"}
  wd = "gs://bucket/two"
  _train(gcs, data_dir, wd, 2, mesh)
  trained = json.loads(paths.read_text(f"{wd}/results.json"))["eval"]

  port = helpers.free_port()
  cmds = [[sys.executable, "-m", "miles_jax.evaluate", f"--config=configs/demo.py:{data_dir}",
           f"--workdir={wd}", *[f"--config.{k}={v}" for k, v in mesh.items()],
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           "--cpu_devices=4"] for i in range(2)]
  outs = _finish(_start(cmds, _env(gcs, session_cache=True)))
  assert "process 1/2" in outs[1][0] and "results: " not in outs[1][0]  # only process 0 writes
  out = [ln.split(": ", 1)[1] for ln in outs[0][0].splitlines() if ln.startswith("results: ")]
  assert len(out) == 1 and out[0].endswith("-step4.json"), outs[0][0][-2000:]
  got = json.loads(paths.read_text(out[0]))["retrieval"]
  for k in ("t2v_R1", "t2v_R5", "t2v_MnR", "v2t_R1", "v2t_MnR"):
    assert got[k] == pytest.approx(trained[f"retrieval/{k}"], abs=1e-9), k
  _assert_nothing_local()


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def test_local_dir_copies_to_the_bucket_only_on_success(gcs):
  """paths.local_dir (viz's figures, np.savez): files written locally reach gs:// whole when the
  block ends; an error inside the block leaves nothing on the bucket."""
  with paths.local_dir("gs://bucket/viz/ok") as local:
    assert os.path.isdir(local)
    with open(os.path.join(local, "a.png"), "wb") as f:
      f.write(b"\x89PNG" + bytes(range(256)))
    np.savez(os.path.join(local, "maps.npz"), x=np.arange(5))
  assert paths.read_bytes("gs://bucket/viz/ok/a.png") == b"\x89PNG" + bytes(range(256))
  with paths.local_file("gs://bucket/viz/ok/maps.npz") as f:
    np.testing.assert_array_equal(np.load(f)["x"], np.arange(5))
  assert not os.path.exists(local)  # the temporary folder is gone
  with pytest.raises(RuntimeError):
    with paths.local_dir("gs://bucket/viz/failed") as local:
      open(os.path.join(local, "half.png"), "wb").close()
      raise RuntimeError("the figure failed")
  assert not paths.exists("gs://bucket/viz/failed/half.png")
  _assert_nothing_local()
