"""masking.py: exact counts, per-frame structure, determinism, validation."""
import numpy as np
import pytest

from miles_jax import masking

GRIDS = [(4, 4), (7, 5), (14, 14)]


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.9])
def test_exact_count(strategy, grid, ratio):
  t, n = 3, grid[0] * grid[1]
  want = (round(ratio * t * n + 1e-9) if strategy == "random" else
          t * int(np.floor(ratio * n + 0.5)))
  assert masking.num_masked(strategy, t, grid, ratio) == want
  rng = np.random.default_rng(0)
  for _ in range(5):
    m = masking.sample_mask(rng, strategy, t, grid, ratio)
    assert m.dtype == bool and m.shape == (t * n,)
    assert m.sum() == want


def test_blockwise_count_is_per_frame():
  m = masking.sample_mask(np.random.default_rng(1), "blockwise", 4, (14, 14), 0.5)
  assert (m.reshape(4, 196).sum(1) == 98).all()
  # frames are drawn independently
  f = m.reshape(4, 196)
  assert not all((f[0] == f[i]).all() for i in range(1, 4))


def test_tube_is_equal_across_frames():
  m = masking.sample_mask(np.random.default_rng(2), "tube", 5, (6, 8), 0.4).reshape(5, 48)
  assert (m == m[0]).all() and m[0].sum() == round(0.4 * 48)


def _neighbour_pairs(frame):
  return (frame[1:] & frame[:-1]).sum() + (frame[:, 1:] & frame[:, :-1]).sum()


def test_blockwise_forms_blocks():
  """Masked patches touch each other far more often than under uniform random masking."""
  rng = np.random.default_rng(3)
  block = np.mean([_neighbour_pairs(masking.sample_mask(rng, "blockwise", 1, (14, 14), 0.3)
                                    .reshape(14, 14)) for _ in range(50)])
  rand = np.mean([_neighbour_pairs(masking.sample_mask(rng, "random", 1, (14, 14), 0.3)
                                   .reshape(14, 14)) for _ in range(50)])
  # random: about 2*13*14*0.3^2 = 33 pairs; rectangles of >= 4 patches give many more
  assert block > 1.5 * rand


def test_random_covers_frames_unevenly():
  m = masking.sample_mask(np.random.default_rng(4), "random", 4, (8, 8), 0.5).reshape(4, 64)
  assert m.sum() == 128 and len(set(m.sum(1))) > 1


def test_deterministic_and_batch_independent():
  a = masking.sample_masks((7, 1), [0, 1, 2, 3], "blockwise", 2, (7, 7), 0.5)
  b = masking.sample_masks((7, 1), [2, 9], "blockwise", 2, (7, 7), 0.5)
  assert a.shape == (4, 98)
  np.testing.assert_array_equal(a[2], b[0])  # row depends on (seed, index) only
  assert not (a[0] == a[1]).all()
  c = masking.sample_masks((8, 1), [0], "blockwise", 2, (7, 7), 0.5)
  assert not (a[0] == c[0]).all()
  np.testing.assert_array_equal(
      masking.sample_mask(np.random.default_rng(5), "tube", 2, (4, 4), 0.5),
      masking.sample_mask(np.random.default_rng(5), "tube", 2, (4, 4), 0.5))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio(ratio):
  with pytest.raises(ValueError, match=r"mask.ratio"):
    masking.num_masked("random", 2, (4, 4), ratio)


def test_bad_strategy_and_grid():
  with pytest.raises(ValueError, match="mask.strategy"):
    masking.sample_mask(np.random.default_rng(0), "stripes", 2, (4, 4), 0.5)
  with pytest.raises(ValueError, match="grid"):
    masking.num_masked("tube", 2, (0, 4), 0.5)
