"""The small user API: load a dual encoder from any checkpoint and embed videos and texts.

    from miles_jax import pretrained
    model = pretrained.load("workdirs/demo/export")          # exported dir (or a .pth + config)
    t = model.encode_texts(["a red square moves left"])     # strings -> [N, P]
    v = model.encode_video_files(["a.mp4", "b.webm"])       # files -> [M, P] (eval protocol)
    pretrained.cosine_similarity(t, v)                       # [N, M]

    v = model.encode_video(frames)                          # [B,T,H,W,3] normalised -> [B,P]
    t = model.encode_text(input_ids, attention_mask)        # int32 [B,L] -> [B,P]

An exported directory carries its tokenizer and its preprocessing (`preprocessing.json`: frames,
frame positions, resolution, normalisation), so the string and file APIs need nothing else. A
`.pth` carries neither: pass `tokenizer=` (vocab.txt / sentencepiece .model) to encode text.
Embeddings are projected and un-normalised (as the PyTorch original returns them); compare them
with `cosine_similarity`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from miles_jax import checkpoints, config_lib, paths
from miles_jax.evaluation.retrieval import cosine_similarity  # noqa: F401  (this API's)
from miles_jax.models import dual_encoder
from miles_jax.models.video import normalize_frames  # noqa: F401  (this API's)


class NoTokenizer(ValueError):
  """Text was to be encoded by a model loaded without a tokenizer."""


@dataclasses.dataclass
class Pretrained:
  """A dual encoder with its params; methods are jit-compiled once per input shape.

  Video batches are split over this host's devices (padded to a multiple of their count).
  """
  config: ml_collections.ConfigDict  # the `model` section
  params: Any
  preprocessing: dict | None = None  # checkpoints.preprocessing_record layout
  tokenizer_path: str | None = None
  source: str = ""

  def __post_init__(self):
    self.module = dual_encoder.build(self.config)
    if self.preprocessing is None:
      self.preprocessing = checkpoints.preprocessing_record(self.config)
    self._tokenizer = None
    self._fingerprint = None
    devices = jax.local_devices()
    self._mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    P = jax.sharding.PartitionSpec
    self._rows = jax.sharding.NamedSharding(self._mesh, P("data"))
    self._rep = jax.sharding.NamedSharding(self._mesh, P())
    self._video = jax.jit(lambda p, f: self.module.apply(
        {"params": p}, f, method=dual_encoder.DualEncoder.encode_video)["embed"],
        out_shardings=self._rep)
    self._text = jax.jit(lambda p, i, m: self.module.apply(
        {"params": p}, i, m, method=dual_encoder.DualEncoder.encode_text)["embed"])
    self._params_rep = None

  def encode_video(self, frames) -> np.ndarray:
    """float32 `[B, T, H, W, 3]` ImageNet-normalised frames -> `[B, P]` (batch over devices)."""
    frames = np.asarray(frames, np.float32)
    b, n = frames.shape[0], len(self._mesh.devices)
    if n == 1:
      return np.asarray(self._video(self.params, jnp.asarray(frames)))
    if self._params_rep is None:
      self._params_rep = jax.device_put(self.params, self._rep)
    pad = -b % n
    if pad:
      frames = np.concatenate([frames, np.zeros((pad,) + frames.shape[1:], frames.dtype)])
    out = self._video(self._params_rep, jax.device_put(frames, self._rows))
    return np.asarray(out)[:b]

  def encode_text(self, input_ids, attention_mask) -> np.ndarray:
    return np.asarray(self._text(self.params, jnp.asarray(input_ids, jnp.int32),
                                 jnp.asarray(attention_mask, jnp.int32)))

  # --- strings and files ------------------------------------------------------------------

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      if not self.tokenizer_path:
        raise NoTokenizer(
            f"{self.source or 'this model'} carries no tokenizer, so it cannot encode text: "
            "load it with pretrained.load(path, tokenizer='vocab.txt') (the BERT vocab.txt or "
            "sentencepiece .model it was trained with; bert-base-uncased for released MILES "
            "weights), or export it with `convert --tokenizer=...`")
      from miles_jax.data.tokenizers import build_tokenizer
      self._tokenizer = build_tokenizer(self.tokenizer_path, int(self.preprocessing["max_len"]))
    return self._tokenizer

  def encode_texts(self, texts, batch_size: int = 256) -> np.ndarray:
    """List of strings -> float32 `[N, P]`, tokenized with the model's own tokenizer."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = []
    for s in range(0, len(texts), batch_size):
      ids, att = self.tokenizer.tokenize_numpy(texts[s:s + batch_size])
      out.append(self.encode_text(ids, att))
    d = self.config.proj_dim
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, d), np.float32)

  def load_video_file(self, path: str) -> np.ndarray:
    """A video file -> uint8 `[T, S, S, 3]` sampled and cropped by `self.preprocessing`."""
    from miles_jax.data import prepare
    pre = self.preprocessing
    return prepare.eval_frames(path, int(pre["num_frames"]), int(pre["img_size"]))

  def normalize(self, frames_uint8) -> np.ndarray:
    pre = self.preprocessing
    x = np.asarray(frames_uint8, np.float32) / 255.0
    return (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)

  def encode_clips(self, clips_uint8) -> np.ndarray:
    """uint8 `[B, T, S, S, 3]` (as `load_video_file` gives) -> float32 `[B, P]`."""
    return self.encode_video(self.normalize(clips_uint8)).astype(np.float32)

  def encode_video_files(self, paths, batch_size: int = 16) -> np.ndarray:
    """Video files -> float32 `[N, P]` (decoded here, in order; raises on an unreadable file —
    `python -m miles_jax.embed` decodes in parallel and skips such files)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    out = []
    for s in range(0, len(paths), batch_size):
      out.append(self.encode_clips(np.stack([self.load_video_file(p)
                                             for p in paths[s:s + batch_size]])))
    d = self.config.proj_dim
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)

  def fingerprint(self) -> str:
    """sha256 (first 16 hex) of the model config and every parameter's name, shape and bytes."""
    if self._fingerprint is None:
      h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True,
                                    default=str).encode())
      for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(self.params)[0],
                               key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
      self._fingerprint = h.hexdigest()[:16]
    return self._fingerprint


