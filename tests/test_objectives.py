"""Losses against independent numpy computations; masking of gradients; MAC masks."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from miles_jax import objectives, parallel


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_contrastive(v, t, tau):
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-8)
  s = (v @ t.T) / tau
  return -np.mean(np.diag(_np_log_softmax(s, 1))) - np.mean(np.diag(_np_log_softmax(s, 0)))


def test_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  v, t = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
  v[3] = 0.0  # a zero embedding: max(||x||, 1e-8) keeps it finite
  want = _np_contrastive(v, t, 0.05)
  got = objectives.contrastive_loss(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32), 0.05)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_contrastive_shard_map_equals_global():
  """With axis_name under shard_map (8 devices, 2 pairs each): same value and gradients."""
  rng = np.random.default_rng(1)
  v = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  mesh = parallel.make_mesh((-1,), ("data",))
  sharded = jax.shard_map(functools.partial(objectives.contrastive_loss, temperature=0.1,
                                            axis_name="data"),
                          mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  global_fn = functools.partial(objectives.contrastive_loss, temperature=0.1)
  np.testing.assert_allclose(float(jax.jit(sharded)(v, t)), float(global_fn(v, t)), rtol=1e-6)
  g_sharded = jax.jit(jax.grad(sharded, argnums=(0, 1)))(v, t)
  g_global = jax.grad(global_fn, argnums=(0, 1))(v, t)
  for a, b in zip(g_sharded, g_global):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _np_mvm(pred, target, mask, loss, normalize):
  if normalize:
    mu, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True)
    target = (target - mu) / np.sqrt(var + 1e-6)
  d = pred - target
  if loss == "smooth_l1":
    per = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5).mean(-1)
  elif loss == "l1":
    per = np.abs(d).mean(-1)
  elif loss == "l2":
    per = (d * d).mean(-1)
  else:
    pn = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    tn = target / np.linalg.norm(target, axis=-1, keepdims=True)
    per = 1 - (pn * tn).sum(-1)
  return per[mask].mean()


@pytest.mark.parametrize("loss", objectives.MVM_LOSSES)
@pytest.mark.parametrize("normalize", [True, False])
def test_mvm_loss_matches_numpy(loss, normalize):
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=(2, 2, 12, 6))
  target = 3.0 * target + 1.0
  mask = rng.random((2, 12)) < 0.5
  got = objectives.mvm_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                            jnp.asarray(mask), loss, normalize)
  np.testing.assert_allclose(float(got), _np_mvm(pred, target, mask, loss, normalize), rtol=1e-5)


def test_mvm_gradient_zero_at_visible_positions_and_targets():
  rng = np.random.default_rng(3)
  pred = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 12)) < 0.5)
  g_pred, g_target = jax.grad(objectives.mvm_loss, argnums=(0, 1))(pred, target, mask)
  g_pred = np.asarray(g_pred)
  assert (g_pred[~np.asarray(mask)] == 0.0).all()  # exactly zero, not just small
  assert np.abs(g_pred[np.asarray(mask)]).sum() > 0
  assert (np.asarray(g_target) == 0.0).all()  # targets are stop-gradient


def test_mvm_loss_ignores_nonfinite_visible_predictions():
  pred = jnp.zeros((1, 4, 3)).at[0, 1].set(jnp.nan)
  mask = jnp.asarray([[True, False, True, False]])
  assert np.isfinite(float(objectives.mvm_loss(pred, jnp.ones((1, 4, 3)), mask)))


def test_random_token_mask_exact_count():
  m = np.asarray(objectives.random_token_mask(jax.random.PRNGKey(0), 5, 64, 48))
  assert m.shape == (5, 64) and (m.sum(1) == 48).all()
  assert len({tuple(r) for r in m}) == 5  # different per sample


def test_drop_text_tokens_keeps_cls_and_padding():
  am = np.zeros((3, 12), np.int32)
  am[0, :12], am[1, :7], am[2, :1] = 1, 1, 1
  out = np.asarray(objectives.drop_text_tokens(jax.random.PRNGKey(0), jnp.asarray(am), 0.5))
  assert (out[:, 0] == 1).all()  # [CLS] always stays
  assert (out[am == 0] == 0).all()  # padding stays padding
  np.testing.assert_array_equal(am.sum(1) - out.sum(1), [5, 3, 0])  # floor(0.5 * (n - 1))


def test_parse_objectives():
  assert objectives.parse_objectives("contrastive, miles") == {"contrastive", "miles"}
  with pytest.raises(ValueError, match="config.objectives"):
    objectives.parse_objectives("contrastive,mae")


def test_mac_text_masking_equals_removing_the_tokens():
  """A caption with MAC's dropped tokens masked out encodes exactly as the caption with those
  tokens removed: (a) with position embeddings zeroed, as the compacted caption of only the kept
  tokens; (b) with real positions, whatever the dropped tokens' ids are."""
  from miles_jax import config_lib  # pylint: disable=g-import-not-at-top
  from miles_jax.models.text import TextEncoder  # pylint: disable=g-import-not-at-top
  cfg = config_lib.text_config("tiny")
  enc = TextEncoder(cfg)
  rng = np.random.default_rng(0)
  b, length = 6, 16
  lengths = np.array([16, 12, 9, 5, 3, 2])
  am = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1000 // 2, 1000, (b, length)).astype(np.int32) * am
  params = nn.unbox(enc.init(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(am))["params"])
  mac = np.asarray(objectives.drop_text_tokens(jax.random.PRNGKey(1), jnp.asarray(am), 0.3))
  dropped = (am == 1) & (mac == 0)
  np.testing.assert_array_equal(dropped.sum(1), np.floor(0.3 * (lengths - 1)))
  assert dropped.sum() >= 8 and not dropped[:, 0].any()
  encode = jax.jit(lambda p, i, m: enc.apply({"params": p}, i, m))

  # (a) positions neutral: masked == compacted (kept tokens only, in order, then padding).
  flat = dict(params)
  flat["position_embeddings"] = {"embedding": jnp.zeros_like(
      params["position_embeddings"]["embedding"])}
  got = np.asarray(encode(flat, ids, mac))
  for i in range(b):
    keep = np.flatnonzero(mac[i])
    cid = np.zeros((1, length), np.int32)
    cam = np.zeros((1, length), np.int32)
    cid[0, :len(keep)], cam[0, :len(keep)] = ids[i, keep], 1
    want = np.asarray(encode(flat, cid, cam))[0, :len(keep)]
    np.testing.assert_allclose(got[i, keep], want, rtol=1e-5, atol=1e-5, err_msg=f"caption {i}")

  # (b) real positions: the dropped tokens' content never reaches a kept token.
  other = np.where(dropped, rng.integers(1, 1000 // 2, (b, length)), ids).astype(np.int32)
  a, z = np.asarray(encode(params, ids, mac)), np.asarray(encode(params, other, mac))
  np.testing.assert_allclose(a[mac == 1], z[mac == 1], rtol=1e-5, atol=1e-5)
  full = np.asarray(encode(params, other, am))  # ... which without the MAC mask it does
  assert np.abs(full[:, 0] - z[:, 0]).max() > 1e-2
