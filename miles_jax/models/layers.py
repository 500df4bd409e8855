"""Building blocks: dense layers with logical axis names, divided space-time attention, MLP.

Divided attention (Frozen-in-Time / MILES): the token sequence is `[cls, (t=0,n=0..N-1),
(t=1,n=0..N-1), ...]`. Patch queries attend to the cls key/value plus the patches of their own
frame (space) or their own spatial position across frames (time); the cls query attends to all
`1 + T*N` keys. Attention scale is `head_dim ** -0.5`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Initialisers of the PyTorch originals: timm ViT (trunc normal 0.02) and BERT (normal 0.02).
vit_init = nn.initializers.truncated_normal(0.02)
bert_init = nn.initializers.normal(0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x, w, operand_dtype):
  """x `[..., in]` @ w `[in, out]` with `operand_dtype` (low-precision) operands and float32
  accumulation, in the forward *and* in both backward matmuls; the result in x's dtype, the
  gradients in x's and w's dtypes (a float32 x or w gets a float32 gradient, not a rounded one).

  Why: XLA:CPU runs `bf16 x bf16 -> f32` dots on the CPU's bf16 units (AVX-512-BF16 / AMX) but
  rewrites `bf16 x bf16 -> bf16` dots, and the mixed `f32 x bf16` dots that autodiff makes of a
  `preferred_element_type=f32` forward, into float32 dots plus converts (measured with
  benchmarks/step_profile.py: 8 of 257 dots of the bf16 step stayed bf16). TPU and GPU
  accumulate bf16 matmuls in float32 anyway, so this is the same arithmetic there.
  """
  return jnp.matmul(x.astype(operand_dtype), w.astype(operand_dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _low_precision_matmul_fwd(x, w, operand_dtype):
  # residuals: the low-precision input (what the weight gradient needs) and the weight as it is
  # (a parameter, alive anyway; cast again in the backward)
  return _low_precision_matmul(x, w, operand_dtype), (x.astype(operand_dtype), w)


def _low_precision_matmul_bwd(operand_dtype, res, g):
  x_low, w = res
  g_low = g.astype(operand_dtype)
  dx = jnp.matmul(g_low, w.astype(operand_dtype).T, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...i,...o->io", x_low, g_low, preferred_element_type=jnp.float32)
  return dx.astype(g.dtype), dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, *, operand_dtype, **kwargs):
  """nn.Dense's contraction (last axis of the input with the kernel's first) through
  `_low_precision_matmul` with `operand_dtype` operands (result in the lhs dtype); anything else
  falls back to lax.dot_general."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2:
    return _low_precision_matmul(lhs, rhs, operand_dtype)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def dense(features: int, axes: tuple[str, str], name: str | None, dtype: Dtype, use_bias: bool = True,
          kernel_init: Callable = vit_init, matmul_dtype: Dtype | None = None) -> nn.Dense:
  """nn.Dense whose kernel and bias carry logical axis names for sharding. Input and output in
  `dtype`; the matmul's operands in `matmul_dtype` (None: `dtype`). Low-precision operands
  accumulate in float32 (see `_low_precision_matmul`); with float32 `dtype` and bf16
  `matmul_dtype` (`model.low_precision=matmuls`) the float32 accumulator is the output and the
  bias is added in float32: no rounding to bf16 and back around the matmul."""
  matmul_dtype = jnp.dtype(matmul_dtype or dtype)
  dot = None
  if matmul_dtype != jnp.dtype(jnp.float32):
    dot = functools.partial(_dense_dot_general, operand_dtype=matmul_dtype)
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, name=name,
      **({"dot_general": dot} if dot else {}),
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


@jax.custom_vjp
def softmax(x):
  """softmax over the last axis, normalised by one reciprocal per row (a multiply per element
  instead of `jax.nn.softmax`'s divide; XLA:CPU's divides are the slow part of the attention's
  elementwise work)."""
  e = jnp.exp(x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))
  return e * (1.0 / e.sum(axis=-1, keepdims=True))


def _softmax_fwd(x):
  y = softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _softmax_attend(q, k, v, spec_logits: str, spec_out: str, bias=None):
  """softmax(q·k) v with the softmax in float32 (q already scaled)."""
  logits = jnp.einsum(spec_logits, q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  weights = softmax(logits)
  out = jnp.einsum(spec_out, weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), weights


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
  """a [..., C, M]^T . b [..., C, N] -> [..., M, N], as a transposed copy of `a` times `b`.

  XLA:CPU runs a dot that contracts a non-minor axis of both operands on Eigen, 2-4x slower
  than YNNPACK runs the canonical [M, C] . [C, N] (benchmarks/step_profile.py --dots); the
  barrier keeps the algebraic simplifier from folding the transpose back into the dot."""
  return _dot_nn(jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2)), b)


