"""miles_jax: MILES (masked visual modeling with injected language semantics) and MAC in JAX/Flax.

Importing the package changes nothing in the process: the `python -m miles_jax.*` commands set
the process up (log filter, path settings) through `miles_jax.cli.setup_process()`.
"""
__version__ = "0.1.0"
