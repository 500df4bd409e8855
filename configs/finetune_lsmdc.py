"""Fine-tune on LSMDC: contrastive only (the papers' protocol); the argument adds
objectives, e.g. `:contrastive,miles` for the appendix's MVM ablation.

Hyperparameters: neither the MILES / Frozen papers nor their releases give LSMDC fine-tuning
settings (papers silent); MSR-VTT's released recipe is reused unchanged (configs/finetune_common.py
names the source of each number).

    python -m miles_jax.train --config=configs/finetune_lsmdc.py \
        --config.train.init_from=PATH_TO_EXPORT_OR_PTH --workdir=runs/ft_lsmdc
"""
from miles_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.sibling(__file__, "finetune_common").finetune_config("lsmdc", arg)
