"""The video block's parts, forward + backward, JAX next to PyTorch in one run (base sizes).

  python benchmarks/components.py [--dtype bfloat16] [--runs 7] [--gemms] [--alternatives] [--json]

Where does a whole-step gap come from? Each row times one part of a ViT-B/16 divided space-time
block on the step's real shapes (batch 2, 4 frames of 14x14 patches + cls = 789 tokens, width
768, 12 heads) as `miles_jax.models` computes it with `model.kernels=xla_cpu` and as the original does
(benchmarks/torch_original.py's attention; torch.nn.Linear / LayerNorm / GELU), alternating JAX
and PyTorch, median over `--runs`: the MLP (fc1, GELU, fc2), one LayerNorm, and the divided
attention's core (after qkv, before proj) in space and time mode. Times are milliseconds per
block; a ratio near 1 says that part is not where the step loses.

`--gemms` adds the MLP's six matmuls one at a time (forward, input gradient, weight gradient of
fc1 and fc2 on the step's shapes, plain `a @ b` in both frameworks): are XLA's GEMM kernels the
gap, or what surrounds them? `--alternatives` adds the attention-core layouts tried instead of
models/xla_cpu.py's (JAX only, same arithmetic): the time attention as broadcast-multiply-sum
(no batched 4 x 5 matmuls) and the space attention with the cls key/value kept apart (no
concatenation into every frame's keys).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step as bench  # noqa: E402  (cpu_model, num_cores, _times)
from miles_jax import allocator  # noqa: E402

B, T, N, H, D = 2, 4, 196, 12, 64
WIDTH, S = H * D, 1 + T * N


def _median_ms(fn, runs: int, sync) -> float:
  sync(fn())  # warm-up (compiles)
  return 1e3 * statistics.median(bench._times(fn, runs, sync))


def jax_parts(dtype, alternatives: bool = False):
  """{part: a call of its jitted forward + backward}; with `alternatives`, also ALTERNATIVES."""
  from miles_jax.models import layers, xla_cpu
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, S, WIDTH)), dtype)
  qkv = [jnp.asarray(0.3 * rng.standard_normal((B, S, H, D)), dtype) for _ in range(3)]
  mlp = layers.Mlp(4 * WIDTH, dtype, kernels="xla_cpu")  # the CPU kernels (model.kernels)
  ln = layers.layer_norm(1e-6, "norm", dtype)
  out = {}
  for name, module in (("MLP (fc1, GELU, fc2)", mlp), ("LayerNorm", ln)):
    params = module.init(jax.random.PRNGKey(0), x)

    def loss(p, x, module=module):
      return jnp.sum(module.apply(p, x).astype(jnp.float32) * x.astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    out[name] = lambda grad=grad, params=params: grad(params, x)
  cores = {f"{mode} attention core":
           lambda q, k, v, t, mode=mode: xla_cpu.divided_attention(q, k, v, t, mode)[0]
           for mode in ("space", "time")}
  for name, fn in {**cores, **(ALTERNATIVES if alternatives else {})}.items():
    def loss(q, k, v, fn=fn):
      return jnp.sum(fn(q, k, v, T).astype(jnp.float32) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out[name] = lambda grad=grad: grad(*qkv)
  return out


def _time_broadcast_sum(q, k, v, t):
  """Time attention without matmuls: logits and values as broadcast products summed over the
  head dimension; the cls key/value enter the softmax as one extra term. Same result as
  layers.divided_attention(mode='time')."""
  from miles_jax.models import layers
  b, s, h, d = q.shape
  n = (s - 1) // t
  f32 = jnp.float32
  cls_out, _ = layers._softmax_attend(q[:, :1], k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd",
                                      kernels="xla_cpu")
  qp, kp, vp = (x[:, 1:].reshape(b, t, n, h, d).astype(f32) for x in (q, k, v))
  lp = jnp.sum(qp[:, :, None] * kp[:, None], axis=-1)  # [b, t_query, t_key, n, h]
  lc = jnp.sum(qp * k[:, :1, None].astype(f32), axis=-1)  # the cls key: [b, t_query, n, h]
  m = jnp.maximum(lp.max(axis=2), lc)
  ep, ec = jnp.exp(lp - m[:, :, None]), jnp.exp(lc - m)
  out = (jnp.sum(ep[..., None] * vp[:, None], axis=2) + ec[..., None] * v[:, :1, None].astype(f32))
  out = (out / (ep.sum(axis=2) + ec)[..., None]).astype(v.dtype).reshape(b, t * n, h, d)
  return jnp.concatenate([cls_out, out], axis=1)


def _space_cls_apart(q, k, v, t):
  """Space attention with the cls key/value as a separate softmax term instead of concatenated
  into every frame's keys. Same result as layers.divided_attention(mode='space')."""
  from miles_jax.models import layers
  b, s, h, d = q.shape
  n = (s - 1) // t
  f32 = jnp.float32
  cls_out, _ = layers._softmax_attend(q[:, :1], k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd",
                                      kernels="xla_cpu")
  hm = lambda x: x.reshape(b, t, n, h, d).transpose(0, 1, 3, 2, 4)
  qg, kg, vg = hm(q[:, 1:]), hm(k[:, 1:]), hm(v[:, 1:])
  lp = jnp.einsum("bthqd,bthkd->bthqk", qg, kg, preferred_element_type=f32)
  lc = jnp.einsum("bthqd,bhd->bthq", qg, k[:, 0], preferred_element_type=f32)
  m = jnp.maximum(lp.max(-1), lc)
  ep, ec = jnp.exp(lp - m[..., None]), jnp.exp(lc - m)
  o = jnp.einsum("bthqk,bthkd->bthqd", ep.astype(v.dtype), vg, preferred_element_type=f32)
  o = (o + ec[..., None] * v[:, 0][:, None, :, None, :].astype(f32)) / (ep.sum(-1) + ec)[..., None]
  o = o.astype(v.dtype).transpose(0, 1, 3, 2, 4).reshape(b, t * n, h, d)
  return jnp.concatenate([cls_out, o], axis=1)


