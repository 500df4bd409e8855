"""The video block's parts, forward + backward, JAX next to PyTorch in one run (base sizes).

  python benchmarks/components.py [--dtype bfloat16] [--runs 7] [--json]

Where does a whole-step gap come from? Each row times one part of a ViT-B/16 divided space-time
block on the step's real shapes (batch 2, 4 frames of 14x14 patches + cls = 789 tokens, width
768, 12 heads) as `miles_jax.models.layers` computes it and as the original does
(benchmarks/torch_original.py's attention; torch.nn.Linear / LayerNorm / GELU), alternating JAX
and PyTorch, median over `--runs`: the MLP (fc1, GELU, fc2), one LayerNorm, and the divided
attention's core (after qkv, before proj) in space and time mode. Times are milliseconds per
block; a ratio near 1 says that part is not where the step loses.
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

B, T, N, H, D = 2, 4, 196, 12, 64
WIDTH, S = H * D, 1 + T * N


def _median_ms(fn, runs: int, sync) -> float:
  sync(fn())  # warm-up (compiles)
  return 1e3 * statistics.median(bench._times(fn, runs, sync))


def jax_parts(dtype):
  from miles_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, S, WIDTH)), dtype)
  qkv = [jnp.asarray(0.3 * rng.standard_normal((B, S, H, D)), dtype) for _ in range(3)]
  mlp = layers.Mlp(4 * WIDTH, dtype)
  ln = layers.layer_norm(1e-6, "norm", dtype)
  out = {}
  for name, module in (("MLP (fc1, GELU, fc2)", mlp), ("LayerNorm", ln)):
    params = module.init(jax.random.PRNGKey(0), x)

    def loss(p, x, module=module):
      return jnp.sum(module.apply(p, x).astype(jnp.float32) * x.astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    out[name] = lambda grad=grad, params=params: grad(params, x)
  for mode in ("space", "time"):
    def loss(q, k, v, mode=mode):
      o = layers.divided_attention(q, k, v, T, mode)[0]
      return jnp.sum(o.astype(jnp.float32) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out[f"{mode} attention core"] = lambda grad=grad: grad(*qkv)
  return out


def torch_parts(dtype: str):
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
  return {
      "MLP (fc1, GELU, fc2)": run(lambda: (mlp(x) * x).sum()),
      "LayerNorm": run(lambda: (ln(x) * x).sum()),
      "space attention core": run(lambda: core(*qkv, "space")),
      "time attention core": run(lambda: core(*qkv, "time")),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--rounds", type=int, default=2, help="alternating JAX / PyTorch rounds")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  import torch
  torch.set_num_threads(bench.num_cores())
  jp, tp = jax_parts(jnp.dtype(args.dtype)), torch_parts(args.dtype)
  rows = {k: {"jax_ms": [], "torch_ms": []} for k in jp}
  for _ in range(args.rounds):
    for k in jp:
      rows[k]["jax_ms"].append(_median_ms(jp[k], args.runs, jax.block_until_ready))
      rows[k]["torch_ms"].append(_median_ms(tp[k], args.runs, lambda _: None))
  print(f"cpu: {bench.cpu_model()} ({bench.num_cores()} cores); jax {jax.__version__}, torch "
        f"{torch.__version__}; {args.dtype}, forward + backward per block, median of "
        f"{args.runs} runs x {args.rounds} rounds")
  print(f"{'part':24s} {'jax_ms':>8s} {'torch_ms':>9s} {'jax/torch':>9s}")
  out = {"cpu": bench.cpu_model(), "dtype": args.dtype, "rows": {}}
  for k, r in rows.items():
    j, t = statistics.median(r["jax_ms"]), statistics.median(r["torch_ms"])
    out["rows"][k] = {"jax_ms": j, "torch_ms": t, "jax_over_torch": j / t}
    print(f"{k:24s} {j:8.1f} {t:9.1f} {j / t:9.2f}")
  if args.json:
    print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
