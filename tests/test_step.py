"""The train step: sharded == single-device, EMA snapshot, no snapshot gradient, GradCache
accumulation == full batch, weight-decay mask and schedules. Tiny model, 8 simulated devices.

Tolerances: sharded vs 1-device and 2 micro-batches vs full batch agree to rtol 1e-5 on losses
and rtol 1e-5 / atol 1e-6 on the updated parameters (lr 1e-3, so atol is 0.1% of an update);
only the order of floating-point reductions differs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miles_jax import config_lib, masking, parallel
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


@pytest.mark.parametrize("shape,axes", [((8,), ("data",)), ((2, 4), ("data", "fsdp")),
                                        ((4, 2), ("data", "model"))],
                         ids=["data8", "fsdp2x4", "data4xmodel2"])
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


def test_snapshot_gets_no_gradient(reference):
  """d loss / d snapshot params is exactly zero, also with targets in the projected space."""
  c, batch, host0, _, _ = reference
  c = _config()
  c.objectives, c.mvm.target_space = "miles", "projected"
  model = state_lib.dual_encoder.build(c.model)
  losses = step_lib._Losses(c, model)  # pylint: disable=protected-access
  params = host0.params
  snapshot = state_lib.snapshot_of(c, params)
  assert set(snapshot) == {"video", "video_proj"}
  b = dict(batch, frames=step_lib.normalize_frames(jnp.asarray(batch["frames"])))

  def loss(snap):
    embeds, mvm_sum = losses.forward(params, b, losses.targets(snap, b["frames"]), None)
    return losses.combine(embeds, mvm_sum, jnp.sum(b["mvm_mask"]))[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(snapshot)
  assert np.isfinite(float(value))
  assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(grads))


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


def _two_steps(c):
  mesh = _one_device_mesh()
  state = state_lib.create_train_state(c, jax.random.PRNGKey(0), mesh)
  host0 = jax.device_get(state)
  step = step_lib.make_train_step(c, mesh, compiler_options=FAST_COMPILE)
  for seed in (0, 1):
    state, metrics = step(state, _batch(c, seed))
  return host0, jax.device_get(state), jax.device_get(metrics)


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

  frames = step_lib.normalize_frames(jnp.asarray(_batch(c)["frames"]))
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
