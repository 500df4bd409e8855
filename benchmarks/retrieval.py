"""B6: top-k text→video search over a 10^6-video gallery, chunked (and sharded) vs dense.

  python benchmarks/retrieval.py                 # 10^6 gallery, 1000 queries, dim 256
  python benchmarks/retrieval.py --devices 8     # add sharded rows (simulated CPU devices)
  python benchmarks/retrieval.py --quick --json  # seconds; last line is one JSON object

Each configuration runs in its own subprocess, so its peak resident memory (VmHWM, reset
after compilation, before the first execution) is its own; "rss_MiB" is that peak minus the
resident memory before the search (the host gallery and queries are already there). "xla_MiB" is XLA's compiled
memory analysis of one step (arguments + temporaries + outputs, per device), which is
also how the dense 10^6 figure is obtained without allocating it. Times are medians of
`--runs` full searches after one warm-up. "match" is the fraction of queries whose top-k
index list equals the dense one (at the full size: dense score rows for 16 queries).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MiB = 2 ** 20
GEN_ROWS = 8192  # host generation block: small, so generating adds no memory peak
CHECK_QUERIES = 16


def _rss():
  fields = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Vm"))
  return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
  except OSError:
    pass


def _embeddings(rows, dim, dtype, seed):
  """Unit-norm random embeddings, generated block-wise straight into the output array."""
  import ml_dtypes  # noqa: F401  (bfloat16 numpy dtype)
  import numpy as np
  rng = np.random.default_rng(seed)
  out = np.empty((rows, dim), dtype)
  block = np.empty((GEN_ROWS, dim), np.float32)
  for s in range(0, rows, GEN_ROWS):
    b = block[:min(GEN_ROWS, rows - s)]
    rng.standard_normal(out=b, dtype=np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    out[s:s + b.shape[0]] = b
  return out


def _memory_analysis(jitted, *args, **kwargs):
  """Compiles (which also fills jit's cache) and returns XLA's bytes per device, in MiB."""
  m = jitted.lower(*args, **kwargs).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / MiB


def child(a):
  """One configuration: prints a JSON line with its figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from miles_jax.evaluation import search

  dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
  q = _embeddings(a.queries, a.dim, dtype, seed=0)
  out = {"mode": a.mode, "gallery": a.gallery, "queries": a.queries}

  if a.mode == "dense_estimate":  # compile only: the dense program's memory, never run
    spec = lambda s: jax.ShapeDtypeStruct(s, dtype)
    out["xla_MiB"] = _memory_analysis(search._dense, spec(q.shape), spec((a.gallery, a.dim)),
                                      k=a.k)
    print(json.dumps(out))
    return

  g = _embeddings(a.gallery, a.dim, dtype, seed=1)
  qd = jnp.asarray(q)
  mesh = None
  if a.mode == "dense":
    gd = jnp.asarray(g)  # the dense baseline keeps the whole gallery on the device
    def run():
      return search.dense_topk(qd, gd, a.k)
    out["xla_MiB"] = _memory_analysis(search._dense, qd, gd, k=a.k)
  else:
    if a.mode == "sharded":
      mesh = jax.make_mesh((jax.device_count(),), ("data",))
    def run():
      return search.topk_search(qd, g, a.k, a.chunk, mesh=mesh)
    # Compile every chunk shape the search will meet (full chunks and the last one) ahead,
    # so the measured window holds executions only.
    ndev = 1 if mesh is None else jax.device_count()
    shapes = {min(a.chunk, a.gallery), a.gallery % a.chunk or a.chunk}
    shapes = sorted({r + (-r % ndev) for r in shapes})
    sds = jax.ShapeDtypeStruct
    scalar = sds((), jnp.int32)
    if mesh is None:
      step, kw = search._step, {"k": a.k}
      specs = lambda r: (sds((a.queries, a.k), jnp.float32), sds((a.queries, a.k), jnp.int32),
                         sds(qd.shape, dtype), sds((r, a.dim), dtype), scalar, scalar)
    else:
      from jax.sharding import NamedSharding, PartitionSpec as P
      rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
      step, kw = search._sharded_step(mesh, a.k), {}
      specs = lambda r: (sds((a.queries, a.k), jnp.float32, sharding=rep),
                         sds((a.queries, a.k), jnp.int32, sharding=rep),
                         sds(qd.shape, dtype, sharding=rep),
                         sds((r, a.dim), dtype, sharding=split), scalar, scalar)
    out["xla_MiB"] = max(_memory_analysis(step, *specs(r), **kw) for r in shapes)
  out["devices"] = 1 if mesh is None else jax.device_count()

  # The first execution allocates buffers that XLA then keeps, so the window starts before
  # it: the warm-up's peak is the program's real footprint.
  rss0, _ = _rss()
  _reset_peak()
  run()  # warm-up
  times = []
  for _ in range(a.runs):
    t0 = time.perf_counter()
    scores, idx = run()
    times.append(time.perf_counter() - t0)
  out["rss_MiB"] = (_rss()[1] - rss0) / MiB
  out["time_s"] = statistics.median(times)
  out["times_s"] = times
  np.save(a.save, idx)
  if a.check_rows and a.mode != "dense":  # dense score rows for a few queries
    _, want = search.dense_topk(qd[:CHECK_QUERIES], g, a.k)
    out["match_rows"] = float(np.mean(np.all(idx[:CHECK_QUERIES] == want, axis=1)))
  print(json.dumps(out))


def _spawn(a, mode, gallery, devices, save, check_rows=False):
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  if devices > 1:
    flags += f" --xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = flags.strip()
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  cmd = [sys.executable, __file__, "--child", "--mode", mode, "--gallery", str(gallery),
         "--queries", str(a.queries), "--dim", str(a.dim), "--k", str(a.k),
         "--chunk", str(a.chunk), "--dtype", a.dtype, "--runs", str(a.runs), "--save", save]
  if check_rows:
    cmd.append("--check_rows")
  res = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"benchmark child {mode} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gallery", type=int, default=10 ** 6)
  p.add_argument("--compare", type=int, default=10 ** 5,
                 help="gallery size for the dense comparison (the dense matrix must fit)")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--chunk", type=int, default=65536)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--devices", type=int, default=0,
                 help="devices for the sharded rows; >1 on CPU simulates them; 0: skip")
  p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
  p.add_argument("--json", action="store_true", help="last line: one JSON object")
  # Internal: one configuration in a subprocess.
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
  p.add_argument("--save", default="", help=argparse.SUPPRESS)
  p.add_argument("--check_rows", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    return child(a)
  if a.quick:
    a.gallery, a.compare, a.queries, a.chunk, a.dim = 20000, 5000, 64, 4096, 64
  if a.compare > a.gallery or a.k > a.compare:
    p.error("need k <= --compare <= --gallery")

  import tempfile
  import numpy as np
  tmp = tempfile.mkdtemp(prefix="b6_")
  path = lambda name: os.path.join(tmp, name + ".npy")
  configs = [("dense", a.compare, 1), ("chunked", a.compare, 1)]
  if a.devices > 1:
    configs.append(("sharded", a.compare, a.devices))
  configs.append(("chunked", a.gallery, 1))
  if a.devices > 1:
    configs.append(("sharded", a.gallery, a.devices))
  rows = []
  for mode, gallery, devices in configs:
    name = f"{mode}_{gallery}"
    r = _spawn(a, mode, gallery, devices, path(name), check_rows=gallery == a.gallery)
    r["name"] = name
    rows.append(r)
  rows.append(dict(_spawn(a, "dense_estimate", a.gallery, 1, ""), name="dense_estimate"))

  dense = np.load(path(f"dense_{a.compare}"))
  full_ref = np.load(path(f"chunked_{a.gallery}"))
  for r in rows:  # "match": identical top-k index lists (order included)
    if r["mode"] in ("chunked", "sharded") and r["gallery"] == a.compare:
      r["match"] = float(np.mean(np.all(np.load(path(r["name"])) == dense, axis=1)))
    elif r["mode"] == "sharded":  # full size: against the chunked result and dense rows
      r["match"] = float(np.mean(np.all(np.load(path(r["name"])) == full_ref, axis=1)))
    elif r["mode"] == "chunked" and r["gallery"] == a.gallery:
      r["match"] = r["match_rows"]
    elif r["mode"] == "dense":
      r["match"] = 1.0
  import shutil
  shutil.rmtree(tmp, ignore_errors=True)
  dense_time = rows[0]["time_s"]
  for r in rows:
    if "time_s" in r:
      r["time_vs_dense"] = r["time_s"] / dense_time * (a.compare / r["gallery"])
      r["Mscores_per_s"] = r["gallery"] * a.queries / r["time_s"] / 1e6

  import jax
  print(f"B6 retrieval search: {a.queries} queries, dim {a.dim}, k={a.k}, chunk {a.chunk}, "
        f"{a.dtype}, median of {a.runs} runs; device: {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")
  head = ("config", "gallery", "devices", "time_s", "Mscores/s", "time/dense*", "xla_MiB",
          "rss_MiB", "match")
  print(("{:<16}{:>9}{:>8}{:>9}{:>11}{:>13}{:>10}{:>9}{:>7}").format(*head))
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for r in rows:
    print(f"{r['mode']:<16}{r['gallery']:>9}{r.get('devices', 1):>8}"
          f"{fmt(r.get('time_s'), '.3f'):>9}{fmt(r.get('Mscores_per_s'), '.0f'):>11}"
          f"{fmt(r.get('time_vs_dense'), '.2f'):>13}{r['xla_MiB']:>10.0f}"
          f"{fmt(r.get('rss_MiB'), '.0f'):>9}{fmt(r.get('match'), '.3f'):>7}")
  print("* time per gallery item relative to dense at the comparison size (1.0 = same "
        "throughput). dense_estimate: compiled, never run. Full-size match: dense score rows "
        f"for {CHECK_QUERIES} queries (chunked), the chunked result (sharded).")
  if a.json:
    figures = {"queries": a.queries, "dim": a.dim, "k": a.k, "chunk": a.chunk,
               "dtype": a.dtype, "runs": a.runs, "device": jax.devices()[0].device_kind,
               "rows": {r["name"]: {k: v for k, v in r.items() if k not in ("name",)}
                        for r in rows}}
    print(json.dumps(figures))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
