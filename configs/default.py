"""Defaults of every field, with the model size as the argument.

    python -m miles_jax.convert --config=configs/default.py:base --checkpoint=... --out=...
    python -m miles_jax.convert --config=configs/default.py:tiny --config.model.video.depth=3 ...
"""
from miles_jax import config_lib


def get_config(arg: str = "base"):
  config = config_lib.default_config()
  config.model = config_lib.model_config(arg or "base")
  return config
