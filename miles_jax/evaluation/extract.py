"""Embedding extraction over the device mesh, every host embedding its share.

Videos: each host holds its clips (`EvalSet.batches` pads them so every host yields the same
number of batches); the global batch is assembled with `make_array_from_process_local_data`,
embedded, and returned replicated with each row's `video_index` (-1 = padding), so the result is
placed by index: nothing dropped or duplicated when the count does not divide the batch.
Texts: every host has every caption and embeds every process_count-th one, the same way: rows
carry their caption index. Which global rows a process's data lands in depends on the mesh's
device order (on TPU pods the batch shards are interleaved across processes, e.g. owners
0,2,4,6,0,2,… on a v4-64), so no result is ever placed by position in the global batch.
"""
from __future__ import annotations

import io
import logging

import jax
import numpy as np

from miles_jax import console, parallel, paths
from miles_jax.models import dual_encoder
from miles_jax.models.video import normalize_frames


class Embedder:
  """Jitted text / video embedding functions for one model on one mesh.

  `video_fn(params, frames, index)` and `text_fn(params, input_ids, attention_mask, index)` are
  the jitted global-batch programs (what `plan` compiles for a TPU slice); `videos` / `texts`
  feed them host-local batches."""

  def __init__(self, model_config, mesh, rules, num_clips: int = 1):
    self.model = dual_encoder.build(model_config)
    k = int(num_clips)
    self.mesh, self.rules = mesh, rules
    self.divisor = parallel.batch_divisor(mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, rules)
    rep = parallel.replicated(mesh)
    m = self.model
    # The row indices ride along, so every host gets all of them replicated with the embeddings.

    def embed_video(p, f, i):
      # [b, K*T, ...] clip-major -> K clips of T frames each, embeddings averaged over clips
      b = f.shape[0]
      f = f.reshape((b * k, f.shape[1] // k) + f.shape[2:])
      with parallel.activation_sharding(mesh, rules):
        e = m.apply({"params": p}, normalize_frames(f), method=m.encode_video)["embed"]
      return e.reshape(b, k, -1).mean(axis=1), i

    def embed_text(p, ids, mask, i):
      with parallel.activation_sharding(mesh, rules):
        return m.apply({"params": p}, ids, mask, method=m.encode_text)["embed"], i

    self.video_fn = jax.jit(embed_video, in_shardings=(None, batch_sh, batch_sh),
                            out_shardings=rep)
    self.text_fn = jax.jit(embed_text, in_shardings=(None, batch_sh, batch_sh, batch_sh),
                           out_shardings=rep)

  def _local_batch(self, batch_size: int) -> int:
    """Rows per host per global batch: a multiple of the host's batch shards."""
    return _round_up(batch_size, max(1, self.divisor // jax.process_count()))

  def texts(self, params, input_ids, attention_mask, batch_size: int) -> np.ndarray:
    """All texts (identical on every host) -> float32 `[C, P]` in order."""
    n, me = jax.process_count(), jax.process_index()
    local = self._local_batch(batch_size)
    c = len(input_ids)
    mine = np.arange(me, c, n)
    per_host = -(-c // n)  # equal batch count on every host
    result, seen = None, np.zeros(c, np.int32)
    for start in range(0, max(per_host, 1), local):
      rows = mine[start:start + local]
      pad = local - len(rows)
      ids = np.concatenate([input_ids[rows], np.zeros((pad, input_ids.shape[1]), input_ids.dtype)])
      att = np.concatenate([attention_mask[rows],
                            np.ones((pad, attention_mask.shape[1]), attention_mask.dtype)])
      index = np.concatenate([rows, -np.ones(pad, np.int64)]).astype(np.int32)
      g = parallel.global_batch({"i": ids, "a": att, "r": index}, self.mesh, self.rules)
      emb, index = (np.asarray(x) for x in self.text_fn(params, g["i"], g["a"], g["r"]))
      if result is None:
        result = np.zeros((c, emb.shape[1]), np.float32)
      keep = index >= 0
      result[index[keep]] = emb[keep]
      np.add.at(seen, index[keep], 1)
    _check_once(seen, "texts")
    return result

  def videos(self, params, eval_set, batch_size: int) -> np.ndarray:
    """Every video of `eval_set` (each host its share) -> float32 `[V, P]` in video order."""
    local = self._local_batch(batch_size)
    num = len(eval_set.video_ids)
    result = np.zeros((num, 0), np.float32)
    seen = np.zeros(num, np.int32)
    batches = console.progress(  # shown when extraction takes more than a few seconds
        eval_set.batches(local), total=-(-eval_set.per_host // local), desc="embedding videos",
        unit="batch", delay=5.0, disable=jax.process_index() != 0)
    for b in batches:
      g = parallel.global_batch({"frames": b["frames"], "index": b["video_index"]},
                                self.mesh, self.rules)
      emb, index = (np.asarray(x) for x in self.video_fn(params, g["frames"], g["index"]))
      if result.shape[1] == 0:
        result = np.zeros((num, emb.shape[1]), np.float32)
      keep = index >= 0
      result[index[keep]] = emb[keep]
      np.add.at(seen, index[keep], 1)
    _check_once(seen, "videos")
    return result


def _check_once(seen: np.ndarray, what: str):
  if not (seen == 1).all():
    bad = np.flatnonzero(seen != 1)[:10]
    raise RuntimeError(f"embedding extraction covered {what} {bad} {seen[bad]} times "
                       "(expected exactly once)")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def cached_embeddings(path: str | None, compute, key: str = "", video_ids=(), texts=()):
  """`(text_emb, video_emb)` from the .npz at `path` (local or gs://) when it was written for the
  same `key` (evaluation/protocol.cache_key) and the same video ids and texts in the same order;
  otherwise computed and written whole (process 0)."""
  if path and paths.exists(path):
    try:
      with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
        ok = (str(z["key"]) == key and z["video_ids"].tolist() == list(video_ids)
              and z["texts"].tolist() == list(texts))
        if ok:
          return z["text"], z["video"]
    except (KeyError, ValueError, OSError):
      pass
    logging.warning("embedding cache %s was written for another evaluation: recomputing", path)
  text, video = compute()
  if path and jax.process_index() == 0:
    buf = io.BytesIO()
    np.savez(buf, text=text, video=video, key=np.asarray(key),
             video_ids=np.asarray(list(video_ids), dtype=str),
             texts=np.asarray(list(texts), dtype=str))
    paths.write_bytes(path, buf.getvalue())
  return text, video
