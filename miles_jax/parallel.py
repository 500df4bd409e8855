"""Device mesh, logical -> mesh sharding rules, and host <-> global array helpers.

The model names its parameter axes ('embed', 'mlp', ...); `config.sharding.rules` maps those names
to mesh axes. Data-parallel, FSDP and tensor-parallel layouts are therefore config changes:

  data parallel:  mesh.shape=(-1,)    mesh.axes=('data',)
  FSDP:           mesh.shape=(2, -1)  mesh.axes=('data', 'fsdp')
  data x model:   mesh.shape=(-1, 2)  mesh.axes=('data', 'model')
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None,
              num_slices: int = 1) -> Mesh:
  """A mesh of `devices` (default: all) with one -1 entry meaning 'all remaining devices'.

  Axis types are Auto (classic jit + NamedSharding), unlike `jax.make_mesh`'s Explicit default.
  `num_slices` > 1 (multislice): the `data` axis spans the slices (device_grid).
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(shape, axes, devices, num_slices), tuple(axes))


def device_grid(shape: Sequence[int], axes: Sequence[str], devices: Sequence,
                num_slices: int = 1) -> np.ndarray:
  """The devices arranged as the mesh `shape` (one -1 entry allowed).

  One slice: on TPU `mesh_utils.create_device_mesh` follows the ICI torus, elsewhere row-major.
  Several slices (`mesh.num_slices`, devices carrying `slice_index`): the `data` axis is split
  into num_slices blocks that cross the data-centre network (DCN) and every other axis stays
  inside a slice, as `mesh_utils.create_hybrid_device_mesh` builds it; only the data-parallel
  gradient all-reduce then crosses slices.
  """
  devices = list(devices)
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape={shape} and mesh.axes={axes} must have the same length")
  if len(set(axes)) != len(axes):
    raise ValueError(f"mesh.axes={axes} repeats an axis name")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={shape}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh.shape={shape}: {len(devices)} devices are not divisible by "
                       f"{known}; change mesh.shape")
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh.shape={shape} has {math.prod(shape)} slots but there are "
                     f"{len(devices)} devices: make the product equal the device count "
                     "or use -1 for one axis")
  num_slices = int(num_slices)
  slices = {getattr(d, "slice_index", None) for d in devices}
  if num_slices < 1:
    raise ValueError(f"mesh.num_slices={num_slices} must be >= 1")
  if num_slices == 1:
    if len(slices) > 1:
      raise ValueError(f"the {len(devices)} devices span {len(slices)} TPU slices but "
                       f"mesh.num_slices=1: set mesh.num_slices={len(slices)}")
    if devices[0].platform == "tpu":  # ICI topology matters there; elsewhere row-major is fine
      from jax.experimental import mesh_utils
      return mesh_utils.create_device_mesh(shape, devices)
    return np.asarray(devices).reshape(shape)
  if None in slices:
    raise ValueError(f"mesh.num_slices={num_slices} needs devices that carry slice_index (TPU "
                     f"multislice); these {devices[0].platform} devices do not: set "
                     "mesh.num_slices=1")
  if len(slices) != num_slices:
    raise ValueError(f"mesh.num_slices={num_slices} but the {len(devices)} devices belong to "
                     f"{len(slices)} slice(s): set mesh.num_slices={len(slices)}")
  if "data" not in axes:
    raise ValueError(f"mesh.num_slices={num_slices} splits the 'data' axis across slices but "
                     f"mesh.axes={axes} has none: add 'data'")
  i = axes.index("data")
  if shape[i] % num_slices:
    raise ValueError(f"mesh.shape={shape}: the data axis ({shape[i]}) must be a multiple of "
                     f"mesh.num_slices={num_slices}")
  per_slice = tuple(s // num_slices if j == i else s for j, s in enumerate(shape))
  dcn = tuple(num_slices if j == i else 1 for j in range(len(shape)))
  from jax.experimental import mesh_utils
  return mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)


def mesh_from_config(config, devices=None) -> Mesh:
  return make_mesh(config.mesh.shape, config.mesh.axes, devices,
                   num_slices=config.mesh.get("num_slices", 1))


def is_partitioned(mesh: Mesh) -> bool:
  """Whether programs on `mesh` are split across devices. A one-device program gets no sharding
  constraints (activations, gradients): nothing to split, and the program stays as it was."""
  return mesh.devices.size > 1


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
  """Inside a jitted program's function: the model's activation constraints
  (`layers.constrain_batch`, flax `nn.with_logical_constraint`) resolve on `mesh` by `rules`;
  outside this context they are no-ops. The residual stream stays split like the batch, so under
  FSDP the partitioner gathers the weights for each matmul instead of gathering activations and
  all-reducing partial sums across the fsdp axis."""
  if not is_partitioned(mesh):
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def logical_rules(rules, mesh: Mesh) -> Rules:
  """`config.sharding.rules` with mesh axes absent from `mesh` removed (then None = replicated)."""
  present = set(mesh.axis_names)
  out = []
  for name, target in rules:
    if target is None:
      out.append((name, None))
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(t for t in targets if t in present)
    out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
  return tuple(out)


def logical_to_mesh_spec(logical: P | None, rules: Rules) -> P:
  """One logical PartitionSpec -> mesh PartitionSpec.

  Per dimension the first rule naming it wins; a mesh axis already used by an earlier dimension
  of the same array leaves the later one replicated (flax's helper rejects repeated names such as
  the conv kernel's ('patch', 'patch', ...)).
  """
  if logical is None:
    return P()
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used, out = set(), []
  for name in logical:
    target = table.get(name) if name is not None else None
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if not axes or used & set(axes):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def logical_to_sharding(logical_specs, mesh: Mesh, rules: Rules):
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules: Rules):
  """Shardings for the unboxed values of params made with `nn.with_logical_partitioning`."""
  return logical_to_sharding(nn.get_partition_spec(abstract_boxed_params), mesh, rules)


def batch_axes(mesh: Mesh, rules: Rules):
  """The mesh axes the batch dimension is split over (the 'batch' rule)."""
  for name, target in rules:
    if name == "batch":
      return target
  return None


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch; the other axes are replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
  """How many shards the global batch is split into (it must be a multiple of this)."""
  axes = batch_axes(mesh, rules)
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch: dict, mesh: Mesh, rules: Rules) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes.

  Each process passes its own slice (global batch / process count rows); host copies are put, so
  a donated step input never aliases the caller's arrays.
  """
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
