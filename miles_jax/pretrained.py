"""The small user API: load a dual encoder from any checkpoint and embed videos and texts.

    from miles_jax import pretrained
    model = pretrained.load("miles.pth", config)          # or an exported orbax directory
    v = model.encode_video(frames)                          # [B,T,H,W,3] normalised -> [B,P]
    t = model.encode_text(input_ids, attention_mask)        # int32 [B,L] -> [B,P]

Embeddings are projected and un-normalised (as the PyTorch original returns them); compare them
with `cosine_similarity`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from miles_jax import checkpoints, config_lib, paths
from miles_jax.models import dual_encoder


@dataclasses.dataclass
class Pretrained:
  """A dual encoder with its params; methods are jit-compiled once per input shape."""
  config: ml_collections.ConfigDict  # the `model` section
  params: Any

  def __post_init__(self):
    self.module = dual_encoder.build(self.config)
    self._video = jax.jit(lambda p, f: self.module.apply(
        {"params": p}, f, method=dual_encoder.DualEncoder.encode_video)["embed"])
    self._text = jax.jit(lambda p, i, m: self.module.apply(
        {"params": p}, i, m, method=dual_encoder.DualEncoder.encode_text)["embed"])

  def encode_video(self, frames) -> np.ndarray:
    return np.asarray(self._video(self.params, jnp.asarray(frames, jnp.float32)))

  def encode_text(self, input_ids, attention_mask) -> np.ndarray:
    return np.asarray(self._text(self.params, jnp.asarray(input_ids, jnp.int32),
                                 jnp.asarray(attention_mask, jnp.int32)))


def normalize_frames(frames_uint8) -> np.ndarray:
  """uint8 `[..., 3]` RGB -> float32 normalised with the ImageNet statistics."""
  x = np.asarray(frames_uint8, np.float32) / 255.0
  return (x - np.asarray(config_lib.IMAGENET_MEAN, np.float32)) / np.asarray(
      config_lib.IMAGENET_STD, np.float32)


def cosine_similarity(a, b) -> np.ndarray:
  """`[N, P] x [M, P] -> [N, M]`, each vector divided by max(||x||, 1e-8)."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return a @ b.T


def load(path: str, config: ml_collections.ConfigDict | None = None) -> Pretrained:
  """Loads a `.pth`/`.safetensors` (PyTorch layout) or an exported orbax directory.

  `config` is a full config or its `model` section; for PyTorch files it defaults to the base
  model; for orbax directories the saved model config is used (and checked against `config`).
  """
  model_config = None
  if config is not None:
    model_config = config.model if "model" in config else config
  if paths.isdir(path):
    params, model_config = checkpoints.load_params(path, model_config)
    return Pretrained(model_config, params)
  from miles_jax import convert
  model_config = model_config or config_lib.model_config("base")
  with paths.local_file(path) as local:  # gs:// too
    params, _ = convert.convert_state_dict(convert.read_state_dict(local), model_config)
  return Pretrained(model_config, jax.tree_util.tree_map(jnp.asarray, params))
