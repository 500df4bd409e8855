"""PyTorch weights of the released MILES / Frozen-in-Time dual encoder as Flax params: reading
`.pth` / `.safetensors` files safely, the torch-key -> Flax-path map, and the conversion
(`python -m miles_jax.convert` is the command on top; weights/public_init.py uses the same map
for public image / text weights).

Accepted files: a bare `state_dict`, or the dict the upstream trainers save (`{'arch', 'epoch',
'state_dict', 'optimizer', 'monitor_best', 'config'}`, `config` being a pickled object of the
upstream's own `parse_config.ConfigParser`), as `.pth` / `.pth.tar` / `.pt`, or a
`.safetensors` with the state_dict's keys; keys with or without DataParallel's `module.`.
Key layouts (`UPSTREAM_LAYOUTS`): the MILES class (TencentARC/MCQ `MILES/model/model_MILES.py`)
names the text projection `text_proj`, Frozen-in-Time's `FrozenInTime` (m-bain/frozen-in-time
`model/model.py`) names it `txt_proj`; everything else is shared. The layout is recognised
from those names and then every key is checked against it.

A `.pth` never runs code: `read_state_dict` lists the pickle's globals statically
(`torch.serialization.get_unsafe_globals_in_checkpoint`), refuses files that reference
code-running modules (os, subprocess, builtins' eval/exec, ...), and loads the rest with
`torch.load(weights_only=True)` where every other unknown global (ConfigParser, PosixPath, ...)
is an inert placeholder class: it records its arguments and state and is never imported,
constructed or called for real. Every tensor is mapped to the Flax tree; anything missing,
unexpected or mis-shaped fails with the key names. Parameters that only training uses
(`video/mask_token`, `mvm_head`) are not in released checkpoints; they keep a fresh
initialisation and are listed in the report.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np
from flax import traverse_util

# Buffers some transformers versions save beside the weights; they hold no learned values.
IGNORED_KEYS = (re.compile(r"text_model\.embeddings\.position_ids$"),)
# Parameters a released (inference) checkpoint does not contain.
TRAIN_ONLY = ("video/mask_token", "mvm_head/")


class ConversionError(ValueError):
  """A checkpoint does not match the model: the message lists every offending key."""


# Globals that can only mean "run a command / code": a file referencing one is refused before
# loading (nothing in any file is ever called either way; see `load_torch_checkpoint`). Not on
# the list on purpose: builtins.getattr / builtins.dict / functools.partial, which a real
# pickled configparser.ConfigParser references (they load as inert placeholders).
CODE_MODULES = ("os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "shutil",
                "socket", "pty", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal",
                "multiprocessing", "webbrowser", "pdb", "commands", "popen2", "platform")
CODE_BUILTINS = ("eval", "exec", "execfile", "compile", "__import__", "open", "input",
                 "breakpoint", "globals", "locals", "vars", "setattr", "delattr")


class Placeholder:
  """Stands for a pickled global that is not a tensor or a plain container (the trainer's
  ConfigParser, a PosixPath, ...): records the arguments and state, does nothing else."""
  qualified_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__["_args"] = args
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.__dict__["_state"] = state

  def __repr__(self):
    return f"<unloaded {self.qualified_name}>"


def _placeholder(name: str) -> type:
  return type(name.rsplit(".", 1)[-1], (Placeholder,), {"qualified_name": name})


def _code_global(name: str) -> bool:
  """True for globals that run code; torch's own safe globals never reach here."""
  module, _, attr = name.rpartition(".")
  if module in ("builtins", "__builtin__"):
    return attr in CODE_BUILTINS
  return module.split(".", 1)[0] in CODE_MODULES


