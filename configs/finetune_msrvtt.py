"""Fine-tune on MSR-VTT (1k-A test split): contrastive only (the papers' protocol); the argument adds
objectives, e.g. `:contrastive,miles` for the appendix's MVM ablation.

Hyperparameters: frozen-in-time configs/msrvtt_4f_i21k.json as its trainer runs it (batch 16,
AdamW lr 3e-5 without weight decay, schedule, warm-up or clipping, float32, 100 epochs of 9,000
samples); each number's source is in configs/finetune_common.py.

    python -m miles_jax.train --config=configs/finetune_msrvtt.py \
        --config.train.init_from=PATH_TO_EXPORT_OR_PTH --workdir=runs/ft_msrvtt
"""
from miles_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.sibling(__file__, "finetune_common").finetune_config("msrvtt", arg)
