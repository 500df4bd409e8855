"""Start from public weights, as the paper does: an image ViT into the video encoder, DistilBERT
into the text encoder (Frozen-in-Time's initialisation).

Video sources (`config.init.video`, format `config.init.video_format`, detected by default):
  vit_npz  the original ViT release / big_vision `.npz` (`embedding/kernel`, `cls`,
           `Transformer/encoderblock_i/...`), e.g. ViT-B/16 ImageNet-21k;
  timm     a timm `.safetensors` / `.pth` (`patch_embed.proj.weight`, `blocks.i.attn.qkv...`);
  clip     an OpenAI CLIP state_dict (`visual.conv1.weight`, `visual.transformer.resblocks.i...`);
           our encoder has no `ln_pre` and uses exact GELU, so this start is approximate (below).
Text source (`config.init.text`): a Hugging Face DistilBERT directory (`model.safetensors` or
`pytorch_model.bin`, `config.json`, `vocab.txt`) or the weights file itself.

What the video encoder gets (Frozen loads the ViT state_dict with strict=False into a model whose
new parts keep their constructor values; we do the same, by name):
  patch embed, cls, spatial pos embed (grid resized by bicubic interpolation when it differs),
  norm1, attn, norm2, mlp, final norm  <- the image ViT;
  temporal_embed <- zeros; timeattn <- `time_init='zeros'`: qkv weight and bias 0, proj weight
  1, proj bias 0 (its input values are 0, so the time branch adds exactly 0 at the start);
  norm3 <- `norm3='fresh'`: LayerNorm scale 1, bias 0 (Frozen; the ViT has no such layer), or
  `'norm1'`: a copy of norm1; mask_token, projections, MVM head keep the model's initialisation.
Every tensor of a source must be used or be a known classifier / text-tower part; missing,
unexpected and mis-shaped tensors fail with their names.
"""
from __future__ import annotations

import json
import re
from typing import Mapping

import ml_collections
import numpy as np

from miles_jax import paths
from miles_jax.weights import torch_io
from miles_jax.weights.torch_io import ConversionError

VIDEO_FORMATS = ("auto", "vit_npz", "timm", "clip")
# Image-classifier parts the video encoder has no place for (Frozen sets them to Identity).
_VIT_IGNORED = re.compile(r"^(head|pre_logits)[./]")
# DistilBertForMaskedLM's head and a buffer some transformers versions save.
_DISTILBERT_IGNORED = re.compile(r"^(vocab_transform|vocab_layer_norm|vocab_projector)\.|"
                                 r"^embeddings\.position_ids$")
# config.json field -> model.text field it must equal.
_DISTILBERT_DIMS = (("dim", "width"), ("n_layers", "depth"), ("n_heads", "num_heads"),
                    ("hidden_dim", "mlp_dim"), ("vocab_size", "vocab_size"),
                    ("max_position_embeddings", "max_len"))


def init_config(config=None) -> ml_collections.ConfigDict:
  """`config.init` with defaults for fields an older config file lacks (a copy)."""
  from miles_jax import config_lib
  out = config_lib.default_config().init
  if config is not None and "init" in config:
    out.update(config.init)
  return ml_collections.ConfigDict(out.to_dict())


# ----------------------------------------------------------------------------- reading sources

def read_video_checkpoint(path: str, fmt: str = "auto"):
  """Reads a ViT / CLIP checkpoint -> (timm-named numpy state_dict, format, notes).

  Every layout is first renamed to timm's keys in torch layout (Linear [out, in], conv OIHW), so
  one table maps them all onto the video encoder.
  """
  if fmt not in VIDEO_FORMATS:
    raise ValueError(f"config.init.video_format={fmt!r}: use one of {', '.join(VIDEO_FORMATS)}")
  if not paths.exists(path):
    raise FileNotFoundError(f"config.init.video={path!r} does not exist")
  if path.endswith(".npz"):
    with paths.local_file(path) as local, np.load(local, allow_pickle=False) as z:
      raw = {k: np.asarray(z[k]) for k in z.files}
  else:
    raw = torch_io.read_state_dict(path)
  if fmt == "auto":
    fmt = _detect_video_format(path, raw)
  if fmt == "vit_npz":
    sd, notes = _npz_to_timm(raw), []
  elif fmt == "clip":
    sd, notes = _clip_to_timm(raw)
  else:
    sd, notes = {k: np.asarray(v, np.float32) for k, v in raw.items()}, []
  return sd, fmt, notes


