"""The MILES train step: contrastive + masked visual modeling against an EMA snapshot encoder.

One jitted function `(state, batch) -> (state, metrics)`:
  1. uint8 frames -> ImageNet-normalised float32 on the device;
  2. snapshot encoder on the intact clip (no gradient: computed outside the differentiated
     function) -> MVM targets (`mvm.target`: the EMA snapshot; a frozen copy of the initial
     encoder; or the clip's patch pixels);
  3. online forwards: text; video with the MVM mask (miles, mvm) and / or intact (contrastive,
     miles with mvm.unmasked_contrastive); MAC views
     with masked tokens dropped and text tokens dropped (mac);
  4. losses, gradients, AdamW update, then the EMA update of the snapshot from the new params.

With `optim.grad_accum_steps = k > 1` the batch is cut into k micro-batches and the step is
GradCache-style: a first pass embeds every micro-batch without keeping activations, the
contrastive loss and its gradient w.r.t. the embeddings are computed over the *whole* batch, and a
second pass back-propagates those embedding gradients (plus the per-token MVM loss) micro-batch by
micro-batch. The update therefore equals the full-batch step, at the cost of one extra forward.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from miles_jax import config_lib, objectives, parallel
from miles_jax.models import dual_encoder
from miles_jax.models.video import VideoEncoder, normalize_frames, patchify
from miles_jax.train import optim
from miles_jax.train.state import TrainState, train_state_shardings

METRICS = ("loss", "contrastive_loss", "mvm_loss", "mac_loss", "lr", "grad_norm",
           "snapshot_momentum")


def _num_tokens(config, frames_shape) -> tuple[int, int]:
  """(T*N, tokens MAC masks) for a clip shape; static under jit."""
  _, t, h, w, _ = frames_shape
  p = config.model.video.patch_size
  total = t * (h // p) * (w // p)
  return total, int(round(config.mac.video_ratio * total))


class _Losses:
  """The step's forward passes and losses for one config (objectives fixed at trace time)."""

  def __init__(self, config, model, step=None):
    self.config = config
    self.model = model
    self.objectives = objectives.parse_objectives(config.objectives)
    # lambda of L = L_contrastive + lambda * L_mvm; 0 before `mvm.start_step` (the snapshot
    # is trained as an EMA from step 0, its targets only used once the encoder is text-aligned).
    self.mvm = bool(self.objectives & objectives.MVM_OBJECTIVES)
    self.mvm_weight = float(config.mvm.weight) if self.mvm else 0.0
    start = int(config.mvm.get("start_step", 0))
    if self.mvm_weight and start > 0 and step is not None:
      self.mvm_weight = jnp.where(step >= start, self.mvm_weight, 0.0).astype(jnp.float32)
    if config.mvm.loss not in objectives.MVM_LOSSES:
      raise ValueError(f"config.mvm.loss={config.mvm.loss!r}: use one of "
                       f"{', '.join(objectives.MVM_LOSSES)}")
    self.snapshot = VideoEncoder(config.model.video, model.dtype,
                                 matmul_dtype=model.matmul_dtype, kernels=model.kernels,
                                 scan_layers=bool(config.model.get("scan_layers", False)))

  def _apply(self, params, method, *args, rng=None, **kwargs):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)

  def targets(self, snapshot_params, frames):
    """MVM targets of the intact clip, gradient stopped: snapshot (or frozen initial) encoder
    features `[B, T*N, D or P]`, or its patch pixels `[B, T*N, p*p*3]` (`mvm.target=pixels`)."""
    if not self.mvm:
      return None
    if self.config.mvm.get("target", "snapshot") == "pixels":
      return jax.lax.stop_gradient(patchify(frames, self.config.model.video.patch_size))
    out = self.snapshot.apply({"params": snapshot_params["video"]}, frames)["patches"]
    if self.config.mvm.target_space == "projected":
      out = self.model.apply({"params": {"video_proj": snapshot_params["video_proj"]}}, out,
                             method="project_video")
    return jax.lax.stop_gradient(out)

  def forward(self, params, batch, targets, rng):
    """Per-sample part: embeddings of every view `{name: [b, P]}` and the MVM loss *sum*.

    `targets` None skips the MVM term (the GradCache embedding pass).
    """
    objs, c = self.objectives, self.config
    det = dict(deterministic=False, rng=rng)
    frames = batch["frames"]
    embeds, mvm_sum = {}, jnp.zeros((), jnp.float32)
    if self.mvm:  # the online encoder on the masked clip
      mask = batch["mvm_mask"]
      video = self._apply(params, "encode_video", frames, mask, **det)
      if targets is not None:
        pred = self._apply(params, "predict_mvm", video["patches"])
        if c.mvm.target_space == "projected":
          pred = self._apply(params, "project_video", pred)
        mvm_sum = objectives.mvm_loss_sum(pred, targets, mask, c.mvm.loss,
                                          c.mvm.normalize_target)
    if objs & {"contrastive", "miles"}:
      embeds["text"] = self._apply(params, "encode_text", batch["input_ids"],
                                   batch["attention_mask"], **det)["embed"]
      if "miles" in objs and not c.mvm.unmasked_contrastive:
        embeds["video"] = video["embed"]  # the paper's one forward: contrastive on the masked clip
      else:
        embeds["video"] = self._apply(params, "encode_video", frames, **det)["embed"]
    if "mac" in objs:
      _, num_masked = _num_tokens(c, frames.shape)
      embeds["mac_video"] = self._apply(params, "encode_video", frames, batch["mac_mask"],
                                        drop_masked=True, num_masked=num_masked, **det)["embed"]
      embeds["mac_text"] = self._apply(params, "encode_text", batch["input_ids"],
                                       batch["mac_attention_mask"], **det)["embed"]
    return embeds, mvm_sum

  def combine(self, embeds, mvm_sum, mvm_count):
    """Global part: contrastive terms over the whole batch -> (loss, per-term metrics)."""
    tau = self.config.temperature
    zero = jnp.zeros((), jnp.float32)
    terms = {"contrastive_loss": zero, "mvm_loss": mvm_sum / mvm_count, "mac_loss": zero}
    if "video" in embeds:
      terms["contrastive_loss"] = objectives.contrastive_loss(embeds["video"], embeds["text"], tau)
    if "mac_video" in embeds:
      terms["mac_loss"] = objectives.contrastive_loss(embeds["mac_video"], embeds["mac_text"], tau)
    loss = terms["contrastive_loss"] + self.mvm_weight * terms["mvm_loss"] + terms["mac_loss"]
    return loss, terms


