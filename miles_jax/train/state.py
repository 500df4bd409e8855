"""The train state (online params, optimiser state, snapshot params) and its sharded creation."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from miles_jax import objectives, parallel
from miles_jax.models import dual_encoder
from miles_jax.train import optim


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimiser updates taken
  params: Any  # online model: video, text, video_proj, text_proj, mvm_head (unboxed)
  opt_state: Any
  snapshot_params: Any  # {'video': ..., ['video_proj': ...]} for 'miles' (not pixels), else {}
  rng: jax.Array  # PRNG key; step randomness is fold_in(rng, step)


def snapshot_keys(config) -> tuple[str, ...]:
  """Which top-level param subtrees the snapshot encoder keeps an EMA copy of."""
  if not objectives.parse_objectives(config.objectives) & objectives.MVM_OBJECTIVES:
    return ()
  if config.mvm.get("target", "snapshot") == "pixels":
    return ()
  target_space = config.mvm.target_space
  if target_space == "features":
    return ("video",)
  if target_space == "projected":
    return ("video", "video_proj")
  raise ValueError(f"config.mvm.target_space={target_space!r}: use features or projected")


def snapshot_of(config, params) -> dict:
  # `+ 0` gives the snapshot its own buffers, so donating the state never aliases two leaves.
  return {k: jax.tree.map(lambda x: x + 0, params[k]) for k in snapshot_keys(config)}


def _dummy_inputs(config):
  v, t = config.model.video, config.model.text
  frames = jnp.zeros((1, v.num_frames, v.img_size, v.img_size, 3), jnp.float32)
  length = min(int(config.data.max_len), int(t.max_len))
  ids = jnp.zeros((1, length), jnp.int32)
  return frames, ids, jnp.ones((1, length), jnp.int32)


def init_boxed_params(model, config, rng):
  """Params with their logical-axis boxes (`nn.Partitioned`)."""
  return model.init({"params": rng}, *_dummy_inputs(config))["params"]


def _init_state(config, model, tx, rng) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  params = nn.unbox(init_boxed_params(model, config, params_rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    snapshot_params=snapshot_of(config, params), rng=state_rng)


def train_state_shardings(config, mesh: Mesh, model=None, tx=None) -> TrainState:
  """A TrainState of NamedShardings: params by the logical rules, optimiser moments like their
  params, snapshot like the online video encoder, scalars replicated."""
  model = model or dual_encoder.build(config.model)
  tx = tx or optim.make_optimizer(config)[0]
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: init_boxed_params(model, config, r), rng)
  param_sh = parallel.param_shardings(boxed, mesh, rules)
  abstract_state = jax.eval_shape(lambda r: _init_state(config, model, tx, r), rng)
  replicated = parallel.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                    snapshot_params={k: param_sh[k] for k in snapshot_keys(config)},
                    rng=replicated)


def abstract_train_state(config, mesh: Mesh, model=None, tx=None) -> TrainState:
  """The state's shapes and dtypes with their shardings on `mesh` (jax.ShapeDtypeStructs; nothing
  is computed or allocated): what a checkpoint restore and an ahead-of-time compile take."""
  from miles_jax import checkpoints
  model = model or dual_encoder.build(config.model)
  tx = tx or optim.make_optimizer(config)[0]
  abstract = jax.eval_shape(
      lambda: create_train_state(config, jax.random.PRNGKey(config.seed), mesh, model, tx))
  return checkpoints.abstract_with_shardings(abstract,
                                             train_state_shardings(config, mesh, model, tx))


def create_train_state(config, rng, mesh: Mesh, model=None, tx=None) -> TrainState:
  """Initialises the state directly in its sharded layout (no device holds a full copy)."""
  model = model or dual_encoder.build(config.model)
  tx = tx or optim.make_optimizer(config)[0]
  shardings = train_state_shardings(config, mesh, model, tx)
  init = jax.jit(lambda r: _init_state(config, model, tx, r), out_shardings=shardings)
  return init(rng)
