"""B5: per-device bytes of params + optimiser state + snapshot under FSDP vs one device.

  python benchmarks/memory.py                  # base model, FSDP over 8 simulated CPU devices
  python benchmarks/memory.py --quick --json   # tiny model
  python benchmarks/memory.py --compiled       # also XLA's memory analysis of the compiled step

Nothing is allocated: the state is abstract (`jax.eval_shape`) and each leaf's per-device bytes
come from its NamedSharding's shard shape. `--compiled` lowers the train step on those abstract
inputs and reports XLA's per-device argument / temp sizes (slow at base size on a CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from miles_jax import config_lib, parallel  # noqa: E402
from miles_jax.models import dual_encoder  # noqa: E402
from miles_jax.train import optim  # noqa: E402
from miles_jax.train import state as state_lib  # noqa: E402
from miles_jax.train import step as step_lib  # noqa: E402


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes the largest-loaded device holds for this tree."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
  return total


def measure(config, mesh, compiled: bool) -> dict:
  model = dual_encoder.build(config.model)
  tx, _ = optim.make_optimizer(config)
  init = state_lib._init_state  # pylint: disable=protected-access
  abstract = jax.eval_shape(lambda r: init(config, model, tx, r), jax.random.PRNGKey(0))
  sh = state_lib.train_state_shardings(config, mesh, model, tx)
  out = {f"{k}_bytes": per_device_bytes(getattr(abstract, k), getattr(sh, k))
         for k in ("params", "opt_state", "snapshot_params")}
  out["state_bytes"] = sum(out.values())
  if compiled:
    rules = parallel.logical_rules(config.sharding.rules, mesh)
    bsh = parallel.batch_sharding(mesh, rules)
    v, b, length = config.model.video, config.data.batch_size, config.data.max_len
    tn = config.data.num_frames * (v.img_size // v.patch_size) ** 2
    batch = {
        "frames": jax.ShapeDtypeStruct((b, config.data.num_frames, v.img_size, v.img_size, 3),
                                       np.uint8, sharding=bsh),
        "input_ids": jax.ShapeDtypeStruct((b, length), np.int32, sharding=bsh),
        "attention_mask": jax.ShapeDtypeStruct((b, length), np.int32, sharding=bsh),
        "mvm_mask": jax.ShapeDtypeStruct((b, tn), np.bool_, sharding=bsh),
    }
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, sh)
    mem = step_lib.make_train_step(config, mesh, model, tx).lower(state, batch).compile()
    mem = mem.memory_analysis()
    out["compiled_argument_bytes"] = int(mem.argument_size_in_bytes)
    out["compiled_temp_bytes"] = int(mem.temp_size_in_bytes)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="base", choices=["base", "small", "tiny"])
  p.add_argument("--objectives", default="contrastive,miles")
  p.add_argument("--fsdp", type=int, default=8, help="devices of the FSDP mesh")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--compiled", action="store_true")
  p.add_argument("--quick", action="store_true", help="tiny model")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.size = "tiny"
  c = config_lib.default_config()
  c.model = config_lib.model_config(args.size)
  c.objectives = args.objectives
  c.data.batch_size = args.batch
  c.data.max_len = min(c.data.max_len, c.model.text.max_len)
  devices = jax.devices()
  if len(devices) < args.fsdp:
    p.error(f"--fsdp={args.fsdp} but only {len(devices)} devices")
  one = measure(c, parallel.make_mesh((1,), ("data",), devices[:1]), args.compiled)
  c.mesh.shape, c.mesh.axes = (1, args.fsdp), ("data", "fsdp")
  fsdp = measure(c, parallel.mesh_from_config(c, devices[:args.fsdp]), args.compiled)
  ratio = fsdp["state_bytes"] / one["state_bytes"]
  out = {"size": args.size, "objectives": args.objectives, "fsdp_devices": args.fsdp,
         "one_device": one, "fsdp": fsdp, "fsdp_over_one_device": ratio}
  mb = lambda x: f"{x / 2**20:10.1f}"
  print(f"model {args.size}, objectives {args.objectives}; per-device MiB")
  print(f"{'':<22}{'params':>10}{'opt_state':>10}{'snapshot':>10}{'total':>10}")
  for name, r in (("1 device", one), (f"FSDP x{args.fsdp}", fsdp)):
    print(f"{name:<22}{mb(r['params_bytes'])}{mb(r['opt_state_bytes'])}"
          f"{mb(r['snapshot_params_bytes'])}{mb(r['state_bytes'])}")
  print(f"FSDP / 1 device: {ratio:.3f} (target <= {1 / 6:.3f}, ideal {1 / args.fsdp:.3f})")
  if args.compiled:
    for name, r in (("1 device", one), (f"FSDP x{args.fsdp}", fsdp)):
      print(f"compiled {name}: arguments {mb(r['compiled_argument_bytes'])} MiB, "
            f"temp {mb(r['compiled_temp_bytes'])} MiB")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