def _split(x, k: int):
  """`[B, ...]` -> `[k, B/k, ...]`, micro-batch j = rows j, j+k, ... (stays device-local when
  each device's rows are a multiple of k)."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _merge(x):
  """Inverse of `_split`."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _like_params(grads, param_shardings):
  """Gradients laid out like their params before the optimiser reads them, so the update runs on
  each device's shard (under FSDP the TPU compiler reduce-scatters them over the fsdp axis;
  docs/plan.md)."""
  if param_shardings is None:
    return grads
  return jax.lax.with_sharding_constraint(grads, param_shardings)


def _loss_and_grads(losses: _Losses, params, snapshot_params, batch, rng, k: int,
                    micro_sharding: NamedSharding | None, param_shardings=None):
  """(loss, terms, grads) of the full batch; GradCache over k micro-batches when k > 1."""
  mask = batch.get("mvm_mask")
  mvm_count = (jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0) if mask is not None
               else jnp.ones((), jnp.float32))
  if k == 1:
    targets = losses.targets(snapshot_params, batch["frames"])

    def loss_fn(p):
      embeds, mvm_sum = losses.forward(p, batch, targets, rng)
      return losses.combine(embeds, mvm_sum, mvm_count)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, terms, _like_params(grads, param_shardings)

  micro = jax.tree.map(lambda x: _split(x, k), batch)
  if micro_sharding is not None:
    micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, micro_sharding), micro)
  rngs = jax.random.split(rng, k)

  # Pass 1: embeddings of every micro-batch, activations not kept.
  def embed(_, xs):
    mb, r = xs
    return None, losses.forward(params, mb, None, r)[0]
  _, embeds = jax.lax.scan(embed, None, (micro, rngs))
  embeds = jax.tree.map(_merge, embeds)  # [B, P] each, original batch order

  # The global part of the loss and its gradient w.r.t. the embeddings.
  def global_loss(e):
    return losses.combine(e, jnp.zeros((), jnp.float32), mvm_count)
  (_, terms), d_embeds = jax.value_and_grad(global_loss, has_aux=True)(embeds)
  d_embeds = jax.tree.map(lambda x: _split(x, k), d_embeds)
  weight = losses.mvm_weight
  d_mvm_sum = jnp.asarray(weight, jnp.float32) / mvm_count

  # Pass 2: back-propagate each micro-batch's embedding gradients (+ its MVM term).
  def backward(acc, xs):
    mb, r, d_e = xs
    grads_acc, mvm_acc = acc
    targets = losses.targets(snapshot_params, mb["frames"])
    (_, mvm_sum), vjp = jax.vjp(lambda p: losses.forward(p, mb, targets, r), params)
    (g,) = vjp((d_e, d_mvm_sum))
    g = _like_params(g, param_shardings)
    return (jax.tree.map(jnp.add, grads_acc, g), mvm_acc + mvm_sum), None
  zeros = _like_params(jax.tree.map(jnp.zeros_like, params), param_shardings)
  (grads, mvm_sum), _ = jax.lax.scan(backward, (zeros, jnp.zeros((), jnp.float32)),
                                     (micro, rngs, d_embeds))
  terms = dict(terms, mvm_loss=mvm_sum / mvm_count)
  loss = terms["contrastive_loss"] + weight * terms["mvm_loss"] + terms["mac_loss"]
  return loss, terms, grads


