"""The video encoder: Frozen-in-Time's divided space-time transformer, with MILES masking.

Tokens are frame-major: `[cls, frame 0 patches, frame 1 patches, ...]`. Patch (t, n) gets
`pos_embed[1+n] + temporal_embed[t]`; cls gets `pos_embed[0]` only. Each block computes
`t = x + TimeAttn(LN3(x)); s = x + SpaceAttn(LN1(t)); out = s + MLP(LN2(s))` — the residual of
the spatial branch is the block input x, not t (the Frozen change).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from miles_jax import config_lib
from miles_jax.models import layers

Dtype = Any


def normalize_frames(frames):
  """The encoder's input: uint8 RGB `[..., H, W, 3]` -> float32 normalised with the ImageNet
  statistics; float input is taken as already normalised (cast to float32). Used by training,
  evaluation and `pretrained` alike; works under jit and on host arrays."""
  frames = jnp.asarray(frames)
  if frames.dtype != jnp.uint8:
    return frames.astype(jnp.float32)
  mean = jnp.asarray(config_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(config_lib.IMAGENET_STD, jnp.float32)
  return (frames.astype(jnp.float32) / 255.0 - mean) / std


def patchify(frames, patch_size: int):
  """`[B, T, H, W, C]` -> `[B, T*N, p*p*C]` in the video encoder's token order (frame-major,
  patches row-major within a frame)."""
  b, t, h, w, ch = frames.shape
  p = patch_size
  x = frames.reshape(b, t, h // p, p, w // p, p, ch).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t * (h // p) * (w // p), p * p * ch)


class SpaceTimeBlock(nn.Module):
  width: int
  num_heads: int
  mlp_ratio: float
  eps: float
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None  # layers.dense's (None: dtype)
  kernels: str = "reference"  # model.kernels

  @nn.compact
  def __call__(self, x, num_frames: int, token_ids=None, deterministic: bool = True):
    ln = lambda name: layers.layer_norm(self.eps, name, self.dtype)
    attn = lambda name, mode: layers.VarAttention(self.num_heads, mode, self.qkv_bias, self.dtype,
                                                   self.matmul_dtype, self.kernels, name=name)
    drop = layers.DropPath(self.drop_path)
    x = layers.constrain_batch(x)
    t = x + attn("timeattn", "time")(ln("norm3")(x), num_frames, token_ids)
    s = x + drop(attn("attn", "space")(ln("norm1")(t), num_frames, token_ids), deterministic)
    mlp = layers.Mlp(int(self.width * self.mlp_ratio), self.dtype,
                     matmul_dtype=self.matmul_dtype, kernels=self.kernels, name="mlp")
    return layers.constrain_batch(s + drop(mlp(ln("norm2")(s)), deterministic))


class VideoEncoder(nn.Module):
  """`[B, T, H, W, 3]` normalised frames -> dict(cls `[B, D]`, patches `[B, M, D]`).

  `mask` (bool `[B, T*N]`, True = masked) replaces masked patch embeddings by the learnable
  `mask_token` (MILES) or, with `drop_masked=True`, removes them before the blocks (MAC); then
  every sample must mask the same number of patches: under `jit` pass that count as the static
  `num_masked` (e.g. `miles_jax.masking.num_masked(...)`). Both outputs come after the final LN.
  """
  config: ml_collections.ConfigDict
  dtype: Dtype = jnp.float32
  remat: str = "none"  # none | full | dots_saveable (layers.maybe_remat)
  scan_layers: bool = False  # params `blocks` [depth, ...] instead of block_0..block_{depth-1}
  matmul_dtype: Dtype | None = None  # the blocks' dense layers' operands (None: dtype)
  kernels: str = "reference"  # model.kernels: reference | xla_cpu (layers.py / xla_cpu.py)

  @nn.compact
  def __call__(self, frames, mask=None, drop_masked: bool = False, num_masked: int | None = None,
               deterministic: bool = True):
    c = self.config
    b, t, h, w, _ = frames.shape
    if t > c.num_frames:
      raise ValueError(f"clip has {t} frames but model.video.num_frames={c.num_frames}: "
                       "the temporal table has no rows for the extra frames")
    if h != c.img_size or w != c.img_size:
      raise ValueError(f"frames are {h}x{w} but model.video.img_size={c.img_size}")
    if c.width % c.num_heads or h % c.patch_size:
      raise ValueError(f"model.video: width={c.width} must divide by num_heads={c.num_heads} and "
                       f"img_size={h} by patch_size={c.patch_size}")
    p, d = c.patch_size, c.width
    gh, gw = h // p, w // p
    n = gh * gw

    x = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed",
        kernel_init=nn.with_logical_partitioning(layers.vit_init,
                                                 ("patch_h", "patch_w", "channels", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
    )(frames.reshape(b * t, h, w, 3).astype(self.dtype))
    x = x.reshape(b, t * n, d)  # frame-major: index t*N + n

    init = lambda axes: nn.with_logical_partitioning(layers.vit_init, axes)
    cls_token = self.param("cls_token", init((None, "embed")), (1, d))
    pos_embed = self.param("pos_embed", init(("positions", "embed")), (1 + n, d))
    temporal_embed = self.param("temporal_embed", init(("frames", "embed")), (c.num_frames, d))
    mask_token = self.param("mask_token", init((None, "embed")), (1, d))

    if mask is not None and not drop_masked:
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    pos = (temporal_embed[:t, None, :] + pos_embed[None, 1:, :]).reshape(t * n, d)
    x = x + pos.astype(x.dtype)
    cls = (cls_token + pos_embed[:1]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls[None], (b, 1, d)), x], axis=1)

    token_ids = None
    if mask is not None and drop_masked:
      if num_masked is None:
        num_masked = _concrete_count(mask)
      x, token_ids = _keep_visible(x, mask, n, mask.shape[1] - num_masked)

    block = layers.maybe_remat(SpaceTimeBlock, self.remat, static_argnums=(2, 4))
    if self.scan_layers:
      if c.drop_path_rate:
        raise ValueError("model.scan_layers=True needs model.video.drop_path_rate=0 (scanned "
                         "layers share one module, so the per-layer drop-path rates cannot differ)")
      x = layers.scan_blocks(block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.qkv_bias,
                                   0.0, self.dtype, self.matmul_dtype, self.kernels,
                                   name="blocks"),
                             x, c.depth, t, token_ids, deterministic)
    for i in range(0 if self.scan_layers else c.depth):
      x = block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.qkv_bias,
                c.drop_path_rate * i / max(c.depth - 1, 1), self.dtype, self.matmul_dtype,
                self.kernels, name=f"block_{i}")(x, t, token_ids, deterministic)
    x = layers.layer_norm(c.layer_norm_eps, "norm", self.dtype)(x)
    return {"cls": x[:, 0], "patches": x[:, 1:]}


def _keep_visible(x, mask, n, num_visible: int):
  """Gathers cls + visible tokens; returns them and their (frame, patch) ids (-1 for cls)."""
  b = x.shape[0]
  # Stable argsort puts visible (False) tokens first, in their original order.
  order = jnp.argsort(mask, axis=1, stable=True)[:, :num_visible]  # [B, V]
  patches = jnp.take_along_axis(x[:, 1:], order[..., None], axis=1)
  x = jnp.concatenate([x[:, :1], patches], axis=1)
  minus = -jnp.ones((b, 1), jnp.int32)
  frame_ids = jnp.concatenate([minus, (order // n).astype(jnp.int32)], axis=1)
  patch_ids = jnp.concatenate([minus, (order % n).astype(jnp.int32)], axis=1)
  return x, (frame_ids, patch_ids)


def _concrete_count(mask) -> int:
  """The per-sample masked count of a concrete mask; it must be equal for every sample."""
  try:
    counts = np.asarray(mask).sum(axis=1)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("drop_masked=True under jit needs the static `num_masked` argument "
                     "(miles_jax.masking.num_masked gives it)") from None
  if not (counts == counts[0]).all():
    raise ValueError(f"drop_masked=True needs the same masked count per sample, got {counts}")
  return int(counts[0])
