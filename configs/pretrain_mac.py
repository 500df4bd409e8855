"""MAC pre-training (mask-then-align): masked video tokens are dropped (ratio 0.75), 15% of
text tokens dropped, contrastive alignment of the masked views, no reconstruction.

    python -m miles_jax.train --config=configs/pretrain_mac.py:stage2 --workdir=runs/mac
"""
import importlib.util
import os


def _pretrain_miles():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_miles.py")
  spec = importlib.util.spec_from_file_location("pretrain_miles", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "stage2"):
  c = _pretrain_miles().get_config(arg)
  c.objectives = "mac"
  c.mac.video_ratio = 0.75
  c.mac.text_ratio = 0.15
  c.mask.strategy = "random"
  return c
