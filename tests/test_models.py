"""Model shapes, masking vs dropping semantics and variable frame counts (tiny configs)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miles_jax import config_lib
from miles_jax.models import dual_encoder, layers, xla_cpu

KERNELS = ("reference", "xla_cpu")


@pytest.fixture(scope="module")
def tiny():
  c = config_lib.model_config("tiny")
  model = dual_encoder.build(c)
  frames = jnp.zeros((2, 4, 32, 32, 3))
  ids = jnp.ones((2, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), frames, ids, jnp.ones_like(ids))["params"])
  return c, model, params


def _frames(seed, t=4, b=2):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, t, 32, 32, 3))


def _video(model, params, frames, **kw):
  return model.apply({"params": params}, frames, method=model.encode_video, **kw)


def test_shapes_and_logical_axes(tiny):
  c, model, params = tiny
  out = _video(model, params, _frames(1))
  n = (32 // 8) ** 2
  assert out["embed"].shape == (2, c.proj_dim)
  assert out["cls"].shape == (2, c.video.width)
  assert out["patches"].shape == (2, 4 * n, c.video.width)
  t = model.apply({"params": params}, jnp.ones((3, 5), jnp.int32), jnp.ones((3, 5), jnp.int32),
                  method=model.encode_text)
  assert t["embed"].shape == (3, c.proj_dim) and t["tokens"].shape == (3, 5, c.text.width)
  boxed = model.init(jax.random.PRNGKey(0), _frames(0), jnp.ones((2, 8), jnp.int32),
                     jnp.ones((2, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["video"]["block_0"]["attn"]["qkv"]["kernel"]) == ("embed", "joined_kv")
  assert tuple(specs["text"]["word_embeddings"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["video"]["block_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")


def test_masked_patches_do_not_see_their_pixels(tiny):
  """A masked patch's embedding is replaced by the mask token: its pixels can't matter."""
  _, model, params = tiny
  n = 16
  mask = np.zeros((2, 4 * n), bool)
  mask[:, [0, 5, 17, 40, 63]] = True
  f1 = _frames(1)
  # change the pixels of patch 5 of frame 0 (row 1, col 1 of the 4x4 grid) only
  f2 = f1.at[:, 0, 8:16, 8:16, :].add(3.0)
  a = _video(model, params, f1, mask=mask)
  b = _video(model, params, f2, mask=mask)
  np.testing.assert_allclose(a["embed"], b["embed"], atol=1e-6)
  c = _video(model, params, f2)  # unmasked: the change is visible
  assert np.abs(np.asarray(c["embed"]) - np.asarray(a["embed"])).max() > 1e-3
  # and the mask token itself is used
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  # (a constant shift would vanish in the LayerNorms: perturb with noise)
  p2["video"]["mask_token"] = params["video"]["mask_token"] + jax.random.normal(
      jax.random.PRNGKey(9), params["video"]["mask_token"].shape)
  d = _video(model, p2, f1, mask=mask)
  assert np.abs(np.asarray(d["embed"]) - np.asarray(a["embed"])).max() > 1e-3


@pytest.mark.slow
def test_dropping_a_whole_frame_equals_a_shorter_clip(tiny):
  """MAC dropping: with every patch of the last frame dropped, the divided attention rule gives
  exactly the model run on the first T-1 frames."""
  _, model, params = tiny
  n = 16
  f = _frames(2)
  mask = np.zeros((2, 4 * n), bool)
  mask[:, 3 * n:] = True
  dropped = _video(model, params, f, mask=mask, drop_masked=True)
  short = _video(model, params, f[:, :3])
  np.testing.assert_allclose(dropped["embed"], short["embed"], atol=2e-5)
  np.testing.assert_allclose(dropped["patches"], short["patches"], atol=2e-5)


@pytest.mark.slow
def test_dropping_nothing_equals_full_and_jit_needs_static_count(tiny):
  _, model, params = tiny
  f = _frames(3)
  full = _video(model, params, f)
  none = _video(model, params, f, mask=np.zeros((2, 64), bool), drop_masked=True)
  np.testing.assert_allclose(full["embed"], none["embed"], atol=2e-5)
  rng = np.random.default_rng(0)
  mask = np.stack([rng.permutation(64) < 48 for _ in range(2)])
  fn = jax.jit(lambda p, x, m: _video(model, p, x, mask=m, drop_masked=True, num_masked=48))
  out = fn(params, f, mask)
  assert out["patches"].shape == (2, 16, 64)
  eager = _video(model, params, f, mask=mask, drop_masked=True)
  np.testing.assert_allclose(out["embed"], eager["embed"], atol=2e-5)
  with pytest.raises(ValueError, match="num_masked"):
    jax.jit(lambda p, x, m: _video(model, p, x, mask=m, drop_masked=True))(params, f, mask)
  bad = mask.copy()
  bad[0, np.argmax(~bad[0])] = True
  with pytest.raises(ValueError, match="same masked count"):
    _video(model, params, f, mask=bad, drop_masked=True)


@pytest.mark.parametrize("kernels", KERNELS)
def test_divided_attention_matches_masked_full_attention(kernels):
  """The reshape-based divided attention (either path) equals full attention restricted by the
  rule."""
  attention = xla_cpu.divided_attention if kernels == "xla_cpu" else layers.divided_attention
  b, t, n, h, d = 2, 3, 5, 2, 4
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, 1 + t * n, h, d)) for i in range(3))
  frame = jnp.concatenate([jnp.array([-1]), jnp.repeat(jnp.arange(t), n)])
  patch = jnp.concatenate([jnp.array([-1]), jnp.tile(jnp.arange(n), t)])
  ids = (jnp.broadcast_to(frame, (b, 1 + t * n)), jnp.broadcast_to(patch, (b, 1 + t * n)))
  for mode in ("space", "time"):
    a, wa = attention(q, k, v, t, mode)
    m, wm = layers.divided_attention_masked(q, k, v, *ids, mode, kernels)
    np.testing.assert_allclose(a, m, atol=1e-5)
    np.testing.assert_allclose(wa, wm, atol=1e-6)


def test_softmax_and_gelu_equal_the_library_forms_with_gradients():
  """xla_cpu.softmax (reciprocal-normalised, custom VJP) and xla_cpu.gelu (erf form) are the same
  functions as jax.nn.softmax / jax.nn.gelu(approximate=False) (the reference path's), values
  and gradients, including masked logits and GELU's far tails."""
  logits = 6.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 4, 9))
  logits = logits.at[:, :, -3:].set(-1e30)  # masked keys, as divided_attention_masked's bias
  cot = jax.random.normal(jax.random.PRNGKey(1), logits.shape)
  ours, ours_vjp = jax.vjp(xla_cpu.softmax, logits)
  ref, ref_vjp = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), logits)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours_vjp(cot)[0], ref_vjp(cot)[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(ours[:, :, -3:])) == 0.0

  x = jnp.linspace(-10.0, 10.0, 2001)
  np.testing.assert_allclose(xla_cpu.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  grad = jax.vmap(jax.grad(xla_cpu.gelu))(x)
  ref_grad = jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["space", "time"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_cpu_divided_attention_is_the_reference_function(mode, dtype, tol):
  """xla_cpu.divided_attention (heads-major groups; time through xla_cpu.attend and its
  hand-written backward) gives the reference path's values, cls weights and q/k/v gradients,
  f32 and bf16."""
  b, t, n, h, d = 2, 3, 5, 2, 4
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k, v = (jax.random.normal(kk, (b, 1 + t * n, h, d), dtype) for kk in keys[:3])
  cot = jax.random.normal(keys[3], (b, 1 + t * n, h, d), jnp.float32)
  outs = []
  for attention in (layers.divided_attention, xla_cpu.divided_attention):
    fn = lambda q, k, v, f=attention: f(q, k, v, t, mode)[0]
    out, vjp = jax.vjp(fn, q, k, v)
    outs.append([out, attention(q, k, v, t, mode)[1]] + list(vjp(cot.astype(dtype))))
  for ref, got in zip(*outs):
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    assert np.linalg.norm(got - ref) <= tol * np.linalg.norm(ref)
  assert np.abs(np.asarray(outs[0][2], np.float32)).max() > 0  # gradients are not trivially zero


def _model_loss_and_grads(mc, params, seed=0):
  model = dual_encoder.build(mc)
  f = _frames(seed)
  ids = jnp.asarray(np.random.default_rng(seed).integers(1, mc.text.vocab_size, (2, 6)), jnp.int32)
  am = jnp.ones((2, 6), jnp.int32).at[1, 4:].set(0)

  def loss(p):
    out = model.apply({"params": p}, f, ids, am)
    return (jnp.sum(out["video_embed"] @ out["text_embed"].T) + jnp.sum(out["mvm_pred"] ** 2),
            out)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("dtype,low_precision,tol", [
    ("float32", "all", 2e-5), pytest.param("bfloat16", "matmuls", 2e-2, marks=pytest.mark.slow),
    pytest.param("bfloat16", "all", 3e-2, marks=pytest.mark.slow)])
def test_xla_cpu_kernels_are_the_reference_model(tiny, dtype, low_precision, tol):
  """model.kernels=xla_cpu is the same model as the reference path: loss, embeddings and every
  parameter's gradient agree (f32 to float rounding, bf16 to bf16's)."""
  c, _, params = tiny
  runs = []
  for kernels in KERNELS:
    mc = config_lib.model_config("tiny")
    mc.dtype, mc.low_precision, mc.kernels = dtype, low_precision, kernels
    runs.append(_model_loss_and_grads(mc, params))
  ((l_ref, o_ref), g_ref), ((l_got, o_got), g_got) = runs
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                           / np.linalg.norm(np.asarray(a, np.float32)))
  assert rel(l_ref, l_got) <= tol
  for key in ("video_embed", "text_embed", "mvm_pred"):
    assert rel(o_ref[key], o_got[key]) <= tol, key
  flat_ref, flat_got = (jax.tree_util.tree_leaves_with_path(g) for g in (g_ref, g_got))
  norm = lambda a: float(np.linalg.norm(np.asarray(a, np.float32)))
  scale = max(norm(a) for _, a in flat_ref)
  for (path, a), (_, b) in zip(flat_ref, flat_got):
    # gradients that are zero in exact arithmetic (the unused mask_token; key biases, which
    # shift every logit of a row alike) are rounding noise on both paths
    if norm(a) > 1e-3 * scale:
      assert rel(a, b) <= 5 * tol, jax.tree_util.keystr(path)
    else:
      assert norm(b) <= 1e-3 * scale, jax.tree_util.keystr(path)


def test_kernels_field_is_explicit_and_checked():
  """model.kernels defaults to reference on every backend (no backend lookup in models/); a bad
  value names the field in one line."""
  import pathlib
  mc = config_lib.model_config("tiny")
  assert mc.kernels == "reference" and dual_encoder.kernels(mc) == "reference"
  assert dual_encoder.build(mc).kernels == "reference"
  mc.kernels = "fast"
  with pytest.raises(ValueError, match="model.kernels='fast'.*reference"):
    dual_encoder.kernels(mc)
  c = config_lib.default_config()
  c.model.kernels = "fast"
  with pytest.raises(ValueError, match="config.model.kernels"):
    config_lib.validate(c, needs_train_data=False)
  models = pathlib.Path(dual_encoder.__file__).parent
  for f in models.glob("*.py"):
    assert "default_backend" not in f.read_text(), f


def test_variable_frames_and_errors(tiny):
  c, model, params = tiny
  for t in (1, 2, 4):
    out = _video(model, params, _frames(4, t=t))
    assert out["patches"].shape == (2, t * 16, c.video.width)
  with pytest.raises(ValueError, match="num_frames"):
    _video(model, params, _frames(4, t=5))
  # a single frame ignores every temporal row but the first
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  p2["video"]["temporal_embed"] = params["video"]["temporal_embed"].at[1:].add(5.0)
  np.testing.assert_allclose(_video(model, params, _frames(4, t=1))["embed"],
                             _video(model, p2, _frames(4, t=1))["embed"], atol=1e-6)


def test_text_padding_is_masked(tiny):
  _, model, params = tiny
  ids = jnp.array([[2, 7, 9, 3, 0, 0]])
  am = jnp.array([[1, 1, 1, 1, 0, 0]])
  a = model.apply({"params": params}, ids, am, method=model.encode_text)["embed"]
  b = model.apply({"params": params}, ids.at[0, 4:].set(55), am, method=model.encode_text)["embed"]
  np.testing.assert_allclose(a, b, atol=1e-6)
  c = model.apply({"params": params}, ids[:, :4], am[:, :4], method=model.encode_text)["embed"]
  np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.slow
def test_bf16_and_remat_agree_with_f32(tiny):
  c, model, params = tiny
  f = _frames(5)
  ref = _video(model, params, f)["embed"]
  c2 = config_lib.model_config("tiny")
  for policy in ("full", "dots_saveable"):
    c2.remat = policy
    out = _video(dual_encoder.build(c2), params, f)["embed"]
    np.testing.assert_allclose(ref, out, atol=1e-5)
  c2.dtype = "bfloat16"
  for scope, kernels in (("all", "reference"), ("matmuls", "reference"), ("all", "xla_cpu"),
                         ("matmuls", "xla_cpu")):  # all: TPU / GPU; matmuls: CPU
    c2.low_precision, c2.kernels = scope, kernels
    out = _video(dual_encoder.build(c2), params, f)["embed"]
    assert out.dtype == jnp.float32
    # bf16 keeps 8 significand bits: eps = 2^-7. This depth-2 model's embeddings land within
    # ~1 eps of the f32 ones relative to their largest entry (measured 0.67-0.98 eps over 5
    # inputs); 3 eps leaves room for reduction order but fails a 5% scale or a sign error.
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    np.testing.assert_allclose(ref, out, rtol=0, atol=3 * eps * float(np.abs(ref).max()))
    assert not np.array_equal(np.asarray(ref), np.asarray(out))  # bf16 really was used


def test_base_parameter_count_matches_released_checkpoint():
  c = config_lib.model_config("base")
  model = dual_encoder.build(c)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1, 224, 224, 3)), jnp.ones((1, 2), jnp.int32),
      jnp.ones((1, 2), jnp.int32)))["params"]
  shapes = nn.unbox(shapes)
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t))
  inference = count(shapes) - count(shapes["mvm_head"]) - count(shapes["video"]["mask_token"])
  assert inference == 180_925_184  # the released MILES checkpoint's value count
  assert count(shapes["video"]) - 768 == 114_168_576  # one video encoder (paper: 114.2 M)


