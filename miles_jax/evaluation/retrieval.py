"""Text-video retrieval metrics, computed the way the released MILES / Frozen code does.

Conventions (SPEC "Evaluation"; Frozen-in-Time `model/metric.py`, reused by MILES):
- A rank is the 1-based position of the ground truth in descending-similarity order.
- text→video (t2v): every text is a query against all videos; ties are broken
  optimistically, i.e. rank = 1 + #videos scoring strictly higher than the ground truth.
- video→text (v2t): every video is a query against all texts; a tie group is counted at
  its mean position, and a video with several captions takes its best-ranked caption
  (the other captions of the same video still compete, as in the original).
- R@K = 100·mean(rank ≤ K), MdR = median rank, MnR = mean rank. With averaged ties a rank
  can be fractional; as in the original, R@1 then needs rank == 1 exactly while R@K for
  K > 1 counts rank < K + 1 (0-based rank < K).

Multi-caption sets (MSVD, MSR-VTT full) are one row of `sim` per caption, with
`text_to_video` naming each caption's video; DiDeMo is paragraph→video, so its sentences are
joined into one text per video before encoding (data preparation), giving a square case.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RECALL_KS = (1, 5, 10, 50)
_ROW_BLOCK = 4096  # rows of `sim` compared at once; bounds the boolean temporaries


def cosine_similarity(text_emb, video_emb) -> np.ndarray:
  """[num_texts, num_videos] cosine similarity; each vector is divided by max(‖x‖, 1e-8)."""
  t = np.asarray(text_emb, dtype=np.float32)
  v = np.asarray(video_emb, dtype=np.float32)
  if t.ndim != 2 or v.ndim != 2 or t.shape[1] != v.shape[1]:
    raise ValueError(f"cosine_similarity: expected text_emb [N, D] and video_emb [M, D], got "
                     f"{t.shape} and {v.shape}; stack the embeddings into 2-D arrays.")
  # max(‖x‖, eps) rather than ‖x‖ + eps keeps unit vectors exactly unit (Frozen's sim_matrix).
  t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-8)
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  return t @ v.T


def flatten_captions(captions_per_video: Sequence[Sequence[str]]):
  """[[captions of video 0], ...] -> (texts, text_to_video) in the layout `sim` rows use."""
  texts, text_to_video = [], []
  for v, caps in enumerate(captions_per_video):
    if isinstance(caps, str):
      raise TypeError(f"flatten_captions: video {v} has a str, expected a list of captions; "
                      "wrap single captions as [caption] (DiDeMo: [' '.join(sentences)]).")
    texts.extend(caps)
    text_to_video.extend([v] * len(caps))
  return texts, np.asarray(text_to_video, dtype=np.int64)


def _check(sim, text_to_video):
  sim = np.asarray(sim)
  t2v = np.asarray(text_to_video)
  if sim.ndim != 2:
    raise ValueError(f"sim must be [num_texts, num_videos], got shape {sim.shape}.")
  num_texts, num_videos = sim.shape
  if t2v.shape != (num_texts,) or not np.issubdtype(t2v.dtype, np.integer):
    raise ValueError(f"text_to_video must be an int array of shape ({num_texts},) (one video "
                     f"index per row of sim), got {t2v.dtype} {t2v.shape}.")
  if num_texts and (t2v.min() < 0 or t2v.max() >= num_videos):
    raise ValueError(f"text_to_video values must lie in [0, {num_videos}), got "
                     f"[{t2v.min()}, {t2v.max()}]; is sim transposed?")
  if not np.all(np.isfinite(sim)):
    raise ValueError("sim has NaN/inf entries; check the embeddings (an all-zero or "
                     "non-finite vector) before ranking.")
  return sim, t2v


def t2v_ranks(sim, text_to_video) -> np.ndarray:
  """0-based text→video ranks [num_texts] (ties optimistic: #videos strictly higher)."""
  sim, t2v = _check(sim, text_to_video)
  gt = sim[np.arange(sim.shape[0]), t2v]
  ranks = np.empty(sim.shape[0], dtype=np.int64)
  for s in range(0, sim.shape[0], _ROW_BLOCK):
    block = slice(s, s + _ROW_BLOCK)
    ranks[block] = np.sum(sim[block] > gt[block, None], axis=1)
  return ranks


def v2t_ranks(sim, text_to_video) -> np.ndarray:
  """0-based video→text ranks [num_videos]: tie groups averaged, best caption per video."""
  sim, t2v = _check(sim, text_to_video)
  num_texts, num_videos = sim.shape
  ranks = np.full(num_videos, np.inf)
  cols = np.sort(sim, axis=0)  # each video's scores over all texts, ascending
  for v in range(num_videos):
    caps = np.flatnonzero(t2v == v)
    if caps.size == 0:
      raise ValueError(f"video {v} has no caption in text_to_video; drop captionless videos "
                       "from the gallery (columns of sim) before computing v2t metrics.")
    g = sim[caps, v]
    lo = np.searchsorted(cols[:, v], g, side="left")
    hi = np.searchsorted(cols[:, v], g, side="right")
    # Ascending positions lo..hi-1 hold the ties; #strictly higher = num_texts - hi.
    higher, ties = num_texts - hi, hi - lo
    ranks[v] = np.min(higher + (ties - 1) / 2.0)
  return ranks


def metrics_from_ranks(ranks0, prefix: str = "") -> dict:
  """R@{1,5,10,50} (%), MdR, MnR from 0-based ranks, as the original's cols2metrics."""
  r = np.asarray(ranks0, dtype=np.float64)
  if r.ndim != 1 or r.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}.")
  out = {}
  for k in RECALL_KS:
    hit = (r == 0) if k == 1 else (r < k)
    out[f"{prefix}R{k}"] = 100.0 * float(np.mean(hit))
  out[f"{prefix}MdR"] = float(np.median(r) + 1)
  out[f"{prefix}MnR"] = float(np.mean(r) + 1)
  return out


