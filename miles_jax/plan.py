"""Plan a TPU run before creating the slice: compile the train step for a TPU topology on any host.

    python -m miles_jax.plan --config=configs/pretrain_miles.py:stage2 --topology=v5e-64 \
        [--config.FIELD=VALUE ...] [--batch=N] [--max_batch] [--mfu=0.4] [--json]

`--topology` is the accelerator type `gcloud compute tpus tpu-vm create --accelerator-type` takes
(v4-32, v5litepod-64 or v5e-64, v5p-128, v6e-64, ...). JAX's deviceless ahead-of-time path gives
the slice's devices without the hardware (`jax.experimental.topologies`, needs libtpu: `pip
install -e '.[tpu]'`); every program a run compiles is then built as `train` builds it on the
TPU — the mesh of `config.mesh`, the sharding rules, remat / scan / dtype, the donated state —
from abstract inputs only (`jax.ShapeDtypeStruct`s with their shardings), lowered and compiled:

  train_<T>f   the train step for each frame count the data sources feed (`data.train`: e.g.
               stage-2 videos at 4 frames and images as 1-frame clips), at the global batch;
  eval_video / eval_text   the evaluation's embedding steps (`data.eval_batch_size`).

Per program and per chip it reports the compiler's memory (arguments — params, optimiser state,
EMA snapshot, batch — temporaries, outputs, aliased, their peak) against the chip's HBM (fits or
not: exit status 3 naming the program when not), the FLOPs per step (XLA's cost analysis; loop
bodies, e.g. `model.scan_layers`, counted by their trip count from the HLO) beside the analytic
count of `miles_jax.profile`, the roofline step time at the chip's peak bf16 rate, clips/s and
hours and list-price cost of a schedule at 100 % and at `--mfu`, and the collectives of the
compiled HLO (count and bytes per step; with several slices the cross-slice DCN transfers
apart from the in-slice ones). `--max_batch` bisects the largest global batch (a
multiple of the batch shards) whose train steps fit.

Each compile runs in a child process whose host memory is watched: compiling the unrolled base
model for a large slice can need 10-20 GB of host RAM; past `--host_memory_gb` (default: what
the host has available) the child is stopped and the error says what lowers it
(`--config.model.scan_layers=True` compiles each transformer stack once).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

GiB = 1024 ** 3


# ----------------------------------------------------------------------------- the slices

@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what a chip has and costs, and how gcloud names its slices."""
  family: str  # accelerator-type prefix as gcloud spells it
  topology_prefix: str  # libtpu's topology name prefix
  chip_config: str  # 'megacore': one JAX device per chip spanning both TensorCores
  names_count_cores: bool  # True: the number in `v4-32` counts TensorCores (2 per chip)
  dims: int  # 2-D or 3-D torus
  hbm_bytes: int
  peak_bf16_flops: float
  usd_per_chip_hour: float
  single_host_chips: int  # the largest slice one host holds


