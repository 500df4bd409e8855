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
