"""Evaluators the train loop (and `python -m miles_jax.evaluate`) run: each has `run(params)`.

`RetrievalEvaluator`: text->video / video->text retrieval on `data.eval` shards.
`ZeroShotEvaluator`: video->text over class-name prompts for labelled shards (HMDB51, UCF101).
"""
from __future__ import annotations

import numpy as np

from miles_jax.data import pipeline
from miles_jax.evaluation import extract, retrieval, zeroshot


class RetrievalEvaluator:
  name = "retrieval"

  def __init__(self, config, mesh, rules, pattern: str | None = None, eval_set=None):
    self.config = config
    self.pattern = pattern or config.data.eval
    self.eval_set = eval_set or pipeline.load_eval_set(
        self.pattern, config, batch_size=config.data.eval_batch_size,
        process_index=_pi(), process_count=_pc())
    self.embedder = extract.Embedder(config.model, mesh, rules)

  def embeddings(self, params):
    e, b = self.eval_set, self.config.data.eval_batch_size
    return (self.embedder.texts(params, e.input_ids, e.attention_mask, b),
            self.embedder.videos(params, e, b))

  def run(self, params, cache: str | None = None) -> dict:
    text, video = extract.cached_embeddings(cache, lambda: self.embeddings(params))
    sim = retrieval.cosine_similarity(text, video)
    out = retrieval.retrieval_metrics(sim, self.eval_set.text_to_video)
    out["num_texts"], out["num_videos"] = sim.shape
    return out

  def chance(self) -> dict:
    e = self.eval_set
    return retrieval.chance_metrics(len(e.texts), len(e.video_ids), e.text_to_video)


class ZeroShotEvaluator(RetrievalEvaluator):
  name = "zeroshot"

  def run(self, params, cache: str | None = None) -> dict:
    e = self.eval_set
    if e.labels is None:
      raise ValueError(f"{self.pattern}: the shards carry no labels, so zero-shot "
                       "classification cannot run (prepare them with --format hmdb51/ucf101)")
    video = self.embedder.videos(params, e, self.config.data.eval_batch_size)
    tok = self.eval_set_tokenizer()

    def encode_text(strings):
      ids, att = tok.tokenize_numpy(list(strings))
      return self.embedder.texts(params, ids, att, self.config.data.eval_batch_size)

    return zeroshot.zeroshot_classify(video, e.labels, e.class_names, encode_text)

  def eval_set_tokenizer(self):
    from miles_jax.data.tokenizers import build_tokenizer
    return build_tokenizer(self.config.data.tokenizer, self.config.data.max_len)


def _pi():
  import jax
  return jax.process_index()


def _pc():
  import jax
  return jax.process_count()


def summary(metrics: dict) -> dict:
  """The scalars worth logging (floats only)."""
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