# Sources (Cloud TPU documentation; prices are on-demand list prices in US regions, which vary
# by region and change: check https://cloud.google.com/tpu/pricing before renting):
# v4  https://cloud.google.com/tpu/docs/v4 : 2 TensorCores per chip used as one megacore device,
#     32 GiB HBM2, 275 TFLOP/s bf16 per chip, 3-D slices, 4 chips per host; `v4-N` counts
#     TensorCores. Price $3.22 per chip-hour (us-central2).
# v5e https://cloud.google.com/tpu/docs/v5e : 1 TensorCore per chip, 16 GB HBM2, 197 TFLOP/s
#     bf16, 2-D slices up to 16x16, 4 chips per host in multi-host slices (v5litepod-8: one
#     host of 8); `v5litepod-N` (also written v5e-N) counts chips. Price $1.20 per chip-hour.
# v5p https://cloud.google.com/tpu/docs/v5p : 2 TensorCores per chip (megacore), 95 GB HBM2e,
#     459 TFLOP/s bf16, 3-D slices, 4 chips per host; `v5p-N` counts TensorCores. Price $4.20
#     per chip-hour.
# v6e https://cloud.google.com/tpu/docs/v6e : 1 TensorCore per chip, 32 GB HBM, 918 TFLOP/s
#     bf16, 2-D slices up to 16x16, 4 chips per host in multi-host slices (v6e-8: one host of
#     8); `v6e-N` counts chips. Price $2.70 per chip-hour.
# The topology / chip-config / host-bound triples libtpu accepts follow the same mapping as
# AI-Hypercomputer/maxtext's accelerator_to_spec_map.py (e.g. v4-32 -> v4:2x2x4 megacore,
# v5p-128 -> v5:4x4x4 megacore, v5e-64 -> v5e:8x8).
CHIPS = {
    "v4": Chip("v4", "v4", "megacore", True, 3, 32 * GiB, 275e12, 3.22, 4),
    "v5litepod": Chip("v5litepod", "v5e", "default", False, 2, 16 * GiB, 197e12, 1.20, 8),
    "v5p": Chip("v5p", "v5", "megacore", True, 3, 95 * 10 ** 9, 459e12, 4.20, 4),
    "v6e": Chip("v6e", "v6e", "default", False, 2, 32 * 10 ** 9, 918e12, 2.70, 8),
}
ALIASES = {"v5e": "v5litepod"}
# 2-D shapes (chips -> X x Y) and 3-D shapes (chips -> X x Y x Z) of the slices gcloud offers.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
             4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  chip: Chip
  chips: int
  shape: tuple
  num_slices: int = 1

  @property
  def topology_name(self) -> str:
    return f"{self.chip.topology_prefix}:{'x'.join(str(s) for s in self.shape)}"

  @property
  def host_bounds(self) -> tuple:
    if self.chips <= self.chip.single_host_chips:
      return tuple(self.shape) + (1,) * (3 - len(self.shape))
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    return self.num_slices * max(1, self.chips // math.prod(self.host_bounds))

  @property
  def devices(self) -> int:
    return self.chips * self.num_slices

  @property
  def accelerator_type(self) -> str:
    n = self.chips * (2 if self.chip.names_count_cores else 1)
    return f"{self.chip.family}-{n}"


def known_slices() -> list[str]:
  out = []
  for chip in CHIPS.values():
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    mult = 2 if chip.names_count_cores else 1
    out += [f"{chip.family}-{n * mult}" for n in shapes]
  return out


class PlanError(Exception):
  """Bad input or a failed plan: one line for the user, and the exit status."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5e-64' / 'v5litepod-64' / '2xv5e-256' -> Slice; PlanError(2) listing the known names."""
  text = str(name).strip().lower()
  m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", text)
  chip = None
  if m:
    family = ALIASES.get(m.group(2), m.group(2))
    chip = CHIPS.get(family)
  if chip is not None:
    count = int(m.group(3))
    chips = count // 2 if chip.names_count_cores else count
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    slices = int(m.group(1) or 1) * int(num_slices)
    if (not chip.names_count_cores or count % 2 == 0) and chips in shapes and slices >= 1:
      return Slice(name, chip, chips, shapes[chips], slices)
  raise PlanError(f"--topology={name}: unknown TPU slice; use one of {', '.join(known_slices())} "
                  "(v5litepod-N may be written v5e-N; NxSLICE for N slices)")


def require_libtpu():
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError("plan compiles for TPU with libtpu, which is not installed: "
                    "pip install -e '.[tpu]' (or pip install 'jax[tpu]==0.10.2')")


def topology_devices(sl: Slice):
  """The slice's abstract TPU devices (deviceless: no TPU needed)."""
  # libtpu reads what machine it is on from these (else it prints warnings, finding no TPU VM).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", sl.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # compiling needs no exclusive hold on a chip: let plans (and a TPU VM's own runs) coexist
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=sl.topology_name, chip_config_name=sl.chip.chip_config,
      chips_per_host_bounds=sl.host_bounds, num_slices=sl.num_slices)
  return list(topo.devices)


# ----------------------------------------------------------------------------- the programs

def train_frame_counts(config) -> list[int]:
  """The clip lengths the train step compiles for: one per distinct `frames` of the sources."""
  from miles_jax import config_lib
  sources = config_lib.train_sources(config)
  frames = sorted({int(s["frames"]) for s in sources}) or [int(config.data.num_frames)]
  return sorted(frames, reverse=True)


def source_weights(config) -> dict[int, float]:
  """frames -> share of the steps (each global batch comes from one source picked by weight)."""
  from miles_jax import config_lib
  sources = config_lib.train_sources(config)
  if not sources:
    return {int(config.data.num_frames): 1.0}
  total = sum(s["weight"] for s in sources)
  out: dict[int, float] = {}
  for s in sources:
    out[int(s["frames"])] = out.get(int(s["frames"]), 0.0) + s["weight"] / total
  return out


def program_names(config) -> list[str]:
  names = [f"train_{t}f" for t in train_frame_counts(config)]
  if config.data.get("eval") or config.data.get("val"):
    names += ["eval_video", "eval_text"]
  return names


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // int(m)) * int(m)


def build_program(config, mesh, name: str, batch: int):
  """(jitted function, abstract args, {argument group: per-chip bytes}, global batch) of one
  program on `mesh`, built by the functions `train` / `evaluate` use."""
  import jax
  import jax.numpy as jnp

  from miles_jax import parallel
  from miles_jax.models import dual_encoder
  from miles_jax.train import optim
  from miles_jax.train.state import abstract_train_state
  from miles_jax.train.step import abstract_batch, make_train_step
  model = dual_encoder.build(config.model)
  tx = optim.make_optimizer(config)[0]
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  state = abstract_train_state(config, mesh, model, tx)
  if name.startswith("train_"):
    frames = int(name[len("train_"):-1])
    div = parallel.batch_divisor(mesh, rules)
    if batch % div:
      raise PlanError(f"batch {batch} must be a multiple of the {div} batch shards of mesh "
                      f"{dict(mesh.shape)} (config.mesh / --batch)")
    args = (state, abstract_batch(config, mesh, batch, frames))
    groups = {"params": state.params, "opt_state": state.opt_state,
              "snapshot": state.snapshot_params, "batch": args[1],
              "step_rng": (state.step, state.rng)}
    return make_train_step(config, mesh, model, tx), args, groups, batch
  from miles_jax.data import pipeline
  from miles_jax.evaluation import extract
  clips = int(config.data.get("eval_clips", 1))
  embedder = extract.Embedder(config.model, mesh, rules, clips)
  # what Embedder's host-local batch gives on every host, times the hosts
  hosts = len({d.process_index for d in mesh.devices.flat})
  per_host = max(1, embedder.divisor // hosts)
  batch = _round_up(int(config.data.eval_batch_size), per_host) * hosts
  sh = parallel.batch_sharding(mesh, rules)
  index = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sh)
  if name == "eval_video":
    v = config.model.video
    frames = jax.ShapeDtypeStruct(
        (batch, int(config.data.num_frames) * clips, v.img_size, v.img_size, 3), jnp.uint8,
        sharding=sh)
    args = (state.params, frames, index)
    return embedder.video_fn, args, {"params": state.params, "batch": (frames, index)}, batch
  if name == "eval_text":
    length = pipeline.eval_max_len(config)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sh)
    args = (state.params, ids, ids, index)
    return embedder.text_fn, args, {"params": state.params, "batch": (ids, ids, index)}, batch
  raise PlanError(f"unknown program {name!r}: one of {program_names(config)}")


