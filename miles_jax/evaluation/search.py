"""Chunked (and optionally sharded) top-k search for galleries too big for a dense matrix.

A 10^6-video gallery against 10^3 queries is a 4 GB f32 similarity matrix; here the gallery
is streamed in chunks, each chunk's top-k is merged into a running top-k, so memory is
O(queries · chunk). With a mesh, each chunk is split along the mesh's `data` axis: every
device scores and top-k's its slice, and the per-device candidates are merged.

Scores are raw dot products: normalise queries and gallery first for cosine similarity
(`normalize`). Ties go to the lower gallery index, as `jax.lax.top_k` on the dense matrix.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_CHUNK = 65536


def normalize(x, eps: float = 1e-8):
  """Divide each row by max(‖x‖, eps) (SPEC cosine), keeping the dtype."""
  x = jnp.asarray(x)
  n = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return (x / jnp.maximum(n, eps)).astype(x.dtype)


def _scores(q, g):
  # f32 accumulation also for bf16 inputs, so chunked and dense agree.
  return jnp.einsum("qd,gd->qg", q, g, preferred_element_type=jnp.float32)


def _iter_chunks(gallery, chunk_size):
  """Yields host/device arrays of at most chunk_size rows, from an array or an iterable."""
  if hasattr(gallery, "shape") and hasattr(gallery, "__getitem__"):
    if len(gallery.shape) != 2:
      raise ValueError(f"gallery must be [G, D], got shape {gallery.shape}.")
    for s in range(0, gallery.shape[0], chunk_size):
      yield gallery[s:s + chunk_size]
  else:
    for chunk in gallery:
      if len(chunk.shape) != 2:
        raise ValueError(f"each gallery chunk must be [rows, D], got {chunk.shape}.")
      for s in range(0, chunk.shape[0], chunk_size):
        yield chunk[s:s + chunk_size]


def _place(chunk, dtype, ndev, sharding):
  """Casts a chunk, pads its rows to a multiple of ndev (a sharded axis must divide evenly)
  and puts it on the device(s); returns (array, number of real rows)."""
  xp = jnp if isinstance(chunk, jax.Array) else np  # host chunks stay on the host until put
  chunk = xp.asarray(chunk, dtype)
  rows = chunk.shape[0]
  pad = -rows % ndev
  if pad:
    chunk = xp.concatenate([chunk, xp.zeros((pad, chunk.shape[1]), dtype)])
  return (jnp.asarray(chunk) if sharding is None else jax.device_put(chunk, sharding)), rows


def _local_topk(q, g, offset, valid, k):
  """Top-k of one (local) chunk with global indices; rows >= valid score -inf."""
  s = _scores(q, g)  # [Q, C]
  col = jnp.arange(g.shape[0])
  s = jnp.where(col[None, :] < valid, s, -jnp.inf)
  vals, idx = jax.lax.top_k(s, min(k, g.shape[0]))
  return vals, idx.astype(jnp.int32) + offset


def _merge(run_vals, run_idx, vals, idx, k):
  # Running candidates come first: they have lower gallery indices, so position order in
  # the concatenation is index order and top_k's "lower position first" keeps the tie rule.
  v = jnp.concatenate([run_vals, vals], axis=1)
  i = jnp.concatenate([run_idx, idx], axis=1)
  v, pos = jax.lax.top_k(v, k)
  return v, jnp.take_along_axis(i, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
def _step(run_vals, run_idx, q, g, offset, valid, *, k):
  vals, idx = _local_topk(q, g, offset, valid, k)
  return _merge(run_vals, run_idx, vals, idx, k)


@functools.lru_cache(maxsize=None)
def _sharded_step(mesh, k):
  """jit'd chunk step with the chunk split over mesh axis `data` (shard_map)."""

  def per_device(run_vals, run_idx, q, g, offset, valid):
    local = g.shape[0]
    start = jax.lax.axis_index("data") * local
    vals, idx = _local_topk(q, g, offset + start, valid - start, k)  # [Q, k_local]
    # Gathered in device order = gallery index order, which the tie rule needs.
    vals = jax.lax.all_gather(vals, "data", axis=1, tiled=True)
    idx = jax.lax.all_gather(idx, "data", axis=1, tiled=True)
    return _merge(run_vals, run_idx, vals, idx, k)

  # check_vma=False: after the all_gather every device holds the same merged top-k, which
  # the replicated out_specs states.
  return jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P(), P("data", None), P(), P()),
      out_specs=(P(), P()), check_vma=False), donate_argnums=(0, 1))


def _check_mesh(mesh):
  if mesh is not None and "data" not in mesh.axis_names:
    raise ValueError(f"topk_search: mesh axes are {mesh.axis_names}; it needs a 'data' axis "
                     "to split the gallery (e.g. jax.make_mesh((n,), ('data',))).")


