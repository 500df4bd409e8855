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
  # What a bfloat16 `dtype` lowers (models/dual_encoder.py: compute_dtypes): all (every
  # activation bf16, the dense layers' matmuls bf16: TPU / GPU) | matmuls (only the dense
  # layers' operands bf16; their float32 accumulator is the output, and LayerNorm, attention,
  # GELU and the residual stream stay float32: XLA:CPU's bf16 elementwise code is slower than
  # its float32 code, benchmarks/train_step.py).
  c.low_precision = "all"
  # Which implementation of the same functions: reference (plain einsum attention, nn.Dense,
  # jax.nn.softmax: every backend, what TPU runs) | xla_cpu (models/xla_cpu.py: custom-VJP
  # kernels in the forms XLA:CPU runs fastest; the CPU demo and the CPU benchmarks).
  c.kernels = "reference"
  # Rematerialisation of each transformer block in the backward pass: none (keep activations),
  # full (keep block inputs only: least memory), dots_saveable (keep matmul outputs, recompute
  # the elementwise ops). Older configs' True / False mean full / none.
  c.remat = "none"
  # One nn.scan over the blocks (compiled once, not depth times). Changes the param tree to a
  # stacked `blocks` / `layers`: dual_encoder.scan_params / unscan_params convert; exports and
  # convert.py use the unrolled layout, so this stays off unless compile time matters.
  c.scan_layers = False
  return c


def default_config() -> ml_collections.ConfigDict:
  """Every field any entry point reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config("base")

  # Which losses and how they are weighted: any of contrastive, miles, mac, mvm (MVM alone: no
  # text, a video-only stage), comma-separated.
  c.objectives = "contrastive,miles"
  c.temperature = 0.05
  c.mvm = ml_collections.ConfigDict()
  c.mvm.weight = 1.0  # lambda in L = L_contrastive + lambda * L_mvm
  # lambda is 0 before this step: the EMA snapshot's targets are used once contrastive training
  # has text-aligned it (the paper starts from pretrained weights; from scratch it is random).
  c.mvm.start_step = 0
  c.mvm.loss = "smooth_l1"  # smooth_l1 | l1 | l2 | cosine
  c.mvm.normalize_target = True  # LayerNorm without affine on the snapshot's features
  c.mvm.target_space = "features"  # features | projected
  # The contrastive term on a second, intact online forward (True) or on the masked clip (False;
  # the papers do not say). True by the ablation's evidence: t2v R@1 11.4 +- 1.4 vs 5.0 +- 0.7
  # over 3 seeds on 512 held-out clips (README "Results", benchmarks/results/ablation.md).
  c.mvm.unmasked_contrastive = True
  # What the masked patches regress: snapshot (EMA of the online video encoder, the paper's
  # text-aligned, evolving target) | frozen (a copy of the online encoder as it enters
  # mvm.start_step -- the initial encoder at 0 -- never updated after) | pixels (the intact
  # clip's patch pixels; with mvm.normalize_target, per-patch normalised as in MAE).
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
  # Glob of TFRecord shards (comma-separated globs allowed), or several weighted sources as a
  # list of {glob, weight, frames} (set with `set_train_sources`): each global batch comes from
  # one source picked by weight, e.g. WebVid clips with 4 frames and CC3M images as 1-frame clips.
  c.data.train = ""
  c.data.eval = ""
  c.data.tokenizer = ""  # vocab.txt (WordPiece) or *.model (sentencepiece)
  c.data.num_frames = 4
  c.data.max_len = 32
  c.data.batch_size = 2  # global batch
  c.data.eval_batch_size = 8
  # A truncated or unparseable eval shard is an error (the gallery would shrink and recall rise);
  # True evaluates the readable records and lists the damage in the eval set's `skipped`.
  c.data.allow_damaged_eval = False
  # Records (serialised JPEG frames, ~50-200 KB each) shuffled per host after the 16-way shard
  # interleave: 10k is ~1-2 GB of host RAM, far above the few hundred a batch spans.
  c.data.shuffle_buffer = 10_000
  c.data.crop_scale = (0.5, 1.0)
  # Evaluation data (docs/evaluation.md "Protocol"):
  c.data.eval_name = ""  # dataset name in results/caches ("": the eval glob's folder name)
  # comma list of split names; data.eval then holds "{split}", e.g. data/ucf101/test{split}-*
  # with eval_splits "1,2,3": every split is evaluated and the mean ± std reported
  c.data.eval_splits = ""
  # eval caption length; 0: model.text.max_len (Frozen tokenises eval text untruncated up to
  # the text model's positions), not data.max_len (the training length)
  c.data.eval_max_len = 0
  c.data.eval_clips = 1  # K test-time clips per video, embeddings averaged (1: off)
  # the train loop's evaluators read this split (best-checkpoint selection) when set; empty:
  # they read data.eval, and best.json records that the test split selected the checkpoint
  c.data.val = ""

  # Retrieval options the papers compare with; every one off by default (Frozen / MILES eval)
  c.eval = ml_collections.ConfigDict()
  # video->text with several captions per video: "frozen" (rank among all captions, the best
  # caption counts: Frozen / MILES) or "max" (a video's captions scored by their max, ranked
  # among videos' caption sets: CLIP4Clip family)
  c.eval.v2t_multi_caption = "frozen"
  c.eval.post = "none"  # none | dsl (dual softmax at inference) | qbnorm (QB-Norm, t2v)
  c.eval.dsl_temperature = 0.01  # DSL: sim * softmax(sim / T) over the other side's queries
  c.eval.qbnorm_bank = ""  # QB-Norm query bank: glob of shards whose captions are the queries
  c.eval.qbnorm_beta = 20.0  # QB-Norm inverse temperature (its release's default)
  c.eval.qbnorm_k = 1  # QB-Norm: top-k of each bank query form the activation set

  c.zeroshot = ml_collections.ConfigDict()
  # prompt templates ("{}" = class name); the papers do not list theirs (**default**)
  c.zeroshot.templates = ("{}", "a video of {}.", "a video of a person {}.", "a person is {}.",
                          "a person doing {}.")
  c.zeroshot.reduce = "mean"  # mean (normalise each prompt, average) | mean_raw

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
  # Global batches built and put on the devices ahead of the step by a background thread
  # (0: built on demand between steps, the device idles meanwhile).
  c.train.prefetch = 2
  # Read the step's metrics (and the non-finite check) after every step instead of only at
  # log steps and before saves: a host<->device sync per step (debugging; the pre-prefetch loop).
  c.train.sync_every_step = False
  # Persistent XLA compilation cache: 'auto' = WORKDIR/compilation_cache (unless
  # JAX_COMPILATION_CACHE_DIR is set), '' = off, or any directory / gs:// path.
  c.train.compilation_cache = "auto"
  # (first, last): a jax.profiler trace of steps first+1..last in WORKDIR/profile; () = none.
  c.train.profile_steps = ()
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


def parse_overrides(items, flag: str = "--set") -> dict:
  """KEY=VALUE strings (given as `flag`) -> {key: value}; values are Python literals where they
  parse, else str."""
  import ast
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"{flag} {item!r}: use KEY=VALUE, e.g. model.video.patch_size=4")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def override(config, overrides: dict):
  """Sets dotted keys, {"model.video.depth": 2, ...}, on `config` in place; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def set_train_sources(config, sources: list) -> None:
  """Sets `data.train` to weighted sources [{glob, weight, frames}, ...] (the field's default is
  a string, which ml_collections would not let a list replace)."""
  with config.data.ignore_type():
    config.data.train = [dict(s) for s in sources]