def _remat_test_loss(c, m, p):
  f = _frames(2)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, c.text.vocab_size, (2, 6)), jnp.int32)
  am = jnp.ones((2, 6), jnp.int32)
  v = m.apply({"params": p}, f, method=m.encode_video)
  t = m.apply({"params": p}, ids, am, method=m.encode_text)
  return jnp.sum(v["embed"] * t["embed"]) + jnp.mean(v["patches"] ** 2)


@pytest.fixture(scope="module")
def tiny_reference_gradients(tiny):
  """Loss and gradients of the unrolled, non-rematerialised tiny model (one compile)."""
  c, model, params = tiny
  return jax.jit(jax.value_and_grad(lambda p: _remat_test_loss(c, model, p)))(params)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "full", "dots_saveable"])
def test_remat_policies_and_scanned_layers_give_the_same_gradients(tiny, tiny_reference_gradients,
                                                                   policy):
  """Remat policies and nn.scan over the blocks change memory / compile time, not the maths:
  loss and gradients equal the unrolled, non-rematerialised model's (params converted with
  scan_params, gradients back with unscan_params)."""
  c, model, params = tiny
  f = _frames(2)
  ids, am = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), jnp.int32)
  ref_loss, ref_grads = tiny_reference_gradients
  for scan in (False, True):
    c2 = config_lib.model_config("tiny")
    c2.remat, c2.scan_layers = policy, scan
    m2 = dual_encoder.build(c2)
    p2 = dual_encoder.scan_params(params) if scan else params
    if scan:
      assert "blocks" in p2["video"] and "block_0" not in p2["video"]
      assert "layers" in p2["text"]
      # the scanned module's own init has the same tree as the converted params
      init = jax.eval_shape(lambda: m2.init(jax.random.PRNGKey(0), f, ids, am)["params"])
      assert jax.tree.structure(nn.unbox(init)) == jax.tree.structure(p2)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: _remat_test_loss(c, m2, p)))(p2)
    np.testing.assert_allclose(l2, ref_loss, rtol=1e-5)
    g2 = dual_encoder.unscan_params(g2) if scan else g2
    assert jax.tree.structure(g2) == jax.tree.structure(ref_grads)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bad_remat_policy_names_the_field():
  c2 = config_lib.model_config("tiny")
  c2.remat = "everything"
  with pytest.raises(ValueError, match="model.remat"):
    jax.eval_shape(lambda: dual_encoder.build(c2).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32)))
