"""B1-B3: train-step time of miles_jax next to the PyTorch original, measured in one run.

  python benchmarks/train_step.py                       # base model, batch 2, f32 (many minutes)
  python benchmarks/train_step.py --dtype bfloat16      # JAX model.dtype=bfloat16 vs torch autocast
  python benchmarks/train_step.py --quick               # tiny model, seconds (what a test calls)
  python benchmarks/train_step.py --size small --batch 4 --runs 7 --json

Baselines measured in the same run, on the same machine:
- the PyTorch original's step (benchmarks/torch_original.py: Frozen's video transformer,
  transformers' DistilBERT with its dropout, AdamW) on the same batch, frames and text length,
  with torch threads = the CPU cores this process may use. JAX and PyTorch are timed in
  alternating rounds (`--rounds`), so machine load hits both; the figure is the median over all
  rounds' timed steps. Every round of each framework runs in a fresh process of its own (this
  script with --worker): in one process the two runtimes' thread pools and allocators disturb
  each other (measured on a 2-core EPYC: the JAX step 7.4 s alone, 8.2-9.7 s in a process
  where the PyTorch step had run), and a user never runs them together. PyTorch has
  `contrastive` and `miles` steps (no MAC implementation is released), and the video encoder's
  forward alone (inference);
- a large float32 matmul = the achievable peak; FLOPs come from XLA's cost analysis.
Both frameworks' workers run with the glibc allocator tunables that `python -m miles_jax.train`
uses on a CPU-only machine (miles_jax/allocator.py: at base size XLA:CPU otherwise page-faults
its step buffers in again every step, ~40 % of the step in the kernel); `--malloc=off` measures
without them, `--torch-malloc` gives PyTorch other ones.
No figure from another machine is used anywhere. With --json the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)  # torch_original

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from miles_jax import allocator, config_lib, masking, parallel  # noqa: E402
from miles_jax.models.video import normalize_frames  # noqa: E402
from miles_jax.train import state as state_lib  # noqa: E402
from miles_jax.train import step as step_lib  # noqa: E402

OBJECTIVES = {"contrastive": "contrastive", "miles": "contrastive,miles", "mac": "mac"}
TORCH_OBJECTIVES = ("contrastive", "miles")


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
  # The CPU kernels (models/xla_cpu.py) and, for bfloat16, bf16 dense matmuls around float32
  # elementwise code: what a CPU run should use (configs/demo.py). --set=model.kernels=reference
  # --set=model.low_precision=all times the reference (TPU) program on this CPU.
  c.model.kernels = "xla_cpu"
  c.model.low_precision = "matmuls"
  c.objectives = objectives
  c.data.batch_size = batch
  c.data.max_len = min(32, c.model.text.max_len)
  c.mac.video_ratio = 0.75
  # The paper's MILES step (one online forward, the contrastive term on the masked clip), as
  # benchmarks/torch_original.py has it; the default's intact-clip placement adds one video
  # forward + backward.
  c.mvm.unmasked_contrastive = False
  c.optim.warmup_steps = 10
  # The original trains DistilBERT in train mode (dropout 0.1): time the same work.
  c.model.text.dropout_rate = 0.1
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


def cpu_model() -> str:
  """The CPU's model name (the figures only compare within one machine and run)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
  """The CPU's bf16 matrix features (AMX / AVX-512-BF16), which decide what bf16 can gain."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return sorted(have & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
  except OSError:
    pass
  return []


def num_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class JaxStep:
  """A compiled miles_jax train step on one device, and its video-encoder forward."""

  def __init__(self, name: str, args, device):
    c = make_config(args.size, args.batch, OBJECTIVES[name], args.dtype)
    config_lib.override(c, config_lib.parse_overrides(getattr(args, "set", None) or []))
    self.config = c
    mesh = parallel.make_mesh((1,), ("data",), [device])
    state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
    self.np_batch = make_batch(c)
    batch = parallel.global_batch(self.np_batch, mesh,
                                  parallel.logical_rules(c.sharding.rules, mesh))
    # --quick is a smoke test: compile fast (timings then say little about the optimised step).
    options = {"xla_backend_optimization_level": 0} if args.quick else None
    step = step_lib.make_train_step(c, mesh, compiler_options=options)
    t0 = time.perf_counter()
    self.compiled = step.lower(state, batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = _flops(self.compiled)
    self.state, self.batch = state, batch
    for _ in range(args.warmup):  # blocking: dispatch is asynchronous, an unblocked warm-up
      jax.block_until_ready(self.run())  # step would be timed with the first measured one

  def run(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics["loss"]

  def make_forward(self):
    """(run, flops) of the video encoder's forward alone, eval mode."""
    from miles_jax.models import dual_encoder
    model = dual_encoder.build(self.config.model)
    params = self.state.params
    frames = normalize_frames(self.batch["frames"])
    fwd = jax.jit(lambda p, f: model.apply({"params": p}, f, method=model.encode_video)["embed"])
    compiled = fwd.lower(params, frames).compile()
    compiled(params, frames).block_until_ready()
    return (lambda: compiled(params, frames)), _flops(compiled)