def topk_search(queries, gallery, k: int, chunk_size: int = DEFAULT_CHUNK, *,
                mesh: Mesh | None = None, allow_fewer: bool = False):
  """Top-k gallery items per query: (scores [Q, k] f32, indices [Q, k] int32), as numpy.

  `gallery` is a [G, D] array (numpy, memmap or jax) or an iterable of [rows, D] chunks
  (e.g. a generator reading shards); either way at most `chunk_size` rows are scored at once.
  With `mesh`, each chunk is split over its `data` axis. A gallery smaller than k is an error,
  or with `allow_fewer` gives min(k, G) columns.
  """
  _check_mesh(mesh)
  if chunk_size < 1 or k < 1:
    raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}.")
  ndev = 1 if mesh is None else mesh.shape["data"]
  q = jnp.asarray(queries)
  if mesh is not None:
    q = jax.device_put(q, NamedSharding(mesh, P()))
    step = _sharded_step(mesh, k)
    chunk_sharding = NamedSharding(mesh, P("data", None))
  else:
    step, chunk_sharding = functools.partial(_step, k=k), None
  run_vals = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
  run_idx = jnp.full((q.shape[0], k), -1, jnp.int32)
  if mesh is not None:
    run_vals, run_idx = jax.device_put((run_vals, run_idx), NamedSharding(mesh, P()))
  offset = 0
  for chunk in _iter_chunks(gallery, chunk_size):
    if chunk.shape[1] != q.shape[1]:
      raise ValueError(f"gallery dim {chunk.shape[1]} != queries dim {q.shape[1]}.")
    g, rows = _place(chunk, q.dtype, ndev, chunk_sharding)
    # Dispatch is asynchronous: without this wait the loop would queue every chunk of the
    # gallery on the device at once. One step in flight plus the next chunk's transfer.
    run_vals.block_until_ready()
    run_vals, run_idx = step(run_vals, run_idx, q, g, np.int32(offset), np.int32(rows))
    offset += rows
  if offset < k:
    if not allow_fewer:
      raise ValueError(f"k={k} exceeds the gallery size {offset}; lower k.")
    return np.asarray(run_vals)[:, :offset], np.asarray(run_idx)[:, :offset]
  return np.asarray(run_vals), np.asarray(run_idx)


@jax.jit
def _count_higher(q, g, gt_score, gt_index, offset, valid):
  s = _scores(q, g)  # [Q, C]
  col = jnp.arange(g.shape[0]) + offset
  # The ground truth itself never counts (its chunk score may differ in the last bit
  # from the separately computed gt_score).
  higher = (s > gt_score[:, None]) & (col[None, :] != gt_index[:, None]) & (
      col[None, :] < offset + valid)
  return jnp.sum(higher, axis=1, dtype=jnp.int32)


def ground_truth_ranks(queries, gallery, gt_index, chunk_size: int = DEFAULT_CHUNK, *,
                       gt_embeddings=None, mesh: Mesh | None = None) -> np.ndarray:
  """1-based rank of each query's ground truth: 1 + #gallery items scoring strictly higher.

  The t2v convention of `retrieval.retrieval_metrics` (optimistic ties), without a dense
  matrix: `retrieval.metrics_from_ranks(ranks - 1)` gives R@K / MdR / MnR. For a gallery
  given as an iterable of chunks, pass `gt_embeddings` [Q, D] (gallery[gt_index]).
  """
  _check_mesh(mesh)
  q = jnp.asarray(queries)
  gt_index = np.asarray(gt_index)
  if gt_index.shape != (q.shape[0],):
    raise ValueError(f"gt_index must have shape ({q.shape[0]},), got {gt_index.shape}.")
  if gt_embeddings is None:
    if not (hasattr(gallery, "shape") and hasattr(gallery, "__getitem__")):
      raise ValueError("ground_truth_ranks: gallery is an iterable of chunks, so pass "
                       "gt_embeddings=gallery rows of gt_index (shape [Q, D]).")
    gt_embeddings = np.asarray(gallery[gt_index])
  gt_score = jnp.einsum("qd,qd->q", q, jnp.asarray(gt_embeddings, q.dtype),
                        preferred_element_type=jnp.float32)
  gt_idx = jnp.asarray(gt_index, jnp.int32)
  ndev, chunk_sharding = 1, None
  if mesh is not None:
    # Plain jit partitions the count over the sharded chunk and all-reduces the sum.
    rep = NamedSharding(mesh, P())
    q, gt_score, gt_idx = jax.device_put((q, gt_score, gt_idx), rep)
    ndev, chunk_sharding = mesh.shape["data"], NamedSharding(mesh, P("data", None))
  counts = jnp.zeros(q.shape[0], jnp.int32)
  offset = 0
  for chunk in _iter_chunks(gallery, chunk_size):
    g, rows = _place(chunk, q.dtype, ndev, chunk_sharding)
    counts.block_until_ready()  # bounds the chunks in flight, as in topk_search
    counts = counts + _count_higher(q, g, gt_score, gt_idx, np.int32(offset), np.int32(rows))
    offset += rows
  if gt_index.size and gt_index.max() >= offset:
    raise ValueError(f"gt_index has values >= the gallery size {offset}.")
  return np.asarray(counts) + 1


@functools.partial(jax.jit, static_argnames=("k",))
def _dense(q, g, *, k):
  return jax.lax.top_k(_scores(q, g), k)


def dense_topk(queries, gallery, k: int):
  """The baseline: full [Q, G] score matrix, then top-k (only where it fits in memory)."""
  q = jnp.asarray(queries)
  v, i = _dense(q, jnp.asarray(gallery, q.dtype), k=k)
  return np.asarray(v), np.asarray(i)



def search_shards(queries, shards, k: int, chunk_size: int = DEFAULT_CHUNK):
  """Cosine top-k of `queries` [Q, D] over a gallery stored in shards, read one at a time.

  `shards` yields (embeddings [n, D], ids [n]) (e.g. `embed.Index.shards()`); both sides are
  normalised here, so scores are cosine similarities. Returns (scores [Q, k'] f32, the shards'
  ids [Q, k']) with k' = min(k, gallery size); only one shard's embeddings are in memory.
  """
  q = normalize(jnp.asarray(queries, jnp.float32))
  seen_ids = []

  def chunks():
    for emb, ids in shards:
      if len(ids):
        seen_ids.append(np.asarray(ids))
        yield normalize(np.asarray(emb, np.float32))

  vals, rows = topk_search(q, chunks(), k, chunk_size, allow_fewer=True)
  if not seen_ids:
    return vals, rows
  return vals, np.concatenate(seen_ids)[rows]
