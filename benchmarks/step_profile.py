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
operators by self CPU time. Both tables are shares of one step, measured in the same run (the
PyTorch step in a process of its own: the two runtimes disturb each other in one process).

`--dots` asks whether the gap is in the matmul kernels: every dot of the compiled step (from
its optimised HLO: operand shapes and dtypes, contraction) with its in-step time (the thunk
that runs it, fused elementwise work included), then each distinct dot timed alone as a jitted
`lax.dot_general` and as `torch.einsum` on the same shapes and dtypes, each framework in a
fresh process (`--dot-worker`), next to PyTorch's in-step `mm` / `addmm` / `bmm` time. If the
step's dots alone take longer in XLA than in oneDNN by about the whole-step gap, faster dot
kernels are what would close it, not a change in this code.
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
from miles_jax import allocator, config_lib  # noqa: E402

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


_SHAPE = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DIMS = ("lhs_batch_dims", "lhs_contracting_dims", "rhs_batch_dims", "rhs_contracting_dims")


def step_dots(hlo_text: str) -> list:
  """Every dot of a compiled module: operand shapes / dtypes, dimension numbers, result dtype,
  op_name, and the thunk that runs it (the dot itself, or the fusion whose computation holds
  it)."""
  shapes, dots, caller, owner = {}, [], {}, {}
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head and " = " not in line.split("(")[0]:
      comp = head.group(1)
      continue
    m = _SHAPE.match(line)
    if m:
      shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
    name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not name:
      continue
    for callee in re.findall(r"calls=%?([\w.\-]+)", line):
      caller[callee] = name.group(1)
    owner[name.group(1)] = comp
    d = re.search(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
    if d and m:
      dims = {k: tuple(int(x) for x in v.split(",") if x) for k, v in
              re.findall(r"(\w+_dims)=\{([\d,]*)\}", line) if k in _DIMS}
      op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', line)
      dots.append({"name": name.group(1), "operands": d.groups(), "out": m.group(2),
                   "dims": [dims.get(k, ()) for k in _DIMS],
                   "op_name": op_name.group(1) if op_name else ""})
  for dot in dots:
    (ld, ls), (rd, rs) = (shapes[o] for o in dot.pop("operands"))
    dot.update(lhs=[ld, list(ls)], rhs=[rd, list(rs)])
    thunk, seen = dot["name"], 0
    while owner.get(thunk) in caller and seen < 8:  # up from fused computations to the thunk
      thunk, seen = caller[owner[thunk]], seen + 1
    dot["thunk"] = thunk
  return dots


def dot_key(dot: dict) -> str:
  return json.dumps([dot["lhs"], dot["rhs"], dot["dims"], dot["out"]])


def einsum_equation(dims, lhs_rank: int, rhs_rank: int) -> str:
  """The einsum of a dot_general: batch dims, then lhs free, then rhs free (XLA's order)."""
  lb, lc, rb, rc = dims
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  lhs, rhs = [None] * lhs_rank, [None] * rhs_rank
  for i, j in list(zip(lb, rb)) + list(zip(lc, rc)):
    lhs[i] = rhs[j] = next(letters)
  lhs = [x or next(letters) for x in lhs]
  rhs = [x or next(letters) for x in rhs]
  out = ([lhs[i] for i in lb] + [x for i, x in enumerate(lhs) if i not in lb + lc]
         + [x for i, x in enumerate(rhs) if i not in rb + rc])
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def dot_worker(framework: str, path: str, runs: int) -> dict:
  """{dot_key: median ms} of every distinct dot in `path` (JSON list), timed alone: `runs`
  rounds over all the dots (so a slow moment of the machine spreads over them, not one dot),
  after two warm-up calls each."""
  import statistics
  import time

  import numpy as np
  with open(path) as f:
    keys = json.load(f)
  rng = np.random.default_rng(0)
  calls = {}
  names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}  # HLO -> numpy / torch
  if framework == "torch":
    import torch
    torch.set_num_threads(bench.num_cores())
  for key in keys:
    (ld, ls), (rd, rs), dims, res = json.loads(key)
    ld, rd, res = names[ld], names[rd], names[res]
    a, b = (rng.standard_normal(shape).astype(np.float32) for shape in (ls, rs))
    if framework == "jax":
      import jax.numpy as jnp
      a, b = jnp.asarray(a, ld), jnp.asarray(b, rd)
      f = jax.jit(lambda a, b, dims=dims, res=res: jax.lax.dot_general(
          a, b, ((dims[1], dims[3]), (dims[0], dims[2])), preferred_element_type=res))
      run = lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b))
    else:
      to = lambda x, dt: torch.from_numpy(x).to(getattr(torch, dt))
      a, b = to(a, ld), to(b, rd)
      if a.dtype != b.dtype:  # a mixed f32 x bf16 dot: torch computes it in f32
        a, b = a.float(), b.float()
      eq = einsum_equation(dims, len(ls), len(rs))
      run = lambda eq=eq, a=a, b=b: torch.einsum(eq, a, b)
    run()
    run()
    calls[key] = run
  times = {key: [] for key in calls}
  for _ in range(runs):
    for key, run in calls.items():
      t = time.perf_counter()
      run()
      times[key].append(time.perf_counter() - t)
  return {key: 1e3 * statistics.median(ts) for key, ts in times.items()}


