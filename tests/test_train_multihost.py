"""Multi-process training (2 processes x 2 CPU devices, gloo on 127.0.0.1): preemption is
collective — SIGTERM to one host makes both save the same step and exit 0, and the resumed run
ends with the params of an uninterrupted one; that uninterrupted 2-process run equals the same
steps taken in this process on 8 devices with both hosts' batches."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from miles_jax import checkpoints, parallel
from miles_jax.data import pipeline, synthetic
from miles_jax.models import dual_encoder
from miles_jax.train import optim
from miles_jax.train.state import create_train_state
from miles_jax.train.step import make_train_step

import helpers  # noqa: E402
from helpers import assert_trees_equal, final_state  # noqa: E402

pytestmark = pytest.mark.slow  # several processes: the full suite only
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(d, num_train=64, num_eval=8, resolution=32, frames=4, verbose=False)
  return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _launch(data_dir, workdir, cache_dir, steps, logs):
  """Both processes of a 2-host run; a constant lr so `train.steps` does not change the updates."""
  port = helpers.free_port()
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # Adam's eps at 1e-3: runs that compile different programs (train.steps differs) round
  # differently by ~1e-7, and with eps 1e-8 Adam turns that noise on the parameters whose
  # gradient is zero by construction (attention key biases) into full lr-sized steps.
  over = {"train.steps": steps, "train.checkpoint_every": 1000, "train.log_every": 1,
          "train.eval_every": 0, "data.batch_size": 8, "optim.warmup_steps": 0,
          "optim.schedule": "constant", "optim.lr": 1e-3, "optim.eps": 1e-3,
          "data.shuffle_buffer": 16, "data.eval": ""}
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "miles_jax.train", f"--config=configs/demo.py:{data_dir}",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in over.items()],
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
           "--cpu_devices=2"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(f"{logs}-{i}.out", "w"),
                                  stderr=open(f"{logs}-{i}.err", "w"), text=True))
  return procs


def _read(path):
  with open(path) as f:
    return f.read()


def _finish(procs, logs, timeout=400):
  """Waits for both; a failed process ends the other (it would wait for its peer forever)."""
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        assert p.poll() in (None, 0), f"process {i}: " + _read(f"{logs}-{i}.err")[-3000:]
      time.sleep(0.2)
    for i, p in enumerate(procs):
      assert p.returncode == 0, f"process {i}: " + _read(f"{logs}-{i}.err")[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [_read(f"{logs}-{i}.out") for i in range(2)]


def test_sigterm_to_one_host_saves_the_same_step_on_both(data_dir, cache_dir, tmp_path):
  wd, logs = str(tmp_path / "pre"), str(tmp_path / "log")
  procs = _launch(data_dir, wd, cache_dir, 400, logs + "-a")
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
  outs = _finish(procs, logs + "-a")
  saved = []
  for out in outs:
    line = [ln for ln in out.splitlines() if ln.startswith("SIGTERM: saved step")]
    assert line, out[-2000:]
    saved.append(int(line[0].split()[3]))
  assert saved[0] == saved[1], saved
  k = saved[0]
  assert 1 <= k < 400
  assert checkpoints.TrainCheckpointer(os.path.join(wd, "checkpoints")).all_steps() == [k]

  # resume to k + 2; an uninterrupted run to k + 2 ends with the same params
  _finish(_launch(data_dir, wd, cache_dir, k + 2, logs + "-b"), logs + "-b")
  ref_wd = str(tmp_path / "ref")
  ref_outs = _finish(_launch(data_dir, ref_wd, cache_dir, k + 2, logs + "-c"), logs + "-c")
  # only process 0 logs
  assert f"step {k + 2}/{k + 2}" in ref_outs[0] and "step" not in ref_outs[1], ref_outs[1][-2000:]
  got, meta = final_state(wd)
  ref, ref_meta = final_state(ref_wd)
  assert int(got.step) == k + 2 and meta["data"] == ref_meta["data"]
  # Equal up to rounding: one lr-sized update (1e-3) on a wrong batch, a lost or repeated step
  # or a stale optimizer state is 100x the tolerance.
  assert_trees_equal(got.params, ref.params, atol=1e-5)
  assert_trees_equal(got.snapshot_params, ref.snapshot_params, atol=1e-5)
  assert_trees_equal(got.opt_state, ref.opt_state, atol=1e-5)
  _assert_equals_one_process(ref_wd, k + 2, ref, ref_meta)


def _assert_equals_one_process(wd, steps, got, meta):
  """The 2-process run in `wd` (its final state `got` and data `meta`, as final_state reads
  them) against the same steps in this process on 8 devices, fed with both hosts' batches (each
  host's shards, concatenated in process order)."""
  assert len(meta["data"]) == 2
  import ml_collections
  with open(os.path.join(wd, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = parallel.mesh_from_config(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  model = dual_encoder.build(config.model)
  tx = optim.make_optimizer(config)[0]
  state = create_train_state(config, jax.random.PRNGKey(config.seed), mesh, model, tx)
  step = make_train_step(config, mesh, model, tx)
  hosts = [pipeline.make_train_iterator(config, seed=config.seed, process_index=i,
                                        process_count=2) for i in range(2)]
  init = jax.device_get(state)
  ref_metrics = []
  for _ in range(steps):
    parts = [next(h) for h in hosts]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, m = step(state, parallel.global_batch(batch, mesh, rules))
    ref_metrics.append(jax.device_get(m))
  # The loss trajectory, step by step: only the order of gloo's sums differs (~1e-7).
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    logged = [json.loads(l) for l in f if json.loads(l).get("kind") == "train"]
  assert len(logged) == steps
  for i, (g, w) in enumerate(zip(logged, ref_metrics)):
    for k in ("loss", "contrastive_loss", "mvm_loss", "grad_norm"):
      np.testing.assert_allclose(g[k], float(w[k]), rtol=1e-4, err_msg=f"step {i + 1} {k}")
  # The parameters, each tensor against its own total update over the run: the 2-process
  # result must sit within 2% of the distance training moved it (a sign or scale error in
  # the update, or a missed all-reduce, moves it by ~100%). The 1e-6 floor (0.1% of one Adam
  # step at this lr) is for tensors whose gradient is zero by construction (attention key
  # biases: softmax ignores them), whose tiny moves are rounding noise amplified by Adam.
  ref = jax.device_get(state)
  for name, g_tree, r_tree, i_tree in (("params", got.params, ref.params, init.params),
                                       ("snapshot", got.snapshot_params, ref.snapshot_params,
                                        init.snapshot_params)):
    leaves = jax.tree_util.tree_leaves
    for (path, g), r, i0 in zip(jax.tree_util.tree_leaves_with_path(g_tree), leaves(r_tree),
                                leaves(i_tree)):
      g, r, i0 = np.asarray(g), np.asarray(r), np.asarray(i0)
      update = float(np.abs(r - i0).max())
      err = float(np.abs(g - r).max())
      assert err <= 0.02 * update + 1e-6, (name, jax.tree_util.keystr(path), err, update)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(init.params)))
  assert moved > 1e-3  # the floor is small against what training changed
