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


class _FakeDevice:
  """What the mesh builder reads of a device: id, platform, device_kind, slice_index."""

  def __init__(self, i, slice_index=None, platform="cpu"):
    self.id, self.platform, self.device_kind = i, platform, platform
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"D{self.id}/s{getattr(self, 'slice_index', '-')}"


def _slices(n_slices, per_slice):
  # interleaved on purpose: the grid must group by slice_index, not by list order
  return [_FakeDevice(i, slice_index=i % n_slices) for i in range(n_slices * per_slice)]


@pytest.mark.parametrize("shape,axes", [((-1,), ("data",)), ((-1, 2), ("data", "fsdp")),
                                        ((2, -1, 2), ("fsdp", "data", "model"))])
def test_multislice_data_axis_spans_the_slices(shape, axes):
  """mesh.num_slices=2: the data axis is the only one that crosses slices (DCN); along every
  other axis all devices share a slice, and each half of the data axis is one slice."""
  devices = _slices(2, 8)
  grid = parallel.device_grid(shape, axes, devices, num_slices=2)
  assert grid.size == 16 and sorted(d.id for d in grid.flat) == list(range(16))
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  d = axes.index("data")
  moved = np.moveaxis(slice_of, d, 0)
  half = moved.shape[0] // 2
  assert (moved[:half] == moved[:half].flat[0]).all() and (moved[half:] == moved[half:].flat[0]).all()
  assert moved[0].flat[0] != moved[-1].flat[0]


@pytest.mark.parametrize("devices,num_slices,shape,needle", [
    ([_FakeDevice(i) for i in range(8)], 2, (-1,), "slice_index"),  # CPU devices: no slices
    (_slices(2, 4), 4, (-1,), "belong to 2 slice"),
    (_slices(2, 4), 1, (-1,), "mesh.num_slices=2"),  # two slices but the config says one
    (_slices(2, 4), 2, (2, -1), "'data'"),  # no data axis to split (axes fsdp, model below)
    (_slices(2, 4), 2, (1, -1), "multiple of mesh.num_slices"),
])
def test_multislice_errors_name_the_field(devices, num_slices, shape, needle):
  axes = ("fsdp", "model") if needle == "'data'" else ("data", "fsdp")[:len(shape)]
  with pytest.raises(ValueError, match="mesh.num_slices") as e:
    parallel.device_grid(shape, axes, devices, num_slices=num_slices)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_mesh_from_config_reads_num_slices():
  c = config_lib.default_config()
  assert c.mesh.num_slices == 1
  assert dict(parallel.mesh_from_config(c).shape) == {"data": jax.device_count()}
  c.mesh.num_slices = 2  # the simulated CPU devices carry no slice_index
  with pytest.raises(ValueError, match="slice_index"):
    parallel.mesh_from_config(c)
