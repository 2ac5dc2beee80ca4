"""Tests for oim_jax/ops/conv.py against NumPy loops over the 3x3 taps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax import ops
from oim_jax.ops import conv as conv_lib

from conftest import conv3x3_out_size as _out_size
from conftest import np_conv3x3
from conftest import np_conv3x3_grads


@pytest.mark.parametrize("shape,stride", [((2, 7, 9, 5), 1),
                                          ((2, 7, 9, 5), 2),
                                          ((1, 8, 6, 3), 2)])
def test_conv3x3_matches_numpy(shape, stride):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, shape[-1], 4)).astype(np.float32)
  want = np_conv3x3(x, k, stride)
  for fn in (ops.conv3x3, ops.conv3x3_im2col_wgrad):
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(k), stride))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,stride", [((2, 7, 9, 5), 1),
                                          ((2, 7, 9, 5), 2),
                                          ((3, 6, 6, 4), 2)])
def test_im2col_weight_gradient_matches_numpy(shape, stride):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, shape[-1], 6)).astype(np.float32)
  g = rng.standard_normal(
      (shape[0], _out_size(shape[1], stride), _out_size(shape[2], stride),
       6)).astype(np.float32)
  want_dk, want_dx = np_conv3x3_grads(x, k, g, stride)
  loss = lambda x, k: jnp.sum(
      ops.conv3x3_im2col_wgrad(x, k, stride) * jnp.asarray(g))
  dx, dk = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(x), jnp.asarray(k))
  np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-4)


def test_patches_times_kernel_is_the_convolution():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, 8, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  p = np.asarray(conv_lib.patches_3x3(jnp.asarray(x), 2, (3, 4)))
  assert p.shape == (2, 3, 4, 27)
  np.testing.assert_allclose(p @ k.reshape(27, 2), np_conv3x3(x, k, 2),
                             rtol=1e-5, atol=1e-5)


def test_im2col_form_is_used_only_in_the_backward():
  # Same forward program as the plain conv: the custom rule only adds the
  # backward, so inference is unchanged.
  x = jnp.ones((1, 5, 5, 2))
  k = jnp.ones((3, 3, 2, 2))
  plain = jax.jit(lambda x, k: ops.conv3x3(x, k, 1)).lower(x, k)
  custom = jax.jit(lambda x, k: ops.conv3x3_im2col_wgrad(x, k, 1)).lower(
      x, k)
  count = lambda lowered: lowered.as_text().count("convolution")
  assert count(plain) == count(custom) == 1
  np.testing.assert_array_equal(
      np.asarray(ops.conv3x3(x, k, 1)),
      np.asarray(ops.conv3x3_im2col_wgrad(x, k, 1)))
