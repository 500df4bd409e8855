"""Zero-shot action recognition as video→text retrieval over class-name prompts.

Each class name is normalised ("ApplyEyeMakeup" → "apply eye makeup", "brush_hair" →
"brush hair"), put into every prompt template, encoded by the caller's `encode_text`, and
the per-template embeddings are combined into one class embedding. A video's prediction is
the class of highest cosine similarity. HMDB51 and UCF101 are reported as top-1 per split
and the mean over their three splits (SPEC "Evaluation").
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

from miles_jax.evaluation import retrieval

# **default** (the papers do not list their prompts): the bare name plus short sentences;
# "{}" receives the normalised class name.
DEFAULT_TEMPLATES = (
    "{}",
    "a video of {}.",
    "a video of a person {}.",
    "a person is {}.",
    "a person doing {}.",
)

# CamelCase boundaries: "ApplyEyeMakeup", "YoYo", and acronyms ("PlayingTV" → "playing tv").
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def normalize_label(name: str) -> str:
  """Dataset label → lower-case words: CamelCase, snake_case and dashes become spaces."""
  words = _CAMEL.sub(" ", name.strip())
  words = re.sub(r"[_\-]+", " ", words)
  return re.sub(r"\s+", " ", words).strip().lower()


def _unit(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-8)


def class_embeddings(class_names: Sequence[str], encode_text: Callable,
                     templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                     reduce: str = "mean", normalize_names: bool = True) -> np.ndarray:
  """[num_classes, D] unit class embeddings from prompt templates.

  reduce="mean": normalise each prompt's embedding, average over templates, re-normalise
  (the usual prompt ensemble); "mean_raw": average the raw embeddings, then normalise.
  `encode_text(list_of_strings)` returns [len(list), D].
  """
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"templates must be non-empty and each contain '{{}}', got {templates!r}.")
  if reduce not in ("mean", "mean_raw"):
    raise ValueError(f"reduce must be 'mean' or 'mean_raw', got {reduce!r}.")
  names = [normalize_label(c) if normalize_names else c for c in class_names]
  prompts = [t.format(c) for c in names for t in templates]
  emb = np.asarray(encode_text(prompts), dtype=np.float32)
  if emb.ndim != 2 or emb.shape[0] != len(prompts):
    raise ValueError(f"encode_text returned shape {emb.shape}, expected ({len(prompts)}, D): "
                     "one embedding per input string.")
  emb = emb.reshape(len(names), len(templates), -1)  # [C, P, D]
  if reduce == "mean":
    emb = _unit(emb)
  return _unit(emb.mean(axis=1))


def zeroshot_accuracy(video_emb, class_emb, labels, topk: Sequence[int] = (1, 5)) -> dict:
  """Top-k accuracy (%) of cosine video→class retrieval; ties averaged as in v2t."""
  sim = retrieval.cosine_similarity(video_emb, class_emb)  # [N, C]
  labels = np.asarray(labels)
  if labels.shape != (sim.shape[0],):
    raise ValueError(f"labels must have shape ({sim.shape[0]},) (one class index per video), "
                     f"got {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= sim.shape[1]):
    raise ValueError(f"labels must lie in [0, {sim.shape[1]}) (the class_emb rows).")
  gt = sim[np.arange(sim.shape[0]), labels][:, None]
  higher = np.sum(sim > gt, axis=1)
  ties = np.sum(sim == gt, axis=1)
  rank0 = higher + (ties - 1) / 2.0  # v2t convention: mean position of the tie group
  out = {}
  for k in topk:
    hit = (rank0 == 0) if k == 1 else (rank0 < k)
    out[f"top{k}"] = 100.0 * float(np.mean(hit))
  return out


def zeroshot_classify(video_emb, labels, class_names: Sequence[str], encode_text: Callable,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                      topk: Sequence[int] = (1, 5), **kwargs) -> dict:
  """class_embeddings + zeroshot_accuracy in one call (kwargs go to class_embeddings)."""
  class_emb = class_embeddings(class_names, encode_text, templates, **kwargs)
  return zeroshot_accuracy(video_emb, class_emb, labels, topk)


def mean_over_splits(per_split: Mapping, expected_splits: int | None = 3) -> dict:
  """{split: acc} → the same plus "mean"; acc is a number or a dict such as {"top1": ...}."""
  if not per_split:
    raise ValueError("mean_over_splits: no splits given.")
  if expected_splits is not None and len(per_split) != expected_splits:
    raise ValueError(f"mean_over_splits: got {len(per_split)} splits {sorted(per_split)}, "
                     f"HMDB51/UCF101 report the mean over {expected_splits}; pass all of them "
                     "or expected_splits=None.")
  out = dict(per_split)
  values = list(per_split.values())
  if all(isinstance(v, Mapping) for v in values):
    keys = set(values[0])
    if any(set(v) != keys for v in values):
      raise ValueError("mean_over_splits: splits report different metrics; use the same "
                       "topk for every split.")
    out["mean"] = {k: float(np.mean([v[k] for v in values])) for k in sorted(keys)}
  else:
    out["mean"] = float(np.mean([float(v) for v in values]))
  return out