ALTERNATIVES = {"time attention, broadcast-sum": _time_broadcast_sum,
                "space attention, cls apart": _space_cls_apart}
# The MLP's matmuls on the step's shapes: (rows, inner, cols, transpose a, transpose b).
TOKENS, HIDDEN = B * S, 4 * WIDTH
GEMMS = {"fc1 forward": (TOKENS, WIDTH, HIDDEN, False, False),
         "fc1 input grad": (TOKENS, HIDDEN, WIDTH, False, True),
         "fc1 weight grad": (WIDTH, TOKENS, HIDDEN, True, False),
         "fc2 forward": (TOKENS, HIDDEN, WIDTH, False, False),
         "fc2 input grad": (TOKENS, WIDTH, HIDDEN, False, True),
         "fc2 weight grad": (HIDDEN, TOKENS, WIDTH, True, False)}


def _gemm_operands(m, k, n, ta, tb, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
  b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
  return a, b


def jax_gemms(dtype) -> dict:
  out = {}
  for name, (m, k, n, ta, tb) in GEMMS.items():
    a, b = (jnp.asarray(x, dtype) for x in _gemm_operands(m, k, n, ta, tb))
    f = jax.jit(lambda a, b, ta=ta, tb=tb: (a.T if ta else a) @ (b.T if tb else b))
    out[f"GEMM {name}"] = lambda f=f, a=a, b=b: f(a, b)
  return out


def torch_gemms(dtype: str) -> dict:
  import torch
  out = {}
  for name, (m, k, n, ta, tb) in GEMMS.items():
    a, b = (torch.from_numpy(x) for x in _gemm_operands(m, k, n, ta, tb))
    if dtype == "bfloat16":
      a, b = a.bfloat16(), b.bfloat16()
    out[f"GEMM {name}"] = lambda a=a, b=b, ta=ta, tb=tb: (a.T if ta else a) @ (b.T if tb else b)
  return out


def torch_parts(dtype: str, alternatives: bool = False):
  """The same parts as the original computes them; an alternative layout's row times the
  original's core of the same mode (the reference for both)."""
  import torch
  from torch_original import _attend
  torch.manual_seed(0)
  autocast = dtype == "bfloat16"
  x = torch.randn(B, S, WIDTH, requires_grad=True)
  mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(),
                            torch.nn.Linear(4 * WIDTH, WIDTH))
  ln = torch.nn.LayerNorm(WIDTH, eps=1e-6)
  qkv = [(0.3 * torch.randn(B, S, H, D)).requires_grad_() for _ in range(3)]

  def core(q, k, v, mode):  # the original's grouping (torch_original.VarAttention, after qkv)
    q, k, v = (y.transpose(1, 2).reshape(B * H, S, D) for y in (q, k, v))
    cls_out = _attend(q[:, :1], k, v)
    if mode == "space":
      group, reps = (lambda y: y[:, 1:].reshape(B * H * T, N, D)), T
    else:
      group = lambda y: y[:, 1:].reshape(B * H, T, N, D).transpose(1, 2).reshape(B * H * N, T, D)
      reps = N
    qg, kg, vg = group(q), group(k), group(v)
    o = _attend(qg, torch.cat([k[:, :1].repeat_interleave(reps, 0), kg], 1),
                torch.cat([v[:, :1].repeat_interleave(reps, 0), vg], 1))
    if mode == "space":
      o = o.reshape(B * H, T * N, D)
    else:
      o = o.reshape(B * H, N, T, D).transpose(1, 2).reshape(B * H, T * N, D)
    return torch.cat([cls_out, o], 1)

  def run(f):
    def go():
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = f()
      y.float().pow(2).sum().backward() if y.dim() > 0 else y.backward()
    return go
  out = {
      "MLP (fc1, GELU, fc2)": run(lambda: (mlp(x) * x).sum()),
      "LayerNorm": run(lambda: (ln(x) * x).sum()),
      "space attention core": run(lambda: core(*qkv, "space")),
      "time attention core": run(lambda: core(*qkv, "time")),
  }
  if alternatives:
    out["time attention, broadcast-sum"] = out["time attention core"]
    out["space attention, cls apart"] = out["space attention core"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--rounds", type=int, default=2, help="alternating JAX / PyTorch rounds")
  p.add_argument("--json", action="store_true")
  p.add_argument("--gemms", action="store_true", help="also the MLP's six matmuls alone")
  p.add_argument("--alternatives", action="store_true",
                 help="also the attention-core layouts tried instead of models/layers.py's")
  p.add_argument("--malloc", default="auto", choices=allocator.MODES,
                 help="glibc allocator tunables, as `python -m miles_jax.train` sets them on a "
                 "CPU-only machine (miles_jax/allocator.py)")
  args = p.parse_args(argv)
  if argv is None:  # run as a script: re-execute once with the tunables
    allocator.reexec_with(args.malloc, WIDTH)
  import torch
  torch.set_num_threads(bench.num_cores())
  dtype = jnp.dtype(args.dtype)
  jp = {**jax_parts(dtype, args.alternatives), **(jax_gemms(dtype) if args.gemms else {})}
  tp = {**torch_parts(args.dtype, args.alternatives),
        **(torch_gemms(args.dtype) if args.gemms else {})}
  rows = {k: {"jax_ms": [], "torch_ms": []} for k in jp}
  for _ in range(args.rounds):
    for k in jp:
      rows[k]["jax_ms"].append(_median_ms(jp[k], args.runs, jax.block_until_ready))
      rows[k]["torch_ms"].append(_median_ms(tp[k], args.runs, lambda _: None))
  print(f"cpu: {bench.cpu_model()} ({bench.num_cores()} cores); jax {jax.__version__}, torch "
        f"{torch.__version__}; {args.dtype}, forward + backward per block, median of "
        f"{args.runs} runs x {args.rounds} rounds; allocator: "
        f"{os.environ.get('GLIBC_TUNABLES', '') or '(glibc defaults)'}")
  print(f"{'part':32s} {'jax_ms':>8s} {'torch_ms':>9s} {'jax/torch':>9s}")
  out = {"cpu": bench.cpu_model(), "dtype": args.dtype, "rows": {}}
  for k, r in rows.items():
    j, t = statistics.median(r["jax_ms"]), statistics.median(r["torch_ms"])
    out["rows"][k] = {"jax_ms": j, "torch_ms": t, "jax_over_torch": j / t}
    print(f"{k:32s} {j:8.1f} {t:9.1f} {j / t:9.2f}")
  if args.json:
    print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
