"""Masks for masked visual modeling over T x N patches: random, blockwise (BEiT) and tube.

Pure numpy and seeded. A mask is bool `[T * N]`, frame-major (index `t * N + n`, with
`n = row * grid_w + col`), True = masked. The number of masked patches depends only on
(strategy, T, grid, ratio) — see `num_masked` — so masked-token shapes are static under jit.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

STRATEGIES = ("blockwise", "tube", "random")

# BEiT's block shape prior: aspect ratio log-uniform in [0.3, 1/0.3], at least 4 patches a block
# (fewer when the whole per-frame budget is smaller).
_MIN_BLOCK_PATCHES = 4
_MIN_ASPECT = 0.3
_MAX_BLOCK_ATTEMPTS = 100


def _check(strategy: str, num_frames: int, grid_hw: Sequence[int], ratio: float):
  if strategy not in STRATEGIES:
    raise ValueError(f"mask.strategy={strategy!r} is unknown: use one of {STRATEGIES}")
  if not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f"mask.ratio={ratio} must be in [0, 1): the fraction of patches masked")
  if int(num_frames) < 1:
    raise ValueError(f"num_frames={num_frames} must be >= 1")
  gh, gw = (int(g) for g in grid_hw)
  if gh < 1 or gw < 1:
    raise ValueError(f"patch grid {tuple(grid_hw)} must be positive: img_size // patch_size")
  return gh, gw


def _round(x: float) -> int:
  return int(math.floor(x + 0.5))  # half up, not Python's banker's rounding


def num_masked(strategy: str, num_frames: int, grid_hw: Sequence[int], ratio: float) -> int:
  """Exact number of masked patches in every mask of this (strategy, T, grid, ratio)."""
  gh, gw = _check(strategy, num_frames, grid_hw, ratio)
  n = gh * gw
  if strategy == "random":
    return _round(ratio * num_frames * n)
  # blockwise and tube mask the same count in every frame
  return num_frames * _round(ratio * n)


def _blockwise_frame(rng: np.random.Generator, gh: int, gw: int, k: int) -> np.ndarray:
  """BEiT-style rectangles on one [gh, gw] frame until exactly k patches are masked."""
  mask = np.zeros((gh, gw), bool)
  count = 0
  min_area = min(_MIN_BLOCK_PATCHES, k)
  log_aspect = (math.log(_MIN_ASPECT), math.log(1.0 / _MIN_ASPECT))
  # One draw of uniforms for all attempts: per-call Generator overhead dominated otherwise.
  u = rng.random((_MAX_BLOCK_ATTEMPTS, 4))
  for a in range(_MAX_BLOCK_ATTEMPTS):
    if count >= k:
      break
    area = min_area + u[a, 0] * (max(min_area, k - count) - min_area)
    aspect = math.exp(log_aspect[0] + u[a, 1] * (log_aspect[1] - log_aspect[0]))
    h = min(max(_round(math.sqrt(area * aspect)), 1), gh)
    w = min(max(_round(math.sqrt(area / aspect)), 1), gw)
    top = int(u[a, 2] * (gh - h + 1))
    left = int(u[a, 3] * (gw - w + 1))
    window = mask[top:top + h, left:left + w]  # a view: writes land in mask
    free = ~window
    num_new = int(free.sum())
    if num_new <= k - count:
      window[...] = True
      count += num_new
    else:
      # The block overshoots: mask a random part of its new patches so the count is exact.
      rows, cols = np.nonzero(free)
      pick = rng.choice(num_new, k - count, replace=False)
      window[rows[pick], cols[pick]] = True
      count = k
  if count < k:  # rare (tiny grids): top up with random free patches
    free = np.flatnonzero(~mask)
    mask.flat[rng.choice(free, k - count, replace=False)] = True
  return mask.reshape(-1)


def sample_mask(rng: np.random.Generator, strategy: str, num_frames: int,
                grid_hw: Sequence[int], ratio: float) -> np.ndarray:
  """One mask, bool [T * N] frame-major, with exactly `num_masked(...)` True entries."""
  gh, gw = _check(strategy, num_frames, grid_hw, ratio)
  n = gh * gw
  if strategy == "random":
    mask = np.zeros(num_frames * n, bool)
    mask[rng.choice(num_frames * n, num_masked(strategy, num_frames, grid_hw, ratio),
                    replace=False)] = True
    return mask
  k = _round(ratio * n)
  if strategy == "tube":
    return np.tile(_blockwise_frame(rng, gh, gw, k), num_frames)
  return np.concatenate([_blockwise_frame(rng, gh, gw, k) for _ in range(num_frames)])


def _seed_words(seed) -> list:
  words = list(seed) if isinstance(seed, (tuple, list, np.ndarray)) else [seed]
  out = [int(w) for w in words]
  if any(w < 0 for w in out):
    raise ValueError(f"mask seed {seed} must be non-negative integers")
  return out


def sample_masks(seed, sample_index: Iterable[int], strategy: str, num_frames: int,
                 grid_hw: Sequence[int], ratio: float) -> np.ndarray:
  """Masks bool [B, T * N]; row b depends only on (seed, sample_index[b]), not on the batch.

  `seed` is an int or a tuple of ints (e.g. (seed, epoch)), so a sample's mask is the same
  whatever batch or host it lands in.
  """
  words = _seed_words(seed)
  rows = [sample_mask(np.random.default_rng(words + [int(i)]), strategy, num_frames, grid_hw,
                      ratio) for i in np.asarray(sample_index).reshape(-1)]
  if not rows:
    gh, gw = _check(strategy, num_frames, grid_hw, ratio)
    return np.zeros((0, num_frames * gh * gw), bool)
  return np.stack(rows)