@jax.custom_vjp
def attend(q, k, v):
  """softmax(q k^T) v over the last two axes (leading axes batch): q `[..., Q, D]` (pre-scaled),
  k / v `[..., K, D]`; softmax and accumulation in float32, the result in v's dtype.

  The same function as `_softmax_attend`, with a backward pass whose four dots are all in
  canonical form (`_dot_tn` for the two that contract the query axis: dK = dS^T Q, dV = P^T dO),
  which XLA:CPU runs on YNNPACK instead of Eigen."""
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


def divided_attention(q, k, v, num_frames: int, mode: str, canonical_time_vjp: bool = False):
  """Divided attention over `[B, 1+T*N, H, Dh]` q/k/v (q pre-scaled) -> (out, cls weights).

  Performance note (XLA:CPU, base size, B=2, measured under load): forward + backward of one
  block's attention took ~115 ms (space, heads-minor groups) + ~30 ms (time): the batched small
  matmuls (time: 4 queries x 5 keys per group) run far below the large-matmul rate, ~1.7 s of a
  ~9 s contrastive step. Space attention now uses heads-major groups (~94 ms, ~18 % faster); an
  elementwise time attention was slower. This is where the CPU step loses to PyTorch.

  `mode='space'` groups patches by frame, `mode='time'` by spatial position. Returns the
  attended values `[B, 1+T*N, H, Dh]` and the cls query's weights `[B, H, 1+T*N]`.
  `canonical_time_vjp`: the time groups go heads-major through `attend`, whose backward dots are
  in the form XLA:CPU runs fastest (model.video.time_attention_vjp; the same values).
  """
  b, s, h, d = q.shape
  t = num_frames
  n = (s - 1) // t
  # cls query attends to everything.
  cls_out, cls_w = _softmax_attend(q[:, :1], k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")

  if mode not in ("space", "time"):
    raise ValueError(f"divided_attention mode must be 'space' or 'time', got {mode!r}")
  if mode == "space":
    # Heads-major groups [B, T, H, N, Dh]: one transpose per operand instead of one inside
    # every einsum (measured ~18 % faster forward + backward on XLA:CPU).
    hm = lambda x: x.reshape(b, t, n, h, d).transpose(0, 1, 3, 2, 4)
    qg, kg, vg = hm(q[:, 1:]), hm(k[:, 1:]), hm(v[:, 1:])
    cls_kv = lambda x: jnp.broadcast_to(x[:, 0][:, None, :, None, :], (b, t, h, 1, d))
    kg = jnp.concatenate([cls_kv(k), kg], axis=3)  # the cls key/value goes first
    vg = jnp.concatenate([cls_kv(v), vg], axis=3)
    out, _ = _softmax_attend(qg, kg, vg, "bthqd,bthkd->bthqk", "bthqk,bthkd->bthqd")
    out = out.transpose(0, 1, 3, 2, 4).reshape(b, t * n, h, d)
    return jnp.concatenate([cls_out, out], axis=1), cls_w[:, :, 0]

  if canonical_time_vjp:
    # time: groups of one spatial position across frames, heads-major [B, N, H, T, Dh]. (The
    # same `attend` on the space groups was slower: 75-80 vs 59-69 ms forward + backward.)
    group = lambda x: x.reshape(b, t, n, h, d).transpose(0, 2, 3, 1, 4)
    qg, kg, vg = group(q[:, 1:]), group(k[:, 1:]), group(v[:, 1:])
    cls_kv = lambda x: jnp.broadcast_to(x[:, 0][:, None, :, None, :], (b, n, h, 1, d))
    kg = jnp.concatenate([cls_kv(k), kg], axis=3)
    vg = jnp.concatenate([cls_kv(v), vg], axis=3)
    out = attend(qg, kg, vg).transpose(0, 3, 1, 2, 4).reshape(b, t * n, h, d)
    return jnp.concatenate([cls_out, out], axis=1), cls_w[:, :, 0]
  # time: groups of one spatial position across frames, [B, N, T, H, Dh]
  group = lambda x: x.reshape(b, t, n, h, d).transpose(0, 2, 1, 3, 4)
  qg, kg, vg = group(q[:, 1:]), group(k[:, 1:]), group(v[:, 1:])
  # Every group also sees the cls key/value, which goes first as in the original.
  kc = jnp.broadcast_to(k[:, None, :1], (b, n, 1, h, d))
  vc = jnp.broadcast_to(v[:, None, :1], (b, n, 1, h, d))
  kg = jnp.concatenate([kc, kg], axis=2)
  vg = jnp.concatenate([vc, vg], axis=2)
  out, _ = _softmax_attend(qg, kg, vg, "bgqhd,bgkhd->bghqk", "bghqk,bgkhd->bgqhd")
  out = out.transpose(0, 2, 1, 3, 4).reshape(b, t * n, h, d)
  return jnp.concatenate([cls_out, out], axis=1), cls_w[:, :, 0]


def divided_attention_masked(q, k, v, frame_ids, patch_ids, mode: str):
  """The same rule for an arbitrary token subset (MAC drops masked tokens).

  frame_ids / patch_ids: int `[B, S]` frame and spatial index of each token, -1 for the cls
  token (position 0). Cost is O(S^2) per head but S is the small visible set.
  """
  same = frame_ids if mode == "space" else patch_ids
  allowed = same[:, :, None] == same[:, None, :]  # [B, S, S]
  allowed = allowed | (same[:, None, :] < 0) | (same[:, :, None] < 0)  # cls row and column
  bias = jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)[:, None]  # [B, 1, S, S]
  out, w = _softmax_attend(q, k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", bias)
  return out, w[:, :, 0]


class VarAttention(nn.Module):
  """Multi-head attention with the divided space/time rule (Frozen's `VarAttention`)."""
  num_heads: int
  mode: str  # 'space' | 'time'
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  canonical_time_vjp: bool = False  # divided_attention's option (time mode only)
  matmul_dtype: Dtype | None = None  # the projections' operands (`dense`; None: dtype)

  @nn.compact
  def __call__(self, x, num_frames: int, token_ids=None):
    b, s, width = x.shape
    h = self.num_heads
    head_dim = width // h
    qkv = dense(3 * width, ("embed", "joined_kv"), "qkv", self.dtype, self.qkv_bias,
                matmul_dtype=self.matmul_dtype)(x)
    qkv = qkv.reshape(b, s, 3, h, head_dim)  # torch chunks qkv as [q | k | v], heads inside
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (head_dim ** -0.5)
    if token_ids is None:
      out, cls_w = divided_attention(q, k, v, num_frames, self.mode, self.canonical_time_vjp)
    else:
      out, cls_w = divided_attention_masked(q, k, v, *token_ids, self.mode)
    if self.mode == "space":
      # Heads averaged cls attention of the spatial attention: appendix figure 1.
      self.sow("intermediates", "cls_attention", cls_w.mean(axis=1))
    out = out.reshape(b, s, width)
    return dense(width, ("joined_kv", "embed"), "proj", self.dtype,
                 matmul_dtype=self.matmul_dtype)(out)


def gelu(x):
  """The exact (erf) GELU, written as torch's nn.GELU / HF's "gelu" compute it:
  x/2 * (1 + erf(x/sqrt(2))). `jax.nn.gelu(approximate=False)` is the same function through
  erfc, which XLA:CPU evaluates ~3x slower (measured: one base-size MLP forward + backward
  284 -> 266 ms, benchmarks/components.py)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  kernel_init: Callable = vit_init
  names: tuple[str, str] = ("fc1", "fc2")
  matmul_dtype: Dtype | None = None  # `dense`'s (None: dtype)

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = dense(self.hidden, ("embed", "mlp"), self.names[0], self.dtype,
              kernel_init=self.kernel_init, matmul_dtype=self.matmul_dtype)(x)
    y = gelu(y)
    return dense(width, ("mlp", "embed"), self.names[1], self.dtype,
                 kernel_init=self.kernel_init, matmul_dtype=self.matmul_dtype)(y)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_name(value) -> str:
  """`model.remat` as a policy name; the booleans of older configs map to none / full."""
  if value is None or value is False or value == "":
    return "none"
  if value is True:
    return "full"
  if value not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={value!r}: use one of {', '.join(REMAT_POLICIES)}")
  return value


def maybe_remat(block: type, policy: str, static_argnums: tuple) -> type:
  """The block class, rematerialised in the backward pass per `policy`.

  none: keep every activation (fastest, most memory); full: keep only the block inputs and
  recompute the rest (least memory, ~1 extra forward); dots_saveable: keep matmul outputs,
  recompute the cheap elementwise ops (softmax, GELU, LayerNorm) in between.
  """
  policy = remat_name(policy)
  if policy == "none":
    return block
  jax_policy = None if policy == "full" else jax.checkpoint_policies.dots_saveable
  return nn.remat(block, policy=jax_policy, static_argnums=static_argnums)


def scan_blocks(block: nn.Module, x, length: int, *args):
  """`x = block(x, *args)` `length` times with one stacked set of params (nn.scan): the layer
  is traced and compiled once instead of `length` times. Params gain a leading layer axis
  (logical name None: not sharded); dropout keys differ per layer."""
  def body(module, carry, _):
    return module(carry, *args), None
  scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    length=length, metadata_params={nn.PARTITION_NAME: None})
  return scanned(block, x, None)[0]
