"""MAC pre-training (mask-then-align): masked video tokens are dropped (ratio 0.75), 15% of
text tokens dropped, contrastive alignment of the masked views, no reconstruction.

    python -m miles_jax.train --config=configs/pretrain_mac.py:stage2 --workdir=runs/mac
"""
from miles_jax import config_lib


def get_config(arg: str = "stage2"):
  c = config_lib.sibling(__file__, "pretrain_miles").get_config(arg)
  c.objectives = "mac"
  c.mac.video_ratio = 0.75
  c.mac.text_ratio = 0.15
  c.mask.strategy = "random"
  return c