def train_step(state: TrainState, batch: dict, *, config, model, tx, lr_schedule,
               micro_sharding: NamedSharding | None = None,
               param_shardings=None) -> tuple[TrainState, dict]:
  """One optimiser update of the online params and one EMA update of the snapshot (pure).

  `param_shardings` (a tree like `state.params`; `make_train_step` passes the state's) lays the
  gradients out like the params before the optimiser reads them."""
  losses = _Losses(config, model, state.step)
  k = int(config.optim.grad_accum_steps)
  b = batch["frames"].shape[0]
  if k < 1 or b % k:
    raise ValueError(f"config.optim.grad_accum_steps={k} must be >= 1 and divide the global "
                     f"batch {b} (config.data.batch_size)")
  rng = jax.random.fold_in(state.rng, state.step)
  mac_rng, text_rng, dropout_rng = jax.random.split(rng, 3)
  batch = dict(batch, frames=normalize_frames(batch["frames"]))
  if "mac" in losses.objectives:
    total, num_masked = _num_tokens(config, batch["frames"].shape)
    batch["mac_mask"] = objectives.random_token_mask(mac_rng, b, total, num_masked)
    batch["mac_attention_mask"] = objectives.drop_text_tokens(
        text_rng, batch["attention_mask"], config.mac.text_ratio)
  if losses.mvm and "mvm_mask" not in batch:
    raise ValueError("objectives 'miles' and 'mvm' need batch['mvm_mask'] (bool [B, T*N]) from "
                     "the data pipeline (miles_jax.masking)")

  loss, terms, grads = _loss_and_grads(losses, state.params, state.snapshot_params, batch,
                                       dropout_rng, k, micro_sharding, param_shardings)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # EMA of the *updated* online encoder: theta_s <- m * theta_s + (1 - m) * theta_o. A frozen
  # target (mvm.target=frozen) is the online encoder as it enters step `mvm.start_step` (the
  # initial encoder when MVM starts at 0): a copy before that step (m = 0), then m = 1.
  if config.mvm.get("target", "snapshot") == "frozen":
    start = int(config.mvm.get("start_step", 0))
    momentum = jnp.where(state.step < start, 0.0, 1.0).astype(jnp.float32)
  else:
    momentum = optim.snapshot_momentum(config, state.step)
  snapshot = {key: jax.tree.map(lambda s, o: momentum * s + (1.0 - momentum) * o,
                                state.snapshot_params[key], params[key])
              for key in state.snapshot_params}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            snapshot_params=snapshot)
  if config.train.get("on_nonfinite", "stop") == "skip":
    # Donation means the loop cannot fall back to the old state: keep it here instead.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = state.replace(step=state.step + 1)
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, keep)
  metrics = dict(terms, loss=loss, lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
                 grad_norm=grad_norm, snapshot_momentum=momentum)
  return new_state, metrics


