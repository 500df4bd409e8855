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
  c.mask = ml_collections.ConfigDict()
  c.mask.strategy = "blockwise"  # blockwise | tube | random
  c.mask.ratio = 0.5
  c.mac = ml_collections.ConfigDict()
  c.mac.video_ratio = 0.75
  c.mac.text_ratio = 0.15
  c.snapshot = ml_collections.ConfigDict()
  c.snapshot.momentum = 0.999
  c.snapshot.schedule = "constant"  # constant | cosine (momentum -> 1.0)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.min_lr_ratio = 0.0
  c.optim.warmup_steps = 1000
  c.optim.schedule = "cosine"  # cosine | linear | constant
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
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
      ("patch", None),
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
