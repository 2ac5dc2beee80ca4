"""Tests for experiments/winograd_conv.py (Winograd F(2x2)/F(4x4) 3x3 convolution).

References: the convolution's definition as NumPy loops over the 9 taps,
in float64, for the output and for both gradients of sum(y * g)
(conftest.np_conv3x3, np_conv3x3_grads).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments"))
import winograd_conv  # pylint: disable=g-import-not-at-top,wrong-import-position

from conftest import np_conv3x3  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import np_conv3x3_grads  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("m", winograd_conv.TILE_SIZES)
@pytest.mark.parametrize("shape", [(2, 7, 7, 5), (1, 8, 9, 3), (3, 5, 11, 4),
                                   (1, 1, 1, 2)])
def test_winograd_matches_direct_convolution(m, shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, shape[-1], 6)).astype(np.float32)
  g = rng.standard_normal(shape[:3] + (6,)).astype(np.float32)
  want_y = np_conv3x3(x, k, 1)
  want_dk, want_dx = np_conv3x3_grads(x, k, g, 1)
  fn = lambda x, k: winograd_conv.conv3x3_winograd(x, k, m)
  y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(k))
  dx, dk = vjp(jnp.asarray(g))
  # F(4x4)'s constants amplify float32 rounding ~10x over the direct sum.
  for got, want in ((y, want_y), (dx, want_dx), (dk, want_dk)):
    got = np.asarray(got)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


def test_winograd_rejects_unknown_tile_size():
  with pytest.raises(ValueError, match="tile size 3"):
    winograd_conv.conv3x3_winograd(jnp.zeros((1, 4, 4, 1)),
                                   jnp.zeros((3, 3, 1, 1)), 3)