def make_train_step(config, mesh: Mesh, model=None, tx=None,
                    compiler_options: dict[str, Any] | None = None) -> Callable:
  """`jax.jit`ted `(state, batch) -> (state, metrics)` with shardings from the config's rules.

  The state argument is donated. `batch` holds global arrays (`parallel.global_batch`) with
  frames uint8 `[B, T, H, W, 3]`, input_ids / attention_mask int32 `[B, L]`, mvm_mask bool
  `[B, T*N]`; other keys (e.g. video_index) are ignored. `compiler_options` go to XLA
  (tests use {'xla_backend_optimization_level': 0} to compile faster).
  """
  model = model or dual_encoder.build(config.model)
  if tx is None:
    tx, lr_schedule = optim.make_optimizer(config)
  else:
    lr_schedule = optim.learning_rate_schedule(config)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  state_sh = train_state_shardings(config, mesh, model, tx)
  batch_sh = parallel.batch_sharding(mesh, rules)
  micro_sh = NamedSharding(mesh, P(None, parallel.batch_axes(mesh, rules)))
  grads_like = state_sh.params if parallel.is_partitioned(mesh) else None
  step = functools.partial(train_step, config=config, model=model, tx=tx,
                           lr_schedule=lr_schedule, micro_sharding=micro_sh,
                           param_shardings=grads_like)

  def step_fn(state, batch):
    batch = {k: v for k, v in batch.items() if k in _BATCH_KEYS}
    with parallel.activation_sharding(mesh, rules):
      return step(state, batch)

  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,),
                 compiler_options=compiler_options)


_BATCH_KEYS = ("frames", "input_ids", "attention_mask", "mvm_mask")


def abstract_batch(config, mesh: Mesh, batch_size: int, num_frames: int) -> dict:
  """The global batch the step takes, as jax.ShapeDtypeStructs sharded like
  `parallel.global_batch` (the data pipeline's dtypes; only `batch_keys(config)`)."""
  v = config.model.video
  length = int(config.data.max_len)
  tokens = int(num_frames) * (v.img_size // v.patch_size) ** 2
  shapes = {"frames": ((batch_size, num_frames, v.img_size, v.img_size, 3), jnp.uint8),
            "input_ids": ((batch_size, length), jnp.int32),
            "attention_mask": ((batch_size, length), jnp.int32),
            "mvm_mask": ((batch_size, tokens), jnp.bool_)}
  sharding = parallel.batch_sharding(mesh, parallel.logical_rules(config.sharding.rules, mesh))
  return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sharding) for k in batch_keys(config)}


def batch_keys(config) -> tuple:
  """The batch entries the step reads for the config's objectives: only these go to the devices."""
  objs = objectives.parse_objectives(config.objectives)
  return tuple(k for k in _BATCH_KEYS if k != "mvm_mask" or objs & objectives.MVM_OBJECTIVES)
