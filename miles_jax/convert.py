"""Import PyTorch weights of the released MILES / Frozen-in-Time dual encoder into Flax.

    python -m miles_jax.convert --checkpoint=MILES.pth --out=DIR
    python -m miles_jax.convert --checkpoint=cc-webvid2m-4f_stformer_b_16_224.pth.tar --out=DIR
        [--config=configs/default.py[:SIZE]] [--config.model.video.width=...] [--overwrite]

The command on top of miles_jax/weights/torch_io.py (accepted files, key layouts and why a
`.pth` never runs code are described there). Parameters that only training uses
(`video/mask_token`, `mvm_head`) are not in released checkpoints; they keep a fresh
initialisation and are listed in the report.

Starting from public weights instead (ViT-B/16 or CLIP into the video encoder, DistilBERT into
the text encoder; see miles_jax/weights/public_init.py) writes the initialised model the same way:

    python -m miles_jax.convert --vit=ViT-B_16.npz --distilbert=distilbert-base-uncased/ --out=DIR
    python -m miles_jax.convert --config.init.video=clip.safetensors \
        --config.model.video.patch_size=32 --out=DIR
"""
from __future__ import annotations

from miles_jax.cli import setup_process

if __name__ == "__main__":  # before TensorFlow / jaxlib load: the log filter, path settings
  setup_process()

import os
import sys

from miles_jax.weights.torch_io import (ConversionError, convert_state_dict, init_model_params,
                                        read_state_dict)


def main(argv):
  from absl import flags
  from miles_jax import checkpoints

  f = flags.FLAGS
  config = f.config
  src, out = f.checkpoint, f.out
  from miles_jax.weights import public_init
  init_cfg = public_init.init_config(config)
  init_cfg.video = f.vit or init_cfg.video
  init_cfg.text = f.distilbert or init_cfg.text
  from_init = bool(init_cfg.video or init_cfg.text)
  if not out or not (src or from_init):
    print("error: --out and one of --checkpoint or --vit/--distilbert (config.init.video/text) "
          "are required (see --help)", file=sys.stderr)
    return 2
  if src and from_init:
    print("error: --checkpoint (a released model) and --vit/--distilbert (public init weights) "
          "are alternatives; pass one", file=sys.stderr)
    return 2
  from miles_jax import paths
  if paths.isdir(out) and any(paths.Path(out).iterdir()) and not f.overwrite:
    print(f"error: --out={out} exists and is not empty; pass --overwrite to replace it",
          file=sys.stderr)
    return 2
  if f.tokenizer and not os.path.exists(f.tokenizer):
    print(f"error: --tokenizer={f.tokenizer} does not exist (a BERT vocab.txt or a "
          "sentencepiece .model)", file=sys.stderr)
    return 2
  if from_init:
    return _export_init(config, init_cfg, out, f.overwrite, f.tokenizer)
  try:
    print(f"reading {src}")
    info = {}
    sd = read_state_dict(src, info)
    params, report = convert_state_dict(sd, config.model, temporal_fill=f.temporal_fill,
                                        drop_modules=(f.drop_modules or "").split(","))
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ConversionError, FileNotFoundError) as e:  # the file is wrong: bad input
    print(f"error: {e}", file=sys.stderr)
    return 2
  checkpoints.save_params(out, params, config.model, overwrite=f.overwrite)
  checkpoints.save_assets(out, config, f.tokenizer)  # tokenizer + preprocessing.json
  print(f"converted {report['converted']} tensors ({report['num_values']:,} values, "
        f"{report['layout']} key layout) -> {out}")
  if info.get("other_entries"):
    print("not converted (trainer entries beside state_dict): " + ", ".join(info["other_entries"]))
  if info.get("placeholders"):
    print("objects left unloaded (inert placeholders, never constructed): "
          + ", ".join(info["placeholders"]))
  if report["dropped"]:
    print(f"dropped ({len(report['dropped'])} keys by --drop_modules): "
          + ", ".join(report["dropped"][:10]) + (" ..." if len(report["dropped"]) > 10 else ""))
  if report["kept_initialised"]:
    print("train-only params not in the checkpoint, freshly initialised: "
          + ", ".join(report["kept_initialised"]))
  if report["ignored"]:
    print("ignored buffers: " + ", ".join(report["ignored"]))
  return 0


def _export_init(config, init_cfg, out: str, overwrite: bool, tokenizer=None) -> int:
  """Initialises the model from public weights (config.init) and exports it to `out`."""
  import jax
  from miles_jax import checkpoints
  from miles_jax.weights import public_init
  try:
    params = init_model_params(config.model, jax.random.PRNGKey(config.get("seed", 0)))
    params, report = public_init.apply_init(params, config.model, init_cfg)
  except (ConversionError, FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  checkpoints.save_params(out, params, config.model, overwrite=overwrite)
  checkpoints.save_assets(out, config, tokenizer)  # tokenizer + preprocessing.json
  print(public_init.format_report(report))
  fresh = [k for k in ("video", "text") if k not in report] + ["video_proj", "text_proj",
                                                               "mvm_head"]
  if init_cfg.clip_proj and "video" in report:
    fresh.remove("video_proj")
  print(f"initialised model -> {out} (fresh initialisation: {', '.join(fresh)})")
  return 0


def cli():
  from absl import flags
  from miles_jax import cli as cli_lib
  from miles_jax import config_lib

  cli_lib.define_config_file(
      "config", config_lib.default_config_path(),
      "Config file (its model section is used), e.g. configs/default.py:tiny; override fields "
      "with --config.model.video.width=64 etc.")
  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint: .pth / .pth.tar (bare state_dict "
                      "or the upstream trainer's dict; MILES 'text_proj' or Frozen 'txt_proj' "
                      "layout; keys may carry 'module.') or .safetensors with the same keys.")
  flags.DEFINE_string("out", None, "Output directory for the orbax checkpoint.")
  flags.DEFINE_string("drop_modules", "", "Comma list of top-level modules in the checkpoint "
                      "that are not part of the released model classes (e.g. a training-only "
                      "encoder) to leave out; by default any such key is an error.")
  flags.DEFINE_enum("temporal_fill", "error", ["error", "zeros"],
                    "When the checkpoint has fewer temporal-embedding rows than "
                    "model.video.num_frames: fail, or fill the added rows with zeros.")
  flags.DEFINE_string("vit", None, "Initialise the video encoder from an image ViT instead of "
                      "converting a released model: ViT-B/16 .npz, timm .safetensors/.pth or "
                      "OpenAI CLIP state_dict (sets config.init.video; format auto-detected or "
                      "config.init.video_format).")
  flags.DEFINE_string("distilbert", None, "Initialise the text encoder from a Hugging Face "
                      "DistilBERT directory or weights file (sets config.init.text).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")
  flags.DEFINE_string("tokenizer", None, "vocab.txt (WordPiece, e.g. bert-base-uncased's) or "
                      "sentencepiece .model copied into --out, so the export encodes text "
                      "(default: config.data.tokenizer; none: pass it to pretrained.load).")
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
