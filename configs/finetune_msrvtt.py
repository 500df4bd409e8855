"""Fine-tune on MSR-VTT (1k-A test split): contrastive only (the papers' protocol); the argument adds
objectives, e.g. `:contrastive,miles` for the appendix's MVM ablation.

    python -m miles_jax.train --config=configs/finetune_msrvtt.py \
        --config.train.init_from=PATH_TO_EXPORT_OR_PTH --workdir=runs/ft_msrvtt
"""
from miles_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.sibling(__file__, "finetune_common").finetune_config("msrvtt", arg)
