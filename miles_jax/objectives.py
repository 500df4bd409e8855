"""The pre-training losses as pure functions: contrastive (NormSoftmax), MVM regression, MAC masks.

All functions take plain arrays. Under `jax.jit` with batch-sharded inputs the arrays *are* the
global batch, so the contrastive loss is global with no extra code; under `shard_map` pass
`axis_name` and the loss gathers the other devices' embeddings itself.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from miles_jax.config_lib import OBJECTIVES  # the names live with the config checks

# Objectives with the masked-visual-modeling term: `miles` (with the contrastive term) and `mvm`
# (alone: video-only pre-training, no text, e.g. an MAE-style stage with mvm.target=pixels).
MVM_OBJECTIVES = frozenset({"miles", "mvm"})
MVM_LOSSES = ("smooth_l1", "l1", "l2", "cosine")


def parse_objectives(objectives: str | Sequence[str]) -> frozenset[str]:
  """`config.objectives` ('contrastive,miles') -> {'contrastive', 'miles'}, validated."""
  if isinstance(objectives, str):
    objectives = [o.strip() for o in objectives.split(",") if o.strip()]
  names = frozenset(objectives)
  unknown = names - set(OBJECTIVES)
  if not names or unknown:
    raise ValueError(f"config.objectives={','.join(objectives)!r}: use a comma list of "
                     f"{', '.join(OBJECTIVES)} (unknown: {sorted(unknown)})")
  return names


def l2_normalize(x, eps: float = 1e-8):
  """x / max(||x||, eps) along the last axis (the PyTorch original's `sim_matrix`)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def contrastive_loss(video_embed, text_embed, temperature: float, axis_name: str | None = None):
  """Symmetric NormSoftmax loss over the batch: v->t plus t->v cross-entropy on S/temperature.

  video_embed, text_embed: `[B, P]`; pair i is (video i, text i). Under `shard_map` give the
  batch's mesh `axis_name`: each device scores its own rows against the gathered columns and the
  mean is taken over the global batch, so value and gradients equal the single-device loss.
  """
  if axis_name is None:
    sim = l2_normalize(video_embed) @ l2_normalize(text_embed).T / temperature  # [B, B] cosines
    v2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(sim, axis=1)))
    t2v = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(sim, axis=0)))
    return v2t + t2v
  b = video_embed.shape[0]
  v, t = l2_normalize(video_embed), l2_normalize(text_embed)
  all_v = jax.lax.all_gather(v, axis_name, tiled=True)  # [G, P]
  all_t = jax.lax.all_gather(t, axis_name, tiled=True)
  labels = jax.lax.axis_index(axis_name) * b + jnp.arange(b)  # global index of local pairs
  # Rows of S owned here: local videos vs all texts (v->t), local texts vs all videos (t->v).
  v2t = jax.nn.log_softmax(v @ all_t.T / temperature, axis=1)  # [b, G]
  t2v = jax.nn.log_softmax(t @ all_v.T / temperature, axis=1)
  pick = lambda logp: jnp.take_along_axis(logp, labels[:, None], axis=1)  # [b, 1]
  local = pick(v2t) + pick(t2v)
  global_b = all_v.shape[0]
  return -jax.lax.psum(jnp.sum(local), axis_name) / global_b


def normalize_target(x, eps: float = 1e-6):
  """LayerNorm without affine over the feature axis (MVM targets)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _per_token_loss(pred, target, loss: str):
  """`[B, M, D]` x2 -> `[B, M]`, each token's loss averaged over features."""
  diff = pred - target
  if loss == "smooth_l1":  # PyTorch smooth_l1_loss with beta=1 (= Huber with delta=1)
    a = jnp.abs(diff)
    return jnp.mean(jnp.where(a < 1.0, 0.5 * diff * diff, a - 0.5), axis=-1)
  if loss == "l1":
    return jnp.mean(jnp.abs(diff), axis=-1)
  if loss == "l2":
    return jnp.mean(diff * diff, axis=-1)
  if loss == "cosine":
    return 1.0 - jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)
  raise ValueError(f"config.mvm.loss={loss!r}: use one of {', '.join(MVM_LOSSES)}")


def mvm_loss_sum(pred, target, mask, loss: str = "smooth_l1", normalize: bool = True):
  """Sum over masked tokens of the per-token regression loss (divide by the masked count).

  pred: online predictions `[B, M, D]` at every position; target: snapshot features `[B, M, D]`
  (gradient stopped here); mask: bool `[B, M]`, True = masked. Unmasked positions get weight 0,
  so shapes stay static and they receive exactly zero gradient.
  """
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  if normalize:
    target = normalize_target(target)
  per_token = _per_token_loss(pred.astype(jnp.float32), target, loss)  # [B, M]
  # where (not multiply) so a non-finite prediction at a visible position cannot leak in.
  return jnp.sum(jnp.where(mask, per_token, 0.0))


def mvm_loss(pred, target, mask, loss: str = "smooth_l1", normalize: bool = True):
  """Mean over masked tokens (of the whole batch) of the per-token regression loss."""
  count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  return mvm_loss_sum(pred, target, mask, loss, normalize) / count


def random_token_mask(rng, batch: int, num_tokens: int, num_masked: int):
  """bool `[batch, num_tokens]` with exactly `num_masked` True per row, uniform (MAC video)."""
  scores = jax.random.uniform(rng, (batch, num_tokens))
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  return ranks < num_masked


def drop_text_tokens(rng, attention_mask, ratio: float):
  """Zeroes the attention mask of `ratio` of each caption's tokens, never the first ([CLS]).

  The dropped count is floor(ratio * (valid tokens - 1)) per caption; dropped tokens are then
  invisible to every query, as if gathered out (MAC text masking), while shapes stay static.
  """
  attention_mask = attention_mask.astype(jnp.int32)
  b, length = attention_mask.shape
  droppable = (attention_mask > 0) & (jnp.arange(length) > 0)[None]  # [B, L]
  num_drop = jnp.floor(ratio * jnp.sum(droppable, axis=1)).astype(jnp.int32)  # [B]
  # Random scores, non-droppable tokens last; drop the num_drop lowest-ranked.
  scores = jnp.where(droppable, jax.random.uniform(rng, (b, length)), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  dropped = ranks < num_drop[:, None]
  return jnp.where(dropped, 0, attention_mask)
