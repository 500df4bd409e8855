"""Mesh construction, logical -> mesh rules and host -> global batches on 8 simulated devices."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from miles_jax import config_lib, parallel


def test_make_mesh_fills_minus_one_with_auto_axes():
  mesh = parallel.make_mesh((2, -1), ("data", "fsdp"))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [(3,), (3, -1), (2, 2)])
def test_make_mesh_errors_name_the_field(shape):
  with pytest.raises(ValueError, match="mesh.shape"):
    parallel.make_mesh(shape, ("data", "fsdp")[:len(shape)])


def test_rules_drop_absent_mesh_axes():
  rules = config_lib.default_config().sharding.rules
  mesh = parallel.make_mesh((-1,), ("data",))
  got = dict(parallel.logical_rules(rules, mesh))
  assert got["batch"] == "data" and got["embed"] is None and got["mlp"] is None
  mesh = parallel.make_mesh((2, 4), ("data", "fsdp"))
  got = dict(parallel.logical_rules(rules, mesh))
  assert got["batch"] == ("data", "fsdp") and got["embed"] == "fsdp"


def test_logical_spec_repeated_names_and_axes():
  rules = (("patch", "model"), ("embed", "fsdp"), ("mlp", "fsdp"))
  # A repeated logical name (conv kernel) and a mesh axis already taken stay replicated.
  assert parallel.logical_to_mesh_spec(P("patch", "patch", None, "embed"), rules) == P(
      "model", None, None, "fsdp")
  assert parallel.logical_to_mesh_spec(P("embed", "mlp"), rules) == P("fsdp", None)


def test_global_batch_is_sharded_over_batch_axes():
  mesh = parallel.make_mesh((2, 4), ("data", "fsdp"))
  rules = parallel.logical_rules(config_lib.default_config().sharding.rules, mesh)
  assert parallel.batch_divisor(mesh, rules) == 8
  local = {"frames": np.arange(16 * 3, dtype=np.uint8).reshape(16, 3),
           "mvm_mask": np.zeros((16, 5), bool)}
  batch = parallel.global_batch(local, mesh, rules)
  assert batch["frames"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["frames"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["frames"]), local["frames"])
  assert jax.device_count() == 8
