"""Tests for oim_jax/ops/normalize.py."""

import numpy as np

from oim_jax import ops


def test_normalize_matches_numpy():
  x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3) * 10
  ref = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(np.asarray(ops.normalize(x)), ref,
                             rtol=1e-5, atol=1e-5)
  x2 = np.concatenate([x, x + 1])  # [2, 2, 3, 3]
  sizes = np.array([[1, 2], [2, 3]], np.int32)
  got = np.asarray(ops.normalize(x2, image_size=sizes))
  ref2 = np.concatenate([ref, (x + 1 - 255 * np.array([0.485, 0.456, 0.406]))
                         / (255 * np.array([0.229, 0.224, 0.225]))])
  ref2[0, 1:] = 0  # Image 0 is 1 x 2: row 1 and column 2 are padding.
  ref2[0, :, 2:] = 0
  np.testing.assert_allclose(got, ref2, rtol=1e-5, atol=1e-5)
