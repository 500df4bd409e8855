"""Config defaults shared by every entry point, and validation that runs before any compute.

Files in `configs/` start from `default_config()` and change what their run needs. Field names
under `model.*` are part of the public contract (see DESIGN.md); SPEC "default" items are fields
here with the SPEC's default value.
"""
from __future__ import annotations

import os

import ml_collections

# ImageNet statistics the released weights were trained with (SPEC, "Video encoder").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def video_config(size: str = "base") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.img_size = 224
  c.patch_size = 16
  c.num_frames = 4  # rows of the temporal table; fewer frames are allowed at inference
  c.width = 768
  c.depth = 12
  c.num_heads = 12
  c.mlp_ratio = 4.0
  c.layer_norm_eps = 1e-6
  c.qkv_bias = True
  c.drop_path_rate = 0.0
  if size == "tiny":
    c.img_size, c.patch_size, c.width, c.depth, c.num_heads = 32, 8, 64, 2, 4
  elif size == "small":
    c.img_size, c.patch_size, c.width, c.depth, c.num_heads = 64, 16, 192, 4, 3
  elif size != "base":
    raise ValueError(f"unknown video size {size!r}: use base, small or tiny")
  return c


def text_config(size: str = "base") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.vocab_size = 30522
  c.width = 768
  c.depth = 6
  c.num_heads = 12
  c.mlp_dim = 3072
  c.max_len = 512  # rows of the learned position table (DistilBERT: 512)
  c.layer_norm_eps = 1e-12
  c.dropout_rate = 0.0
  if size == "tiny":
    c.vocab_size, c.width, c.depth, c.num_heads, c.mlp_dim, c.max_len = 1000, 64, 2, 4, 128, 64
  elif size == "small":
    c.vocab_size, c.width, c.depth, c.num_heads, c.mlp_dim, c.max_len = 8000, 192, 4, 3, 768, 64
  elif size != "base":
    raise ValueError(f"unknown text size {size!r}: use base, small or tiny")
  return c


def model_config(size: str = "base") -> ml_collections.ConfigDict:
  """The dual encoder: `base` is the released MILES / Frozen-in-Time model (180.9 M params)."""
  c = ml_collections.ConfigDict()
  c.video = video_config(size)
  c.text = text_config(size)
  c.proj_dim = 256 if size == "base" else 64
  # MVM prediction head (SPEC default: one Linear(width -> width)); not part of released weights.
  c.mvm_head = "linear"
  # Output width of the MVM head: 0 = the video width (feature targets); pixel targets
  # (mvm.target=pixels) need patch_size**2 * 3.
  c.mvm_head_dim = 0
  # Compute dtype for activations; params stay float32.
  c.dtype = "float32"
  c.remat = False  # rematerialise each transformer block in the backward pass
  return c


