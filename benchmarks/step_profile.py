"""Where the train step's time goes: JAX per-op timings by kind, next to PyTorch's profiler.

  python benchmarks/step_profile.py                    # base model, batch 2, f32 (minutes)
  python benchmarks/step_profile.py --dtype bfloat16   # the bf16 mixed-precision step
  python benchmarks/step_profile.py --quick            # tiny model (what a test calls)

JAX: the compiled step runs under `jax.profiler` with XLA:CPU's per-thunk trace events
(`--xla_cpu_enable_xprof_traceme`); each event names its HLO instruction, whose `op_name`
metadata in the compiled module says which Flax module and which part of the step (forward
`jvp(...)`, backward `transpose(jvp(...))`, optimizer) produced it. Those are summed by kind
(patch embed, space attention, time attention, MLP, LayerNorm, text encoder, optimizer,
transposes/copies, ...). The dots' operand dtypes are listed too: in bf16, whether XLA keeps the
matmuls in bf16 (the CPU's AVX-512-BF16 / AMX units) or converts them back to f32.
PyTorch: `torch.profiler` over the original's step (benchmarks/torch_original.py), its top
operators by self CPU time. Both tables are shares of one step, measured in the same run.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

# Per-op trace events from XLA:CPU; must be set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402

import train_step as bench  # noqa: E402

# (kind, regex on the op_name metadata); the first match wins, so the order matters.
KINDS = [
    # outside the forward (jvp) and backward (transpose): AdamW, clipping, EMA, bookkeeping
    ("optimizer / update", r"^state\.|optax|^jit\([^)]*\)/(?!.*(jvp|transpose))"),
    ("dropout / rng", r"Dropout|threefry|bernoulli|_uniform|random_bits|drop_path"),
    ("patch embed", r"patch_embed|conv_general_dilated"),
    ("time attention qkv/proj", r"/timeattn/(qkv|proj)/"),
    ("space attention qkv/proj", r"/attn/(qkv|proj)/"),
    ("time attention core", r"/timeattn/"),
    ("space attention core", r"/attn/"),
    ("video MLP", r"/video/.*/mlp/"),
    ("video LayerNorm", r"/video/.*norm"),
    ("text encoder", r"/text/|encode_text|text_proj"),
    ("losses / projections", r"loss|video_proj|mvm_head|predict_mvm|log_softmax|normalize"),
]


def classify(op_name: str, opcode: str) -> str:
  for kind, pattern in KINDS:
    if re.search(pattern, op_name):
      return kind
  if opcode in ("copy", "transpose") or "copy" in opcode or "transpose" in opcode:
    return "transposes / copies"
  return "other video / elementwise" if "/video/" in op_name else "other"


def hlo_index(hlo_text: str) -> dict:
  """HLO instruction name -> (op_name, opcode, result dtype, operand names), from the text of a
  compiled module."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    name, rest = m.groups()
    op = re.search(r" ([a-z][\w\-]*)\((.*?)\)", rest)
    if not op:
      continue
    opcode = op.group(1)
    if opcode == "fusion":  # the fusion's kind says more than "fusion"
      k = re.search(r"kind=(k\w+)", rest)
      opcode = f"fusion:{k.group(1)}" if k else opcode
    dtype = re.match(r"\(?(\w+)\[", rest)
    op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
    operands = re.findall(r"%([\w.\-]+)", op.group(2))
    out[name] = (op_name.group(1) if op_name else "", opcode, dtype.group(1) if dtype else "?",
                 operands)
  return out


def dot_dtypes(index: dict) -> collections.Counter:
  """Operand-dtype signature of every dot / convolution in the optimised module."""
  c = collections.Counter()
  for name, (_, opcode, dtype, operands) in index.items():
    if opcode in ("dot", "convolution"):
      ins = "x".join(index.get(o, ("", "", "?"))[2] for o in operands)
      c[f"{opcode} {ins} -> {dtype}"] += 1
  return c