def v2t_ranks_max(sim, text_to_video) -> np.ndarray:
  """0-based video→text ranks [num_videos], CLIP4Clip family: each video's captions form one
  candidate scored by the max over them; the ground-truth set is ranked among the num_videos
  sets, ties optimistic (CLIP4Clip's `compute_metrics`: first position among equals)."""
  sim, t2v = _check(sim, text_to_video)
  num_videos = sim.shape[1]
  if np.bincount(t2v, minlength=num_videos).min() == 0:
    raise ValueError("v2t_ranks_max: some video has no caption in text_to_video.")
  grouped = np.full((num_videos, num_videos), -np.inf)  # [caption set g, video v]
  np.maximum.at(grouped, t2v, sim)
  scores = grouped.T  # [query video, caption set]
  gt = np.diagonal(scores)
  return np.sum(scores > gt[:, None], axis=1).astype(np.int64)


def dual_softmax(sim, temperature: float = 0.01, query_axis: int = 0) -> np.ndarray:
  """Dual-softmax (DSL) inference re-scoring (CAMoE, arXiv 2109.04290; used by the CLIP4Clip
  family): each score times the softmax of scores/temperature over the queries (`query_axis`)
  for the same candidate. t2v: sim [texts, videos], query_axis 0; v2t: query_axis 1."""
  x = np.asarray(sim, np.float64) / temperature
  x = np.exp(x - x.max(axis=query_axis, keepdims=True))
  prior = x / x.sum(axis=query_axis, keepdims=True)
  return np.asarray(sim, np.float64) * prior


def qb_norm(sim, bank_sim, beta: float = 20.0, k: int = 1) -> np.ndarray:
  """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022), rows = queries.

  `bank_sim` [bank queries, candidates]: the candidates some bank query ranks in its top k form
  the activation set; a test query whose top-1 candidate is in it gets its row replaced by
  exp(beta·s) / Σ_bank exp(beta·s_bank) per candidate; other rows are left unchanged.
  """
  sim = np.asarray(sim, np.float64)
  bank = np.asarray(bank_sim, np.float64)
  if bank.ndim != 2 or bank.shape[1] != sim.shape[1]:
    raise ValueError(f"qb_norm: bank_sim must be [bank queries, {sim.shape[1]}], got {bank.shape}")
  active = np.unique(np.argsort(-bank, axis=1, kind="stable")[:, :k])
  norm = np.exp(bank * beta).sum(axis=0)
  rows = np.isin(np.argmax(sim, axis=1), active)
  out = sim.copy()
  out[rows] = np.exp(sim[rows] * beta) / norm
  return out


V2T_MODES = ("frozen", "max")


def retrieval_metrics(sim: np.ndarray, text_to_video: np.ndarray, *, v2t_mode: str = "frozen",
                      sim_v2t=None) -> dict:
  """t2v_* and v2t_* R@1/5/10/50, MdR, MnR for sim [num_texts, num_videos].

  v2t_mode "frozen": rank among all captions, a video's best caption counts (Frozen / MILES);
  "max": rank among videos' caption sets scored by their max (CLIP4Clip family). `sim_v2t`:
  a separately post-processed matrix for the v2t direction (e.g. dual softmax).
  """
  sim, t2v = _check(sim, text_to_video)
  if v2t_mode not in V2T_MODES:
    raise ValueError(f"v2t_mode={v2t_mode!r}: use one of {V2T_MODES}")
  sim_v2t = sim if sim_v2t is None else _check(sim_v2t, t2v)[0]
  out = metrics_from_ranks(t2v_ranks(sim, t2v), "t2v_")
  ranks = v2t_ranks(sim_v2t, t2v) if v2t_mode == "frozen" else v2t_ranks_max(sim_v2t, t2v)
  out.update(metrics_from_ranks(ranks, "v2t_"))
  out["num_texts"], out["num_videos"] = sim.shape
  return out