def default_config() -> ml_collections.ConfigDict:
  """Every field any entry point reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("base")

  # Which losses and how they are weighted: any of contrastive, miles, mac (comma-separated).
  c.objectives = "contrastive,miles"
  c.temperature = 0.05
  c.mvm = ml_collections.ConfigDict()
  c.mvm.weight = 1.0  # lambda in L = L_contrastive + lambda * L_mvm
  c.mvm.loss = "smooth_l1"  # smooth_l1 | l1 | l2 | cosine
  c.mvm.normalize_target = True  # LayerNorm without affine on the snapshot's features
  c.mvm.target_space = "features"  # features | projected
  c.mvm.unmasked_contrastive = False  # second, unmasked online forward for the contrastive term
  # What the masked patches regress: snapshot (EMA of the online video encoder, the paper's
  # text-aligned, evolving target) | frozen (the initial encoder, never updated) | pixels (the
  # intact clip's patch pixels; with mvm.normalize_target, per-patch normalised as in MAE).
  c.mvm.target = "snapshot"
  c.mask = ml_collections.ConfigDict()
  c.mask.strategy = "blockwise"  # blockwise | tube | random
  c.mask.ratio = 0.5
  c.mac = ml_collections.ConfigDict()
  c.mac.video_ratio = 0.75
  c.mac.text_ratio = 0.15
  c.snapshot = ml_collections.ConfigDict()
  c.snapshot.momentum = 0.999
  c.snapshot.schedule = "constant"  # constant | cosine (momentum -> 1.0)

  # Start from public weights (miles_jax/init_weights.py, docs/init_viz_profile.md).
  c.init = ml_collections.ConfigDict()
  c.init.video = ""  # ViT-B/16 .npz | timm .safetensors/.pth | OpenAI CLIP state_dict
  c.init.video_format = "auto"  # auto | vit_npz | timm | clip
  c.init.text = ""  # Hugging Face DistilBERT dir (or its weights file, config.json beside)
  c.init.time_init = "zeros"  # zeros (Frozen: qkv 0, proj weight 1, bias 0) | random
  c.init.norm3 = "fresh"  # fresh (Frozen: LayerNorm ones/zeros) | norm1 (copy the spatial LN)
  c.init.clip_proj = False  # map CLIP's visual.proj onto video_proj (needs proj_dim = its width)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.min_lr_ratio = 0.0
  c.optim.warmup_steps = 1000
  c.optim.schedule = "cosine"  # cosine | linear | constant
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # Adam epsilon (PyTorch AdamW default)
  c.optim.grad_clip = 1.0
  c.optim.grad_accum_steps = 1

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # glob of TFRecord shards
  c.data.eval = ""
  c.data.tokenizer = ""  # vocab.txt (WordPiece) or *.model (sentencepiece)
  c.data.num_frames = 4
  c.data.max_len = 32
  c.data.batch_size = 2  # global batch
  c.data.eval_batch_size = 8
  c.data.shuffle_buffer = 1000
  c.data.crop_scale = (0.5, 1.0)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep = 3
  c.train.eval_every = 0
  c.train.on_nonfinite = "stop"  # stop | skip
  c.train.best_metric = ""  # e.g. "retrieval/t2v_R1": also keep the best checkpoint by it
  c.train.init_from = ""  # exported model dir or .pth/.safetensors to start a new run from
  c.train.inject_nan_at_step = -1  # fault-injection for tests: NaN loss at this step
  # An ablation.json (python -m miles_jax.ablate) whose contrastive-only row is printed next to
  # the final retrieval table when it was measured on the same held-out split (the demo's).
  c.train.compare_to = ""
  c.evaluators = "retrieval"  # comma list run on data.eval: retrieval, zeroshot

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)  # -1: all remaining devices
  c.mesh.axes = ("data",)
  # logical axis -> mesh axis (None: replicated). Batch goes over `batch`.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("joined_kv", "model"),
      ("vocab", None),
      ("proj", None),
      ("patch_h", None),
      ("patch_w", None),
      ("frames", None),
      ("positions", None),
      ("channels", None),
      ("height", None),
      ("width", None),
  )
  return c


def default_config_path() -> str:
  """configs/default.py of this source checkout (entry points use it when --config is absent)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "configs", "default.py")


OBJECTIVES = ("contrastive", "miles", "mac")
MVM_TARGETS = ("snapshot", "frozen", "pixels")


