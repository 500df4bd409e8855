"""bf16 compute: dense layers compute the right gradients on both kernel paths; with
model.kernels=xla_cpu they keep bf16 operands with float32 accumulation in the forward and both
backward matmuls (what XLA:CPU runs on its bf16 units)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miles_jax.models import layers

KERNELS = ("reference", "xla_cpu")


def _loss(dtype, kernels="xla_cpu"):
  def f(params, x):
    y = layers.dense(48, ("embed", "mlp"), "d", dtype, kernels=kernels).apply(
        {"params": params}, x.astype(dtype))
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))
  return f


def _init():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 32), jnp.float32)
  params = layers.dense(48, ("embed", "mlp"), "d", jnp.float32).init(jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params["params"],
                                is_leaf=lambda p: hasattr(p, "value")), x


@pytest.mark.parametrize("kernels", KERNELS)
def test_bf16_dense_gradients_match_float32(kernels):
  params, x = _init()
  g32 = jax.grad(_loss(jnp.float32, kernels), argnums=(0, 1))(params, x)
  g16 = jax.grad(_loss(jnp.bfloat16, kernels), argnums=(0, 1))(params, x)
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


@pytest.mark.parametrize("kernels", KERNELS)
def test_matmul_scope_dense_keeps_float32_activations(kernels):
  """model.low_precision=matmuls: float32 in and out, the forward dot bf16 x bf16 -> f32 (with
  xla_cpu the two backward dots too), and the gradients those of the float32 layer within
  bf16's rounding."""
  params, x = _init()

  def loss(p, x):
    y = layers.dense(48, ("embed", "mlp"), "d", jnp.float32, matmul_dtype=jnp.bfloat16,
                     kernels=kernels).apply({"params": p}, x)
    assert y.dtype == jnp.float32
    return jnp.sum(jnp.sin(y))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  dots = re.findall(r"stablehlo.dot_general[^\n]*", hlo)
  assert len(dots) == 3, dots
  for d in dots if kernels == "xla_cpu" else dots[:1]:
    operands = re.search(r":\s*\((.*?)\)\s*->\s*(\S+)", d)
    assert operands.group(1).count("bf16") == 2 and "f32" in operands.group(2), d
  g32 = jax.grad(_loss(jnp.float32), argnums=(0, 1))(params, x)
  g = jax.grad(loss, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g)):
    a, b = np.asarray(a), np.asarray(b)
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(a)
    assert not np.array_equal(a, b)  # the operands really were rounded to bf16
  if kernels == "xla_cpu":
    # the float32 weight gets its float32 accumulator as gradient, not a bf16-rounded copy
    dw = np.asarray(g[0]["kernel"])
    assert not np.array_equal(dw, np.asarray(jnp.asarray(dw).astype(jnp.bfloat16), np.float32))


def _model_dots(scope, kernels):
  """(activation dtype of the video patches, [(operand dtypes, result dtype)] of every dot) of
  the tiny dual encoder's forward with model.dtype=bfloat16 and model.low_precision=scope."""
  from miles_jax import config_lib
  from miles_jax.models import dual_encoder
  mc = config_lib.model_config("tiny")
  mc.dtype, mc.low_precision, mc.kernels = "bfloat16", scope, kernels
  model = dual_encoder.build(mc)
  frames = jnp.zeros((2, 2, 32, 32, 3), jnp.float32)
  ids, am = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), frames, ids, am)
  out = jax.eval_shape(model.apply, params, frames, ids, am)
  hlo = jax.jit(model.apply).lower(params, frames, ids, am).as_text()
  dots = [re.search(r":\s*\((.*?)\)\s*->\s*(\S+)", d).groups()
          for d in re.findall(r"stablehlo.dot_general[^\n]*", hlo)]
  return out["patches"].dtype, dots


@pytest.mark.slow
@pytest.mark.parametrize("kernels", KERNELS)
def test_low_precision_scopes_of_the_model(kernels):
  """`all`: activations bf16, the attention's dots too; `matmuls`: activations float32 and only
  the dense layers' dots bf16 — video 6 per block, text 6 per block, the two projections and
  the MVM head."""
  from miles_jax import config_lib
  mc = config_lib.model_config("tiny")
  num_dense = 6 * mc.video.depth + 6 * mc.text.depth + 3
  act, dots = _model_dots("matmuls", kernels)
  assert act == jnp.float32
  bf16 = [d for d in dots if d[0].count("bf16") == 2]
  assert len(bf16) == num_dense, dots
  assert all("f32" in r for _, r in bf16)
  assert all("bf16" not in o for o, _ in dots if o.count("bf16") != 2)  # attention: float32
  assert len(dots) > num_dense
  act, dots = _model_dots("all", kernels)
  assert act == jnp.bfloat16
  assert len([d for d in dots if d[0].count("bf16") == 2]) == len(dots)


def test_low_precision_resolution():
  from miles_jax import config_lib
  from miles_jax.models import dual_encoder
  mc = config_lib.model_config("tiny")
  assert dual_encoder.compute_dtypes(mc) == (jnp.float32, jnp.float32)
  mc.dtype = "bfloat16"
  # the default does not depend on the backend (a TPU program compiled on a CPU host is TPU's)
  assert dual_encoder.compute_dtypes(mc) == (jnp.bfloat16, jnp.bfloat16)
  mc.low_precision = "matmuls"
  assert dual_encoder.compute_dtypes(mc) == (jnp.float32, jnp.bfloat16)
  for bad in ("bf16", "auto"):
    mc.low_precision = bad
    with pytest.raises(ValueError, match="model.low_precision.*matmuls"):
      dual_encoder.compute_dtypes(mc)
