"""The MILES dual encoder: video encoder + text encoder + projections + the MVM head.

Parameter tree: `video` (VideoEncoder), `text` (TextEncoder), `video_proj` (Linear width->proj),
`text_proj` (ReLU -> Linear width->proj), `mvm_head` (Linear width->width, or ->`mvm_head_dim` for pixel targets; train only).
Embeddings are projected and *not* normalised, as in the PyTorch original.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from miles_jax import config_lib
from miles_jax.models import layers
from miles_jax.models.text import TextEncoder
from miles_jax.models.video import VideoEncoder

Dtype = Any


DTYPES = {name: getattr(jnp, name) for name in config_lib.DTYPES}


def compute_dtype(config: ml_collections.ConfigDict) -> Dtype:
  """model.dtype as a jnp dtype (the compute dtype; params stay float32)."""
  name = config.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: use one of {', '.join(DTYPES)}")
  return DTYPES[name]


def compute_dtypes(config: ml_collections.ConfigDict) -> tuple[Dtype, Dtype]:
  """(activation dtype, dense-matmul operand dtype) for the `model` config: model.dtype, and
  model.low_precision's scope for a bfloat16 one — `all` (both bf16) or `matmuls` (activations
  float32, the dense layers' operands bf16 with float32 accumulation)."""
  dtype = compute_dtype(config)
  scope = config.get("low_precision", "all")
  if scope not in config_lib.LOW_PRECISION:
    raise ValueError(f"model.low_precision={scope!r}: use one of "
                     f"{', '.join(config_lib.LOW_PRECISION)}")
  if dtype != jnp.float32 and scope == "matmuls":
    return jnp.float32, dtype
  return dtype, dtype


def kernels(config: ml_collections.ConfigDict) -> str:
  """model.kernels: `reference` (plain einsum attention and nn.Dense: every backend) or
  `xla_cpu` (models/xla_cpu.py: the same functions in the forms XLA:CPU runs fastest)."""
  name = config.get("kernels", "reference")
  if name not in config_lib.KERNELS:
    raise ValueError(f"model.kernels={name!r}: use one of {', '.join(config_lib.KERNELS)}")
  return name


class DualEncoder(nn.Module):
  config: ml_collections.ConfigDict  # the `model` section of the config
  dtype: Dtype = jnp.float32
  matmul_dtype: Dtype | None = None  # the dense layers' operands (None: dtype)
  kernels: str = "reference"  # model.kernels: reference | xla_cpu

  def setup(self):
    c = self.config
    remat = layers.remat_name(c.get("remat", "none"))
    scan = bool(c.get("scan_layers", False))
    mm, kn = self.matmul_dtype, self.kernels
    self.video = VideoEncoder(c.video, self.dtype, remat, scan, mm, kn)
    self.text = TextEncoder(c.text, self.dtype, remat, scan, mm, kn)
    dense = lambda features, axes: layers.dense(features, axes, None, self.dtype,
                                                matmul_dtype=mm, kernels=kn)
    self.video_proj = dense(c.proj_dim, ("embed", "proj"))
    self.text_proj = dense(c.proj_dim, ("embed", "proj"))
    self.mvm_head = dense(int(c.get("mvm_head_dim", 0)) or c.video.width, ("embed", "mlp"))

  def encode_video(self, frames, mask=None, drop_masked: bool = False,
                   num_masked: int | None = None, deterministic: bool = True):
    """Normalised float frames `[B, T, H, W, 3]` -> dict(embed, cls, patches)."""
    out = self.video(frames, mask, drop_masked, num_masked, deterministic)
    return {"embed": self.video_proj(out["cls"]).astype(jnp.float32), **out}

  def encode_text(self, input_ids, attention_mask, deterministic: bool = True):
    """int32 `[B, L]` -> dict(embed `[B, P]`, tokens `[B, L, D]`); the first token is the output."""
    tokens = self.text(input_ids, attention_mask, deterministic)
    return {"embed": self.project_text(tokens[:, 0]), "tokens": tokens}

  def project_video(self, x):
    return self.video_proj(x).astype(jnp.float32)

  def project_text(self, x):
    return self.text_proj(nn.relu(x)).astype(jnp.float32)

  def predict_mvm(self, patches):
    return self.mvm_head(patches)

  def __call__(self, frames, input_ids, attention_mask, mask=None, drop_masked: bool = False,
               num_masked: int | None = None, deterministic: bool = True):
    v = self.encode_video(frames, mask, drop_masked, num_masked, deterministic)
    t = self.encode_text(input_ids, attention_mask, deterministic)
    return {"video_embed": v["embed"], "text_embed": t["embed"], "patches": v["patches"],
            "mvm_pred": self.predict_mvm(v["patches"])}


def build(config: ml_collections.ConfigDict) -> DualEncoder:
  """The dual encoder for a model config, computing in its `dtype` within the scope of
  `low_precision` (params stay float32), with its `kernels`."""
  return DualEncoder(config, *compute_dtypes(config), kernels(config))


# `model.scan_layers`: the encoders' blocks become one scanned module whose params have a leading
# layer axis. Released weights, exports and convert.py use the unrolled tree; these two map
# between the layouts (params or any tree of the same structure, e.g. optimizer moments).
_SCANNED = (("video", "block_", "blocks"), ("text", "layer_", "layers"))


def scan_params(params: dict) -> dict:
  """Unrolled `video/block_i`, `text/layer_i` -> scanned `video/blocks`, `text/layers`."""
  import jax
  import numpy as np
  out = dict(params)
  for enc, prefix, name in _SCANNED:
    if enc not in out:
      continue
    tree = dict(out[enc])
    keys = sorted((k for k in tree if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    if keys:
      tree[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                *[tree.pop(k) for k in keys])
    out[enc] = tree
  return out


def unscan_params(params: dict) -> dict:
  """Scanned `video/blocks`, `text/layers` -> unrolled `video/block_i`, `text/layer_i`."""
  import jax
  import numpy as np
  out = dict(params)
  for enc, prefix, name in _SCANNED:
    if enc not in out or name not in out[enc]:
      continue
    tree = dict(out[enc])
    stacked = tree.pop(name)
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      tree[f"{prefix}{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], stacked)
    out[enc] = tree
  return out
