"""Embedding extraction over the device mesh, every host embedding its share.

Videos: each host holds its clips (`EvalSet.batches` pads them so every host yields the same
number of batches); the global batch is assembled with `make_array_from_process_local_data`,
embedded, and returned replicated with each row's `video_index` (-1 = padding), so the result is
placed by index: nothing dropped or duplicated when the count does not divide the batch.
Texts: every host has every caption; each global batch is cut the same way.
"""
from __future__ import annotations

import io
import logging

import jax
import numpy as np

from miles_jax import console, parallel, paths
from miles_jax.models import dual_encoder
from miles_jax.train.step import normalize_frames


class Embedder:
  """Jitted text / video embedding functions for one model on one mesh."""

  def __init__(self, model_config, mesh, rules, num_clips: int = 1):
    self.model = dual_encoder.build(model_config)
    k = int(num_clips)
    self.mesh, self.rules = mesh, rules
    self.divisor = parallel.batch_divisor(mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, rules)
    rep = parallel.replicated(mesh)
    m = self.model
    # The row indices ride along, so every host gets all of them replicated with the embeddings.

    def embed_video(p, f):
      # [b, K*T, ...] clip-major -> K clips of T frames each, embeddings averaged over clips
      b = f.shape[0]
      f = f.reshape((b * k, f.shape[1] // k) + f.shape[2:])
      e = m.apply({"params": p}, normalize_frames(f), method=m.encode_video)["embed"]
      return e.reshape(b, k, -1).mean(axis=1)

    self._video = jax.jit(lambda p, f, i: (embed_video(p, f), i),
                          in_shardings=(None, batch_sh, batch_sh), out_shardings=rep)
    self._text = jax.jit(
        lambda p, i, a: m.apply({"params": p}, i, a, method=m.encode_text)["embed"],
        in_shardings=(None, batch_sh, batch_sh), out_shardings=rep)

  def _local_rows(self, global_rows: int) -> slice:
    """This process's contiguous rows of a global batch (processes own equal slices)."""
    n, i = jax.process_count(), jax.process_index()
    per = global_rows // n
    return slice(i * per, (i + 1) * per)

  def texts(self, params, input_ids, attention_mask, batch_size: int) -> np.ndarray:
    """All texts (identical on every host) -> float32 `[C, P]` in order."""
    gb = _round_up(batch_size * jax.process_count(), self.divisor)
    c = len(input_ids)
    out = []
    for start in range(0, c, gb):
      ids, att = input_ids[start:start + gb], attention_mask[start:start + gb]
      pad = gb - len(ids)
      ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
      att = np.concatenate([att, np.ones((pad, att.shape[1]), att.dtype)])
      rows = self._local_rows(gb)
      g = parallel.global_batch({"i": ids[rows], "a": att[rows]}, self.mesh, self.rules)
      out.append(np.asarray(self._text(params, g["i"], g["a"]))[:gb - pad])
    return np.concatenate(out).astype(np.float32)

  def videos(self, params, eval_set, batch_size: int) -> np.ndarray:
    """Every video of `eval_set` (each host its share) -> float32 `[V, P]` in video order."""
    local = _round_up(batch_size, max(1, self.divisor // jax.process_count()))
    num = len(eval_set.video_ids)
    result = np.zeros((num, 0), np.float32)
    seen = np.zeros(num, np.int32)
    batches = console.progress(  # shown when extraction takes more than a few seconds
        eval_set.batches(local), total=-(-eval_set.per_host // local), desc="embedding videos",
        unit="batch", delay=5.0, disable=jax.process_index() != 0)
    for b in batches:
      g = parallel.global_batch({"frames": b["frames"], "index": b["video_index"]},
                                self.mesh, self.rules)
      emb, index = (np.asarray(x) for x in self._video(params, g["frames"], g["index"]))
      if result.shape[1] == 0:
        result = np.zeros((num, emb.shape[1]), np.float32)
      keep = index >= 0
      result[index[keep]] = emb[keep]
      np.add.at(seen, index[keep], 1)
    if not (seen == 1).all():
      bad = np.flatnonzero(seen != 1)[:10]
      raise RuntimeError(f"embedding extraction covered videos {bad} {seen[bad]} times "
                         "(expected exactly once)")
    return result


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
