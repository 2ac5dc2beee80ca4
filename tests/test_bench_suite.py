"""Smoke test of the benchmark suite's measurement functions (bench/suite_jax.py).

Small sizes and one or two calls: the point is that the suite still runs
with today's configs (e.g. the synthetic config's flip test needs image
sizes for the query embeddings), not the timings.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import suite_jax  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_suite_infer_and_train_run_on_the_tiny_config():
  infer = suite_jax.run_infer("tiny", 96, 160, 2, "float32", iters=1,
                              queries=2)
  assert infer["detect_s"] > 0 and infer["embed_s"] > 0
  assert infer["flops_per_image"] > 0
  train = suite_jax.run_train("tiny", 96, 160, 2, "float32", steps=1,
                              num_gt=2)
  assert np.isfinite(train["loss"]) and train["step_s"] > 0
  assert train["backend_compiles_timed"] == 0  # no recompilation
