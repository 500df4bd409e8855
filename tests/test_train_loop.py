"""The train loop end to end on tiny demo runs: the SIGTERM handler, NaN skip mode, bad config.
Kill -9 at random points (resume == uninterrupted) and the NaN stop are in tests/test_faults.py;
a 2-process run against the 1-process step in tests/test_train_multihost.py."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from miles_jax import checkpoints, config_lib
from miles_jax.data import synthetic

import helpers  # noqa: E402
from helpers import apply_overrides, final_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(d, num_train=96, num_eval=16, resolution=32, frames=4, verbose=False)
  return d


def _overrides(steps=6, **extra):
  o = {"train.steps": steps, "train.checkpoint_every": 2, "train.log_every": 1,
       "train.eval_every": 0, "data.batch_size": 8, "optim.warmup_steps": 2,
       "data.shuffle_buffer": 16}
  o.update(extra)
  return [f"--config.{k}={v}" for k, v in o.items()]


def _cmd(data_dir, workdir, *extra):
  return [sys.executable, "-m", "miles_jax.train", f"--config=configs/demo.py:{data_dir}",
          f"--workdir={workdir}", *extra]


def _env(devices=8):
  return dict(os.environ, XLA_FLAGS=helpers.xla_flags(devices),
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def _run(cmd, timeout=300, env=None):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env or _env())


def test_one_process_sigterm_handler_flags_the_step_and_is_removed_after():
  """One process: SIGTERM sets the flag the loop reads after each step, and the previous
  handler comes back when the run ends. (SIGTERM to a running trainer, which then saves and
  exits 0 and resumes: tests/test_faults.py for one process, tests/test_train_multihost.py
  for two, mid-run with periodic saves off.)"""
  from miles_jax.train import loop
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("previous"))
  try:
    with loop._Preemption() as preempt:
      assert not preempt.collective and not preempt.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert preempt.reached(2) and seen == []
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == ["previous"]
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_nan_skip_mode_drops_the_update_and_finishes(data_dir, tmp_path):
  """(Stopping on NaN with the checkpoints untouched: tests/test_faults.py.)"""
  wd = str(tmp_path / "skip")
  r = _run(_cmd(data_dir, wd, *_overrides(**{"debug.inject_nan_at_step": 3,
                                             "train.on_nonfinite": "skip"})))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "update skipped (1 so far)" in r.stdout
  state, _ = final_state(wd)
  assert int(state.step) == 6
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))


def test_wrong_type_on_the_command_line(data_dir, tmp_path):
  wd = str(tmp_path / "bad")
  r = _run(_cmd(data_dir, wd, *_overrides(), "--config.train.steps=abc"), timeout=120)
  assert r.returncode != 0 and "steps" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(wd)


@pytest.mark.parametrize("field,value,needle", [
    ("mask.ratio", -0.5, "mask.ratio"),
    ("mesh.shape", (3,), "mesh.shape"),
    ("data.train", "/nonexistent/*.tfrecord", "data.train"),
    ("data.batch_size", 12, "data.batch_size"),  # not a multiple of the 8 devices
    ("objectives", "contrastive,mae", "objectives"),
])
def test_bad_config_fails_before_compute(data_dir, tmp_path, field, value, needle):
  """In-process: train() refuses before creating anything in the workdir."""
  from miles_jax.train import loop
  config = config_lib.sibling(os.path.join(ROOT, "configs", "demo.py"), "demo").get_config(
      data_dir)
  apply_overrides(config, {field: value})
  wd = str(tmp_path / "bad")
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    loop.train(config, wd)
  assert not os.path.exists(wd)


def test_prefetcher_hands_out_batches_in_order_with_their_data_state():
  """The background thread runs ahead, but each batch comes with the iterator state *after*
  it (what a checkpoint must record), and an error in the thread reaches the consumer."""
  from miles_jax.train.loop import _Prefetcher

  class Data:
    def __init__(self, fail_at=None):
      self.n, self.fail_at = 0, fail_at

    def __next__(self):
      if self.n == self.fail_at:
        raise ValueError("corrupt shard")
      self.n += 1
      return {"x": self.n}

    def state(self):
      return {"position": self.n}

  for depth in (0, 2):
    p = _Prefetcher(Data(), lambda b: b["x"] * 10, depth)
    got = [next(p) for _ in range(5)]
    p.close()
    assert got == [(10 * i, {"position": i}) for i in range(1, 6)]
  p = _Prefetcher(Data(fail_at=2), lambda b: b, 2)
  next(p), next(p)
  with pytest.raises(ValueError, match="corrupt shard"):
    next(p)
  p.close()


def _tb_scalars(logdir: str) -> dict:
  """{tag: [(step, value)]} from every TensorBoard event file under `logdir`."""
  import tensorflow as tf
  out = {}
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name:
      continue
    for e in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for v in e.summary.value:
        value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
        out.setdefault(v.tag, []).append((e.step, value))
  return out


@pytest.mark.slow
def test_metrics_read_at_log_steps_profile_and_compile_cache(data_dir, tmp_path):
  """log_every=4 over 4 steps: one metrics row; `train.profile_steps` writes a jax.profiler
  trace with step markers; the persistent compilation cache lands under the workdir by default;
  throughput, wall-clock and restarts reach TensorBoard (perf/*), and a resume counts a
  restart."""
  wd = str(tmp_path / "prof")
  env = _env(1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  r = _run(_cmd(data_dir, wd, *_overrides(steps=4, **{"train.log_every": 4,
                                                      "train.checkpoint_every": 4,
                                                      "train.profile_steps": "(1, 3)"})),
           env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert [x["step"] for x in rows if x["kind"] == "train"] == [4]
  traces = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(wd, "profile")) for f in fs
            if f.endswith(".xplane.pb")]
  assert traces, os.listdir(wd)
  assert any(b"step_num" in open(t, "rb").read() for t in traces)  # StepTraceAnnotation
  assert os.listdir(os.path.join(wd, "compilation_cache"))
  r = _run(_cmd(data_dir, wd, *_overrides(steps=6, **{"train.log_every": 2,
                                                      "train.checkpoint_every": 6})), env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  tb = _tb_scalars(os.path.join(wd, "tensorboard"))
  for tag in ("steps_per_sec", "clips_per_sec", "clips_per_sec_per_chip", "wall_clock_hours",
              "restarts", "eta_hours"):
    assert [s for s, _ in tb[f"perf/{tag}"]] == [4, 6], tag
  assert [v for _, v in tb["perf/restarts"]] == [0, 1]
  for (_, sps), (_, cps), (_, per_chip) in zip(tb["perf/steps_per_sec"], tb["perf/clips_per_sec"],
                                               tb["perf/clips_per_sec_per_chip"]):
    assert sps > 0 and cps == pytest.approx(8 * sps, rel=1e-5)  # data.batch_size=8
    assert per_chip == pytest.approx(cps, rel=1e-5)  # one device
  assert tb["perf/wall_clock_hours"][1][1] > tb["perf/wall_clock_hours"][0][1] > 0
  assert tb["perf/eta_hours"][1][1] == 0.0
  last = [r for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
          if r["kind"] == "train"][-1]
  assert last["step"] == 6 and last["perf"]["restarts"] == 1


@pytest.mark.slow
def test_video_only_mvm_stage_then_miles_from_it(data_dir, tmp_path, capsys):
  """A video-only stage (objectives=mvm, pixel targets: an MAE-style pre-training of the video
  encoder) hands its weights to a MILES run with train.init_from: every param but the pixel
  head (another width: it starts fresh, and says so) is the stage's, and the snapshot starts
  as the stage's video encoder."""
  from miles_jax.train import loop
  get = lambda: config_lib.sibling(os.path.join(ROOT, "configs", "demo.py"), "demo").get_config(
      data_dir)
  small = {"model.video.depth": 1, "model.text.depth": 1, "data.batch_size": 8,
           "train.log_every": 1, "train.eval_every": 0, "data.shuffle_buffer": 16,
           "optim.warmup_steps": 1}
  c1 = apply_overrides(get(), {**small, "objectives": "mvm", "mvm.target": "pixels",
                               "model.mvm_head_dim": 8 * 8 * 3, "train.steps": 2,
                               "train.checkpoint_every": 2})
  loop.train(c1, str(tmp_path / "stage1"))
  stage1, _ = checkpoints.read_params_host(str(tmp_path / "stage1" / "export"))
  wd2 = str(tmp_path / "stage2")
  c2 = apply_overrides(get(), {**small, "objectives": "contrastive,miles", "train.steps": 1,
                               "train.checkpoint_every": 1, "optim.lr": 0.0,
                               "train.init_from": str(tmp_path / "stage1" / "export")})
  loop.train(c2, wd2)
  assert "mvm_head/kernel has shape (64, 192)" in capsys.readouterr().out
  state, _ = final_state(wd2)
  flat1 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stage1)}
  flat2 = {jax.tree_util.keystr(k): v
           for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    if "mvm_head" in k:
      assert np.shape(flat2[k])[-1] == 64 and np.shape(flat1[k])[-1] == 192
    else:
      np.testing.assert_array_equal(flat2[k], flat1[k], err_msg=k)
  # the EMA of two equal trees: equal up to the rounding of m*x + (1-m)*x
  helpers.assert_trees_equal(jax.device_get(state.snapshot_params["video"]), stage1["video"],
                             atol=1e-6)


def test_local_workdir_is_refused_across_hosts_unless_shared():
  """Several processes on one machine share its disk (the 2-process tests here); on several
  machines a local workdir would scatter every checkpoint, so it is refused in one line."""
  from miles_jax.train.loop import check_shared_workdir
  c = config_lib.default_config()
  check_shared_workdir(c, "/tmp/run", [7, 7, 7, 7])  # one machine
  check_shared_workdir(c, "gs://bucket/run", [1, 2])  # a bucket: every host sees it
  with pytest.raises(ValueError) as e:
    check_shared_workdir(c, "/tmp/run", [1, 1, 2, 2])
  msg = str(e.value)
  assert "--workdir=/tmp/run" in msg and "2 hosts" in msg and "shared_workdir" in msg
  assert "\n" not in msg
  c.train.shared_workdir = True
  check_shared_workdir(c, "/tmp/run", [1, 2])