def load(path: str, config: ml_collections.ConfigDict | None = None,
         tokenizer: str | None = None) -> Pretrained:
  """Loads a `.pth`/`.safetensors` (PyTorch layout) or an exported orbax directory.

  `config` is a full config or its `model` section; for PyTorch files it defaults to the base
  model; for orbax directories the saved model config is used (and checked against `config`).
  `tokenizer` (vocab.txt / .model) overrides the export's own, and is how a `.pth` gets one.
  """
  model_config = None
  if config is not None:
    model_config = config.model if "model" in config else config
  if tokenizer and not paths.exists(tokenizer):
    raise FileNotFoundError(f"tokenizer={tokenizer} does not exist")
  if paths.isdir(path):
    params, model_config = checkpoints.load_params(path, model_config)
    pre = checkpoints.read_preprocessing(path)
    if pre and not tokenizer and pre.get("tokenizer"):
      tokenizer = paths.join(path, pre["tokenizer"])
    if pre is None and config is not None and "model" in config:
      pre = checkpoints.preprocessing_record(config)
    return Pretrained(model_config, params, pre, tokenizer, source=path)
  from miles_jax.weights import torch_io
  model_config = model_config or config_lib.model_config("base")
  with paths.local_file(path) as local:  # gs:// too
    params, _ = torch_io.convert_state_dict(torch_io.read_state_dict(local), model_config)
  pre = checkpoints.preprocessing_record(config if config is not None and "model" in config
                                         else model_config)
  return Pretrained(model_config, jax.tree_util.tree_map(jnp.asarray, params), pre, tokenizer,
                    source=path)
