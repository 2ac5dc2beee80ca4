"""Test set-up: CPU only, and a persistent compilation cache so reruns are fast."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "OIM_JAX_TEST_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "oim_jax_test_xla"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
