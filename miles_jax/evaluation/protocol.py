"""What an evaluation was: the protocol recorded in every results JSON, and the fingerprint that
keys the embedding cache, so a cache never answers for another evaluation.

An embedding cache is valid only for the same params (their content), the same eval files
(their content), model config, frames and their positions, clips, crop, tokenizer (its vocab
file's content) and caption length: `cache_key` hashes all of them.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

# Hashing reads whole files; this many bytes at a time.
_CHUNK = 1 << 22


def file_fingerprint(paths) -> str:
  """sha256 over each file's name and content, in the given order."""
  import tensorflow as tf  # gfile: local and gs:// alike
  h = hashlib.sha256()
  for p in paths:
    h.update(os.path.basename(p).encode() + b"\0")
    with tf.io.gfile.GFile(p, "rb") as f:
      while True:
        block = f.read(_CHUNK)
        if not block:
          break
        h.update(block)
    h.update(b"\1")
  return h.hexdigest()


def params_fingerprint(params) -> str:
  """sha256 over every parameter's path, dtype, shape and values (any sharding, any host)."""
  import jax
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def dataset_name(config) -> str:
  """data.eval_name, or the folder of the eval glob (data/msrvtt/test-*.tfrecord -> msrvtt)."""
  if config.data.get("eval_name"):
    return str(config.data.eval_name)
  first = config.data.eval.split(",")[0].strip()
  return os.path.basename(os.path.dirname(first)) or "eval"


def describe(config, eval_set, files: list, split: str) -> dict:
  """The protocol of one eval split: enough to tell two evaluations apart and to reproduce one."""
  from miles_jax.data import pipeline
  d, ev = config.data, config.get("eval")
  size = config.model.video.img_size
  post = "none" if ev is None else ev.post
  if post == "dsl":
    post = f"dsl(temperature={ev.dsl_temperature}; t2v over texts, v2t over videos)"
  elif post == "qbnorm":
    post = (f"qbnorm(beta={ev.qbnorm_beta}, k={ev.qbnorm_k}, bank={ev.qbnorm_bank}; text->video "
            "only, video->text unchanged)")
  tokenizer = d.tokenizer
  return {
      "dataset": dataset_name(config),
      "split": split,
      "files": [os.path.basename(f) for f in files],
      "files_sha256": file_fingerprint(files),
      "num_texts": len(eval_set.texts),
      "num_videos": len(eval_set.video_ids),
      # the published split's size as prepare recorded it (0: unknown): a smaller gallery
      # makes retrieval easier, so recall is not comparable when the two differ
      "num_videos_expected": int(getattr(eval_set, "expected_videos", 0)),
      "skipped_records": len(eval_set.skipped),
      "failed_videos": len(eval_set.failed),
      "num_frames": int(d.num_frames),
      "num_clips": int(eval_set.num_clips),
      "frame_positions": eval_set.positions,
      "frames": pipeline.eval_protocol(config),
      "crop": (f"centre square of the short side (offsets rounded half to even), resized to "
               f"{size}x{size} bilinear without antialias (torchvision CenterCrop/Resize on "
               "tensors, as the MILES release)" if pipeline.eval_protocol(config) == "miles"
               else f"centre square of the short side, resized to {size}x{size} (antialiased)"),
      "normalisation": "ImageNet mean/std",
      "caption_length": pipeline.eval_max_len(config),
      "captions_at_length_limit": int(eval_set.truncated),
      "tokenizer": os.path.basename(tokenizer),
      "tokenizer_sha256": file_fingerprint([tokenizer]),
      "v2t_multi_caption": "frozen" if ev is None else ev.v2t_multi_caption,
      "post_processing": post,
      "dtype": str(config.model.get("dtype", "float32")),
  }


def gallery_check(protocol: dict) -> tuple:
  """(one line "gallery: N videos of E expected", True when N != E and E is known)."""
  n, e = int(protocol["num_videos"]), int(protocol.get("num_videos_expected", 0))
  if not e:
    return f"gallery: {n} videos (expected size unknown: shards from before it was recorded, " \
           "or not a published split)", False
  if n == e:
    return f"gallery: {n} videos of {e} expected", False
  return (f"gallery: {n} videos of {e} expected -- WARNING: the gallery is "
          f"{'smaller' if n < e else 'larger'} than the published split, so recall is NOT "
          "comparable with published numbers (see the shards' report.json)"), True


def cache_key(params_fp: str, protocol: dict, model_config) -> str:
  """Hex key of (params, protocol minus its free-text fields, model config)."""
  keyed = {k: v for k, v in protocol.items()
           if k not in ("post_processing", "v2t_multi_caption", "dataset",
                        "num_videos_expected")}
  blob = json.dumps({"params": params_fp, "protocol": keyed,
                     "model": model_config.to_dict() if hasattr(model_config, "to_dict")
                     else dict(model_config)}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def package_version() -> str:
  import miles_jax
  return miles_jax.__version__