def validate(config: ml_collections.ConfigDict, workdir: str | None = None,
             needs_train_data: bool = True) -> None:
  """Checks a config before any compute; raises ValueError naming the field and the fix."""
  def matches(pattern: str) -> bool:
    import tensorflow as tf  # gfile: local paths and gs:// alike; comma-separated globs
    return any(tf.io.gfile.glob(p.strip()) for p in pattern.split(",") if p.strip())

  def fail(field, msg):
    raise ValueError(f"config.{field}: {msg}")

  objs = [o.strip() for o in str(config.objectives).split(",") if o.strip()]
  if not objs or any(o not in OBJECTIVES for o in objs):
    fail("objectives", f"{config.objectives!r}: use a comma list of {', '.join(OBJECTIVES)}")
  if not 0.0 <= config.mask.ratio < 1.0:
    fail("mask.ratio", f"{config.mask.ratio} must be in [0, 1)")
  if config.mvm.get("target", "snapshot") not in MVM_TARGETS:
    fail("mvm.target", f"{config.mvm.target!r}: use {', '.join(MVM_TARGETS)}")
  if config.mvm.get("target", "snapshot") == "pixels":
    v = config.model.video
    want = v.patch_size * v.patch_size * 3
    if config.mvm.target_space != "features":
      fail("mvm.target_space", f"{config.mvm.target_space!r} applies to encoder targets; use "
           "features with mvm.target=pixels")
    if int(config.model.get("mvm_head_dim", 0)) != want:
      fail("model.mvm_head_dim", f"{config.model.get('mvm_head_dim', 0)}: mvm.target=pixels "
           f"regresses {v.patch_size}x{v.patch_size}x3 patch pixels, set it to {want}")
  if config.mask.strategy not in ("blockwise", "tube", "random"):
    fail("mask.strategy", f"{config.mask.strategy!r}: use blockwise, tube or random")
  for f in ("video_ratio", "text_ratio"):
    if not 0.0 <= config.mac[f] < 1.0:
      fail(f"mac.{f}", f"{config.mac[f]} must be in [0, 1)")
  if config.temperature <= 0:
    fail("temperature", f"{config.temperature} must be > 0")
  if not 0.0 <= config.snapshot.momentum <= 1.0:
    fail("snapshot.momentum", f"{config.snapshot.momentum} must be in [0, 1]")
  for f in ("lr", "weight_decay"):
    if config.optim[f] < 0:
      fail(f"optim.{f}", f"{config.optim[f]} must be >= 0")
  for f in ("steps", "log_every", "checkpoint_every", "keep"):
    if int(config.train[f]) <= 0:
      fail(f"train.{f}", f"{config.train[f]} must be > 0")
  if config.train.on_nonfinite not in ("stop", "skip"):
    fail("train.on_nonfinite", f"{config.train.on_nonfinite!r}: use stop or skip")
  if int(config.data.batch_size) <= 0:
    fail("data.batch_size", f"{config.data.batch_size} must be > 0")
  v = config.model.video
  if v.img_size % v.patch_size:
    fail("model.video.img_size", f"{v.img_size} is not a multiple of patch_size {v.patch_size}")
  if config.data.num_frames > v.num_frames:
    fail("data.num_frames", f"{config.data.num_frames} > model.video.num_frames={v.num_frames}")
  if config.data.max_len > config.model.text.max_len:
    fail("data.max_len", f"{config.data.max_len} > model.text.max_len={config.model.text.max_len}")
  if needs_train_data:
    if not config.data.train:
      fail("data.train", "is empty: set it to a glob of TFRecord shards "
           "(python -m miles_jax.data.prepare / miles_jax.data.synthetic write them)")
    if not matches(config.data.train):
      fail("data.train", f"{config.data.train!r} matches no files")
  if config.data.eval and not matches(config.data.eval):
    fail("data.eval", f"{config.data.eval!r} matches no files")
  if not config.data.tokenizer or not matches(config.data.tokenizer):
    fail("data.tokenizer", f"{config.data.tokenizer!r} does not exist: give a BERT vocab.txt "
         "or a sentencepiece .model")
  if config.train.init_from and not matches(config.train.init_from):
    fail("train.init_from", f"{config.train.init_from!r} does not exist")
  if workdir is not None:
    probe = workdir
    while probe and not os.path.exists(probe):
      probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.access(probe, os.W_OK | os.X_OK):
      raise PermissionError(f"--workdir={workdir}: {probe} is not writable")


def sibling(config_file: str, name: str):
  """Imports `name`.py from the folder of `config_file`: config files sharing a base config
  (configs/ is not a package; ml_collections loads each file by path)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"miles_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