class TorchStep:
  """The PyTorch original's step for `config` on the same batch as JaxStep's (`np_batch`)."""

  def __init__(self, name: str, config, np_batch: dict, args):
    import torch

    import torch_original
    torch.set_num_threads(num_cores())
    c = config
    self.trainer = torch_original.Trainer(c.model, name, lr=c.optim.lr,
                                          weight_decay=c.optim.weight_decay,
                                          grad_clip=c.optim.grad_clip,
                                          bf16=args.dtype == "bfloat16")
    self.batch = torch_original.torch_batch(np_batch)
    for _ in range(args.warmup):
      self.run()

  def run(self):
    return self.trainer.step(self.batch)

  def forward(self):
    return self.trainer.encode_video(self.batch["frames"])


def _times(fn, runs: int, block=jax.block_until_ready) -> list[float]:
  out = []
  for _ in range(runs):
    t = time.perf_counter()
    block(fn())
    out.append(time.perf_counter() - t)
  return out


def worker(framework: str, names: list, args) -> dict:
  """One round of one framework, in this process: each objective's timed steps (and the video
  forward's for `contrastive`); the JAX worker also measures the matmul baseline around every
  objective."""
  out = {"rows": {}}
  if framework == "jax":
    device = jax.devices()[0]
    mm_runs = max(args.runs, 5)
    out["peaks"] = [matmul_peak(args.matmul, mm_runs, device)[1]]
    out["device"], out["platform"] = device.device_kind, device.platform
    for name in names:
      j = JaxStep(name, args, device)
      out["kernels"], out["low_precision"] = j.config.model.kernels, j.config.model.low_precision
      row = {"times": _times(j.run, args.runs), "compile_s": j.compile_s, "gflop": j.flops / 1e9}
      if name == "contrastive":
        fwd, fwd_flops = j.make_forward()
        row["forward_times"], row["forward_gflop"] = _times(fwd, args.runs), fwd_flops / 1e9
      out["rows"][name] = row
      del j
      out["peaks"].append(matmul_peak(args.matmul, mm_runs, device)[1])
    return out
  import torch
  torch.set_num_threads(num_cores())
  out["torch_version"], out["torch_threads"] = torch.__version__, torch.get_num_threads()
  for name in names:
    c = make_config(args.size, args.batch, OBJECTIVES[name], args.dtype)
    t = TorchStep(name, c, make_batch(c), args)
    row = {"times": _times(t.run, args.runs, block=lambda x: x)}
    if name == "contrastive":
      row["forward_times"] = _times(t.forward, args.runs, block=lambda x: x)
    out["rows"][name] = row
    del t
  return out


def worker_environ(framework: str, args) -> dict:
  """The worker's environment: glibc allocator tunables as `python -m miles_jax.train` sets
  them (miles_jax/allocator.py), `--malloc` for JAX, `--torch-malloc` for PyTorch; the CPU
  platform where libtpu is installed without a TPU."""
  mode = args.malloc if framework == "jax" else args.torch_malloc
  if mode == "same":
    mode = args.malloc
  env = {**os.environ, allocator.ENV: mode}
  if not env.get("JAX_PLATFORMS") and allocator.libtpu_without_tpu():
    env["JAX_PLATFORMS"] = "cpu"  # as cli.setup_process: libtpu (the [tpu] extra), no TPU chip
  return allocator.tuned_environ(env, config_lib.video_config(args.size).width) or env


