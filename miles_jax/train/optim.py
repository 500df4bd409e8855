"""AdamW with warm-up + decay, clipping and a weight-decay mask; the snapshot momentum schedule."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax

# Parameters that never get weight decay (SPEC: none on norms, biases, embeddings, tokens).
NO_DECAY_LEAVES = ("bias", "scale", "embedding")  # Dense/Conv/LayerNorm biases, LN scales, nn.Embed
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "temporal_embed", "word_embeddings",
                  "position_embeddings")
_NORM_RE = re.compile(r"^(norm\w*|ln\w*|\w*layer_?norm\w*)$", re.IGNORECASE)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decays(names: tuple[str, ...]) -> bool:
  """Whether the parameter at this path (module names ..., leaf name) gets weight decay."""
  if names[-1] in NO_DECAY_LEAVES:
    return False
  return not any(n in NO_DECAY_NAMES or _NORM_RE.match(n) for n in names)


def weight_decay_mask(params):
  """Tree of bools, True where weight decay applies (kernels of Dense/Conv layers)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(_path_names(p)), params)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to `optim.lr`, then cosine | linear decay to lr*min_lr_ratio, or flat."""
  o = config.optim
  total = int(config.train.steps)
  warmup = int(o.warmup_steps)
  end = o.lr * o.min_lr_ratio
  decay_steps = max(total - warmup, 1)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(o.lr, end, decay_steps)
  elif o.schedule == "constant":
    decay = optax.constant_schedule(o.lr)
  else:
    raise ValueError(f"config.optim.schedule={o.schedule!r}: use cosine, linear or constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with clipping and masked decay, its learning-rate schedule) from `config.optim`."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule


def snapshot_momentum(config, step):
  """EMA momentum m at `step`: constant, or cosine from snapshot.momentum up to 1 over training."""
  s = config.snapshot
  m = jnp.asarray(s.momentum, jnp.float32)
  if s.schedule == "constant":
    return m
  if s.schedule == "cosine":
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(config.train.steps), 1), 0.0, 1.0)
    return 1.0 - (1.0 - m) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
  raise ValueError(f"config.snapshot.schedule={s.schedule!r}: use constant or cosine")
