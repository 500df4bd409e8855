"""Evaluators the train loop (and `python -m miles_jax.evaluate`) run: each has `run(params)`.

`RetrievalEvaluator`: text->video / video->text retrieval on `data.eval` shards.
`ZeroShotEvaluator`: video->text over class-name prompts for labelled shards (HMDB51, UCF101).
"""
from __future__ import annotations

import os

import numpy as np

from miles_jax import config_lib
from miles_jax.data import pipeline
from miles_jax.evaluation import extract, protocol, retrieval, zeroshot


class RetrievalEvaluator:
  name = "retrieval"

  def __init__(self, config, mesh, rules, pattern: str | None = None, eval_set=None,
               split: str | None = None):
    self.config = config
    self.pattern = pattern or config.data.eval
    self.split = split or config_lib.split_name(self.pattern)
    self.eval_set = eval_set or pipeline.load_eval_set(
        self.pattern, config, batch_size=config.data.eval_batch_size,
        process_index=_pi(), process_count=_pc())
    self.embedder = extract.Embedder(config.model, mesh, rules, self.eval_set.num_clips)
    self._protocol = None

  def protocol(self) -> dict:
    """The recorded protocol of this evaluation (evaluation/protocol.py)."""
    if self._protocol is None:
      self._protocol = protocol.describe(self.config, self.eval_set,
                                         pipeline.list_files(self.pattern, "data.eval"),
                                         self.split)
    return self._protocol

  def embeddings(self, params):
    e, b = self.eval_set, self.config.data.eval_batch_size
    return (self.embedder.texts(params, e.input_ids, e.attention_mask, b),
            self.embedder.videos(params, e, b))

  def cached(self, params, cache_dir: str | None, params_fp: str | None = None):
    """(text, video) embeddings, from `cache_dir` when it holds this exact evaluation's."""
    if not cache_dir:
      return self.embeddings(params)
    key = protocol.cache_key(params_fp or protocol.params_fingerprint(params), self.protocol(),
                             self.config.model)
    e = self.eval_set
    return extract.cached_embeddings(os.path.join(cache_dir, f"embeddings-{key[:24]}.npz"),
                                     lambda: self.embeddings(params), key, e.video_ids, e.texts)

  def run(self, params, cache_dir: str | None = None, params_fp: str | None = None) -> dict:
    text, video = self.cached(params, cache_dir, params_fp)
    sim = retrieval.cosine_similarity(text, video)
    ev = self.config.get("eval")
    sim_v2t, mode = None, "frozen"
    if ev is not None:
      mode = ev.v2t_multi_caption
      if ev.post == "dsl":
        sim, sim_v2t = (retrieval.dual_softmax(sim, ev.dsl_temperature, 0),
                        retrieval.dual_softmax(sim, ev.dsl_temperature, 1))
      elif ev.post == "qbnorm":
        sim_v2t = sim
        bank = self.query_bank_embeddings(params)
        sim = retrieval.qb_norm(sim, retrieval.cosine_similarity(bank, video),
                                ev.qbnorm_beta, ev.qbnorm_k)
    out = retrieval.retrieval_metrics(sim, self.eval_set.text_to_video, v2t_mode=mode,
                                      sim_v2t=sim_v2t)
    out["protocol"] = self.protocol()
    return out

  def query_bank_embeddings(self, params):
    """QB-Norm's query bank: every caption of the eval.qbnorm_bank shards, embedded."""
    from miles_jax.data import tokenizers
    texts = pipeline.read_captions(self.config.eval.qbnorm_bank, "eval.qbnorm_bank")
    tok = tokenizers.build_tokenizer(self.config.data.tokenizer,
                                     pipeline.eval_max_len(self.config))
    ids, att = tok.tokenize_numpy(texts)
    return self.embedder.texts(params, ids, att, self.config.data.eval_batch_size)

  def chance(self) -> dict:
    e = self.eval_set
    return retrieval.chance_metrics(len(e.texts), len(e.video_ids), e.text_to_video)


class ZeroShotEvaluator(RetrievalEvaluator):
  name = "zeroshot"

  def run(self, params, cache_dir: str | None = None, params_fp: str | None = None) -> dict:
    e = self.eval_set
    if e.labels is None:
      raise ValueError(f"{self.pattern}: the shards carry no labels, so zero-shot "
                       "classification cannot run (prepare them with --format hmdb51/ucf101)")
    video = self.embedder.videos(params, e, self.config.data.eval_batch_size)
    tok = self.eval_set_tokenizer()

    def encode_text(strings):
      ids, att = tok.tokenize_numpy(list(strings))
      used = max(int(att.sum(1).max()), 1)  # pad to the longest prompt only (padding is masked)
      return self.embedder.texts(params, ids[:, :used], att[:, :used],
                                 self.config.data.eval_batch_size)

    zs = self.config.get("zeroshot")
    templates = tuple(zs.templates) if zs is not None else zeroshot.DEFAULT_TEMPLATES
    reduce = zs.reduce if zs is not None else "mean"
    out = zeroshot.zeroshot_classify(video, e.labels, e.class_names, encode_text, templates,
                                     reduce=reduce)
    out["protocol"] = dict(self.protocol(), templates=list(templates), reduce=reduce,
                           num_classes=len(e.class_names))
    return out

  def eval_set_tokenizer(self):
    from miles_jax.data.tokenizers import build_tokenizer
    return build_tokenizer(self.config.data.tokenizer, pipeline.eval_max_len(self.config))


def _pi():
  import jax
  return jax.process_index()


def _pc():
  import jax
  return jax.process_count()


def summary(metrics: dict) -> dict:
  """The scalars worth logging (floats only; the protocol dict is left out)."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
