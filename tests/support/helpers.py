"""Helpers shared by several test files (imported as `helpers`: tests/conftest.py puts
tests/support/ on sys.path)."""
import json
import os
import socket

import jax
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# XLA's LLVM backend at -O0 for the tests' tiny programs: compiling, not running, is what takes the
# time on 2 cores (a 6-step demo run: ~37 s instead of ~52-67 s, measured here). HLO passes are
# unchanged; the benchmarks and the real CLIs keep the default.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (coordinators, the GCS emulator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's subprocess: fast compiles, optionally `devices` simulated CPUs."""
  flags = [FAST_COMPILE_FLAG]
  if devices:
    flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)

# Tiny dims on purpose unlike any preset (heads 3 and 5, odd widths), set as config overrides.
TINY_OVERRIDES = {
    "model.video.img_size": 32, "model.video.patch_size": 8, "model.video.num_frames": 4,
    "model.video.width": 48, "model.video.depth": 2, "model.video.num_heads": 3,
    "model.video.mlp_ratio": 2.0, "model.text.vocab_size": 101, "model.text.width": 40,
    "model.text.depth": 2, "model.text.num_heads": 5, "model.text.mlp_dim": 72,
    "model.text.max_len": 16, "model.proj_dim": 24,
}


def apply_overrides(config, overrides: dict):
  """Sets dotted `a.b.c` fields of a ConfigDict, as `--config.a.b.c=v` would."""
  from miles_jax import config_lib
  return config_lib.override(config, overrides)


def final_state(workdir: str, step=None):
  """(TrainState on the host, meta) of a workdir's checkpoint, restored on this process."""
  from miles_jax import checkpoints, parallel
  from miles_jax.models import dual_encoder
  from miles_jax.train import optim
  from miles_jax.train.state import create_train_state, train_state_shardings
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.shape, config.mesh.axes = (-1,), ("data",)
  mesh = parallel.mesh_from_config(config)
  model = dual_encoder.build(config.model)
  tx = optim.make_optimizer(config)[0]
  abstract = jax.eval_shape(lambda: create_train_state(config, jax.random.PRNGKey(0), mesh,
                                                       model, tx))
  ck = checkpoints.TrainCheckpointer(os.path.join(workdir, "checkpoints"))
  state, meta = ck.restore(checkpoints.abstract_with_shardings(
      abstract, train_state_shardings(config, mesh, model, tx)), step)
  ck.close()
  return jax.device_get(state), meta


def assert_trees_equal(a, b, atol: float = 0.0):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)
