"""Opt-in XLA:CPU kernels (`model.kernels = "xla_cpu"`): the same functions as the reference
path in layers.py, written in the forms XLA:CPU runs fastest. The CPU demo and the CPU
benchmarks select them; TPU / GPU configs keep `model.kernels = "reference"`.

What each one buys on XLA:CPU (measured with benchmarks/step_profile.py and
benchmarks/components.py, base size):
- `dense_dot_general`: low-precision dense matmuls as `bf16 x bf16 -> f32` dots in the forward
  and both backward matmuls (custom VJP). XLA:CPU runs those on the CPU's bf16 units
  (AVX-512-BF16 / AMX) but rewrites `bf16 x bf16 -> bf16` dots, and the mixed `f32 x bf16` dots
  autodiff makes of a `preferred_element_type=f32` forward, into float32 dots plus converts
  (8 of 257 dots of the bf16 step stayed bf16 without it).
- `softmax`: one reciprocal per row instead of a divide per element, with its own VJP.
- `divided_attention`: space groups heads-major `[B, T, H, N, Dh]` (one transpose per operand
  instead of one inside every einsum: ~18 % faster forward + backward); time groups through
  `attend`, whose backward dots are all in canonical form (`_dot_tn` copies the transposed
  operand behind an optimization barrier), which XLA:CPU runs on YNNPACK instead of Eigen
  (time attention forward + backward 21-27 -> 12-14 ms per base block).
- `gelu`: the exact GELU through erf (torch's form); `jax.nn.gelu(approximate=False)` goes
  through erfc, which XLA:CPU evaluates ~3x slower.

This module imports nothing from the rest of the package: layers.py dispatches to it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x, w, operand_dtype):
  """x `[..., in]` @ w `[in, out]` with `operand_dtype` operands and float32 accumulation, in the
  forward and both backward matmuls; the result in x's dtype, the gradients in x's and w's
  dtypes (a float32 x or w gets a float32 gradient, not a rounded one)."""
  return jnp.matmul(x.astype(operand_dtype), w.astype(operand_dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _low_precision_matmul_fwd(x, w, operand_dtype):
  # residuals: the low-precision input (what the weight gradient needs) and the weight as it is
  return low_precision_matmul(x, w, operand_dtype), (x.astype(operand_dtype), w)


def _low_precision_matmul_bwd(operand_dtype, res, g):
  x_low, w = res
  g_low = g.astype(operand_dtype)
  dx = jnp.matmul(g_low, w.astype(operand_dtype).T, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...i,...o->io", x_low, g_low, preferred_element_type=jnp.float32)
  return dx.astype(g.dtype), dw.astype(w.dtype)


low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _dense_dot(lhs, rhs, dimension_numbers, precision=None, *, operand_dtype, **kwargs):
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2:
    return low_precision_matmul(lhs, rhs, operand_dtype)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def dense_dot_general(operand_dtype):
  """An nn.Dense `dot_general`: its contraction through `low_precision_matmul` with
  `operand_dtype` operands (result in the input's dtype)."""
  return functools.partial(_dense_dot, operand_dtype=jnp.dtype(operand_dtype))


@jax.custom_vjp
def softmax(x):
  """softmax over the last axis, normalised by one reciprocal per row."""
  e = jnp.exp(x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))
  return e * (1.0 / e.sum(axis=-1, keepdims=True))


def _softmax_fwd(x):
  y = softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def gelu(x):
  """The exact GELU as torch's nn.GELU computes it: x/2 * (1 + erf(x/sqrt(2)))."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def _dot_nt(a, b):
  """a [..., M, C] . b [..., N, C]^T -> [..., M, N] in float32, leading axes batch."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)),
                             preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a [..., M, C] . b [..., C, N] -> [..., M, N] in float32, leading axes batch."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [..., C, M]^T . b [..., C, N] -> [..., M, N], as a transposed copy of `a` times `b`
  (the barrier keeps the algebraic simplifier from folding the transpose back into the dot)."""
  return _dot_nn(jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2)), b)


@jax.custom_vjp
def attend(q, k, v):
  """softmax(q k^T) v over the last two axes (leading axes batch): q `[..., Q, D]` (pre-scaled),
  k / v `[..., K, D]`; softmax and accumulation in float32, the result in v's dtype. The
  backward's four dots are in canonical form (`_dot_tn` for dK = dS^T Q and dV = P^T dO)."""
  return _attend_fwd(q, k, v)[0]


def _attend_fwd(q, k, v):
  p = softmax(_dot_nt(q, k))
  return _dot_nn(p.astype(v.dtype), v).astype(v.dtype), (q, k, v, p)


def _attend_bwd(res, g):
  q, k, v, p = res
  f32 = lambda x: x.astype(jnp.float32)
  g = f32(g)
  dp = _dot_nt(g, f32(v))
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
  return (_dot_nn(ds, f32(k)).astype(q.dtype), _dot_tn(ds, f32(q)).astype(k.dtype),
          _dot_tn(p, g).astype(v.dtype))


attend.defvjp(_attend_fwd, _attend_bwd)


def divided_attention(q, k, v, num_frames: int, mode: str):
  """layers.divided_attention (same arguments, same values) with heads-major groups: the space
  groups through einsums, the time groups through `attend`."""
  b, s, h, d = q.shape
  t = num_frames
  n = (s - 1) // t
  if mode not in ("space", "time"):
    raise ValueError(f"divided_attention mode must be 'space' or 'time', got {mode!r}")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :1], k, preferred_element_type=jnp.float32)
  cls_w = softmax(logits)
  cls_out = jnp.einsum("bhqk,bkhd->bqhd", cls_w.astype(v.dtype), v,
                       preferred_element_type=jnp.float32).astype(v.dtype)
  if mode == "space":  # groups of one frame: [B, T, H, N, Dh]
    group = lambda x: x.reshape(b, t, n, h, d).transpose(0, 1, 3, 2, 4)
    ungroup = lambda x: x.transpose(0, 1, 3, 2, 4)
    g = t
  else:  # groups of one spatial position across frames: [B, N, H, T, Dh]
    group = lambda x: x.reshape(b, t, n, h, d).transpose(0, 2, 3, 1, 4)
    ungroup = lambda x: x.transpose(0, 3, 1, 2, 4)
    g = n
  qg, kg, vg = group(q[:, 1:]), group(k[:, 1:]), group(v[:, 1:])
  cls_kv = lambda x: jnp.broadcast_to(x[:, 0][:, None, :, None, :], (b, g, h, 1, d))
  kg = jnp.concatenate([cls_kv(k), kg], axis=3)  # the cls key/value goes first
  vg = jnp.concatenate([cls_kv(v), vg], axis=3)
  if mode == "space":
    w = softmax(jnp.einsum("bthqd,bthkd->bthqk", qg, kg, preferred_element_type=jnp.float32))
    out = jnp.einsum("bthqk,bthkd->bthqd", w.astype(vg.dtype), vg,
                     preferred_element_type=jnp.float32).astype(vg.dtype)
  else:
    out = attend(qg, kg, vg)
  out = ungroup(out).reshape(b, t * n, h, d)
  return jnp.concatenate([cls_out, out], axis=1), cls_w[:, :, 0]