def trace_events(logdir: str) -> list:
  path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    return json.load(f)["traceEvents"]


def jax_profile(j: "bench.JaxStep", steps: int) -> dict:
  index = hlo_index(j.compiled.as_text())
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(steps):
      jax.block_until_ready(j.run())
    jax.profiler.stop_trace()
    events = trace_events(logdir)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") != "X" or not op or e["name"].startswith("end:"):
      continue
    op_name, opcode = index.get(op, ("", op.split(".")[0]))[:2]
    us = e.get("dur", 0.0) / steps
    by_kind[classify(op_name, opcode)] += us
    by_op[op] += us
  total = sum(by_kind.values())
  top = [{"hlo_op": op, "ms": us / 1e3, "op_name": index.get(op, ("",))[0][-90:]}
         for op, us in by_op.most_common(12)]
  return {"total_ms": total / 1e3,
          "kinds": [{"kind": k, "ms": v / 1e3, "pct": 100.0 * v / total}
                    for k, v in by_kind.most_common()],
          "top_ops": top, "dots": dict(dot_dtypes(index))}


def torch_profile(t: "bench.TorchStep", steps: int) -> dict:
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      t.run()
  rows = [(e.key, e.self_cpu_time_total / steps) for e in prof.key_averages()]
  total = sum(us for _, us in rows)
  rows.sort(key=lambda r: -r[1])
  return {"total_ms": total / 1e3,
          "ops": [{"op": k, "ms": us / 1e3, "pct": 100.0 * us / total} for k, us in rows[:14]]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="base", choices=["base", "small", "tiny"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--objective", default="contrastive", choices=list(bench.OBJECTIVES))
  p.add_argument("--steps", type=int, default=2, help="profiled steps (after warm-up)")
  p.add_argument("--no-torch", dest="torch", action="store_false")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.size = "tiny"
  args.warmup, args.runs, args.rounds = 1, 1, 1
  j = bench.JaxStep(args.objective, args, jax.devices()[0])
  out = {"cpu": bench.cpu_model(), "cpu_flags": bench.cpu_flags(), "size": args.size,
         "batch": args.batch, "dtype": args.dtype, "objective": args.objective,
         "jax": jax_profile(j, args.steps)}
  use_torch = args.torch and args.objective in bench.TORCH_OBJECTIVES
  if use_torch:
    out["torch"] = torch_profile(bench.TorchStep(args.objective, j.config, j.np_batch, args), args.steps)

  print(f"cpu: {out['cpu']} ({' '.join(out['cpu_flags'])}); {args.objective} step, model "
        f"{args.size}, batch {args.batch}, {args.dtype}; mean of {args.steps} profiled steps")
  print(f"\nJAX by kind of op (sum of XLA:CPU thunk times {out['jax']['total_ms']:.1f} ms):")
  print(f"{'kind':<28}{'ms':>10}{'%':>7}")
  for r in out["jax"]["kinds"]:
    print(f"{r['kind']:<28}{r['ms']:>10.1f}{r['pct']:>6.1f}%")
  print("\nJAX slowest HLO ops:")
  for r in out["jax"]["top_ops"]:
    print(f"  {r['ms']:>9.1f} ms  {r['hlo_op']:<28} {r['op_name']}")
  print("\nJAX dots/convolutions by operand dtypes (optimised HLO):")
  for k, v in sorted(out["jax"]["dots"].items(), key=lambda kv: -kv[1]):
    print(f"  {v:>4} x {k}")
  if use_torch:
    print(f"\nPyTorch top operators by self CPU time (total {out['torch']['total_ms']:.1f} ms):")
    print(f"{'operator':<40}{'ms':>10}{'%':>7}")
    for r in out["torch"]["ops"]:
      print(f"{r['op']:<40}{r['ms']:>10.1f}{r['pct']:>6.1f}%")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
