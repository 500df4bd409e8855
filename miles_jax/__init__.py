"""miles_jax: MILES (masked visual modeling with injected language semantics) and MAC in JAX/Flax."""
__version__ = "0.1.0"

from miles_jax import console as _console

# Before TensorFlow / jaxlib load: no C++ start-up log lines on the console unless asked for
# (MILES_JAX_VERBOSE=1 or --verbose); see miles_jax/console.py.
_console.install()

# One URI layer for local and gs:// paths (etils.epath + orbax + tensorstore): see paths.py.
from miles_jax import paths as _paths  # noqa: E402,F401  (configures on import)