def per_chip_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


# ----------------------------------------------------------------------------- reading the HLO

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Multislice: the TPU compiler emits each slice's program with the in-slice (ICI) collectives
# above and turns the cross-slice (DCN) part into host-transfer send / recv pairs handled by the
# megascale runtime, tagged `_xla_megascale_transfer_type="ALL_REDUCE"` etc. Counted from the
# sends (one per transfer; the recv is its other half), bytes as sent per chip.
_DCN_TYPE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')


def _arrays(shape_text: str) -> list[tuple[str, tuple]]:
  """'(f32[2,3]{1,0}, bf16[4]{0})' -> [('f32', (2, 3)), ('bf16', (4,))]."""
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(
      shape_text) if d in _DTYPE_BYTES]


def _nbytes(arrays) -> int:
  return sum(math.prod(s) * _DTYPE_BYTES[d] for d, s in arrays)


def _dot_flops(out, lhs, attrs: str) -> int:
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
  k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
  return 2 * math.prod(out) * k


def _conv_flops(out, lhs, rhs, attrs: str) -> int:
  """XLA's count for a convolution: 2 x output size x input features per group x the kernel
  positions that land on real (not padding, not dilation-hole) input elements."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not labels:
    return 0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = [c for c in lhs_l if c not in "bf"]
  win = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}

  def field(key, default, n, pair=False):
    if key not in fields:
      return [default] * n
    parts = fields[key].split("x")
    return [tuple(int(v) for v in p.split("_")) if pair else int(p) for p in parts]
  n = len(spatial)
  size = field("size", 1, n)
  stride = field("stride", 1, n)
  pad = field("pad", (0, 0), n, pair=True)
  lhs_dil = field("lhs_dilate", 1, n)
  rhs_dil = field("rhs_dilate", 1, n)
  valid = 1
  for i, c in enumerate(spatial):
    in_size = lhs[lhs_l.index(c)]
    out_size = out[out_l.index(c)]
    dilated = (in_size - 1) * lhs_dil[i] + 1
    count = 0
    for o in range(out_size):
      for k in range(size[i]):
        pos = o * stride[i] - pad[i][0] + k * rhs_dil[i]
        if 0 <= pos < dilated and pos % lhs_dil[i] == 0:
          count += 1
    valid *= count
  # the kernel's `i` dimension is already the input features of one feature group
  in_features = rhs[rhs_l.index("i")]
  return 2 * out[out_l.index("b")] * out[out_l.index("f")] * in_features * valid


def read_hlo(text: str) -> dict:
  """From optimised HLO text: collectives per step (count and bytes, loops counted by their
  trip count) and the FLOPs of dots / convolutions that XLA's cost analysis leaves out because it
  counts a while loop's body once (`loop_extra_flops`), plus the loops found."""
  comps: dict[str, list] = {}
  entry, current, shapes = None, None, {}
  for line in text.splitlines():
    if current is None or line.startswith(("%", "ENTRY")) or (line and not line[0].isspace()):
      m = _COMP.match(line)
      if m and line.rstrip().endswith("{"):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
        shapes = {}
        params = re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|(?:[a-z0-9]+\[[0-9,]*\]))",
                            line.split("->")[0])
        for pname, pshape in params:
          shapes[pname] = pshape
        comps[current + "/shapes"] = shapes
        comps[current + "/result"] = line.split("->", 1)[1].rsplit("{", 1)[0]
        continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    root, name, shape, op, rest = m.groups()
    shapes[name] = shape
    comps[current].append((name, shape, op, rest))
    if root:
      comps[current + "/root"] = (op, rest)

  def operand_shapes(comp, rest):
    args = rest.split(")", 1)[0]
    out = []
    for a in args.split(","):
      a = a.strip().lstrip("%")
      arr = _arrays(a)
      if arr:
        out.append(arr[0][1])
        continue
      s = comps.get(comp + "/shapes", {}).get(a.split(" ")[-1].lstrip("%"))
      out.append(_arrays(s)[0][1] if s and _arrays(s) else None)
    return out

  own_flops: dict[str, int] = {}
  calls: dict[str, list] = {}
  colls: dict[str, list] = {}
  loops = []
  for comp, instrs in comps.items():
    if comp.endswith(("/shapes", "/root", "/result")):
      continue
    flops, called, cl = 0, [], []
    for name, shape, op, rest in instrs:
      if op in ("dot", "convolution"):
        ops = operand_shapes(comp, rest)
        out = _arrays(shape)
        if out and len(ops) >= 2 and ops[0] is not None and ops[1] is not None:
          flops += (_dot_flops(out[0][1], ops[0], rest) if op == "dot"
                    else _conv_flops(out[0][1], ops[0], ops[1], rest))
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base in COLLECTIVES:
        arrays = _arrays(shape)
        if op == "all-gather-start" and shape.startswith("("):
          arrays = arrays[len(arrays) // 2:]  # (operands, results)
        if base == "all-reduce" and comp.startswith("all-reduce-scatter"):
          # The TPU compiler writes a reduce-scatter as an `all-reduce-scatter` fusion: an
          # all-reduce whose sum is sliced to each chip's shard inside the fusion. It runs as a
          # reduce-scatter; what each chip ends with is the fusion's result, the shard.
          base, arrays = "reduce-scatter", _arrays(comps[comp + "/result"]) or arrays
        cl.append((base, _nbytes(arrays), False))
      elif op == "send" and (dcn_type := _DCN_TYPE.search(rest)):
        kind = dcn_type.group(1).lower().replace("_", "-")
        cl.append((kind, _nbytes(_arrays(shape)[:1]), True))  # (data, context, token)
      if op.endswith("-done"):
        continue
      trip = 1
      if op == "while":
        t = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        cond = re.search(r"condition=%?([\w.\-]+)", rest)
        trip = int(t.group(1)) if t else _trip_from_condition(comps, cond.group(1) if cond else "")
        body = re.search(r"body=%?([\w.\-]+)", rest)
        if body:
          loops.append((body.group(1), trip))
          called.append((body.group(1), trip))
        cond = re.search(r"condition=%?([\w.\-]+)", rest)
        if cond:
          called.append((cond.group(1), 1))
        continue
      for key in ("calls", "to_apply", "true_computation", "false_computation"):
        for c in re.findall(rf"\b{key}=%?([\w.\-]+)", rest):
          called.append((c, 1))
      b = re.search(r"branch_computations=\{([^}]*)\}", rest)
      if b:
        called += [(c.strip().lstrip("%"), 1) for c in b.group(1).split(",") if c.strip()]
    own_flops[comp], calls[comp], colls[comp] = flops, called, cl

  extra = [0]
  coll_total: dict[str, dict] = {k: {"count": 0, "bytes": 0, "largest": 0} for k in COLLECTIVES}
  dcn_total: dict[str, dict] = {}
  loop_rows = []

  def walk(comp, mult, depth=0):
    if comp not in own_flops or depth > 64:
      return
    extra[0] += own_flops[comp] * (mult - 1)
    for kind, nbytes, dcn in colls[comp]:
      c = (dcn_total.setdefault(kind, {"count": 0, "bytes": 0, "largest": 0}) if dcn
           else coll_total[kind])
      c["count"] += mult
      c["bytes"] += mult * nbytes
      c["largest"] = max(c["largest"], nbytes)
    for callee, trip in calls[comp]:
      walk(callee, mult * trip, depth + 1)

  if entry is not None:
    walk(entry, 1)
  for body, trip in loops:
    loop_rows.append({"body": body, "trip_count": trip, "body_dot_flops": _subtree(
        body, own_flops, calls)})
  return {"loop_extra_flops": extra[0], "collectives": coll_total, "dcn_collectives": dcn_total,
          "loops": loop_rows}


def _trip_from_condition(comps: dict, cond: str) -> int:
  """A scan / fori_loop's trip count from its condition `i < N` (i from 0 by 1, as lax lowers
  them); 1 when the condition has another form."""
  root = comps.get(cond + "/root")
  if not root or root[0] != "compare" or "direction=LT" not in root[1]:
    return 1
  operands = [a.strip().lstrip("%") for a in root[1].split(")", 1)[0].split(",")]
  for name, _, op, rest in comps.get(cond, []):
    if op == "constant" and name in operands:
      value = rest.split(")", 1)[0].strip()
      if value.isdigit():
        return int(value)
  return 1


def _subtree(comp, own, calls, depth=0) -> int:
  if comp not in own or depth > 64:
    return 0
  return own[comp] + sum(t * _subtree(c, own, calls, depth + 1) for c, t in calls[comp])


# ----------------------------------------------------------------------------- one compile

def compile_program(config, sl: Slice, name: str, batch: int, dump_hlo: str = "") -> dict:
  """Builds and compiles one program for the slice (in this process) -> its figures; with
  `dump_hlo` a folder, the optimised HLO goes to `<dump_hlo>/<name>_b<batch>.hlo.txt`."""
  import jax

  from miles_jax import parallel
  # Nothing runs here: no backend is needed beside the TPU compiler the topology brings, and
  # none is started (on a CPU host with libtpu JAX would otherwise try the TPU runtime).
  jax.config.update("jax_platforms", "cpu")
  devices = topology_devices(sl)
  mesh = parallel.mesh_from_config(config, devices)
  fn, args, groups, batch = build_program(config, mesh, name, batch)
  t0 = time.time()
  lowered = fn.lower(*args)
  rules = parallel.logical_rules(config.sharding.rules, mesh)
  head = {"program": name, "batch": int(batch),
          "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "batch_shards": int(parallel.batch_divisor(mesh, rules)), "devices": len(devices),
          "argument_groups": {k: per_chip_bytes(v) for k, v in groups.items()}}
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError: the TPU compiler's own fit check
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if "RESOURCE_EXHAUSTED" not in first and "out of memory" not in first.lower():
      raise
    need = re.search(r"required for [^(]*\(([\d.]+)([KMGTP]?)i?B?\)", first)
    units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40, "P": 2 ** 50}
    required = int(float(need.group(1)) * units[need.group(2)]) if need else 2 ** 62
    return {**head, "compile_s": round(time.time() - t0, 1), "compiler_oom": first,
            "memory": {"arguments": 0, "temporaries": required, "outputs": 0, "aliased": 0,
                       "code": 0, "peak": required},
            "flops_xla": 0.0, "flops": 0.0, "loops": [], "collectives": {},
            "dcn_collectives": {}}
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  if dump_hlo:
    from etils import epath
    folder = epath.Path(dump_hlo)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_b{batch}.hlo.txt").write_text(text)
  hlo = read_hlo(text)
  memory = {
      "arguments": int(mem.argument_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
      "outputs": int(mem.output_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
      "code": int(mem.generated_code_size_in_bytes)}
  memory["peak"] = (memory["arguments"] + memory["temporaries"] + memory["outputs"]
                    - memory["aliased"] + memory["code"])
  flops_xla = float(cost.get("flops", 0.0))
  return {
      **head, "compile_s": round(seconds, 1), "memory": memory, "flops_xla": flops_xla, "flops": flops_xla + hlo["loop_extra_flops"],
      "loops": hlo["loops"], "collectives": {k: v for k, v in hlo["collectives"].items()
                                             if v["count"]},
      "dcn_collectives": hlo["dcn_collectives"]}


# ----------------------------------------------------------------------------- child processes

def _available_host_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return int(info.get("MemAvailable", info.get("MemTotal", 0)))
  except OSError:
    return 0


def _rss_bytes(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def run_compile(argv: list[str], name: str, batch: int, limit_bytes: int, sl: Slice) -> dict:
  """`compile_program` in a child process (this command re-run with --worker_*), its host memory
  watched: past `limit_bytes` it is stopped and PlanError(4) says what lowers it."""
  with tempfile.TemporaryDirectory(prefix="miles_plan_") as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, "-m", "miles_jax.plan", *argv, f"--worker_program={name}",
           f"--worker_batch={batch}", f"--worker_out={out}"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, killed = [0], [False]

    def watch():
      while proc.poll() is None:
        rss = _rss_bytes(proc.pid)
        peak[0] = max(peak[0], rss)
        if limit_bytes and rss > limit_bytes:
          killed[0] = True
          proc.kill()
          return
        time.sleep(0.2)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    seconds = time.time() - t0
    if killed[0] or proc.returncode in (-9, 137):
      why = (f"passed --host_memory_gb={limit_bytes / GiB:.1f}" if killed[0]
             else "was killed (out of host memory?)")
      raise PlanError(
          f"compiling {name} for {sl.name} {why} at {peak[0] / GiB:.1f} GiB of host RAM after "
          f"{seconds:.0f} s: set --config.model.scan_layers=True (compiles each transformer "
          "stack once), plan a smaller --batch, or use a host with more memory", code=4)
    if proc.returncode != 0 or not os.path.exists(out):
      lines = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
      last = lines[-1] if lines else f"exit status {proc.returncode}"
      raise PlanError(f"compiling {name} for {sl.name} failed: {last}",
                      code=proc.returncode if proc.returncode in (2, 3) else 1)
    with open(out) as f:
      result = json.load(f)
  result["host_peak_gib"] = round(peak[0] / GiB, 2)
  result["wall_s"] = round(seconds, 1)
  return result


# ----------------------------------------------------------------------------- the report

# Sample counts the hours column uses, by clip length: pre-training stage 1 (1-frame clips) and
# stage 2 (4 frames) of the MILES / Frozen-in-Time curriculum.
SCHEDULES = {1: ("stage-1 schedule: 20 M 1-frame samples", 20e6),
             4: ("stage-2 schedule: 10 M 4-frame samples", 10e6)}


def analytic_flops(config, name: str, batch: int, devices: int) -> float | None:
  """miles_jax.profile's analytic count of one program, per chip per step (2 FLOPs a MAC)."""
  from miles_jax import profile
  from miles_jax.data import pipeline
  length = int(config.data.max_len)
  if name.startswith("train_"):
    frames = int(name[len("train_"):-1])
    macs = profile.step_macs(config, frames, length)
  elif name == "eval_video":
    frames = int(config.data.num_frames) * int(config.data.get("eval_clips", 1))
    macs = profile.video_macs(config.model.video, frames) + (
        config.model.video.width * config.model.proj_dim)
  else:
    macs = profile.text_macs(config.model.text, pipeline.eval_max_len(config)) + (
        config.model.text.width * config.model.proj_dim)
  return None if macs is None else 2.0 * macs * batch / devices


def summarize(config, sl: Slice, results: list[dict], mfu: float) -> dict:
  """The figures of every compiled program plus the slice's roofline, throughput and cost."""
  chip = sl.chip
  weights = source_weights(config)
  rows = []
  for r in results:
    mem = r["memory"]
    row = dict(r)
    row["hbm_bytes"] = chip.hbm_bytes
    row["hbm_fraction"] = mem["peak"] / chip.hbm_bytes
    row["fits"] = mem["peak"] <= chip.hbm_bytes
    analytic = analytic_flops(config, r["program"], r["batch"], sl.devices)
    row["flops_analytic"] = analytic
    row["flops_ratio"] = r["flops"] / analytic if analytic and r["flops"] else None
    # a program the compiler refused (out of HBM) has no FLOPs: the analytic count stands in
    row["roofline_step_s"] = (r["flops"] or analytic or 0.0) / chip.peak_bf16_flops
    row["clips_per_s_roofline"] = r["batch"] / max(row["roofline_step_s"], 1e-12)
    row["clips_per_s_at_mfu"] = row["clips_per_s_roofline"] * mfu
    rows.append(row)
  train = [r for r in rows if r["program"].startswith("train_")]
  out = {"config": "", "topology": sl.name, "accelerator_type": sl.accelerator_type,
         "topology_name": sl.topology_name, "chip_config": chip.chip_config,
         "num_slices": sl.num_slices, "chips": sl.devices, "hosts": sl.hosts,
         "hbm_per_chip_gib": chip.hbm_bytes / GiB, "peak_bf16_tflops_per_chip":
         chip.peak_bf16_flops / 1e12, "usd_per_chip_hour": chip.usd_per_chip_hour, "mfu": mfu,
         "fits": all(r["fits"] for r in rows), "programs": rows, "notes": [],
         # what decides memory and FLOPs besides the shapes, as compiled
         "model_settings": {k: config.model.get(k) for k in ("remat", "scan_layers",
                                                             "low_precision", "kernels")}}
  if str(config.model.get("kernels", "reference")) != "reference":
    out["notes"].append(f"model.kernels={config.model.kernels}: these are the CPU kernels; a "
                        "TPU run of this config should set --config.model.kernels=reference")
  if train:
    # a step's expected time over the sources' mix (each batch comes from one source)
    share = {r["program"]: weights.get(int(r["program"][6:-1]), 0.0) for r in train}
    covered = sum(share.values())
    if covered < 1 - 1e-9:  # --programs left a source out: the mix over the programs planned
      out["notes"].append(
          f"schedule from {', '.join(share)} only ({100 * covered:.0f} % of the steps); plan "
          "every train program for the full mix")
    step = sum(share[r["program"]] * r["roofline_step_s"] for r in train) / max(covered, 1e-12)
    batch = train[0]["batch"]
    frames = max(int(r["program"][6:-1]) for r in train)
    label, samples = SCHEDULES.get(frames, (f"{frames}-frame schedule: 10 M samples", 10e6))
    hours = samples / batch * step / 3600
    steps_hours = int(config.train.steps) * step / 3600
    out["schedule"] = {
        "name": label, "samples": samples, "batch": batch,
        "mean_step_s_roofline": step, "clips_per_s_roofline": batch / max(step, 1e-12),
        "clips_per_s_at_mfu": batch / max(step, 1e-12) * mfu,
        "hours_roofline": hours, "hours_at_mfu": hours / mfu,
        "usd_roofline": hours * sl.devices * chip.usd_per_chip_hour,
        "usd_at_mfu": hours / mfu * sl.devices * chip.usd_per_chip_hour,
        "config_steps": int(config.train.steps), "config_steps_hours_at_mfu": steps_hours / mfu}
  return out


def _gib(b) -> str:
  return f"{b / GiB:.2f}"


def format_report(s: dict) -> str:
  lines = [f"{s['config']} on {s['topology']} ({s['accelerator_type']}: {s['topology_name']} "
           f"{s['chip_config']}, {s['chips']} chips, {s['hosts']} hosts; "
           f"{s['hbm_per_chip_gib']:.1f} GiB HBM and {s['peak_bf16_tflops_per_chip']:.0f} "
           f"TFLOP/s bf16 per chip, ${s['usd_per_chip_hour']:.2f} per chip-hour list)"]
  for r in s["programs"]:
    m, g = r["memory"], r["argument_groups"]
    if r.get("compiler_oom"):
      lines.append(f"{r['program']}: batch {r['batch']}, mesh {r['mesh']} | DOES NOT FIT: the "
                   f"compiler needs {_gib(m['peak'])} GiB per chip of {_gib(r['hbm_bytes'])} "
                   f"({r['compiler_oom'][:160]})")
      continue
    lines.append(
        f"{r['program']}: batch {r['batch']}, mesh {r['mesh']} | per chip GiB: arguments "
        f"{_gib(m['arguments'])} (" + ", ".join(f"{k} {_gib(v)}" for k, v in g.items()) +
        f"), temporaries {_gib(m['temporaries'])}, outputs {_gib(m['outputs'])}, aliased "
        f"{_gib(m['aliased'])}, code {_gib(m['code'])}, peak {_gib(m['peak'])} of "
        f"{_gib(r['hbm_bytes'])} ({100 * r['hbm_fraction']:.0f} %) -> "
        + ("fits" if r["fits"] else "DOES NOT FIT"))
    ratio = (f", compiler / analytic {r['flops_ratio']:.3f}" if r["flops_ratio"] else "")
    loops = "; loops " + ", ".join(f"{lp['trip_count']} x" for lp in r["loops"]) \
        if r["loops"] else ""
    lines.append(
        f"  FLOPs per chip per step: compiler {r['flops'] / 1e12:.3f} T (XLA cost analysis "
        f"{r['flops_xla'] / 1e12:.3f} T{loops}), analytic "
        + (f"{r['flops_analytic'] / 1e12:.3f} T" if r["flops_analytic"] else "n/a") + ratio
        + f" | roofline {r['roofline_step_s'] * 1e3:.1f} ms/step, "
        f"{r['clips_per_s_roofline']:.0f} clips/s ({r['clips_per_s_at_mfu']:.0f} at "
        f"{100 * s['mfu']:.0f} % MFU)")
    colls = ", ".join(f"{k} {v['count']} x ({v['bytes'] / 2**20:.1f} MiB)"
                      for k, v in r["collectives"].items()) or "none"
    where = " in-slice (ICI)" if s["num_slices"] > 1 else ""
    lines.append(f"  collectives per step{where}: {colls} | compile {r['compile_s']:.0f} s, "
                 f"host peak {r['host_peak_gib']:.1f} GiB")
    if s["num_slices"] > 1:
      dcn = ", ".join(f"{k} {v['count']} x ({v['bytes'] / 2**20:.1f} MiB)"
                      for k, v in r.get("dcn_collectives", {}).items()) or "none"
      lines.append(f"  cross-slice (DCN) collectives per step: {dcn}")
  sc = s.get("schedule")
  if sc:
    lines.append(
        f"{sc['name']} at batch {sc['batch']}: {sc['clips_per_s_roofline']:.0f} clips/s, "
        f"{sc['hours_roofline']:.1f} h, ${sc['usd_roofline']:,.0f} at the roofline; "
        f"{sc['clips_per_s_at_mfu']:.0f} clips/s, {sc['hours_at_mfu']:.1f} h, "
        f"${sc['usd_at_mfu']:,.0f} at {100 * s['mfu']:.0f} % MFU (train.steps="
        f"{sc['config_steps']}: {sc['config_steps_hours_at_mfu']:.1f} h)")
  if "max_batch" in s:
    lines.append(f"max global batch that fits: {s['max_batch']}")
  lines += [f"note: {n}" for n in s.get("notes", [])]
  lines.append("fits: " + ("yes" if s["fits"] else "NO"))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def _progress(msg: str):
  print(msg, file=sys.stderr, flush=True)


def _limit_bytes(flag: float) -> int:
  if flag:
    return int(flag * GiB)
  return max(int(_available_host_bytes() - 0.5 * GiB), 1 * GiB)


def max_batch(argv, sl, name, start: dict, hbm: int, limit: int, tries: list) -> int:
  """Largest multiple of the batch shards at which `name` fits, by compiling: a bracket [fits,
  does not fit] found by doubling / halving, then narrowed by interpolating the peak memory
  (close to linear in the batch) with a bisection fallback, to one batch-shard step."""
  shards = int(start["batch_shards"])
  points = {int(start["batch"]): int(start["memory"]["peak"])}

  def peak(b):
    r = run_compile(argv, name, b, limit, sl)
    points[b] = int(r["memory"]["peak"])
    ok = points[b] <= hbm
    tries.append({"batch": b, "fits": ok, "peak_gib": points[b] / GiB,
                  "compile_s": r["compile_s"]})
    _progress(f"  max_batch: {name} at batch {b}: peak {points[b] / GiB:.2f} GiB -> "
              f"{'fits' if ok else 'does not fit'} (compile {r['wall_s']:.0f} s)")
    return ok

  b0 = int(start["batch"])
  lo, hi = (b0, None) if points[b0] <= hbm else (None, b0)
  while hi is None:
    if lo >= 1 << 22:
      return lo
    hi_try = lo * 2
    # jump by the memory per clip seen so far (a line through 0 and lo), at most 8x
    per = max(points[lo] / lo, 1.0)
    hi_try = max(hi_try, min(lo * 8, int(hbm / per) // shards * shards + shards))
    if peak(hi_try):
      lo = hi_try
    else:
      hi = hi_try
  while lo is None:
    b = max(shards, hi // 2 // shards * shards)
    if b == hi:
      return 0
    if peak(b):
      lo = b
    else:
      hi = b
  while hi - lo > shards:
    slope = (points[hi] - points[lo]) / (hi - lo)
    guess = lo + int((hbm - points[lo]) / slope) if slope > 0 else (lo + hi) // 2
    guess = guess // shards * shards
    if not lo < guess < hi:
      guess = (lo + hi) // 2 // shards * shards
    if guess <= lo:
      break
    if peak(guess):
      lo = guess
      if guess + shards < hi:  # an interpolated guess is usually the answer: check the next
        if peak(guess + shards):
          lo = guess + shards
        else:
          hi = guess + shards
    else:
      hi = guess
  return lo


def plan(flags_, argv: list[str], spec: str = "") -> tuple[dict, int]:
  """-> (summary, exit status)."""
  config = flags_.config
  sl = parse_slice(flags_.topology, flags_.num_slices)
  if flags_.hbm_gb:
    sl = dataclasses.replace(sl, chip=dataclasses.replace(sl.chip,
                                                          hbm_bytes=int(flags_.hbm_gb * GiB)))
  require_libtpu()
  mesh_slices = int(config.mesh.get("num_slices", 1))
  if sl.num_slices == 1 and mesh_slices > 1:
    raise PlanError(f"config.mesh.num_slices={mesh_slices} but --topology={flags_.topology} is "
                    f"one slice: add --num_slices={mesh_slices} (or --topology="
                    f"{mesh_slices}x{flags_.topology})")
  if sl.num_slices > 1 and mesh_slices != sl.num_slices:
    raise PlanError(f"--topology={flags_.topology} is {sl.num_slices} slices: set "
                    f"--config.mesh.num_slices={sl.num_slices} (the data axis across slices)"
                    if "num_slices" in config.mesh else
                    f"--topology={flags_.topology} is {sl.num_slices} slices, and this version's "
                    "mesh has no mesh.num_slices (multislice): plan one slice")
  batch = int(flags_.batch or config.data.batch_size)
  limit = _limit_bytes(flags_.host_memory_gb)
  names = program_names(config)
  if flags_.programs:
    unknown = [n for n in flags_.programs if n not in names]
    if unknown:
      raise PlanError(f"--programs={','.join(flags_.programs)}: {', '.join(unknown)} not among "
                      f"this config's programs ({', '.join(names)})")
    names = [n for n in names if n in flags_.programs]
  results = []
  for name in names:
    r = run_compile(argv, name, batch, limit, sl)
    _progress(f"compiled {name} for {sl.name} (batch {r['batch']}) in {r['wall_s']:.0f} s: "
              f"peak {r['memory']['peak'] / GiB:.2f} GiB per chip, host peak "
              f"{r['host_peak_gib']:.1f} GiB")
    results.append(r)
  s = summarize(config, sl, results, flags_.mfu)
  s["config"] = spec
  if flags_.max_batch:
    train = [r for r in s["programs"] if r["program"].startswith("train_")]
    big = max(train, key=lambda r: r["memory"]["peak"])
    tries: list = []
    s["max_batch"] = max_batch(argv, sl, big["program"], big, sl.chip.hbm_bytes, limit, tries)
    s["max_batch_program"] = big["program"]
    s["max_batch_compiles"] = tries
  code = 0
  if not s["fits"]:
    code = 3
  return s, code


def _define(fv):
  from absl import flags
  flags.DEFINE_string("topology", None, "TPU slice as gcloud names it: v4-32, v5litepod-64 "
                      "(or v5e-64), v5p-128, v6e-64, ...; NxSLICE for N slices.", flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network "
                       "(multislice); NxSLICE in --topology multiplies it.", flag_values=fv)
  flags.DEFINE_integer("batch", 0, "Global train batch (0: config.data.batch_size).",
                       flag_values=fv)
  flags.DEFINE_list("programs", [], "Compile only these of the config's programs (e.g. "
                    "train_4f; default all: train_<T>f per clip length, eval_video, eval_text).",
                    flag_values=fv)
  flags.DEFINE_bool("max_batch", False, "Also find the largest global batch that fits, by "
                    "compiling (bisection).", flag_values=fv)
  flags.DEFINE_float("mfu", 0.4, "Model-FLOPs utilisation assumed for the throughput, hours "
                     "and cost columns (the roofline is 1.0).", flag_values=fv)
  flags.DEFINE_float("hbm_gb", 0.0, "Plan against this many GiB of HBM per chip instead of "
                     "the chip's (e.g. to keep headroom); 0: the chip's.", flag_values=fv)
  flags.DEFINE_float("host_memory_gb", 0.0, "Stop a compile whose host RAM passes this many "
                     "GiB (0: what the host has available when plan starts).", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print the report as one JSON object (the progress lines "
                    "still go to stderr).", flag_values=fv)
  flags.DEFINE_string("dump_hlo", "", "Write each compiled program's optimised HLO text to "
                     "this folder (local or gs://) as PROGRAM_bBATCH.hlo.txt.", flag_values=fv)
  # the child processes: `python -m miles_jax.plan <same flags> --worker_program=...`
  flags.DEFINE_string("worker_program", "", "(internal) compile this program here.",
                      flag_values=fv)
  flags.DEFINE_integer("worker_batch", 0, "(internal)", flag_values=fv)
  flags.DEFINE_string("worker_out", "", "(internal) the worker's result file.", flag_values=fv)


def main(argv):
  from absl import flags
  f = flags.FLAGS
  if f.config is None or not f.topology:
    print("error: --config and --topology are required, e.g. --config=configs/"
          "pretrain_miles.py:stage2 --topology=v5e-64", file=sys.stderr)
    return 2
  try:
    sl = parse_slice(f.topology, f.num_slices)
    if f.worker_program:
      r = compile_program(f.config, sl, f.worker_program, f.worker_batch, f.dump_hlo)
      r["host_maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
      with open(f.worker_out, "w") as out:
        json.dump(r, out)
      return 0
    argv_rest = [a for a in sys.argv[1:] if not a.startswith(("--worker_", "--json", "--nojson",
                                                                "--max_batch", "--nomax_batch"))]
    s, code = plan(f, argv_rest, _config_spec())
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.code
  print(json.dumps(s, default=float) if f.json else format_report(s))
  if code == 3:
    bad = [r for r in s["programs"] if not r["fits"]]
    r = bad[0]
    over = (r["memory"]["peak"] - r["hbm_bytes"]) / GiB
    print(f"error: {r['program']} does not fit {s['topology']}: {r['memory']['peak'] / GiB:.2f} "
          f"GiB per chip of {r['hbm_bytes'] / GiB:.2f} ({over:.2f} GiB over); lower --batch / "
          "data.batch_size, set model.remat=full, or shard the params with mesh.shape="
          "(data, fsdp)", file=sys.stderr)
  return code


def _config_spec() -> str:
  for a in sys.argv[1:]:
    if a.startswith("--config="):
      return a[len("--config="):]
  return ""


def cli():
  from absl import flags

  from miles_jax import cli as cli_lib
  from miles_jax import config_lib
  cli_lib.define_config_file(
      "config", None, "Config file, e.g. configs/pretrain_miles.py:stage2; override any "
      "field with --config.FIELD=VALUE (as train takes them).")
  del config_lib
  _define(flags.FLAGS)
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