def dots_report(j: "bench.JaxStep", thunk_ms: dict, runs: int, rounds: int) -> dict:
  """The step's dots: their thunks' in-step times (`thunk_ms`: ms per step by HLO op) and each
  distinct dot alone, JAX and PyTorch in alternating fresh processes (--dot-worker), the
  median of the rounds' medians."""
  dots = step_dots(j.compiled.as_text())
  groups = collections.OrderedDict()
  for d in dots:
    g = groups.setdefault(dot_key(d), {"count": 0, "thunks": set(), "op_name": d["op_name"],
                                       "eigen": 0})
    g["count"] += 1
    g["thunks"].add(d["thunk"])
    # a dot that is its own thunk runs on Eigen (DotThunk), asynchronously: its trace event
    # covers the launch, not the work; a fused one (YNNPACK) is timed whole
    g["eigen"] += d["thunk"] == d["name"]
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(list(groups), f)
  # alternating fresh JAX and PyTorch processes, `rounds` of each: this machine's speed drifts
  # over minutes, so one process per framework can land in a slow and a fast phase
  alone = {"jax": collections.defaultdict(list), "torch": collections.defaultdict(list)}
  for _ in range(rounds):
    for fw in ("jax", "torch"):
      got = _in_fresh_process(f"{fw} dot", [f"--dot-worker={fw}", f"--dot-file={f.name}",
                                            f"--dot-runs={runs}"])
      for key, ms in got.items():
        alone[fw][key].append(ms)
  alone = {fw: {key: sorted(v)[len(v) // 2] for key, v in d.items()} for fw, d in alone.items()}
  os.unlink(f.name)
  rows = []
  for key, g in groups.items():
    (ld, ls), (rd, rs), dims, res = json.loads(key)
    shape = lambda dt, sh: f"{dt}[{','.join(map(str, sh))}]"
    rows.append({"lhs": shape(ld, ls), "rhs": shape(rd, rs), "out": res, "dims": dims,
                 "count": g["count"], "eigen": g["eigen"], "op_name": g["op_name"][-80:],
                 "in_step_ms": sum(thunk_ms.get(t, 0.0) for t in g["thunks"]),
                 "jax_alone_ms": g["count"] * alone["jax"][key],
                 "torch_alone_ms": g["count"] * alone["torch"][key]})
  rows.sort(key=lambda r: -r["jax_alone_ms"])
  total = lambda k: sum(r[k] for r in rows)
  # a thunk holding several dots counts once in the total (rows may share it)
  fused = {d["thunk"] for d in dots if d["thunk"] != d["name"]}
  return {"dots": len(dots), "distinct": len(rows), "rows": rows,
          "eigen_dots": sum(r["eigen"] for r in rows),
          "in_step_ms": sum(thunk_ms.get(t, 0.0) for t in fused), "jax_alone_ms": total("jax_alone_ms"),
          "torch_alone_ms": total("torch_alone_ms"), "step_thunks_ms": sum(thunk_ms.values())}


TORCH_DOT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")


def trace_events(logdir: str) -> list:
  path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  with gzip.open(path) as f:
    return json.load(f)["traceEvents"]


def thunk_times(j: "bench.JaxStep", steps: int) -> collections.Counter:
  """{HLO op: microseconds per step} of `steps` profiled steps (XLA:CPU thunk trace events)."""
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(steps):
      jax.block_until_ready(j.run())
    jax.profiler.stop_trace()
    events = trace_events(logdir)
  by_op = collections.Counter()
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") == "X" and op and not e["name"].startswith("end:"):
      by_op[op] += e.get("dur", 0.0) / steps
  return by_op


def jax_profile(j: "bench.JaxStep", steps: int) -> dict:
  index = hlo_index(j.compiled.as_text())
  wall_s = bench._times(j.run, steps)  # pylint: disable=protected-access
  by_op = thunk_times(j, steps)
  by_kind = collections.Counter()
  for op, us in by_op.items():
    op_name, opcode = index.get(op, ("", op.split(".")[0]))[:2]
    by_kind[classify(op_name, opcode)] += us
  total = sum(by_kind.values())
  top = [{"hlo_op": op, "ms": us / 1e3, "op_name": index.get(op, ("",))[0][-90:]}
         for op, us in by_op.most_common(12)]
  return {"total_ms": total / 1e3, "step_s": sorted(wall_s)[len(wall_s) // 2], "steps_s": wall_s,
          "thunk_ms": {op: us / 1e3 for op, us in by_op.items()},
          "kinds": [{"kind": k, "ms": v / 1e3, "pct": 100.0 * v / total}
                    for k, v in by_kind.most_common()],
          "top_ops": top, "dots": dict(dot_dtypes(index))}


def _in_fresh_process(what: str, flags: list) -> dict:
  """This script with `flags` in a new process; its last stdout line is the JSON result."""
  import subprocess
  cmd = [sys.executable, os.path.abspath(__file__)] + flags
  r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if r.returncode != 0:
    raise SystemExit(f"error: the {what} worker failed (exit {r.returncode}): {' '.join(cmd)}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def torch_profile(t: "bench.TorchStep", steps: int) -> dict:
  from torch.profiler import ProfilerActivity, profile
  wall_s = bench._times(t.run, steps, block=lambda x: x)  # pylint: disable=protected-access
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      t.run()
  rows = [(e.key, e.self_cpu_time_total / steps) for e in prof.key_averages()]
  total = sum(us for _, us in rows)
  rows.sort(key=lambda r: -r[1])
  return {"total_ms": total / 1e3, "step_s": sorted(wall_s)[len(wall_s) // 2],
          "dot_ms": sum(us for k, us in rows if k in TORCH_DOT_OPS) / 1e3,
          "ops": [{"op": k, "ms": us / 1e3, "pct": 100.0 * us / total} for k, us in rows[:14]]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="base", choices=["base", "small", "tiny"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--objective", default="contrastive", choices=list(bench.OBJECTIVES))
  p.add_argument("--steps", type=int, default=3, help="profiled steps (after warm-up)")
  p.add_argument("--no-torch", dest="torch", action="store_false")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", action="store_true")
  p.add_argument("--dots", action="store_true", help="also time every dot of the step alone, "
                 "JAX and PyTorch (fresh processes)")
  p.add_argument("--dot-runs", type=int, default=9, help="timed rounds over the distinct dots")
  p.add_argument("--dot-rounds", type=int, default=3, help="alternating JAX / PyTorch processes")
  p.add_argument("--dot-worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--dot-file", help=argparse.SUPPRESS)
  p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--malloc", default="auto", choices=allocator.MODES,
                 help="glibc allocator tunables for this process and its workers, as `python -m "
                 "miles_jax.train` sets them on a CPU-only machine (miles_jax/allocator.py)")
  args = p.parse_args(argv)
  if args.quick:
    args.size = "tiny"
  if argv is None:  # run as a script: re-execute once with the tunables (workers inherit them)
    allocator.reexec_with(args.malloc, config_lib.video_config(args.size).width)
  if args.dot_worker:
    print(json.dumps(dot_worker(args.dot_worker, args.dot_file, args.dot_runs)))
    return None
  # two warm-up steps: the first steps after compiling are several times slower (measured: the
  # first bf16 base step 13-20 s, then 4-5 s, under every allocator setting)
  args.warmup, args.runs, args.rounds = 2, 1, 1
  if args.quick:
    args.dot_rounds, args.dot_runs = 1, 3
  if args.torch_worker:  # the PyTorch step's profile, in a process without JAX's runtime
    c = bench.make_config(args.size, args.batch, bench.OBJECTIVES[args.objective], args.dtype)
    t = bench.TorchStep(args.objective, c, bench.make_batch(c), args)
    print(json.dumps(torch_profile(t, args.steps)))
    return None
  j = bench.JaxStep(args.objective, args, jax.devices()[0])
  out = {"cpu": bench.cpu_model(), "cpu_flags": bench.cpu_flags(), "size": args.size,
         "batch": args.batch, "dtype": args.dtype, "objective": args.objective,
         "jax": jax_profile(j, args.steps)}
  use_torch = args.torch and args.objective in bench.TORCH_OBJECTIVES
  if args.dots:
    out["dots"] = dots_report(j, out["jax"]["thunk_ms"], args.dot_runs, args.dot_rounds)
  if use_torch:
    out["torch"] = _in_fresh_process("torch profile", ["--torch-worker"] + [
        f"--{k}={getattr(args, k)}" for k in ("size", "batch", "dtype", "objective", "steps")])

  out["malloc"] = os.environ.get("GLIBC_TUNABLES", "") or "(glibc defaults)"
  print(f"cpu: {out['cpu']} ({' '.join(out['cpu_flags'])}); {args.objective} step, model "
        f"{args.size}, batch {args.batch}, {args.dtype}; mean of {args.steps} profiled steps; "
        f"allocator: {out['malloc']}")
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
  print(f"\nstep wall time (median of {args.steps}, each framework in its own process): JAX "
        f"{out['jax']['step_s']:.2f} s" + (f", PyTorch {out['torch']['step_s']:.2f} s; PyTorch's "
        f"mm / addmm / bmm (self time) {out['torch']['dot_ms']:.1f} ms" if use_torch else ""))
  if args.dots:
    d = out["dots"]
    print(f"\nThe step's {d['dots']} dots ({d['distinct']} distinct), ms per step. Each alone: "
          f"JAX {d['jax_alone_ms']:.1f}, PyTorch {d['torch_alone_ms']:.1f} (JAX / PyTorch "
          f"{d['jax_alone_ms'] / max(d['torch_alone_ms'], 1e-9):.2f}). In the step: "
          f"{d['dots'] - d['eigen_dots']} in YNNPACK fusions, whose thunks (fused elementwise "
          f"included, overlapping) take {d['in_step_ms']:.1f} of {d['step_thunks_ms']:.1f}; "
          f"{d['eigen_dots']} on Eigen (column 'in step' shows 'eigen': their thunks run "
          f"asynchronously and the trace times only their launch)")
    print(f"{'n':>4} {'lhs':<26}{'rhs':<26}{'out':<9}{'in step':>9}{'JAX':>9}{'torch':>9}"
          f"{'ratio':>7}  op")
    for r in d["rows"]:
      in_step = "eigen" if r["eigen"] == r["count"] else f"{r['in_step_ms']:.1f}"
      print(f"{r['count']:>4} {r['lhs']:<26}{r['rhs']:<26}{r['out']:<9}{in_step:>9}"
            f"{r['jax_alone_ms']:>9.1f}{r['torch_alone_ms']:>9.1f}"
            f"{r['jax_alone_ms'] / max(r['torch_alone_ms'], 1e-9):>7.2f}  {r['op_name'][-48:]}")
  if args.json:
    out["jax"].pop("thunk_ms")
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
