"""Building blocks: dense layers with logical axis names, divided space-time attention, MLP.

Divided attention (Frozen-in-Time / MILES): the token sequence is `[cls, (t=0,n=0..N-1),
(t=1,n=0..N-1), ...]`. Patch queries attend to the cls key/value plus the patches of their own
frame (space) or their own spatial position across frames (time); the cls query attends to all
`1 + T*N` keys. Attention scale is `head_dim ** -0.5`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from miles_jax.models import xla_cpu

Dtype = Any

# Initialisers of the PyTorch originals: timm ViT (trunc normal 0.02) and BERT (normal 0.02).
vit_init = nn.initializers.truncated_normal(0.02)
bert_init = nn.initializers.normal(0.02)


def _mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, *, operand_dtype, **kwargs):
  """lax.dot_general with `operand_dtype` operands and a float32 accumulator, returned in the
  lhs dtype (`model.low_precision=matmuls`: float32 activations, bf16 matmuls)."""
  return jax.lax.dot_general(lhs.astype(operand_dtype), rhs.astype(operand_dtype),
                             dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32, **kwargs).astype(lhs.dtype)


def dense(features: int, axes: tuple[str, str], name: str | None, dtype: Dtype, use_bias: bool = True,
          kernel_init: Callable = vit_init, matmul_dtype: Dtype | None = None,
          kernels: str = "reference") -> nn.Dense:
  """nn.Dense whose kernel and bias carry logical axis names for sharding. Input and output in
  `dtype`; the matmul's operands in `matmul_dtype` (None: `dtype`). With float32 `dtype` and bf16
  `matmul_dtype` (`model.low_precision=matmuls`) the float32 accumulator is the output and the
  bias is added in float32. `kernels="xla_cpu"`: low-precision matmuls through
  xla_cpu.dense_dot_general (the same arithmetic, bf16 dots in the backward too)."""
  matmul_dtype = jnp.dtype(matmul_dtype or dtype)
  dot = None
  if kernels == "xla_cpu" and matmul_dtype != jnp.dtype(jnp.float32):
    dot = xla_cpu.dense_dot_general(matmul_dtype)
  elif matmul_dtype != jnp.dtype(dtype):
    dot = functools.partial(_mixed_dot_general, operand_dtype=matmul_dtype)
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, name=name,
      **({"dot_general": dot} if dot else {}),
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def constrain_batch(x):
  """`x` (batch-leading) split over the mesh like the batch, other axes whole: the activation
  constraint of a transformer block's input and output. A no-op unless the program traces under
  `parallel.activation_sharding` (the train step and the eval embedding programs do)."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def softmax(x, kernels: str = "reference"):
  """softmax over the last axis (of float32 logits)."""
  return xla_cpu.softmax(x) if kernels == "xla_cpu" else jax.nn.softmax(x, axis=-1)


