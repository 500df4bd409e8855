"""Device mesh, logical -> mesh sharding rules, and host <-> global array helpers.

The model names its parameter axes ('embed', 'mlp', ...); `config.sharding.rules` maps those names
to mesh axes. Data-parallel, FSDP and tensor-parallel layouts are therefore config changes:

  data parallel:  mesh.shape=(-1,)    mesh.axes=('data',)
  FSDP:           mesh.shape=(2, -1)  mesh.axes=('data', 'fsdp')
  data x model:   mesh.shape=(-1, 2)  mesh.axes=('data', 'model')
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh of `devices` (default: all) with one -1 entry meaning 'all remaining devices'.

  Axis types are Auto (classic jit + NamedSharding), unlike `jax.make_mesh`'s Explicit default.
  """
  devices = list(jax.devices() if devices is None else devices)
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
  device_array = np.asarray(devices).reshape(shape)
  if devices[0].platform == "tpu":  # ICI topology matters there; elsewhere row-major is fine
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices)
  return Mesh(device_array, axes)


def mesh_from_config(config, devices=None) -> Mesh:
  return make_mesh(config.mesh.shape, config.mesh.axes, devices)


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
