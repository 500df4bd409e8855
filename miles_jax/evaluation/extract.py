"""Embedding extraction over the device mesh, every host embedding its share.

Videos: each host holds its clips (`EvalSet.batches` pads them so every host yields the same
number of batches); the global batch is assembled with `make_array_from_process_local_data`,
embedded, and returned replicated with each row's `video_index` (-1 = padding), so the result is
placed by index: nothing dropped or duplicated when the count does not divide the batch.
Texts: every host has every caption; each global batch is cut the same way.
"""
from __future__ import annotations

import io

import jax
import numpy as np

from miles_jax import parallel, paths
from miles_jax.models import dual_encoder
from miles_jax.train.step import normalize_frames


class Embedder:
  """Jitted text / video embedding functions for one model on one mesh."""

  def __init__(self, model_config, mesh, rules):
    self.model = dual_encoder.build(model_config)
    self.mesh, self.rules = mesh, rules
    self.divisor = parallel.batch_divisor(mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, rules)
    rep = parallel.replicated(mesh)
    m = self.model
    # The row indices ride along, so every host gets all of them replicated with the embeddings.
    self._video = jax.jit(
        lambda p, f, i: (m.apply({"params": p}, normalize_frames(f),
                                 method=m.encode_video)["embed"], i),
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
    for b in eval_set.batches(local):
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


def cached_embeddings(path: str | None, compute):
  """Loads `(text_emb, video_emb)` from an .npz at `path`, or computes and writes it (process 0)."""
  if path and paths.exists(path):
    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
      return z["text"], z["video"]
  text, video = compute()
  if path and jax.process_index() == 0:  # local or gs://; written whole, never half
    buf = io.BytesIO()
    np.savez(buf, text=text, video=video)
    paths.write_bytes(path, buf.getvalue())
  return text, video
