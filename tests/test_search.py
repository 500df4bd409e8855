"""Chunked / sharded top-k search against the dense score matrix (numpy)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from miles_jax.evaluation import retrieval, search


def _int_data(seed, num_queries=6, size=100, dim=8):
  # Small integers: every dot product is exact in f32 and bf16 whatever the summation order,
  # and there are many ties to exercise the lower-index-first rule.
  rng = np.random.default_rng(seed)
  q = rng.integers(-2, 3, (num_queries, dim)).astype(np.float32)
  g = rng.integers(-2, 3, (size, dim)).astype(np.float32)
  return q, g


def _numpy_topk(q, g, k):
  s = q.astype(np.float64) @ g.T.astype(np.float64)
  idx = np.lexsort((np.broadcast_to(np.arange(g.shape[0]), s.shape), -s), axis=1)[:, :k]
  return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("chunk_size,k", [(1, 3), (7, 10), (32, 5), (100, 10), (1000, 100)])
def test_chunked_equals_dense(chunk_size, k):
  q, g = _int_data(0)
  want_s, want_i = _numpy_topk(q, g, k)
  s, i = search.topk_search(q, g, k, chunk_size)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(s, want_s)


def test_iterable_of_uneven_chunks_and_bf16():
  q, g = _int_data(1)
  want_s, want_i = _numpy_topk(q, g, 12)
  pieces = (g[a:b] for a, b in [(0, 5), (5, 45), (45, 46), (46, 100)])
  s, i = search.topk_search(q, pieces, 12, chunk_size=16)
  np.testing.assert_array_equal(i, want_i)
  s, i = search.topk_search(q.astype(jax.numpy.bfloat16), g, 12, chunk_size=16)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(s, want_s)


def test_random_floats_match_dense_jax():
  rng = np.random.default_rng(2)
  q = np.asarray(search.normalize(rng.normal(size=(20, 32)).astype(np.float32)))
  g = np.asarray(search.normalize(rng.normal(size=(1000, 32)).astype(np.float32)))
  want_s, want_i = search.dense_topk(q, g, 10)
  s, i = search.topk_search(q, g, 10, chunk_size=96)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("explicit", [True, False])
def test_sharded_equals_dense(explicit):
  assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
  mesh = (jax.make_mesh((8,), ("data",)) if explicit
          else Mesh(np.array(jax.devices()), ("data",)))
  q, g = _int_data(3, size=203)
  for chunk_size, k in [(203, 10), (50, 10), (13, 20)]:  # 13, 50, 203: not multiples of 8
    want_s, want_i = _numpy_topk(q, g, k)
    s, i = search.topk_search(q, g, k, chunk_size, mesh=mesh)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)


def test_ground_truth_ranks_equal_t2v_metrics():
  q, g = _int_data(4, num_queries=40, size=25)
  gt = np.random.default_rng(4).permutation(np.arange(40) % 25)  # 1-2 texts per video
  sim = q @ g.T
  want = retrieval.t2v_ranks(sim, gt) + 1
  mesh = jax.make_mesh((8,), ("data",))
  for kwargs in [dict(chunk_size=25), dict(chunk_size=6), dict(chunk_size=9, mesh=mesh)]:
    np.testing.assert_array_equal(search.ground_truth_ranks(q, g, gt, **kwargs), want)
  chunks = iter([g[:10], g[10:]])
  ranks = search.ground_truth_ranks(q, chunks, gt, 4, gt_embeddings=g[gt])
  np.testing.assert_array_equal(ranks, want)
  got = retrieval.metrics_from_ranks(ranks - 1, "t2v_")
  dense = retrieval.retrieval_metrics(sim, gt)
  assert got == {k: v for k, v in dense.items() if k.startswith("t2v_")}


def test_errors():
  q, g = _int_data(5, size=4)
  with pytest.raises(ValueError, match="exceeds the gallery size"):
    search.topk_search(q, g, 5)
  with pytest.raises(ValueError, match="'data' axis"):
    search.topk_search(q, g, 2, mesh=jax.make_mesh((8,), ("model",)))
  with pytest.raises(ValueError, match="gt_embeddings"):
    search.ground_truth_ranks(q, iter([g]), np.zeros(6, int))
