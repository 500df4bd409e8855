"""Fine-tune on DiDeMo (paragraph-to-video): contrastive only (the papers' protocol); the argument adds
objectives, e.g. `:contrastive,miles` for the appendix's MVM ablation.

Hyperparameters: neither the MILES / Frozen papers nor their releases give DiDeMo fine-tuning
settings (papers silent); MSR-VTT's released recipe is reused unchanged (configs/finetune_common.py
names the source of each number).

    python -m miles_jax.train --config=configs/finetune_didemo.py \
        --config.train.init_from=PATH_TO_EXPORT_OR_PTH --workdir=runs/ft_didemo
"""
from miles_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.sibling(__file__, "finetune_common").finetune_config("didemo", arg)