def load_torch_checkpoint(path: str):
  """`torch.load` of a `.pth` that never runs code -> (object, names of placeholder globals).

  Raises ConversionError for a file whose pickle references code-running globals."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading .pth checkpoints needs torch: pip install -e '.[torch]' "
                      "(or convert the file to .safetensors elsewhere)") from None
  from torch import serialization
  try:  # static listing of the pickle's globals: nothing is loaded or run
    unknown = sorted(serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:  # legacy (torch < 1.6, non-zip) format: torch's weights-only rules alone
    unknown = []  # apply, so such a file loads only if it holds plain data
  code = [g for g in unknown if _code_global(g)]
  if code:
    raise ConversionError(
        f"{path}: refused to load — its pickle references {', '.join(code)}, which would run "
        "code when loaded. A checkpoint needs tensors and plain containers only; nothing was "
        "executed.")
  stand_ins = [(_placeholder(g), g) for g in unknown]
  try:
    with serialization.safe_globals(stand_ins):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError for anything the rules above do not cover
    raise ConversionError(
        f"{path}: refused to load — torch.load(weights_only=True) rejected it ({e}). A "
        "checkpoint must hold tensors and plain containers; one that needs code is not loaded. "
        "(A pre-zip torch<1.6 file with other objects: re-save its state_dict with torch.save.)"
    ) from None
  return obj, unknown


def read_state_dict(path: str, info: dict | None = None) -> dict[str, np.ndarray]:
  """Reads `.pth`/`.pth.tar` (bare state_dict or the upstream trainer's dict; never runs code)
  or `.safetensors` into numpy arrays, `module.` prefixes stripped. `info` (optional) receives
  what else the file held: `placeholders` (unloaded globals) and `other_entries`."""
  info = {} if info is None else info
  from miles_jax import paths
  if paths.is_uri(path):  # gs://: read from a local copy
    if not paths.exists(path):
      raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with paths.local_file(path) as local:
      return read_state_dict(local, info)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    sd = load_file(path)
  elif path.endswith((".pth", ".pt", ".bin", ".ckpt", ".tar")):
    obj, info["placeholders"] = load_torch_checkpoint(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
      info["other_entries"] = sorted(str(k) for k in obj if k != "state_dict")
      obj = obj["state_dict"]  # upstream trainers: {'arch', 'epoch', 'state_dict', ...}
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path}: expected a state_dict mapping, got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not hasattr(v, "numpy"))
    if not_tensors:
      raise ConversionError(f"{path}: state_dict entries that are not tensors: "
                            + ", ".join(not_tensors))
    sd = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items()}
  else:
    raise ConversionError(f"{path}: unknown checkpoint type; use .pth, .pth.tar or .safetensors")
  return {_strip(k): np.asarray(v) for k, v in sd.items()}


def _strip(key: str) -> str:
  return key[len("module."):] if key.startswith("module.") else key


def _t(w):  # torch Linear weight [out, in] -> flax kernel [in, out]
  return np.ascontiguousarray(w.T)


# The two released model classes' top-level module names (upstream source, read for this map):
# TencentARC/MCQ MILES/model/model_MILES.py class MILES: self.text_model (HF DistilBERT),
#   self.video_model (SpaceTimeTransformer of model/video_encoder_MILES.py; head, pre_logits
#   and fc are nn.Identity, so hold no keys), self.text_proj = Sequential(ReLU, Linear),
#   self.vid_proj = Sequential(Linear).
# m-bain/frozen-in-time model/model.py class FrozenInTime: the same, but self.txt_proj.
# The released MILES.pth holds only these modules: upstream test_MILES.py loads it into MILES
# with strict=True, and its README says it "contains the weights of Video Encoder and Text
# Encoder" (no snapshot encoder, no MVM head). Any other top-level module is reported as
# unexpected; `drop_modules` names ones to leave out on purpose.
UPSTREAM_LAYOUTS = {
    "miles": {"text_model": "text_model", "video_model": "video_model",
              "text_proj": "text_proj.1", "video_proj": "vid_proj.0"},
    "frozen": {"text_model": "text_model", "video_model": "video_model",
               "text_proj": "txt_proj.1", "video_proj": "vid_proj.0"},
}


def detect_layout(keys) -> str:
  """'miles' or 'frozen' from the text-projection name the checkpoint uses."""
  found = sorted(name for name, lay in UPSTREAM_LAYOUTS.items()
                 if any(_strip(k).startswith(lay["text_proj"] + ".") for k in keys))
  if len(found) != 1:
    names = " / ".join(f"{lay['text_proj']}.weight ({n})" for n, lay in UPSTREAM_LAYOUTS.items())
    raise ConversionError(
        "checkpoint does not match a released layout: expected exactly one text projection "
        f"of {names}, found {found or 'none'}")
  return found[0]


def torch_key_map(model_config, layout: str = "frozen") -> dict[str, tuple[str, callable]]:
  """Flax param path ('video/block_0/attn/qkv/kernel') -> (upstream torch key, transform)."""
  names = UPSTREAM_LAYOUTS[layout]
  ident = lambda w: w
  squeeze0 = lambda w: w.reshape(w.shape[-2], w.shape[-1])
  conv = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  m: dict[str, tuple[str, callable]] = {}

  def linear(flax: str, torch: str):
    m[f"{flax}/kernel"] = (f"{torch}.weight", _t)
    m[f"{flax}/bias"] = (f"{torch}.bias", ident)

  def norm(flax: str, torch: str):
    m[f"{flax}/scale"] = (f"{torch}.weight", ident)
    m[f"{flax}/bias"] = (f"{torch}.bias", ident)

  v = names["video_model"]
  m["video/cls_token"] = (f"{v}.cls_token", squeeze0)
  m["video/pos_embed"] = (f"{v}.pos_embed", squeeze0)
  m["video/temporal_embed"] = (f"{v}.temporal_embed", squeeze0)
  m["video/patch_embed/kernel"] = (f"{v}.patch_embed.proj.weight", conv)
  m["video/patch_embed/bias"] = (f"{v}.patch_embed.proj.bias", ident)
  for i in range(model_config.video.depth):
    fb, tb = f"video/block_{i}", f"{v}.blocks.{i}"
    for n in ("norm1", "norm2", "norm3"):
      norm(f"{fb}/{n}", f"{tb}.{n}")
    for a in ("attn", "timeattn"):
      linear(f"{fb}/{a}/qkv", f"{tb}.{a}.qkv")
      linear(f"{fb}/{a}/proj", f"{tb}.{a}.proj")
    linear(f"{fb}/mlp/fc1", f"{tb}.mlp.fc1")
    linear(f"{fb}/mlp/fc2", f"{tb}.mlp.fc2")
  norm("video/norm", f"{v}.norm")

  t = names["text_model"]
  m["text/word_embeddings/embedding"] = (f"{t}.embeddings.word_embeddings.weight", ident)
  m["text/position_embeddings/embedding"] = (f"{t}.embeddings.position_embeddings.weight", ident)
  norm("text/embeddings_LayerNorm", f"{t}.embeddings.LayerNorm")
  for i in range(model_config.text.depth):
    fl, tl = f"text/layer_{i}", f"{t}.transformer.layer.{i}"
    for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
      linear(f"{fl}/attention/{n}", f"{tl}.attention.{n}")
    norm(f"{fl}/sa_layer_norm", f"{tl}.sa_layer_norm")
    linear(f"{fl}/ffn/lin1", f"{tl}.ffn.lin1")
    linear(f"{fl}/ffn/lin2", f"{tl}.ffn.lin2")
    norm(f"{fl}/output_layer_norm", f"{tl}.output_layer_norm")

  linear("video_proj", names["video_proj"])
  linear("text_proj", names["text_proj"])
  return m


def flatten(tree) -> dict:
  """A nested params dict -> {'video/block_0/attn/qkv/kernel': array} (flax.traverse_util)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def assign_tensors(expected: Mapping, kmap: Mapping, sd: Mapping, source: str,
                   ignored=lambda key: False) -> tuple[dict, set]:
  """Fills the Flax paths of `kmap` (path -> (torch key, transform)) from `sd`, each checked
  against the shape of `expected[path]` -> (flat params, used keys).

  Fails with every missing, unexpected (unused and not `ignored`) and mis-shaped key named.
  """
  out, used, missing, bad = {}, set(), [], []
  for path, (key, fn) in kmap.items():
    if key not in sd:
      missing.append(key)
      continue
    used.add(key)
    val = fn(np.asarray(sd[key], dtype=np.float32))
    ref = expected[path].shape
    if val.shape != ref:
      bad.append(f"{key}: checkpoint {tuple(np.shape(sd[key]))} -> {val.shape} but model "
                 f"param {path} is {ref}")
      continue
    out[path] = val
  unexpected = sorted(k for k in sd if k not in used and not ignored(k))
  problems = []
  if missing:
    problems.append(f"missing ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
  if bad:
    problems.append(f"shape mismatch ({len(bad)}): " + "; ".join(bad) +
                    " — set model.video.* / model.text.* / model.proj_dim to the checkpoint's")
  if problems:
    raise ConversionError(f"{source} does not match the model config:\n  "
                          + "\n  ".join(problems))
  return out, used


def _zero_fill_rows(fn, ref):
  """Wraps a transform so a table with fewer rows than `ref` gets zero rows appended."""
  def fill(w):
    w = fn(w)
    if w.shape[0] < ref.shape[0]:
      w = np.concatenate([w, np.zeros((ref.shape[0] - w.shape[0],) + w.shape[1:], np.float32)])
    return w
  return fill


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model_config, init_params=None,
                       temporal_fill: str = "error", drop_modules=()):
  """Maps a (prefix-stripped) PyTorch state_dict onto the Flax params of `model_config`.

  `init_params` supplies train-only parameters (mask token, MVM head) that released checkpoints
  lack; without it they are freshly initialised. `temporal_fill='zeros'` lets a checkpoint with
  fewer temporal rows than `model.video.num_frames` load (Frozen's 1 -> 4 frame curriculum:
  the added rows start at zero). `drop_modules`: top-level torch modules outside the model
  (e.g. a training-only encoder) to leave out; they are listed in the report. Returns
  (params, report) with the layout ('miles' / 'frozen') the keys were recognised as.
  """
  import jax

  if init_params is None:
    init_params = init_model_params(model_config, jax.random.PRNGKey(0))
  expected = flatten(jax.tree_util.tree_map(np.asarray, init_params))
  sd = {_strip(k): v for k, v in state_dict.items()}
  layout = detect_layout(sd)
  own = {n.split(".")[0] for n in UPSTREAM_LAYOUTS[layout].values()}
  drop = {d.strip() for d in drop_modules if d.strip()}
  if drop & own:
    raise ConversionError(f"drop_modules={sorted(drop)} names the model's own modules "
                          f"{sorted(drop & own)}; only modules outside {sorted(own)} can be "
                          "dropped")
  dropped = sorted(k for k in sd if k.split(".")[0] in drop)
  sd = {k: v for k, v in sd.items() if k.split(".")[0] not in drop}
  kmap = torch_key_map(model_config, layout)
  kept = [p for p in expected if p not in kmap]
  for path in kept:
    if not path.startswith(TRAIN_ONLY):
      raise AssertionError(f"no torch key for flax param {path}")  # a bug in the map
  if temporal_fill == "zeros":
    key, fn = kmap["video/temporal_embed"]
    kmap["video/temporal_embed"] = (key, _zero_fill_rows(fn, expected["video/temporal_embed"]))
  ignored = lambda k: any(r.search(k) for r in IGNORED_KEYS)
  flat, used = assign_tensors(expected, kmap, sd, f"checkpoint ({layout} layout)", ignored)
  flat.update({p: expected[p] for p in kept})
  report = {"layout": layout, "dropped": dropped, "converted": len(used), "kept_initialised": kept,
            "ignored": sorted(k for k in sd if ignored(k)),
            "num_values": int(sum(np.asarray(sd[k]).size for k in used))}
  return unflatten(flat), report


def init_model_params(model_config, rng):
  """Fresh (unboxed) params of the dual encoder for `model_config`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from miles_jax.models.dual_encoder import build

  v = model_config.video
  frames = jnp.zeros((1, 1, v.img_size, v.img_size, 3), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  params = jax.jit(build(model_config).init)(rng, frames, ids, jnp.ones_like(ids))["params"]
  return nn.unbox(params)
