"""miles_jax: MILES (masked visual modeling with injected language semantics) and MAC in JAX/Flax."""
__version__ = "0.1.0"
