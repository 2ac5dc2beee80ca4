"""oim-jax: joint detection and identification for person search (OIM), in JAX/Flax."""

__version__ = "0.1.0"
