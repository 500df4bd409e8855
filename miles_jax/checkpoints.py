"""orbax checkpoints: exported inference params (convert, pretrained) with their model config.

An exported model is a directory holding `params/` (an orbax StandardCheckpointer tree) and
`model_config.json` (the `model` config section), so a loader can check the architecture
before reading a single tensor.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from miles_jax import paths

MODEL_CONFIG_FILE = "model_config.json"


class ArchitectureMismatch(ValueError):
  """A checkpoint was written for another model configuration."""


def _config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


# Model fields newer than some saved configs: absent there means this value.
_ADDED_LATER = {"mvm_head_dim": 0}
# How the params are computed with, not what they are: a checkpoint loads under any of these.
_COMPUTE_ONLY = ("dtype", "remat", "drop_path_rate", "dropout_rate", "low_precision", "kernels",
                 "time_attention_vjp")


def diff_configs(saved: dict, wanted: dict, prefix: str = "model") -> list[str]:
  """Human-readable differences between two (nested) model config dicts."""
  out = []
  for k in sorted(set(saved) | set(wanted)):
    a, b = saved.get(k, _ADDED_LATER.get(k)), wanted.get(k, _ADDED_LATER.get(k))
    if k == "scan_layers":  # absent from configs written before the field existed
      a, b = bool(a), bool(b)
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff_configs(a, b, f"{prefix}.{k}")
    elif a != b and k not in _COMPUTE_ONLY:
      out.append(f"{prefix}.{k}: checkpoint {a!r}, config {b!r}")
  return out


def save_params(path: str, params, model_config: ml_collections.ConfigDict,
                overwrite: bool = False) -> None:
  """Writes params + model config (local or gs://); the directory appears only once complete.

  Every process calls it: orbax writes each process's shards of sharded (FSDP) params, so
  nothing is gathered onto one host; process 0 writes the small files.
  """
  path = paths.resolve(path)
  if paths.isdir(path) and any(paths.Path(path).iterdir()):
    if not overwrite:
      raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
  # Locally: write PATH.tmp, then rename. Object stores have no directory rename (gcsfs would
  # copy every object), so there the old export is removed and model_config.json, written
  # last, is the completion mark: a folder without it is not loaded (read_model_config).
  remote = paths.is_uri(path)
  target = path if remote else path + ".tmp"
  if jax.process_index() == 0:
    paths.rmtree(target)
  sync("save_params_clean")
  params = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(paths.join(target, "params"), params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_text(paths.join(target, MODEL_CONFIG_FILE),
                     json.dumps(_config_to_dict(model_config), indent=2))
    if not remote:
      paths.rmtree(path)
      os.replace(target, path)
  sync("save_params_done")


def sync(name: str) -> None:
  """A barrier across all processes (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def read_model_config(path: str) -> ml_collections.ConfigDict:
  cfg_file = paths.join(path, MODEL_CONFIG_FILE)
  if not paths.exists(cfg_file):
    raise FileNotFoundError(f"{path} is not an exported miles_jax model (no {MODEL_CONFIG_FILE})")
  saved = json.loads(paths.read_text(cfg_file))
  # Configs written before model.kernels: backend-resolved settings that no longer exist.
  saved.get("video", {}).pop("time_attention_vjp", None)
  if saved.get("low_precision") == "auto":
    saved["low_precision"] = "all"
  return ml_collections.ConfigDict(saved)


def load_params(path: str, model_config: ml_collections.ConfigDict | None = None,
                shardings=None):
  """Restores exported params -> (params, model_config); fails naming any architecture change.

  `shardings` (a pytree of jax.sharding.Sharding matching the params) places each array on
  the current mesh, whatever mesh wrote it; without it the params come back as host numpy.
  """
  path = paths.resolve(path)
  saved = read_model_config(path)
  if model_config is not None:
    diffs = diff_configs(saved.to_dict(), _config_to_dict(model_config))
    if diffs:
      raise ArchitectureMismatch(f"{path} was written for another architecture:\n  "
                                 + "\n  ".join(diffs))
  else:
    model_config = saved
  if shardings is None:  # host numpy, whatever mesh (and process count) wrote them
    return read_params_host(path)[0], model_config
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(paths.join(path, "params"))
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    target = jax.tree_util.tree_map(
        lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
    params = ckptr.restore(paths.join(path, "params"), target)
  return params, model_config


class TrainCheckpointer:
  """orbax CheckpointManager for training: the TrainState plus a JSON `meta` (data position, …).

  Saves are async and atomic (a step directory exists only once complete), keeps the newest
  `keep` steps plus, with `best_metric`, the best by that metric. Restoring takes abstract
  targets carrying shardings, so a run resumes on any mesh.
  """

  def __init__(self, directory: str, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", save_interval_steps: int = 1):
    self.directory = paths.resolve(directory)
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


# --- Self-contained exports: the tokenizer and the preprocessing travel with the params. ------

PREPROCESSING_FILE = "preprocessing.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.model")  # WordPiece vocab / sentencepiece model


def preprocessing_record(config: ml_collections.ConfigDict) -> dict:
  """How a clip and a caption are turned into model inputs at evaluation time (SPEC, eval).

  `config` is a full config (its `data` section gives frames and max_len) or a `model` section.
  """
  from miles_jax import config_lib
  model = config.model if "model" in config else config
  data = config.get("data") if "model" in config else None
  num_frames = int(data.num_frames) if data is not None else int(model.video.num_frames)
  # Captions never longer than the text position table (data.max_len's default is 32).
  max_len = int(min(data.max_len if data is not None else 32, model.text.max_len))
  return {
      "num_frames": num_frames,
      "img_size": int(model.video.img_size),
      # centre of each of num_frames equal segments of the source (Frozen's `uniform` rule)
      "frame_positions": "segment_centre",
      "crop": "centre_square",  # the centred square of side min(height, width)
      "resize": "area",  # that square resized to img_size x img_size (area / antialiased)
      "mean": list(config_lib.IMAGENET_MEAN),
      "std": list(config_lib.IMAGENET_STD),
      "max_len": max_len,
      "tokenizer": None,
  }


def save_assets(path: str, config: ml_collections.ConfigDict, tokenizer: str | None = None):
  """Writes `preprocessing.json` and copies the tokenizer (vocab.txt / *.model) beside the params.

  `tokenizer` defaults to `config.data.tokenizer`; without one the export has no tokenizer and
  `pretrained.load(path, tokenizer=...)` must be given it.
  """
  from etils import epath
  path = epath.Path(path)
  record = preprocessing_record(config)
  if tokenizer is None and "data" in config:
    tokenizer = config.data.get("tokenizer", "") or None
  if tokenizer:
    src = epath.Path(tokenizer)
    if not src.exists():
      raise FileNotFoundError(f"tokenizer {tokenizer} does not exist")
    name = TOKENIZER_FILES[1] if src.name.endswith(".model") else TOKENIZER_FILES[0]
    src.copy(path / name, overwrite=True)
    record["tokenizer"] = name
  (path / PREPROCESSING_FILE).write_text(json.dumps(record, indent=2))
  return record


def read_preprocessing(path: str) -> dict | None:
  """The export's preprocessing record (None for exports written before it existed)."""
  from etils import epath
  f = epath.Path(path) / PREPROCESSING_FILE
  return json.loads(f.read_text()) if f.exists() else None


def find_params_source(path: str) -> tuple[str, str, dict | None]:
  """Where the params of an orbax source lie -> (item directory, key of the params inside it
  ('' for the whole item), saved `model` config or None).

  `path` is an exported model (`WORKDIR/export`, `best`, convert output), a training workdir,
  its `checkpoints/` folder (newest step) or one step folder of it.
  """
  path = paths.resolve(path).rstrip("/")
  if paths.exists(paths.join(path, MODEL_CONFIG_FILE)):
    return paths.join(path, "params"), "", read_model_config(path).to_dict()
  model = None
  if paths.exists(paths.join(path, "checkpoints")):  # a training workdir
    if paths.exists(paths.join(path, "config.json")):
      model = json.loads(paths.read_text(paths.join(path, "config.json"))).get("model")
    path = paths.join(path, "checkpoints")
  if not paths.exists(paths.join(path, "state")):  # a checkpoints folder: its newest step
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True), item_names=("state", "meta"))
    step = manager.latest_step()
    manager.close()
    if step is None:
      raise FileNotFoundError(f"{path} holds no exported model ({MODEL_CONFIG_FILE}) and no "
                              "training checkpoint")
    path = paths.join(path, str(step))
  if model is None:  # a step folder: WORKDIR/checkpoints/STEP -> WORKDIR/config.json
    cfg = paths.join(paths.dirname(paths.dirname(path)), "config.json")
    if paths.exists(cfg):
      model = json.loads(paths.read_text(cfg)).get("model")
  return paths.join(path, "state"), "params", model


def read_params_host(path: str) -> tuple[dict, dict | None]:
  """The params of an orbax source (see find_params_source) as numpy on every process (each
  reads the whole tree, whatever mesh wrote it) -> (params, saved `model` config or None)."""
  item, key, model = find_params_source(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(item)
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    tree = dict(tree)
    if key:
      tree = {key: tree[key]}
    restore_args = jax.tree_util.tree_map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    out = ckptr.restore(item, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args, partial_restore=bool(key)))
  return (out[key] if key else out), model