def _detect_video_format(path, raw) -> str:
  keys = list(raw)
  if not keys:
    raise ConversionError(f"{path}: no tensors at the top level (a {{'model': state_dict}} "
                          "wrapper?); save the inner state_dict as .safetensors")
  if any(k.startswith("visual.") for k in keys):
    return "clip"
  if any(k.startswith(("Transformer/", "params/Transformer/")) for k in keys):
    return "vit_npz"
  if "patch_embed.proj.weight" in raw:
    return "timm"
  raise ConversionError(f"{path}: cannot tell the layout from its keys ({', '.join(keys[:5])}, "
                        "...); set config.init.video_format to vit_npz, timm or clip")


def _npz_to_timm(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ViT-release / big_vision names and layouts -> timm names in torch layout.

  Unknown keys are passed through under their own names so they surface as unexpected.
  """
  raw = {k[len("params/"):] if k.startswith("params/") else k: np.asarray(v, np.float32)
         for k, v in raw.items()}
  out, used = {}, set()

  def take(key):
    used.add(key)
    return raw[key] if key in raw else _Missing(key)

  out["patch_embed.proj.weight"] = _apply(take("embedding/kernel"), lambda w: w.transpose(3, 2, 0, 1))
  out["patch_embed.proj.bias"] = take("embedding/bias")
  out["cls_token"] = take("cls")
  pos = "Transformer/posembed_input/pos_embedding"
  if pos not in raw and "pos_embedding" in raw:
    pos = "pos_embedding"  # big_vision keeps it at the top level
  out["pos_embed"] = take(pos)
  blocks = sorted({int(m.group(1)) for k in raw
                   for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
  for i in blocks:
    pre = f"Transformer/encoderblock_{i}/"
    # Sub-modules are found by kind: the ViT release numbers them LayerNorm_0, ..._1,
    # LayerNorm_2, MlpBlock_3; big_vision LayerNorm_0, ..._0, LayerNorm_1, MlpBlock_0.
    mods = sorted({k[len(pre):].split("/")[0] for k in raw if k.startswith(pre)},
                  key=lambda m: int(m.rsplit("_", 1)[-1]) if m[-1].isdigit() else -1)
    kind = lambda name: [m for m in mods if m.startswith(name)]
    lns, att, mlp = kind("LayerNorm_"), kind("MultiHeadDotProductAttention_"), kind("MlpBlock_")
    lns = lns + [f"LayerNorm_<missing {j}>" for j in range(len(lns), 2)]
    att = (att or ["MultiHeadDotProductAttention_1"])[0]
    mlp = (mlp or ["MlpBlock_3"])[0]
    b = f"blocks.{i}."
    for ln, name in zip(lns[:2], ("norm1", "norm2")):
      out[b + name + ".weight"] = take(pre + ln + "/scale")
      out[b + name + ".bias"] = take(pre + ln + "/bias")
    # query/key/value kernels [D, H, Dh] -> rows of torch's fused qkv [3D, D], heads inside.
    qkv_w = [take(f"{pre}{att}/{n}/kernel") for n in ("query", "key", "value")]
    qkv_b = [take(f"{pre}{att}/{n}/bias") for n in ("query", "key", "value")]
    out[b + "attn.qkv.weight"] = _apply(qkv_w, lambda ws: np.concatenate(
        [w.reshape(w.shape[0], -1).T for w in ws]))
    out[b + "attn.qkv.bias"] = _apply(qkv_b, lambda bs: np.concatenate([x.reshape(-1) for x in bs]))
    out[b + "attn.proj.weight"] = _apply(take(f"{pre}{att}/out/kernel"),
                                         lambda w: w.reshape(-1, w.shape[-1]).T)
    out[b + "attn.proj.bias"] = take(f"{pre}{att}/out/bias")
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{b}mlp.{fc}.weight"] = _apply(take(f"{pre}{mlp}/Dense_{j}/kernel"), lambda w: w.T)
      out[f"{b}mlp.{fc}.bias"] = take(f"{pre}{mlp}/Dense_{j}/bias")
  out["norm.weight"] = take("Transformer/encoder_norm/scale")
  out["norm.bias"] = take("Transformer/encoder_norm/bias")
  for k in raw:
    if k.startswith(("head/", "pre_logits/")):
      out[k.replace("/", ".")] = raw[k]  # classifier: ignored by name later
    elif k not in used:
      out[k] = raw[k]
  missing = sorted({m.key for v in out.values() for m in _missing_in(v)})
  if missing:
    raise ConversionError(f"ViT .npz: missing tensors ({len(missing)}): {', '.join(missing)}")
  return out


class _Missing:
  def __init__(self, key):
    self.key = key


def _missing_in(v):
  vs = v if isinstance(v, list) else [v]
  return [x for x in vs if isinstance(x, _Missing)]


def _apply(v, fn):
  """fn(v) unless v (or an element of it) is missing; then the missing marker(s)."""
  gone = _missing_in(v)
  return (gone if len(gone) > 1 else gone[0]) if gone else fn(v)


_CLIP_RENAMES = (
    (r"^visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^visual\.ln_post\.", "norm."),
    (r"^visual\.conv1\.weight$", "patch_embed.proj.weight"),
)


def _clip_to_timm(raw: Mapping[str, np.ndarray]):
  """OpenAI CLIP visual tower -> timm names; returns (state_dict, notes on what is approximate)."""
  out, notes = {}, []
  text_tower = [k for k in raw if not k.startswith("visual.")]
  for k, v in raw.items():
    if not k.startswith("visual."):
      continue
    v = np.asarray(v, np.float32)
    for pat, rep in _CLIP_RENAMES:
      if re.match(pat, k):
        out[re.sub(pat, rep, k)] = v
        break
    else:
      if k == "visual.class_embedding":
        out["cls_token"] = v.reshape(1, 1, -1)
      elif k == "visual.positional_embedding":
        out["pos_embed"] = v[None]
      elif k == "visual.proj":
        out["clip.proj"] = v  # [width, embed_dim], x @ proj: used only with init.clip_proj
      elif k.startswith("visual.ln_pre."):
        out["clip." + k[len("visual."):]] = v  # no place in our encoder: dropped, noted below
      else:
        out[k] = v  # surfaces as unexpected
  if "patch_embed.proj.weight" in out:
    # CLIP's conv1 has no bias; ours does: zero adds nothing.
    out["patch_embed.proj.bias"] = np.zeros(out["patch_embed.proj.weight"].shape[0], np.float32)
    notes.append("patch_embed bias: CLIP's conv1 has none -> zeros (exact)")
  notes.append("visual.ln_pre dropped: model.video has no LayerNorm between the position "
               "embedding and block 0 (approximation: block 0 sees un-normalised tokens)")
  notes.append("MLP activation: CLIP's quick-GELU x*sigmoid(1.702x) runs as exact GELU "
               "(approximation, |difference| <= 0.02 per unit)")
  if text_tower:
    notes.append(f"CLIP text tower ignored ({len(text_tower)} tensors): the text encoder is "
                 "DistilBERT (config.init.text)")
  return out, notes


def read_distilbert(path: str):
  """A DistilBERT dir or weights file -> (state_dict without 'distilbert.', config.json dict or
  None, vocab.txt path or None). `path` may be a URI (gs://...)."""
  if not paths.exists(path):
    raise FileNotFoundError(f"config.init.text={path!r} does not exist")
  is_dir = paths.isdir(path)
  folder = path if is_dir else paths.dirname(path)
  weights = path
  if is_dir:
    names = ("model.safetensors", "pytorch_model.bin")
    found = [n for n in names if paths.exists(paths.join(path, n))]
    if not found:
      raise FileNotFoundError(f"config.init.text={path}: the directory holds neither "
                              f"{' nor '.join(names)}")
    weights = paths.join(path, found[0])
  sd = torch_io.read_state_dict(weights)
  if any(k.startswith("bert.") for k in sd):
    raise ConversionError(f"{weights}: this is a BERT checkpoint (keys 'bert.*'); "
                          "config.init.text needs DistilBERT (e.g. distilbert-base-uncased)")
  sd = {k[len("distilbert."):] if k.startswith("distilbert.") else k: v for k, v in sd.items()}
  hf_config = None
  cfg_path = paths.join(folder, "config.json")
  if paths.exists(cfg_path):
    hf_config = json.loads(paths.read_text(cfg_path))
  vocab = paths.join(folder, "vocab.txt")
  return sd, hf_config, vocab if paths.exists(vocab) else None


# ----------------------------------------------------------------------------- mapping

def _sub_map(model_config, flax_prefix: str, torch_prefix: str) -> dict:
  """The released-checkpoint key map restricted to one encoder, torch prefix removed."""
  return {p: (k[len(torch_prefix):], fn) for p, (k, fn) in torch_io.torch_key_map(model_config).items()
          if p.startswith(flax_prefix)}


def resize_pos_embed(pos: np.ndarray, grid: int) -> np.ndarray:
  """`[1 + g*g, D]` -> `[1 + grid*grid, D]`: cls row kept, the g x g table resized bicubically."""
  import jax
  import jax.numpy as jnp
  n, d = pos.shape[0] - 1, pos.shape[1]
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ConversionError(f"pos_embed has {n} patch rows, not a square grid: cannot resize")
  table = jax.image.resize(jnp.asarray(pos[1:].reshape(g, g, d)), (grid, grid, d), "bicubic")
  return np.concatenate([pos[:1], np.asarray(table).reshape(grid * grid, d)])


def video_from_image_vit(sd: Mapping[str, np.ndarray], model_config, ref_video: Mapping,
                         init_cfg, source: str = "ViT checkpoint"):
  """timm-named ViT state_dict -> (flat {'video/...': array}, report) with Frozen's time init."""
  v = model_config.video
  expected = {f"video/{k}": np.asarray(a) for k, a in torch_io.flatten(ref_video).items()}
  kmap = _sub_map(model_config, "video/", "video_model.")
  new = lambda p: (p == "video/temporal_embed" or "/norm3/" in p or "/timeattn/" in p)
  kmap = {p: kf for p, kf in kmap.items() if not new(p)}
  sd = dict(sd)
  notes = []
  grid = v.img_size // v.patch_size
  pos = sd.get("pos_embed")
  if pos is not None and pos.reshape(-1, pos.shape[-1]).shape[0] != 1 + grid * grid:
    flat = pos.reshape(-1, pos.shape[-1])
    g = int(round((flat.shape[0] - 1) ** 0.5))
    sd["pos_embed"] = resize_pos_embed(flat, grid)[None]
    notes.append(f"pos_embed resized {g}x{g} -> {grid}x{grid} (bicubic, cls row kept)")
  ignored = lambda k: bool(_VIT_IGNORED.match(k)) or k.startswith("clip.")
  flat, used = torch_io.assign_tensors(expected, kmap, sd, source, ignored)

  if init_cfg.time_init not in ("zeros", "random"):
    raise ValueError(f"config.init.time_init={init_cfg.time_init!r}: use zeros or random")
  if init_cfg.norm3 not in ("fresh", "norm1"):
    raise ValueError(f"config.init.norm3={init_cfg.norm3!r}: use fresh or norm1")
  flat["video/temporal_embed"] = np.zeros_like(expected["video/temporal_embed"])
  for i in range(v.depth):
    b = f"video/block_{i}"
    for leaf in ("scale", "bias"):
      p = f"{b}/norm3/{leaf}"
      if init_cfg.norm3 == "norm1":
        flat[p] = flat[f"{b}/norm1/{leaf}"].copy()
      else:
        flat[p] = (np.ones_like if leaf == "scale" else np.zeros_like)(expected[p])
    for leaf in ("qkv/kernel", "qkv/bias", "proj/kernel", "proj/bias"):
      p = f"{b}/timeattn/{leaf}"
      if init_cfg.time_init == "random":
        flat[p] = expected[p]
      else:  # Frozen's time_init='zeros'
        flat[p] = (np.ones_like if leaf == "proj/kernel" else np.zeros_like)(expected[p])
  kept = sorted(p for p in expected if p not in flat)
  for p in kept:
    flat[p] = expected[p]
  report = {"source": source, "tensors": len(used),
            "values": int(sum(np.asarray(sd[k]).size for k in used if k in sd)),
            "ignored": sorted(k for k in sd if ignored(k) and not k.startswith("clip.")),
            "zero_temporal_embed": True, "time_init": init_cfg.time_init,
            "norm3": init_cfg.norm3, "kept_initialised": kept, "notes": notes}
  return flat, report


def text_from_distilbert(sd: Mapping[str, np.ndarray], hf_config: dict | None, model_config,
                         ref_text: Mapping, source: str = "DistilBERT checkpoint"):
  """DistilBERT state_dict (+ config.json) -> (flat {'text/...': array}, report)."""
  t = model_config.text
  if hf_config is not None:
    bad = [f"config.json {k}={hf_config[k]} but model.text.{f}={t[f]} (set "
           f"--config.model.text.{f}={hf_config[k]})"
           for k, f in _DISTILBERT_DIMS if k in hf_config and hf_config[k] != t[f]]
    act = hf_config.get("activation", "gelu")
    if act != "gelu":
      bad.append(f"config.json activation={act!r} but the text encoder uses exact 'gelu'")
    if hf_config.get("sinusoidal_pos_embds"):
      bad.append("config.json sinusoidal_pos_embds=true: the text encoder learns its positions")
    if bad:
      raise ConversionError(f"{source}: config.json does not fit model.text:\n  " +
                            "\n  ".join(bad))
  expected = {f"text/{k}": np.asarray(a) for k, a in torch_io.flatten(ref_text).items()}
  kmap = _sub_map(model_config, "text/", "text_model.")
  flat, used = torch_io.assign_tensors(expected, kmap, dict(sd), source,
                                      lambda k: bool(_DISTILBERT_IGNORED.match(k)))
  report = {"source": source, "tensors": len(used),
            "values": int(sum(np.asarray(sd[k]).size for k in used)),
            "ignored": sorted(k for k in sd if _DISTILBERT_IGNORED.match(k)),
            "notes": [] if hf_config is not None else
            ["no config.json beside the weights: dims checked by tensor shapes only"]}
  return flat, report


def apply_init(params, model_config, init_cfg):
  """Returns (params with the `config.init` sources loaded, report); other subtrees untouched.

  `params` is an unboxed dual-encoder tree (e.g. `torch_io.init_model_params`); loaded subtrees
  come back as numpy float32.
  """
  params = dict(params)
  report = {}
  if init_cfg.video:
    sd, fmt, notes = read_video_checkpoint(init_cfg.video, init_cfg.video_format)
    flat, rep = video_from_image_vit(sd, model_config, params["video"], init_cfg,
                                     f"{init_cfg.video} ({fmt})")
    rep["format"] = fmt
    rep["notes"] = notes + rep["notes"]
    if fmt == "clip":
      if model_config.video.layer_norm_eps != 1e-5:
        rep["notes"].append(f"CLIP's LayerNorm eps is 1e-5; model.video.layer_norm_eps="
                            f"{model_config.video.layer_norm_eps} (set it to 1e-5 to match)")
      rep["notes"].append("CLIP normalises pixels with its own mean/std, the pipeline with "
                          "ImageNet's (fine-tuning absorbs the shift)")
      if init_cfg.clip_proj:
        proj = sd.get("clip.proj")
        want = model_config.proj_dim
        if proj is None or proj.shape != (model_config.video.width, want):
          raise ConversionError(
              f"config.init.clip_proj=True needs visual.proj of shape "
              f"({model_config.video.width}, model.proj_dim={want}); the checkpoint has "
              f"{None if proj is None else proj.shape} (set model.proj_dim or clip_proj=False)")
        params["video_proj"] = {"kernel": proj.copy(), "bias": np.zeros(want, np.float32)}
        rep["notes"].append("visual.proj -> video_proj (bias zero)")
      elif "clip.proj" in sd:
        rep["notes"].append("visual.proj not used (config.init.clip_proj=False): video_proj "
                            "keeps its initialisation")
    params["video"] = torch_io.unflatten(flat)["video"]
    report["video"] = rep
  if init_cfg.text:
    sd, hf_config, vocab = read_distilbert(init_cfg.text)
    flat, rep = text_from_distilbert(sd, hf_config, model_config, params["text"], init_cfg.text)
    if vocab:
      rep["vocab"] = vocab
      text = paths.read_text(vocab)
      n = text.count("\n") + (not text.endswith("\n") and bool(text))  # lines, as a file reads
      if n != model_config.text.vocab_size:
        raise ConversionError(f"{vocab} has {n} tokens but model.text.vocab_size="
                              f"{model_config.text.vocab_size}: the tokenizer would index other "
                              "rows than the embedding was trained with")
    params["text"] = torch_io.unflatten(flat)["text"]
    report["text"] = rep
  return params, report


def init_params(config, rng=None):
  """Fresh dual-encoder params with `config.init`'s public weights loaded -> (params, report)."""
  import jax
  rng = jax.random.PRNGKey(config.get("seed", 0)) if rng is None else rng
  params = torch_io.init_model_params(config.model, rng)
  return apply_init(params, config.model, init_config(config))


def format_report(report: dict) -> str:
  """Human-readable lines of an `apply_init` report."""
  lines = []
  for part in ("video", "text"):
    if part not in report:
      continue
    r = report[part]
    lines.append(f"{part}: {r['tensors']} tensors ({r['values']:,} values) from {r['source']}")
    if part == "video":
      lines.append(f"  temporal_embed zeros; timeattn time_init={r['time_init']}; "
                   f"norm3={r['norm3']}")
      if r["kept_initialised"]:
        lines.append("  kept the model's initialisation: " + ", ".join(r["kept_initialised"]))
    if r.get("ignored"):
      lines.append("  ignored: " + ", ".join(r["ignored"]))
    if r.get("vocab"):
      lines.append(f"  tokenizer: set data.tokenizer={r['vocab']}")
    lines += [f"  note: {n}" for n in r.get("notes", [])]
  return "\n".join(lines)
