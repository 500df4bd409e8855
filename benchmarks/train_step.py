"""B1-B3: train-step time and achieved FLOP/s for the contrastive, miles and mac objectives.

  python benchmarks/train_step.py                 # base model, batch 2, 5 timed runs (minutes)
  python benchmarks/train_step.py --quick         # tiny model, seconds (what a test may call)
  python benchmarks/train_step.py --size small --batch 4 --runs 7 --json

Baseline measured in the same run: a large float32 matmul on the same device = the achievable
peak. FLOPs come from XLA's cost analysis of the compiled step; times are the median of `--runs`
timed steps after compile and one warm-up step. The last line with --json is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from miles_jax import config_lib, masking, parallel  # noqa: E402
from miles_jax.train import state as state_lib  # noqa: E402
from miles_jax.train import step as step_lib  # noqa: E402

PYTORCH_CONTRASTIVE_S = 7.07  # BENCHMARKS.md: PyTorch original, base, batch 2, 2 threads
OBJECTIVES = {"contrastive": "contrastive", "miles": "contrastive,miles", "mac": "mac"}


def _median_time(fn, runs: int) -> float:
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def matmul_peak(n: int, runs: int, device) -> tuple[float, float]:
  """(seconds, FLOP/s) of an n x n float32 matmul."""
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.standard_normal((n, n), np.float32), device)
  b = jax.device_put(rng.standard_normal((n, n), np.float32), device)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))
  t = _median_time(lambda: f(a, b), runs)
  return t, 2.0 * n ** 3 / t


def make_config(size: str, batch: int, objectives: str, dtype: str):
  c = config_lib.default_config()
  c.model = config_lib.model_config(size)
  c.model.dtype = dtype
  c.objectives = objectives
  c.data.batch_size = batch
  c.data.max_len = min(32, c.model.text.max_len)
  c.mac.video_ratio = 0.75
  c.optim.warmup_steps = 10
  return c


def make_batch(c, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  v, b, length = c.model.video, c.data.batch_size, c.data.max_len
  t, grid = c.data.num_frames, (v.img_size // v.patch_size,) * 2
  return {
      "frames": rng.integers(0, 256, (b, t, v.img_size, v.img_size, 3), dtype=np.uint8),
      "input_ids": rng.integers(1, c.model.text.vocab_size, (b, length), dtype=np.int32),
      "attention_mask": np.ones((b, length), np.int32),
      "mvm_mask": np.stack([masking.sample_mask(rng, c.mask.strategy, t, grid, c.mask.ratio)
                            for _ in range(b)]),
  }


def bench_objective(name: str, args, device) -> dict:
  c = make_config(args.size, args.batch, OBJECTIVES[name], args.dtype)
  mesh = parallel.make_mesh((1,), ("data",), [device])
  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  batch = parallel.global_batch(make_batch(c), mesh, parallel.logical_rules(c.sharding.rules, mesh))
  # --quick is a smoke test: compile fast (timings then say little about the optimised step).
  options = {"xla_backend_optimization_level": 0} if args.quick else None
  step = step_lib.make_train_step(c, mesh, compiler_options=options)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  for _ in range(args.warmup):
    run()
  t = _median_time(run, args.runs)
  del holder
  return {"objective": name, "step_s": t, "compile_s": compile_s, "gflop": flops / 1e9,
          "gflop_per_s": flops / t / 1e9}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="base", choices=["base", "small", "tiny"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--objectives", default="contrastive,miles,mac")
  p.add_argument("--matmul", type=int, default=0, help="matmul size (0: 4096, 1024 if --quick)")
  p.add_argument("--quick", action="store_true", help="tiny model, 3 runs: a smoke test")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.runs = "tiny", min(args.runs, 3)
  names = [o.strip() for o in args.objectives.split(",") if o.strip()]
  for n in names:
    if n not in OBJECTIVES:
      p.error(f"--objectives: unknown {n!r}, use {', '.join(OBJECTIVES)}")
  device = jax.devices()[0]
  n = args.matmul or (1024 if args.quick else 4096)
  # The machine is shared: the matmul baseline is re-measured around every objective and each
  # row's percentage uses the mean of the measurements just before and after it.
  mm_runs = max(args.runs, 5)
  peaks = [matmul_peak(n, mm_runs, device)[1]]
  rows = []
  for name in names:
    rows.append(bench_objective(name, args, device))
    peaks.append(matmul_peak(n, mm_runs, device)[1])
    peak_row = 0.5 * (peaks[-2] + peaks[-1])
    rows[-1]["matmul_gflop_per_s"] = peak_row / 1e9
    rows[-1]["pct_of_matmul_peak"] = 100.0 * rows[-1]["gflop_per_s"] * 1e9 / peak_row
  peak = statistics.median(peaks)
  mm_s = 2.0 * n ** 3 / peak
  by = {r["objective"]: r for r in rows}
  out = {"device": device.device_kind, "platform": device.platform, "size": args.size,
         "batch": args.batch, "dtype": args.dtype, "runs": args.runs,
         "matmul_n": n, "matmul_s": mm_s, "matmul_gflop_per_s": peak / 1e9,
         "matmul_gflop_per_s_all": [x / 1e9 for x in peaks],
         "rows": rows}
  if "contrastive" in by and "miles" in by:
    out["miles_over_contrastive"] = by["miles"]["step_s"] / by["contrastive"]["step_s"]
  if "contrastive" in by and "mac" in by:
    out["contrastive_over_mac"] = by["contrastive"]["step_s"] / by["mac"]["step_s"]
    out["mac_flops_reduction_pct"] = 100.0 * (1 - by["mac"]["gflop"] / by["contrastive"]["gflop"])
  if "contrastive" in by and args.size == "base" and args.batch == 2:
    out["pytorch_contrastive_s"] = PYTORCH_CONTRASTIVE_S
    out["speedup_vs_pytorch"] = PYTORCH_CONTRASTIVE_S / by["contrastive"]["step_s"]

  print(f"device: {device.platform} {device.device_kind}; model {args.size}, batch {args.batch}, "
        f"{args.dtype}; median of {args.runs} runs")
  print(f"baseline f32 matmul {n}x{n}: median {mm_s * 1e3:.1f} ms = {peak / 1e9:.1f} GFLOP/s "
        f"(range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} over {len(peaks)} measurements)")
  print(f"{'objective':<12}{'step_s':>9}{'compile_s':>11}{'gflop':>9}{'gflop_per_s':>13}"
        f"{'matmul_gflop_per_s':>20}{'pct_of_matmul_peak':>20}")
  for r in rows:
    print(f"{r['objective']:<12}{r['step_s']:>9.3f}{r['compile_s']:>11.1f}{r['gflop']:>9.1f}"
          f"{r['gflop_per_s']:>13.1f}{r['matmul_gflop_per_s']:>20.1f}"
          f"{r['pct_of_matmul_peak']:>19.1f}%")
  if "miles_over_contrastive" in out:
    print(f"B2 miles / contrastive step time: {out['miles_over_contrastive']:.2f}x "
          "(target <= 1.45x)")
  if "contrastive_over_mac" in out:
    print(f"B3 mac (drop 0.75) speed-up over contrastive: {out['contrastive_over_mac']:.2f}x, "
          f"FLOPs -{out['mac_flops_reduction_pct']:.0f}% (target >= 2.5x, >= 60%)")
  if "contrastive" in by:
    print(f"B1 contrastive at {by['contrastive']['pct_of_matmul_peak']:.0f}% of matmul peak "
          "(CPU target >= 80%)")
  if "speedup_vs_pytorch" in out:
    print(f"PyTorch original contrastive step on this machine: {PYTORCH_CONTRASTIVE_S} s -> "
          f"{out['speedup_vs_pytorch']:.2f}x")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
