r"""Train-loop throughput (issue 11 item 8) and compile time of scanned vs unrolled layers.

  python benchmarks/loop_throughput.py            # demo model, 40 timed steps, 3 rounds
  python benchmarks/loop_throughput.py --quick    # seconds-scale smoke run (used by a test)
  python benchmarks/loop_throughput.py --json     # last line: one JSON object with every figure

Loop: the same run (configs/demo.py tiny model, synthetic data, same batch and seed) trained by
`loop.train` in two modes, alternated round by round so machine load hits both alike:
* `sync`: the pre-issue-11 loop — metrics fetched to the host after every step
  (`train.sync_every_step=True`) and the next batch built and transferred only after that
  (`train.prefetch=0`);
* `async`: metrics read at log steps only, 2 global batches prefetched by a background thread.
Each run logs twice (`log_every = steps / 2`); steps/s is the loop's own figure for the second
window, i.e. after compilation. Reported: median steps/s per mode and the ratio async / sync.

Compile: one train step of a depth-`--depth` tiny model lowered and compiled with
`model.scan_layers` off / on, alternated; median seconds and the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from miles_jax import config_lib  # noqa: E402


def _config(data: str, steps: int, mode: str):
  cfg = config_lib.sibling(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"),
                           "demo").get_config(data)
  cfg.train.steps, cfg.train.log_every = 2 * steps, steps
  cfg.train.checkpoint_every, cfg.train.eval_every = 10 * steps, 0
  cfg.data.eval, cfg.data.batch_size, cfg.data.shuffle_buffer = "", 8, 64
  cfg.train.compilation_cache = ""
  cfg.train.prefetch = 0 if mode == "sync" else 2
  cfg.train.sync_every_step = mode == "sync"
  return cfg


def loop_steps_per_s(data: str, steps: int, mode: str, root: str) -> float:
  from miles_jax.train import loop
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    loop.train(_config(data, steps, mode), tempfile.mkdtemp(dir=root))
  rates = [float(x) for x in re.findall(r"\| ([0-9.]+) steps/s", out.getvalue())]
  return rates[-1]


def compile_seconds(depth: int, scan: bool) -> float:
  from miles_jax import parallel
  from miles_jax.models import dual_encoder
  from miles_jax.train import optim
  from miles_jax.train.state import create_train_state
  from miles_jax.train.step import make_train_step
  import numpy as np
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.kernels = "xla_cpu"  # a CPU measurement: the CPU kernels (models/xla_cpu.py)
  c.model.video.depth = c.model.text.depth = depth
  c.model.scan_layers = scan
  c.data.num_frames, c.data.max_len, c.data.batch_size = 4, 16, 4
  mesh = parallel.mesh_from_config(c)
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  model = dual_encoder.build(c.model)
  tx = optim.make_optimizer(c)[0]
  state = create_train_state(c, jax.random.PRNGKey(0), mesh, model, tx)
  n = (32 // 8) ** 2 * 4
  batch = parallel.global_batch({
      "frames": np.zeros((4, 4, 32, 32, 3), np.uint8),
      "input_ids": np.ones((4, 16), np.int32), "attention_mask": np.ones((4, 16), np.int32),
      "mvm_mask": np.zeros((4, n), bool)}, mesh, rules)
  step = make_train_step(c, mesh, model, tx)
  t = time.perf_counter()
  step.lower(state, batch).compile()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=40, help="timed steps per run (after as many "
                 "warm-up steps)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--depth", type=int, default=12, help="layers per encoder for the compile test")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", action="store_true")
  a = p.parse_args()
  if a.quick:
    a.steps, a.rounds, a.depth = 3, 1, 2
  from miles_jax.data import synthetic
  root = tempfile.mkdtemp(prefix="loop_bench_")
  data = os.path.join(root, "data")
  synthetic.generate(data, num_train=64, num_eval=8, resolution=32, frames=4, verbose=False)
  rates = {"sync": [], "async": []}
  for _ in range(a.rounds):
    for mode in ("sync", "async"):
      rates[mode].append(loop_steps_per_s(data, a.steps, mode, root))
  comp = {False: [], True: []}
  for _ in range(a.rounds):
    for scan in (False, True):
      comp[scan].append(compile_seconds(a.depth, scan))
  res = {
      "device": str(jax.devices()[0].device_kind), "batch": 8, "timed_steps": a.steps,
      "rounds": a.rounds,
      "sync_steps_per_s": statistics.median(rates["sync"]),
      "async_steps_per_s": statistics.median(rates["async"]),
      "sync_runs": rates["sync"], "async_runs": rates["async"],
      "depth": a.depth,
      "compile_unrolled_s": statistics.median(comp[False]),
      "compile_scanned_s": statistics.median(comp[True]),
  }
  res["async_over_sync"] = res["async_steps_per_s"] / res["sync_steps_per_s"]
  res["unrolled_over_scanned_compile"] = res["compile_unrolled_s"] / res["compile_scanned_s"]
  print(f"loop, demo model, batch 8, {a.steps} steps after warm-up, median of {a.rounds} "
        "alternating rounds")
  print(f"  sync every step, no prefetch : {res['sync_steps_per_s']:8.2f} steps/s  "
        f"{rates['sync']}")
  print(f"  log-step reads, prefetch 2   : {res['async_steps_per_s']:8.2f} steps/s  "
        f"{rates['async']}")
  print(f"  ratio                         : {res['async_over_sync']:8.2f}x")
  print(f"train-step compile, depth {a.depth} (video + text), tiny width")
  print(f"  unrolled : {res['compile_unrolled_s']:7.2f} s   scanned : "
        f"{res['compile_scanned_s']:7.2f} s   ratio {res['unrolled_over_scanned_compile']:.2f}x")
  if a.json:
    print(json.dumps(res))


if __name__ == "__main__":
  main()