def _softmax_attend(q, k, v, spec_logits: str, spec_out: str, bias=None, kernels="reference"):
  """softmax(q·k) v with the softmax in float32 (q already scaled)."""
  logits = jnp.einsum(spec_logits, q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  weights = softmax(logits, kernels)
  out = jnp.einsum(spec_out, weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), weights


def divided_attention(q, k, v, num_frames: int, mode: str):
  """Divided attention over `[B, 1+T*N, H, Dh]` q/k/v (q pre-scaled) -> (out, cls weights).

  `mode='space'` groups patches by frame, `mode='time'` by spatial position; every group also
  sees the cls key/value (first, as in the original). Returns the attended values
  `[B, 1+T*N, H, Dh]` and the cls query's weights `[B, H, 1+T*N]`.
  """
  b, s, h, d = q.shape
  t = num_frames
  n = (s - 1) // t
  if mode not in ("space", "time"):
    raise ValueError(f"divided_attention mode must be 'space' or 'time', got {mode!r}")
  # cls query attends to everything.
  cls_out, cls_w = _softmax_attend(q[:, :1], k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd")
  # groups [B, G, S_g, H, Dh]: space G=T frames of N patches; time G=N positions of T frames
  perm = (0, 1, 2, 3, 4) if mode == "space" else (0, 2, 1, 3, 4)
  group = lambda x: x.reshape(b, t, n, h, d).transpose(perm)
  qg, kg, vg = group(q[:, 1:]), group(k[:, 1:]), group(v[:, 1:])
  g = qg.shape[1]
  cls_kv = lambda x: jnp.broadcast_to(x[:, None, :1], (b, g, 1, h, d))
  kg = jnp.concatenate([cls_kv(k), kg], axis=2)
  vg = jnp.concatenate([cls_kv(v), vg], axis=2)
  out, _ = _softmax_attend(qg, kg, vg, "bgqhd,bgkhd->bghqk", "bghqk,bgkhd->bgqhd")
  out = out.transpose(perm).reshape(b, t * n, h, d)
  return jnp.concatenate([cls_out, out], axis=1), cls_w[:, :, 0]


def divided_attention_masked(q, k, v, frame_ids, patch_ids, mode: str, kernels="reference"):
  """The same rule for an arbitrary token subset (MAC drops masked tokens).

  frame_ids / patch_ids: int `[B, S]` frame and spatial index of each token, -1 for the cls
  token (position 0). Cost is O(S^2) per head but S is the small visible set.
  """
  same = frame_ids if mode == "space" else patch_ids
  allowed = same[:, :, None] == same[:, None, :]  # [B, S, S]
  allowed = allowed | (same[:, None, :] < 0) | (same[:, :, None] < 0)  # cls row and column
  bias = jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)[:, None]  # [B, 1, S, S]
  out, w = _softmax_attend(q, k, v, "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", bias, kernels)
  return out, w[:, :, 0]


class VarAttention(nn.Module):
  """Multi-head attention with the divided space/time rule (Frozen's `VarAttention`)."""
  num_heads: int
  mode: str  # 'space' | 'time'
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None  # the projections' operands (`dense`; None: dtype)
  kernels: str = "reference"  # model.kernels

  @nn.compact
  def __call__(self, x, num_frames: int, token_ids=None):
    b, s, width = x.shape
    h = self.num_heads
    head_dim = width // h
    dense_ = lambda features, axes, name, use_bias=True: dense(
        features, axes, name, self.dtype, use_bias, matmul_dtype=self.matmul_dtype,
        kernels=self.kernels)
    qkv = dense_(3 * width, ("embed", "joined_kv"), "qkv", self.qkv_bias)(x)
    qkv = qkv.reshape(b, s, 3, h, head_dim)  # torch chunks qkv as [q | k | v], heads inside
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (head_dim ** -0.5)
    if token_ids is not None:
      out, cls_w = divided_attention_masked(q, k, v, *token_ids, self.mode, self.kernels)
    elif self.kernels == "xla_cpu":
      out, cls_w = xla_cpu.divided_attention(q, k, v, num_frames, self.mode)
    else:
      out, cls_w = divided_attention(q, k, v, num_frames, self.mode)
    if self.mode == "space":
      # Heads averaged cls attention of the spatial attention: appendix figure 1.
      self.sow("intermediates", "cls_attention", cls_w.mean(axis=1))
    out = out.reshape(b, s, width)
    return dense_(width, ("joined_kv", "embed"), "proj")(out)


def gelu(x, kernels: str = "reference"):
  """The exact (erf) GELU of torch's nn.GELU / HF's "gelu"."""
  return xla_cpu.gelu(x) if kernels == "xla_cpu" else jax.nn.gelu(x, approximate=False)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  kernel_init: Callable = vit_init
  names: tuple[str, str] = ("fc1", "fc2")
  matmul_dtype: Dtype | None = None  # `dense`'s (None: dtype)
  kernels: str = "reference"  # model.kernels

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense_ = lambda features, axes, name: dense(
        features, axes, name, self.dtype, kernel_init=self.kernel_init,
        matmul_dtype=self.matmul_dtype, kernels=self.kernels)
    y = gelu(dense_(self.hidden, ("embed", "mlp"), self.names[0])(x), self.kernels)
    return dense_(width, ("mlp", "embed"), self.names[1])(y)


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