def _median_of(cdf_at, n):
  """Median of a rank distribution on 1..n given its CDF; midpoint where the CDF hits 1/2."""
  cdf = np.array([cdf_at(r) for r in range(1, n + 1)])
  r = int(np.searchsorted(cdf, 0.5 - 1e-12)) + 1
  return r + 0.5 if abs(cdf[r - 1] - 0.5) < 1e-12 and r < n else float(r)


def _best_of_n_cdf(num_texts, n, r):
  """P(best of n ground-truth captions is within the top r of num_texts), random order."""
  # P(all n outside the top r) = C(T-r, n) / C(T, n), as a product to avoid huge binomials.
  if r >= num_texts - n + 1:
    return 1.0
  i = np.arange(n)
  return 1.0 - float(np.prod((num_texts - r - i) / (num_texts - i)))


def chance_metrics(num_texts: int, num_videos: int, text_to_video=None) -> dict:
  """Expected metrics of a uniformly random ranking (no ties), for a random-chance row."""
  t2v = (np.arange(num_texts) if text_to_video is None
         else np.asarray(text_to_video))
  if t2v.shape != (num_texts,):
    raise ValueError(f"text_to_video must have shape ({num_texts},), got {t2v.shape}.")
  out = {}
  # t2v: the ground truth's rank is uniform on 1..num_videos.
  for k in RECALL_KS:
    out[f"t2v_R{k}"] = 100.0 * min(k, num_videos) / num_videos
  out["t2v_MdR"] = _median_of(lambda r: r / num_videos, num_videos)
  out["t2v_MnR"] = (num_videos + 1) / 2.0
  # v2t: best of n_v ground-truth captions among num_texts; mix over videos.
  counts = np.bincount(t2v, minlength=num_videos)
  if np.any(counts == 0):
    raise ValueError("chance_metrics: some video has no caption in text_to_video.")
  ns, weights = np.unique(counts, return_counts=True)
  weights = weights / weights.sum()
  cdf = lambda r: float(sum(w * _best_of_n_cdf(num_texts, n, r) for n, w in zip(ns, weights)))
  for k in RECALL_KS:
    out[f"v2t_R{k}"] = 100.0 * cdf(min(k, num_texts))
  out["v2t_MdR"] = _median_of(cdf, num_texts)
  # E[min of n uniform positions out of T] = (T + 1) / (n + 1).
  out["v2t_MnR"] = float(sum(w * (num_texts + 1) / (n + 1) for n, w in zip(ns, weights)))
  out["num_texts"], out["num_videos"] = num_texts, num_videos
  return out


_COLUMNS = ("R1", "R5", "R10", "MdR", "MnR")


def format_table(metrics: Mapping, title: str = "") -> str:
  """The papers' table: one row per method, t2v then v2t R@1 R@5 R@10 MdR MnR.

  `metrics` is one `retrieval_metrics` dict, or {row name: metrics dict} for several rows
  (e.g. the model and the random-chance row).
  """
  rows = {"": metrics} if "t2v_R1" in metrics else dict(metrics)
  name_w = max([6] + [len(str(n)) for n in rows])
  head = ["R@1", "R@5", "R@10", "MdR", "MnR"]
  cell = lambda s: f"{s:>7}"
  lines = [title] if title else []
  lines.append(" " * name_w + " | " + "text → video".center(35) + " | "
               + "video → text".center(35))
  lines.append("method".ljust(name_w) + " | " + "".join(map(cell, head)) + " | "
               + "".join(map(cell, head)))
  lines.append("-" * len(lines[-1]))
  for name, m in rows.items():
    parts = []
    for d in ("t2v", "v2t"):
      parts.append("".join(cell(f"{m[f'{d}_{c}']:.1f}") for c in _COLUMNS))
    lines.append(str(name).ljust(name_w) + " | " + parts[0] + " | " + parts[1])
  return "\n".join(lines)


# The columns of a retrieval table (and of an ablation summary's rows).
TABLE_METRICS = tuple(f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR"))


def reference_rows(path: str, num_texts: int, names=("contrastive_only",)) -> dict:
  """{row label: mean metrics} of `names` from an ablation summary JSON (experiments/ablate.py
  writes it), for the final table of a run evaluated on the same held-out split (same number of
  texts); {} when it does not apply."""
  import json
  import os
  if not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    summary = json.load(f)
  if int(summary.get("data", {}).get("num_eval", -1)) != int(num_texts):
    return {}
  rows = {}
  for name in names:
    row = summary["variants"].get(name, {})
    if row.get("n") and all(m in row["mean"] for m in TABLE_METRICS):
      rows[f"{name} (ablation, mean of {row['n']} seed{'s' * (row['n'] > 1)})"] = row["mean"]
  return rows