def run_worker(framework: str, names: list, args) -> dict:
  """`worker` in a fresh process; its last stdout line is the JSON result."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
         f"--size={args.size}", f"--batch={args.batch}", f"--runs={args.runs}",
         f"--warmup={args.warmup}", f"--dtype={args.dtype}", f"--objectives={','.join(names)}",
         f"--matmul={args.matmul}"] + (["--quick"] if args.quick else []) + (
             [] if args.torch else ["--no-torch"]) + [f"--set={x}" for x in args.set]
  r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=worker_environ(framework, args))
  if r.returncode != 0:
    raise SystemExit(f"error: the {framework} worker failed (exit {r.returncode}): "
                     f"{' '.join(cmd)}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def combine(names: list, jax_rounds: list, torch_rounds: list) -> list:
  """Per objective: medians over every round's timed steps, and each round's median."""
  med = statistics.median
  pooled = lambda parts, key: med([x for part in parts for x in part[key]])  # all rounds
  rows = []
  for name in names:
    js = [r["rows"][name] for r in jax_rounds]
    row = {"objective": name, "step_s": pooled(js, "times"), "compile_s": js[0]["compile_s"],
           "gflop": js[0]["gflop"], "step_s_rounds": [med(j["times"]) for j in js]}
    row["gflop_per_s"] = row["gflop"] / row["step_s"]
    # the matmul baseline measured just before and after this objective, in every round
    i = names.index(name)
    peak = statistics.mean(x for r in jax_rounds for x in r["peaks"][i:i + 2])
    row["matmul_gflop_per_s"] = peak / 1e9
    row["pct_of_matmul_peak"] = 100.0 * row["gflop_per_s"] * 1e9 / peak
    ts = [r["rows"][name] for r in torch_rounds if name in r["rows"]]
    if ts:
      row["torch_step_s"] = pooled(ts, "times")
      row["torch_step_s_rounds"] = [med(t["times"]) for t in ts]
      row["jax_over_torch"] = row["step_s"] / row["torch_step_s"]
    if "forward_times" in js[0]:
      row["video_forward_s"] = pooled(js, "forward_times")
      row["video_forward_gflop"] = js[0]["forward_gflop"]
      if ts:
        row["torch_video_forward_s"] = pooled(ts, "forward_times")
        row["video_forward_jax_over_torch"] = (row["video_forward_s"] /
                                               row["torch_video_forward_s"])
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="base", choices=["base", "small", "tiny"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--runs", type=int, default=3, help="timed steps per framework per round")
  p.add_argument("--rounds", type=int, default=2, help="alternating JAX / PyTorch rounds")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--objectives", default="contrastive,miles,mac")
  p.add_argument("--no-torch", dest="torch", action="store_false",
                 help="JAX only (the PyTorch columns need the [torch] extra and transformers)")
  p.add_argument("--matmul", type=int, default=0, help="matmul size (0: 4096, 1024 if --quick)")
  p.add_argument("--quick", action="store_true", help="tiny model, 2 runs: a smoke test")
  p.add_argument("--json", action="store_true")
  p.add_argument("--set", action="append", default=[], help="a config override for the JAX "
                 "step, KEY=VALUE (repeatable), e.g. --set=model.kernels=reference")
  p.add_argument("--malloc", default="auto", choices=allocator.MODES,
                 help="glibc allocator tunables of the JAX worker processes, as the miles_jax "
                 "CLIs set them (miles_jax/allocator.py; auto: resident for base size)")
  p.add_argument("--torch-malloc", default="same", choices=("same",) + allocator.MODES,
                 help="the PyTorch workers' tunables (same: --malloc's, the same conditions)")
  p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)  # one round
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.runs, args.rounds = "tiny", min(args.runs, 2), min(args.rounds, 2)
  names = [o.strip() for o in args.objectives.split(",") if o.strip()]
  for n in names:
    if n not in OBJECTIVES:
      p.error(f"--objectives: unknown {n!r}, use {', '.join(OBJECTIVES)}")
  if args.torch and args.worker != "jax":  # the JAX worker never imports torch
    try:
      import torch  # noqa: F401
      import transformers  # noqa: F401
    except ImportError:
      p.error("the PyTorch baseline needs `pip install -e '.[torch,test]'` (torch, transformers);"
              " or pass --no-torch")
  args.matmul = args.matmul or (1024 if args.quick else 4096)
  if args.worker:
    print(json.dumps(worker(args.worker, names, args)))
    return None
  n = args.matmul
  jax_rounds, torch_rounds = [], []
  torch_names = [x for x in names if x in TORCH_OBJECTIVES] if args.torch else []
  for i in range(args.rounds):
    for framework, fw_names, results in (("jax", names, jax_rounds),
                                         ("torch", torch_names, torch_rounds)):
      if fw_names:
        results.append(run_worker(framework, fw_names, args))
        print(f"[round {i + 1}/{args.rounds}] {framework}: " + ", ".join(
            f"{k} {statistics.median(v['times']):.3f} s" for k, v in results[-1]["rows"].items()),
            file=sys.stderr, flush=True)
  rows = combine(names, jax_rounds, torch_rounds)
  peaks = [x for r in jax_rounds for x in r["peaks"]]
  peak = statistics.median(peaks)
  mm_s = 2.0 * n ** 3 / peak
  by = {r["objective"]: r for r in rows}
  out = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": num_cores(),
         "device": jax_rounds[0]["device"], "platform": jax_rounds[0]["platform"],
         "size": args.size, "batch": args.batch, "dtype": args.dtype, "runs": args.runs, "rounds": args.rounds,
         "malloc": {fw: worker_environ(fw, args).get("GLIBC_TUNABLES", "")
                    for fw in ("jax", "torch")},
         "kernels": jax_rounds[0].get("kernels"), "low_precision": jax_rounds[0].get("low_precision"),
         "matmul_n": n, "matmul_s": mm_s, "matmul_gflop_per_s": peak / 1e9,
         "matmul_gflop_per_s_all": [x / 1e9 for x in peaks],
         "rows": rows}
  if torch_rounds:
    out["torch_version"] = torch_rounds[0]["torch_version"]
    out["torch_threads"] = torch_rounds[0]["torch_threads"]
  out["jax_version"] = jax.__version__
  if "contrastive" in by and "miles" in by:
    out["miles_over_contrastive"] = by["miles"]["step_s"] / by["contrastive"]["step_s"]
  if "contrastive" in by and "mac" in by:
    out["contrastive_over_mac"] = by["contrastive"]["step_s"] / by["mac"]["step_s"]
    out["mac_flops_reduction_pct"] = 100.0 * (1 - by["mac"]["gflop"] / by["contrastive"]["gflop"])

  print(f"cpu: {out['cpu']} ({out['cores']} cores; {' '.join(out['cpu_flags']) or 'no bf16 units'})"
        f"; jax {jax.__version__}" + (f", torch {out['torch_version']} "
                                       f"({out['torch_threads']} threads)" if torch_rounds else ""))
  print(f"model {args.size}, batch {args.batch}, {args.dtype} (JAX: model.kernels="
        f"{out['kernels']}, low_precision={out['low_precision']}); median of {args.runs} runs x "
        f"{args.rounds} alternating rounds")
  for fw, tunables in out["malloc"].items():
    print(f"{fw} workers: GLIBC_TUNABLES={tunables or '(unset)'}")
  print(f"baseline f32 matmul {n}x{n} (JAX): median {mm_s * 1e3:.1f} ms = {peak / 1e9:.1f} GFLOP/s "
        f"(range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} over {len(peaks)} measurements)")
  head = (f"{'objective':<13}{'jax_s':>8}{'torch_s':>9}{'jax/torch':>10}{'compile_s':>10}"
          f"{'gflop':>9}{'gflop_per_s':>12}{'pct_of_matmul_peak':>19}")
  print(head)
  fmt = lambda r, k, f: format(r[k], f) if k in r else "-"
  for r in rows:
    print(f"{r['objective']:<13}{r['step_s']:>8.3f}{fmt(r, 'torch_step_s', '.3f'):>9}"
          f"{fmt(r, 'jax_over_torch', '.2f'):>10}{r['compile_s']:>10.1f}{r['gflop']:>9.1f}"
          f"{r['gflop_per_s']:>12.1f}{r['pct_of_matmul_peak']:>18.1f}%")
    if "video_forward_s" in r:
      print(f"{'video fwd':<13}{r['video_forward_s']:>8.3f}"
            f"{fmt(r, 'torch_video_forward_s', '.3f'):>9}"
            f"{fmt(r, 'video_forward_jax_over_torch', '.2f'):>10}{'':>10}"
            f"{r['video_forward_gflop']:>9.1f}"
            f"{r['video_forward_gflop'] / r['video_forward_s']:>12.1f}")
  if "miles_over_contrastive" in out:
    print(f"B2 miles / contrastive step time: {out['miles_over_contrastive']:.2f}x "
          "(target <= 1.45x)")
  if "contrastive_over_mac" in out:
    print(f"B3 mac (drop 0.75) speed-up over contrastive: {out['contrastive_over_mac']:.2f}x, "
          f"FLOPs -{out['mac_flops_reduction_pct']:.0f}% (target >= 2.5x, >= 60%)")
  if "contrastive" in by:
    print(f"B1 contrastive at {by['contrastive']['pct_of_matmul_peak']:.0f}% of matmul peak "
          "(CPU target >= 80%)" + (f"; JAX / PyTorch step time "
                                   f"{by['contrastive']['jax_over_torch']:.2f}x (target <= 1.0x)"
                                   if "jax_over_torch" in by["contrastive"] else ""))
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