def train_sources(config) -> list[dict]:
  """`data.train` as [{glob, weight, frames}]: a string is one source of weight 1 with
  `data.num_frames` frames. Raises ValueError naming the field for a malformed entry."""
  train = config.data.train
  if isinstance(train, str):
    return [{"glob": train, "weight": 1.0, "frames": int(config.data.num_frames)}] if train else []
  out = []
  for i, s in enumerate(train):
    s = dict(s)
    unknown = set(s) - {"glob", "weight", "frames"}
    if unknown or not s.get("glob"):
      raise ValueError(f"config.data.train[{i}]: {s!r}: each source is {{glob, weight, frames}} "
                       f"with a non-empty glob{f' (unknown keys {sorted(unknown)})' if unknown else ''}")
    weight, frames = float(s.get("weight", 1.0)), int(s.get("frames", config.data.num_frames))
    if weight <= 0:
      raise ValueError(f"config.data.train[{i}].weight={weight} must be > 0")
    if frames < 1:
      raise ValueError(f"config.data.train[{i}].frames={frames} must be >= 1")
    out.append({"glob": str(s["glob"]), "weight": weight, "frames": frames})
  return out


def default_config_path() -> str:
  """configs/default.py of this source checkout (entry points use it when --config is absent)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "configs", "default.py")


OBJECTIVES = ("contrastive", "miles", "mac", "mvm")
MVM_TARGETS = ("snapshot", "frozen", "pixels")
DTYPES = ("float32", "bfloat16")  # model.dtype
LOW_PRECISION = ("all", "matmuls")  # model.low_precision (models/dual_encoder.py)
KERNELS = ("reference", "xla_cpu")  # model.kernels (models/layers.py, models/xla_cpu.py)


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
  if int(config.mvm.get("start_step", 0)) < 0:
    fail("mvm.start_step", f"{config.mvm.start_step} must be >= 0")
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
  if config.model.get("dtype", "float32") not in DTYPES:
    fail("model.dtype", f"{config.model.dtype!r}: use {' or '.join(DTYPES)}")
  if config.model.get("low_precision", "all") not in LOW_PRECISION:
    fail("model.low_precision", f"{config.model.low_precision!r}: use "
         f"{' or '.join(LOW_PRECISION)} (matmuls with model.kernels=xla_cpu on CPU)")
  if config.model.get("kernels", "reference") not in KERNELS:
    fail("model.kernels", f"{config.model.kernels!r}: use {' or '.join(KERNELS)} "
         "(xla_cpu: the CPU kernels of models/xla_cpu.py)")
  v = config.model.video
  if v.img_size % v.patch_size:
    fail("model.video.img_size", f"{v.img_size} is not a multiple of patch_size {v.patch_size}")
  if config.data.num_frames > v.num_frames:
    fail("data.num_frames", f"{config.data.num_frames} > model.video.num_frames={v.num_frames}")
  if config.data.max_len > config.model.text.max_len:
    fail("data.max_len", f"{config.data.max_len} > model.text.max_len={config.model.text.max_len}")
  if int(config.data.get("eval_max_len", 0)) > config.model.text.max_len:
    fail("data.eval_max_len", f"{config.data.eval_max_len} > model.text.max_len="
         f"{config.model.text.max_len}")
  if int(config.data.get("eval_clips", 1)) < 1:
    fail("data.eval_clips", f"{config.data.eval_clips} must be >= 1")
  if config.data.num_frames * int(config.data.get("eval_clips", 1)) < 1:
    fail("data.num_frames", "must be >= 1")
  ev = config.get("eval")
  if ev is not None:
    if ev.v2t_multi_caption not in ("frozen", "max"):
      fail("eval.v2t_multi_caption", f"{ev.v2t_multi_caption!r}: use frozen or max")
    if ev.post not in ("none", "dsl", "qbnorm"):
      fail("eval.post", f"{ev.post!r}: use none, dsl or qbnorm")
    if ev.post == "qbnorm" and not (ev.qbnorm_bank and matches(ev.qbnorm_bank)):
      fail("eval.qbnorm_bank", f"{ev.qbnorm_bank!r} matches no files: QB-Norm needs a query "
           "bank, e.g. the training split's shards")
  if needs_train_data:
    sources = train_sources(config)
    if not sources:
      fail("data.train", "is empty: set it to a glob of TFRecord shards "
           "(python -m miles_jax.data.prepare / miles_jax.data.synthetic write them)")
    for i, src in enumerate(sources):
      field = "data.train" if isinstance(config.data.train, str) else f"data.train[{i}]"
      if not matches(src["glob"]):
        fail(field, f"{src['glob']!r} matches no files")
      if src["frames"] > v.num_frames:
        fail(field, f"frames={src['frames']} > model.video.num_frames={v.num_frames}")
  for name, pattern in eval_patterns(config):
    if not matches(pattern):
      fail("data.eval", f"{pattern!r} (split {name}) matches no files")
  if config.data.get("val") and not matches(config.data.val):
    fail("data.val", f"{config.data.val!r} matches no files")
  if not config.data.tokenizer or not matches(config.data.tokenizer):
    fail("data.tokenizer", f"{config.data.tokenizer!r} does not exist: give a BERT vocab.txt "
         "or a sentencepiece .model")
  if config.train.init_from:
    from miles_jax import paths  # local or gs://, through the same URI layer as the workdir
    if not paths.exists(config.train.init_from):
      fail("train.init_from", f"{config.train.init_from!r} does not exist")
  if workdir is not None and "://" not in workdir:  # a bucket's permissions show on first write
    probe = workdir
    while probe and not os.path.exists(probe):
      probe = os.path.dirname(probe)
    probe = probe or "."
    # isdir: root passes os.access on any path, and on a file with an x bit set.
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
      raise PermissionError(f"--workdir={workdir}: {probe} is not writable (a directory "
                            "you can write to must hold the workdir)")


def eval_patterns(config) -> list:
  """[(split name, glob)] of data.eval: one per data.eval_splits entry ("{split}" filled in),
  or the one glob (split name: its shards' prefix, e.g. "test")."""
  pattern = config.data.eval
  if not pattern:
    return []
  splits = [s.strip() for s in str(config.data.get("eval_splits", "")).split(",") if s.strip()]
  if splits:
    if "{split}" not in pattern:
      raise ValueError(f"config.data.eval={pattern!r}: with data.eval_splits set it must hold "
                       "'{split}', e.g. data/ucf101/test{split}-*.tfrecord")
    return [(s, pattern.replace("{split}", s)) for s in splits]
  if "{split}" in pattern:
    raise ValueError(f"config.data.eval={pattern!r} holds '{{split}}': set data.eval_splits, "
                     "e.g. 1,2,3")
  return [(split_name(pattern), pattern)]


def split_name(pattern: str) -> str:
  """The split of an eval glob: its shards' prefix (data/msrvtt/test-*.tfrecord -> test)."""
  base = os.path.basename(pattern.split(",")[0].strip())
  return base.split("-")[0].split("*")[0] or "eval"


def sibling(config_file: str, name: str):
  """Imports `name`.py from the folder of `config_file`: config files sharing a base config
  (configs/ is not a package; ml_collections loads each file by path)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"miles_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
