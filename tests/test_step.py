"""The train step: sharded == single-device, EMA snapshot, what each forward sees and where the
gradient goes (on the jitted step), GradCache accumulation == full batch (dropout off and on),
weight-decay mask and schedules. Tiny model, 8 simulated devices.

Tolerances: sharded vs 1-device and 2 micro-batches vs full batch agree to rtol 1e-5 on losses
and rtol 1e-5 / atol 1e-6 on the updated parameters (lr 1e-3, so atol is 0.1% of an update);
only the order of floating-point reductions differs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miles_jax import config_lib, masking, parallel
from miles_jax.models.video import normalize_frames
from miles_jax.train import optim
from miles_jax.train import state as state_lib
from miles_jax.train import step as step_lib

B, L = 8, 16


def _config(accum: int = 1):
  c = config_lib.default_config()
  c.model = config_lib.model_config("tiny")
  c.model.video.depth = c.model.text.depth = 1  # compile time dominates: one block each
  c.objectives = "contrastive,miles,mac"  # every term, so every branch is compared
  c.data.batch_size, c.data.max_len = B, L
  c.optim.lr, c.optim.warmup_steps, c.optim.grad_accum_steps = 1e-3, 0, accum
  c.optim.eps = 1e-6  # a first Adam step is g/(|g|+eps): keep near-zero grads from dominating
  c.train.steps = 10
  return c


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # tests are compile-bound on 2 cores


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  v = c.model.video
  t, grid = v.num_frames, (v.img_size // v.patch_size,) * 2
  lengths = rng.integers(4, L + 1, B)
  return {
      "frames": rng.integers(0, 256, (B, t, v.img_size, v.img_size, 3), dtype=np.uint8),
      "input_ids": rng.integers(1, c.model.text.vocab_size, (B, L), dtype=np.int32),
      "attention_mask": (np.arange(L)[None] < lengths[:, None]).astype(np.int32),
      "mvm_mask": np.stack([masking.sample_mask(rng, c.mask.strategy, t, grid, c.mask.ratio)
                            for _ in range(B)]),
      "video_index": np.arange(B, dtype=np.int32),
  }


def _one_device_mesh():
  return parallel.make_mesh((1,), ("data",), jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
  """Initial state and the state after one step, all on one device, as host copies."""
  c = _config()
  mesh = _one_device_mesh()
  state0 = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  host0 = jax.device_get(state0)
  batch = _batch(c)
  state1, metrics = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)(state0, batch)
  return c, batch, host0, jax.device_get(state1), jax.device_get(metrics)


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _assert_metrics_close(got, want):
  assert set(got) == set(step_lib.METRICS)
  for k in step_lib.METRICS:
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("shape,axes", [
    pytest.param((8,), ("data",), id="data8", marks=pytest.mark.slow),
    pytest.param((2, 4), ("data", "fsdp"), id="fsdp2x4"),
    pytest.param((4, 2), ("data", "model"), id="data4xmodel2", marks=pytest.mark.slow)])
def test_sharded_step_equals_one_device(reference, shape, axes):
  c, batch, host0, host1, metrics1 = reference
  c = _config()
  c.mesh.shape, c.mesh.axes = shape, axes
  mesh = parallel.mesh_from_config(c)
  if "fsdp" in axes:  # sharded init: same values as the 1-device init, and really sharded
    state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
    _assert_trees_close(jax.device_get(state), host0, rtol=0, atol=0)
    kernel = state.params["video"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 4, kernel.shape[1])
  else:
    state = jax.device_put(host0, state_lib.train_state_shardings(c, mesh))
  rules = parallel.logical_rules(c.sharding.rules, mesh)
  state, metrics = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)(
      state, parallel.global_batch(batch, mesh, rules))
  _assert_metrics_close(metrics, metrics1)
  _assert_trees_close(jax.device_get(state), host1)


def test_fsdp_step_keeps_block_activations_split_like_the_batch():
  """Each transformer block's input and output is constrained to the batch sharding (without it
  the partitioner may gather activations over the fsdp axis and all-reduce partial sums: 10x
  the collective bytes of the base model on a v5e-8 FSDP plan, docs/plan.md); outside a step
  the constraint is a no-op."""
  c = _config()
  c.mesh.shape, c.mesh.axes = (2, 4), ("data", "fsdp")
  mesh = parallel.mesh_from_config(c)
  text = step_lib.make_train_step(c, mesh).lower(
      state_lib.abstract_train_state(c, mesh),
      step_lib.abstract_batch(c, mesh, B, c.model.video.num_frames)).as_text()
  split = [ln for ln in text.splitlines() if "sharding_constraint" in ln
           and '[{"data", "fsdp"}, {}, {}]' in ln]
  # in + out of 1 video and 1 text block, in each forward the step runs (and their transposes)
  assert len(split) >= 4, len(split)
  from miles_jax.models import layers
  x = jnp.ones((B, 3, 5))
  assert layers.constrain_batch(x) is x


def test_snapshot_is_the_ema_of_the_updated_params(reference):
  c, _, host0, host1, metrics = reference
  m = np.float32(c.snapshot.momentum)
  assert float(metrics["snapshot_momentum"]) == pytest.approx(m)
  assert set(host1.snapshot_params) == {"video"}
  want = jax.tree.map(lambda s, o: m * s + (np.float32(1) - m) * o,
                      host0.snapshot_params["video"], host1.params["video"])
  _assert_trees_close(host1.snapshot_params["video"], want, rtol=1e-6, atol=1e-7)
  # The snapshot starts as a copy of the online video encoder.
  _assert_trees_close(host0.snapshot_params["video"], host0.params["video"], rtol=0, atol=0)
  assert int(host1.step) == 1 and float(metrics["mvm_loss"]) > 0 and float(metrics["mac_loss"]) > 0


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(reference):
  _, batch, host0, host1, metrics1 = reference
  c = _config(accum=2)
  mesh = _one_device_mesh()
  state = jax.device_put(host0, state_lib.train_state_shardings(c, mesh))
  state, metrics = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)(state, batch)
  _assert_metrics_close(metrics, metrics1)
  _assert_trees_close(jax.device_get(state), host1)


def test_weight_decay_mask(reference):
  params = reference[2].params
  mask = {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  no_decay = ["['video']['cls_token']", "['video']['mask_token']", "['video']['pos_embed']",
              "['video']['temporal_embed']", "['video']['norm']['scale']",
              "['video']['block_0']['norm3']['bias']", "['video']['patch_embed']['bias']",
              "['text']['word_embeddings']['embedding']",
              "['text']['position_embeddings']['embedding']",
              "['text']['embeddings_LayerNorm']['scale']",
              "['text']['layer_0']['sa_layer_norm']['scale']",
              "['text']['layer_0']['output_layer_norm']['bias']", "['text_proj']['bias']"]
  for name in no_decay:
    assert mask[name] is False, name
  decay = [k for k, v in mask.items() if v]
  assert decay and all(k.endswith("['kernel']") for k in decay)
  assert all(v for k, v in mask.items() if k.endswith("['kernel']"))


def test_schedules():
  c = _config()
  c.optim.warmup_steps, c.train.steps, c.optim.min_lr_ratio = 10, 110, 0.1
  lr = optim.learning_rate_schedule(c)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0, 5e-4, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5), 1e-4], rtol=1e-5, atol=1e-9)
  c.snapshot.schedule, c.snapshot.momentum = "cosine", 0.996
  m = [float(optim.snapshot_momentum(c, s)) for s in (0, 55, 110)]
  np.testing.assert_allclose(m, [0.996, 0.998, 1.0], rtol=1e-6)


# --- What each forward of the real (jitted) step sees, and where its gradient goes -------------
# A spy on every video encoder's first block records its input from inside the jitted step
# (flax method interception at trace time + jax.debug.callback at run time). The expected inputs
# are computed here in numpy from the params: patch embedding (a strided conv = a matmul over
# each patch's pixels) + position tables, with the mask token where the mask says.

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from miles_jax import objectives  # pylint: disable=g-import-not-at-top
from miles_jax.models import dual_encoder  # pylint: disable=g-import-not-at-top
from miles_jax.models.video import SpaceTimeBlock, VideoEncoder  # pylint: disable=g-import-not-at-top


def _spy_block0(records):
  """Interceptor: appends (role, first-block input) for each video encoder forward."""
  def spy(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name == "__call__" and isinstance(m, SpaceTimeBlock)
        and m.name == "block_0" and isinstance(m.parent, VideoEncoder)):
      role = "online" if isinstance(m.parent.parent, nn.Module) else "snapshot"
      jax.debug.callback(lambda x, role=role: records.append((role, np.asarray(x))), args[0])
    return next_fun(*args, **kwargs)
  return spy


def _first_block_input(video_params, frames, mask):
  """numpy: tokens entering block 0 (cls first), mask token at masked patches."""
  v = np.asarray
  b, t, h, w, _ = frames.shape
  kernel = v(video_params["patch_embed"]["kernel"])  # [p, p, 3, D]
  p, d = kernel.shape[0], kernel.shape[-1]
  gh, gw = h // p, w // p
  patches = frames.reshape(b, t, gh, p, gw, p, 3).transpose(0, 1, 2, 4, 3, 5, 6)
  x = patches.reshape(b, t * gh * gw, p * p * 3) @ kernel.reshape(p * p * 3, d)
  x = x + v(video_params["patch_embed"]["bias"])
  if mask is not None:
    x = np.where(mask[..., None], v(video_params["mask_token"]), x)
  pos = (v(video_params["temporal_embed"])[:t, None] + v(video_params["pos_embed"])[None, 1:])
  x = x + pos.reshape(t * gh * gw, d)
  cls = v(video_params["cls_token"]) + v(video_params["pos_embed"])[:1]
  return np.concatenate([np.broadcast_to(cls[None], (b, 1, d)), x], axis=1)


def _reference_loss(c, model, params, snapshot, frames, batch):
  """The MILES loss written out from the SPEC with the targets as constants: (loss, terms)."""
  mask = jnp.asarray(batch["mvm_mask"])
  snap = jax.jit(lambda s, f: VideoEncoder(c.model.video).apply({"params": s}, f)["patches"],
                 compiler_options=FAST_COMPILE)(snapshot["video"], frames)
  if c.mvm.target_space == "projected":
    snap = snap @ snapshot["video_proj"]["kernel"] + snapshot["video_proj"]["bias"]
  targets = np.asarray(snap)  # a constant: no path back to any parameter

  def loss_fn(p):
    apply = lambda method, *a, **k: model.apply({"params": p}, *a, method=method, **k)
    text = apply("encode_text", batch["input_ids"], batch["attention_mask"])["embed"]
    masked = apply("encode_video", frames, mask)
    video = (apply("encode_video", frames)["embed"] if c.mvm.unmasked_contrastive
             else masked["embed"])
    pred = apply("predict_mvm", masked["patches"])
    if c.mvm.target_space == "projected":
      pred = apply("project_video", pred)
    mvm = objectives.mvm_loss(pred, targets, mask, c.mvm.loss, c.mvm.normalize_target)
    con = objectives.contrastive_loss(video, text, c.temperature)
    return con + c.mvm.weight * mvm, {"contrastive_loss": con, "mvm_loss": mvm}
  return loss_fn


@pytest.mark.parametrize("unmasked_contrastive,target_space",
                         [(False, "features"), (True, "features"), (False, "projected")])
@pytest.mark.slow
def test_step_feeds_mask_to_online_intact_clip_to_snapshot(unmasked_contrastive, target_space):
  """On the jitted step: the online encoder sees mask tokens exactly at the masked positions,
  the snapshot the intact clip, the contrastive term the clip `unmasked_contrastive` names; the
  loss and the gradient equal the SPEC's loss with the (perturbed) snapshot's targets as
  constants; the snapshot moves only by the EMA."""
  c = _config()
  c.objectives = "contrastive,miles"
  c.mvm.unmasked_contrastive, c.mvm.target_space = unmasked_contrastive, target_space
  c.snapshot.momentum = 0.9
  mesh = _one_device_mesh()
  tx = optax.sgd(1.0)  # params1 = params0 - grads: the step's gradient, read back exactly
  state = jax.device_get(state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh, tx=tx))
  # A snapshot that differs from the online encoder (as after some training), so that using the
  # wrong one shows.
  rng = np.random.default_rng(1)
  snapshot = jax.tree.map(lambda x: x + np.float32(0.1) * rng.standard_normal(x.shape, np.float32),
                          state.snapshot_params)
  state = state.replace(snapshot_params=snapshot)
  batch = _batch(c, seed=3)
  frames = np.asarray(normalize_frames(jnp.asarray(batch["frames"])))

  records = []
  step = step_lib.make_train_step(c, mesh, tx=tx, compiler_options=FAST_COMPILE)
  with nn.intercept_methods(_spy_block0(records)):
    new, metrics = step(jax.device_put(state, state_lib.train_state_shardings(c, mesh, tx=tx)),
                        batch)
    new, metrics = jax.device_get((new, metrics))
  jax.effects_barrier()

  masked = _first_block_input(state.params["video"], frames, batch["mvm_mask"])
  intact = _first_block_input(state.params["video"], frames, None)
  snap_intact = _first_block_input(snapshot["video"], frames, None)
  assert batch["mvm_mask"].any() and not batch["mvm_mask"].all()
  online = [x for role, x in records if role == "online"]
  snap = [x for role, x in records if role == "snapshot"]
  assert len(snap) == 1
  np.testing.assert_allclose(snap[0], snap_intact, rtol=1e-5, atol=1e-5)
  want = [masked, intact] if unmasked_contrastive else [masked]
  assert len(online) == len(want)
  for x in online:  # each online forward is one of the expected ones, and each expected is seen
    assert any(np.allclose(x, w, rtol=1e-5, atol=1e-5) for w in want)
  for w in want:
    assert any(np.allclose(x, w, rtol=1e-5, atol=1e-5) for x in online)

  model = dual_encoder.build(c.model)
  loss_fn = _reference_loss(c, model, state.params, snapshot, jnp.asarray(frames), batch)
  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                                compiler_options=FAST_COMPILE)(state.params)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  for k in ("contrastive_loss", "mvm_loss"):
    np.testing.assert_allclose(float(metrics[k]), float(terms[k]), rtol=1e-5, err_msg=k)
  # The step's gradient is the gradient with constant targets: none flows through the snapshot
  # branch (the projected option's video_proj included) into the online params.
  got = jax.tree.map(lambda a, b: a - b, state.params, new.params)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # The snapshot gets no optimiser update: exactly the EMA of its old value and the new params.
  m = np.float32(0.9)
  want_snap = {k: jax.tree.map(lambda s, o: m * s + (np.float32(1) - m) * o, snapshot[k],
                               new.params[k]) for k in snapshot}
  _assert_trees_close(new.snapshot_params, want_snap, rtol=1e-6, atol=1e-7)
  # ... and the perturbed snapshot did change the loss (the targets come from it).
  unperturbed = jax.jit(_reference_loss(c, model, state.params, jax.device_get(
      state_lib.snapshot_of(c, state.params)), jnp.asarray(frames), batch),
                        compiler_options=FAST_COMPILE)(state.params)[1]
  assert abs(float(unperturbed["mvm_loss"]) / float(terms["mvm_loss"]) - 1) > 1e-3  # 100x the rtol above


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch_with_dropout():
  """With dropout and drop-path on, GradCache's update equals the plain gradient of the
  full-batch loss in which micro-batch j is forwarded with dropout key j: both passes of
  GradCache must draw the same dropout, or the cached embeddings do not match the backward."""
  c = _config(accum=2)
  c.objectives = "contrastive,miles"
  c.model.video.drop_path_rate, c.model.text.dropout_rate = 0.5, 0.3
  mesh = _one_device_mesh()
  tx = optax.sgd(1.0)  # params1 = params0 - grads
  state = jax.device_get(state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh, tx=tx))
  batch = _batch(c, seed=5)
  new, metrics = jax.device_get(step_lib.make_train_step(c, mesh, tx=tx,
                                                         compiler_options=FAST_COMPILE)(
      jax.device_put(state, state_lib.train_state_shardings(c, mesh, tx=tx)), batch))

  # The documented randomness: key = fold_in(state.rng, step) -> (mac, text, dropout); the
  # dropout key split into one key per micro-batch; micro-batch j = rows j, j+k, ...
  model = dual_encoder.build(c.model)
  losses = step_lib._Losses(c, model)  # pylint: disable=protected-access
  dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[2]
  keys = jax.random.split(dropout_key, 2)
  b = {k: jnp.asarray(batch[k]) for k in step_lib._BATCH_KEYS}  # pylint: disable=protected-access
  b["frames"] = normalize_frames(b["frames"])
  micro = [jax.tree.map(lambda x, j=j: x[j::2], b) for j in range(2)]
  count = jnp.sum(b["mvm_mask"].astype(jnp.float32))

  def full_loss(p, keys):
    outs = [losses.forward(p, mb, losses.targets(state.snapshot_params, mb["frames"]), key)
            for mb, key in zip(micro, keys)]
    # back to the original row order: row 2i from micro-batch 0, row 2i+1 from micro-batch 1
    embeds = jax.tree.map(lambda a, z: jnp.stack([a, z], 1).reshape(-1, a.shape[-1]),
                          outs[0][0], outs[1][0])
    return losses.combine(embeds, outs[0][1] + outs[1][1], count)

  value_and_grad = jax.jit(jax.value_and_grad(full_loss, has_aux=True),
                           compiler_options=FAST_COMPILE)
  (loss, terms), grads = value_and_grad(state.params, keys)
  other = value_and_grad(state.params, keys[::-1])[0][0]
  assert abs(float(other) / float(loss) - 1) > 1e-3  # dropout really changes the loss
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  for k in ("contrastive_loss", "mvm_loss"):
    np.testing.assert_allclose(float(metrics[k]), float(terms[k]), rtol=1e-5, err_msg=k)
  got = jax.tree.map(lambda a, z: a - z, state.params, new.params)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_mac_step_encodes_text_with_tokens_dropped():
  """On the jitted step, the MAC text view's attention mask is the batch's with exactly
  floor(text_ratio * (valid - 1)) real tokens dropped per caption, never [CLS]."""
  from miles_jax.models.text import TextEncoder  # pylint: disable=g-import-not-at-top
  c = _config()
  c.objectives, c.mac.text_ratio = "mac", 0.4
  mesh = _one_device_mesh()
  records = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, TextEncoder) and context.method_name == "__call__":
      jax.debug.callback(lambda m: records.append(np.asarray(m)), args[1])
    return next_fun(*args, **kwargs)

  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  batch = _batch(c, seed=2)
  with nn.intercept_methods(spy):
    jax.block_until_ready(step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)(
        state, batch))
  jax.effects_barrier()
  am = batch["attention_mask"]
  assert len(records) == 1
  got = records[0]
  assert ((got == 1) <= (am == 1)).all() and (got[:, 0] == 1).all()
  np.testing.assert_array_equal(am.sum(1) - got.sum(1), np.floor(0.4 * (am.sum(1) - 1)))


def _two_steps(c):
  mesh = _one_device_mesh()
  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  host0 = jax.device_get(state)
  step = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)
  for seed in (0, 1):
    state, metrics = step(state, _batch(c, seed))
  return host0, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_frozen_target_keeps_the_initial_encoder():
  """mvm.target=frozen: the target encoder is the initial online encoder, never updated, while
  the online encoder moves (the row that tests whether the *evolving* snapshot matters)."""
  c = _config()
  c.objectives, c.mvm.target = "contrastive,miles", "frozen"
  host0, host2, metrics = _two_steps(c)
  assert float(metrics["snapshot_momentum"]) == 1.0 and float(metrics["mvm_loss"]) > 0
  _assert_trees_close(host2.snapshot_params["video"], host0.params["video"], rtol=0, atol=0)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(host2.params["video"]), jax.tree.leaves(host0.params["video"]))]
  assert max(moved) > 1e-4


@pytest.mark.slow
def test_frozen_target_is_the_encoder_entering_the_mvm_start_step():
  """mvm.target=frozen with mvm.start_step=k: the target is a copy of the online encoder as it
  enters step k (text-aligned by k contrastive steps), never updated after it."""
  c = _config()
  c.objectives, c.mvm.target, c.mvm.start_step = "contrastive,miles", "frozen", 2
  mesh = _one_device_mesh()
  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  step = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)
  online, momenta = [], []
  for seed in range(4):
    online.append(jax.device_get(state.params["video"]))
    state, metrics = step(state, _batch(c, seed))
    momenta.append(float(metrics["snapshot_momentum"]))
  assert momenta == [0.0, 0.0, 1.0, 1.0]
  _assert_trees_close(jax.device_get(state.snapshot_params["video"]), online[2], rtol=0, atol=0)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(online[2]), jax.tree.leaves(online[1]))]
  assert max(moved) > 1e-4  # the copy taken entering step 2 differs from the one entering step 1


@pytest.mark.slow
def test_pixel_targets_are_the_encoders_patches():
  """mvm.target=pixels: targets are the clip's patches in the encoder's token order (checked
  against the patch embedding itself), no snapshot is kept, the head predicts p*p*3 values."""
  c = _config()
  c.objectives, c.mvm.target = "contrastive,miles", "pixels"
  v = c.model.video
  with pytest.raises(ValueError, match="model.mvm_head_dim"):
    config_lib.validate(c, needs_train_data=False)
  c.model.mvm_head_dim = v.patch_size ** 2 * 3
  host0, host2, metrics = _two_steps(c)
  assert host0.snapshot_params == {} and host2.snapshot_params == {}
  kernel = host0.params["mvm_head"]["kernel"]
  assert kernel.shape == (v.width, v.patch_size ** 2 * 3)
  assert np.isfinite(float(metrics["mvm_loss"])) and float(metrics["mvm_loss"]) > 0

  frames = normalize_frames(jnp.asarray(_batch(c)["frames"]))
  model = state_lib.dual_encoder.build(c.model)
  targets = step_lib._Losses(c, model).targets({}, frames)  # pylint: disable=protected-access
  n = (v.img_size // v.patch_size) ** 2
  assert targets.shape == (B, v.num_frames * n, v.patch_size ** 2 * 3)
  emb = host0.params["video"]["patch_embed"]
  tokens = jax.vmap(lambda f: jax.lax.conv_general_dilated(
      f, emb["kernel"], (v.patch_size,) * 2, "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")))(frames)  # [B, T, h, w, D]
  want = tokens.reshape(B, v.num_frames * n, v.width) + emb["bias"]
  got = targets @ emb["kernel"].reshape(-1, v.width) + emb["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_configs_saved_before_mvm_head_dim_still_resume():
  """A workdir written before `model.mvm_head_dim` existed resumes with the default (0), and
  is refused for pixel targets (another head)."""
  from miles_jax import checkpoints
  wanted = config_lib.model_config("tiny").to_dict()
  saved = {k: v for k, v in wanted.items() if k != "mvm_head_dim"}
  assert checkpoints.diff_configs(saved, wanted) == []
  wanted["mvm_head_dim"] = 192
  assert checkpoints.diff_configs(saved, wanted) == ["model.mvm_head_dim: checkpoint 0, config 192"]


@pytest.mark.slow
def test_mvm_starts_at_start_step():
  """mvm.start_step=1: step 0's loss is the contrastive term alone and the MVM head gets no
  update; from step 1 on the loss is contrastive + weight * mvm and the head moves."""
  c = _config()
  c.objectives, c.mvm.start_step, c.mvm.weight = "contrastive,miles", 1, 0.7
  c.optim.weight_decay = 0.0  # else decay alone would move the head
  mesh = _one_device_mesh()
  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  step = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)
  heads, losses = [jax.device_get(state.params["mvm_head"])], []
  for seed in (0, 1):
    state, m = step(state, _batch(c, seed))
    m = jax.device_get(m)
    heads.append(jax.device_get(state.params["mvm_head"]))
    losses.append((float(m["loss"]), float(m["contrastive_loss"]), float(m["mvm_loss"])))
  (l0, c0, m0), (l1, c1, m1) = losses
  assert m0 > 0.01 and m1 > 0.01  # the MVM term is computed (and logged) before it counts
  assert l0 == pytest.approx(c0, rel=1e-6)
  assert l1 == pytest.approx(c1 + 0.7 * m1, rel=1e-6) and l1 - c1 > 0.005
  _assert_trees_close(heads[1], heads[0], rtol=0, atol=0)
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(heads[2]),
                                                   jax.tree.leaves(heads[1])))
  assert moved > 1e-4


@pytest.mark.slow
def test_mvm_objective_alone_trains_the_video_encoder_without_text():
  """objectives=mvm (a video-only stage, here MAE-style with pixel targets): the loss is the MVM
  term alone, the text encoder and projections get no gradient, the video encoder and the head
  do; the batch keeps its mask."""
  c = _config()
  c.objectives, c.mvm.target = "mvm", "pixels"
  c.model.mvm_head_dim = c.model.video.patch_size ** 2 * 3
  c.optim.weight_decay = 0.0  # else decay alone would move the text params
  assert "mvm_mask" in step_lib.batch_keys(c)
  host0, host2, metrics = _two_steps(c)
  assert float(metrics["contrastive_loss"]) == 0.0 and float(metrics["mac_loss"]) == 0.0
  assert float(metrics["mvm_loss"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["mvm_loss"]), rtol=1e-6)
  for key in ("text", "text_proj", "video_proj"):
    _assert_trees_close(host2.params[key], host0.params[key], rtol=0, atol=0)
  for key in ("video", "mvm_head"):
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(host2.params[key]), jax.tree.leaves(host0.params[key]))]
    assert max(moved) > 1e-4, key
