"""miles_jax: MILES (masked visual modeling with injected language semantics) and MAC in JAX/Flax."""
__version__ = "0.1.0"

import os as _os

# tf.data is the input pipeline: keep TensorFlow's C++ INFO/WARNING lines off the console
# (set TF_CPP_MIN_LOG_LEVEL yourself to see them).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One URI layer for local and gs:// paths (etils.epath + orbax + tensorstore): see paths.py.
from miles_jax import paths as _paths  # noqa: E402,F401  (configures on import)
