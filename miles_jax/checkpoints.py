"""orbax checkpoints: exported inference params (convert, pretrained) with their model config.

An exported model is a directory holding `params/` (an orbax StandardCheckpointer tree) and
`model_config.json` (the `model` config section), so a loader can check the architecture
before reading a single tensor.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

MODEL_CONFIG_FILE = "model_config.json"


class ArchitectureMismatch(ValueError):
  """A checkpoint was written for another model configuration."""


def _config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


# Model fields newer than some saved configs: absent there means this value.
_ADDED_LATER = {"mvm_head_dim": 0}


def diff_configs(saved: dict, wanted: dict, prefix: str = "model") -> list[str]:
  """Human-readable differences between two (nested) model config dicts."""
  out = []
  for k in sorted(set(saved) | set(wanted)):
    a, b = saved.get(k, _ADDED_LATER.get(k)), wanted.get(k, _ADDED_LATER.get(k))
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff_configs(a, b, f"{prefix}.{k}")
    elif a != b and k not in ("dtype", "remat", "drop_path_rate", "dropout_rate"):
      out.append(f"{prefix}.{k}: checkpoint {a!r}, config {b!r}")
  return out


def save_params(path: str, params, model_config: ml_collections.ConfigDict,
                overwrite: bool = False) -> None:
  """Writes params + model config; the directory appears only once complete."""
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  params = jax.tree_util.tree_map(np.asarray, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
  with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
    json.dump(_config_to_dict(model_config), f, indent=2)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)


def read_model_config(path: str) -> ml_collections.ConfigDict:
  cfg_file = os.path.join(path, MODEL_CONFIG_FILE)
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path} is not an exported miles_jax model (no {MODEL_CONFIG_FILE})")
  with open(cfg_file) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(path: str, model_config: ml_collections.ConfigDict | None = None,
                shardings=None):
  """Restores exported params -> (params, model_config); fails naming any architecture change.

  `shardings` (a pytree of jax.sharding.Sharding matching the params) places each array on
  the current mesh, whatever mesh wrote it.
  """
  path = os.path.abspath(path)
  saved = read_model_config(path)
  if model_config is not None:
    diffs = diff_configs(saved.to_dict(), _config_to_dict(model_config))
    if diffs:
      raise ArchitectureMismatch(f"{path} was written for another architecture:\n  "
                                 + "\n  ".join(diffs))
  else:
    model_config = saved
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.join(path, "params"))
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    if shardings is not None:
      target = jax.tree_util.tree_map(
          lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
    params = ckptr.restore(os.path.join(path, "params"), target)
  return params, model_config


class TrainCheckpointer:
  """orbax CheckpointManager for training: the TrainState plus a JSON `meta` (data position, …).

  Saves are async and atomic (a step directory exists only once complete), keeps the newest
  `keep` steps plus, with `best_metric`, the best by that metric. Restoring takes abstract
  targets carrying shardings, so a run resumes on any mesh.
  """

  def __init__(self, directory: str, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: float(metrics.get(best_metric, float("-inf")
                                                  if best_mode == "max" else float("inf")))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, best_fn=best_fn, best_mode=best_mode,
        keep_checkpoints_without_metrics=True, create=True, enable_async_checkpointing=True,
        save_interval_steps=save_interval_steps)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=force)

  def restore(self, abstract_state, step: int | None = None):
    """-> (state, meta) of `step` (default latest); `abstract_state` leaves carry shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
