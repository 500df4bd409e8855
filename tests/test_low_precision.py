"""bf16 compute: dense layers keep bf16 operands with float32 accumulation in the forward and
both backward matmuls (what XLA:CPU runs on its bf16 units), and compute the right gradients."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from miles_jax.models import layers


def _loss(dtype):
  def f(params, x):
    y = layers.dense(48, ("embed", "mlp"), "d", dtype).apply({"params": params}, x.astype(dtype))
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return f


def _init():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 32), jnp.float32)
  params = layers.dense(48, ("embed", "mlp"), "d", jnp.float32).init(jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params["params"],
                                is_leaf=lambda p: hasattr(p, "value")), x


def test_bf16_dense_gradients_match_float32():
  params, x = _init()
  g32 = jax.grad(_loss(jnp.float32), argnums=(0, 1))(params, x)
  g16 = jax.grad(_loss(jnp.bfloat16), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
    a, b = np.asarray(a), np.asarray(b, np.float32)
    # bf16 has 8 mantissa bits: relative error of a K=32..196 sum of products stays ~1e-2;
    # a wrong transpose, sign or scale would be off by O(1).
    assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(a)


def test_bf16_dense_dots_stay_bf16_in_forward_and_backward():
  params, x = _init()
  hlo = jax.jit(jax.grad(_loss(jnp.bfloat16), argnums=(0, 1))).lower(params, x).as_text()
  dots = re.findall(r"stablehlo.dot_general[^\n]*", hlo)
  assert len(dots) == 3, dots  # forward, d/dx, d/dW
  for d in dots:
    operands = re.search(r":\s*\((.*?)\)\s*->\s*(\S+)", d)
    assert operands.group(1).count("bf16") == 2 and "f32" in operands.group(2), d


def test_matmul_scope_dense_keeps_float32_activations():
  """model.low_precision=matmuls: float32 in and out, the three dots bf16 x bf16 -> f32, and the
  gradients those of the float32 layer within bf16's rounding."""
  params, x = _init()

  def loss(p, x):
    y = layers.dense(48, ("embed", "mlp"), "d", jnp.float32, matmul_dtype=jnp.bfloat16).apply(
        {"params": p}, x)
    assert y.dtype == jnp.float32
    return jnp.sum(jnp.sin(y))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  dots = re.findall(r"stablehlo.dot_general[^\n]*", hlo)
  assert len(dots) == 3, dots
  for d in dots:
    operands = re.search(r":\s*\((.*?)\)\s*->\s*(\S+)", d)
    assert operands.group(1).count("bf16") == 2 and "f32" in operands.group(2), d
  g32 = jax.grad(_loss(jnp.float32), argnums=(0, 1))(params, x)
  g = jax.grad(loss, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g)):
    a, b = np.asarray(a), np.asarray(b)
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(a)
    assert not np.array_equal(a, b)  # the operands really were rounded to bf16
  # the float32 weight gets its float32 accumulator as gradient, not a bf16-rounded copy
  dw = np.asarray(g[0]["kernel"])
  assert not np.array_equal(dw, np.asarray(jnp.asarray(dw).astype(jnp.bfloat16), np.float32))


def _model_dots(scope):
  """(activation dtype of the video patches, [(operand dtypes, result dtype)] of every dot) of
  the tiny dual encoder's forward with model.dtype=bfloat16 and model.low_precision=scope."""
  from miles_jax import config_lib
  from miles_jax.models import dual_encoder
  mc = config_lib.model_config("tiny")
  mc.dtype, mc.low_precision = "bfloat16", scope
  model = dual_encoder.build(mc)
  frames = jnp.zeros((2, 2, 32, 32, 3), jnp.float32)
  ids, am = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), frames, ids, am)
  out = jax.eval_shape(model.apply, params, frames, ids, am)
  hlo = jax.jit(model.apply).lower(params, frames, ids, am).as_text()
  dots = [re.search(r":\s*\((.*?)\)\s*->\s*(\S+)", d).groups()
          for d in re.findall(r"stablehlo.dot_general[^\n]*", hlo)]
  return out["patches"].dtype, dots


def test_low_precision_scopes_of_the_model():
  """`all`: activations bf16, the attention's dots too; `matmuls`: activations float32 and only
  the dense layers' dots bf16 — video 6 per block, text 6 per block, the two projections and
  the MVM head."""
  from miles_jax import config_lib
  mc = config_lib.model_config("tiny")
  num_dense = 6 * mc.video.depth + 6 * mc.text.depth + 3
  act, dots = _model_dots("matmuls")
  assert act == jnp.float32
  bf16 = [d for d in dots if d[0].count("bf16") == 2]
  assert len(bf16) == num_dense, dots
  assert all("f32" in r for _, r in bf16)
  assert all("bf16" not in o for o, _ in dots if o.count("bf16") != 2)  # attention: float32
  assert len(dots) > num_dense
  act, dots = _model_dots("all")
  assert act == jnp.bfloat16
  assert len([d for d in dots if d[0].count("bf16") == 2]) == len(dots)


def test_low_precision_resolution():
  from miles_jax import config_lib
  from miles_jax.models import dual_encoder
  mc = config_lib.model_config("tiny")
  assert dual_encoder.compute_dtypes(mc) == (jnp.float32, jnp.float32)
  mc.dtype = "bfloat16"
  assert jax.default_backend() == "cpu"
  assert dual_encoder.compute_dtypes(mc) == (jnp.float32, jnp.bfloat16)  # auto on CPU
  mc.low_precision = "all"
  assert dual_encoder.compute_dtypes(mc) == (jnp.bfloat16, jnp.bfloat16)
  mc.low_precision = "bf16"
  try:
    dual_encoder.compute_dtypes(mc)
  except ValueError as e:
    assert "model.low_precision" in str(e) and "matmuls" in str(e)
  else:
    raise AssertionError("a bad model.low_precision was accepted")
