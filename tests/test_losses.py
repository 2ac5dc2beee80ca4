"""Tests for oim_jax/ops/losses.py against NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np

from oim_jax.ops import losses


def test_smooth_l1_vs_numpy():
  x = np.linspace(-1.0, 1.0, 41).astype(np.float32)
  beta = 1.0 / 9
  want = np.where(np.abs(x) < beta, 0.5 * x**2 / beta, np.abs(x) - 0.5 * beta)
  np.testing.assert_allclose(losses.smooth_l1(jnp.asarray(x), beta), want,
                             rtol=1e-6, atol=1e-7)


def test_masked_smooth_l1_zero_value_and_gradient_outside_the_mask():
  x = jnp.array([[0.5, -2.0, 0.01, 3.0], [jnp.inf, jnp.nan, 1.0, -1.0]])
  mask = jnp.array([True, False])
  f = lambda v: jnp.sum(losses.masked_smooth_l1(v, mask, 1.0))
  # Row 0: 0.125 + 1.5 + 0.00005 + 2.5; row 1 masked.
  np.testing.assert_allclose(f(x), 0.125 + 1.5 + 0.5 * 0.01**2 + 2.5,
                             rtol=1e-6)
  g = jax.grad(f)(x)
  np.testing.assert_allclose(g[0], [0.5, -1.0, 0.01, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(g[1], 0.0)


def test_sigmoid_bce_vs_naive_formula_and_stable_at_extremes():
  z = np.array([-5.0, -0.3, 0.0, 0.7, 4.0])
  y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
  p = 1.0 / (1.0 + np.exp(-z))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(losses.sigmoid_bce(jnp.asarray(z, jnp.float32),
                                                jnp.asarray(y, jnp.float32)),
                             want, rtol=1e-5)
  big = losses.sigmoid_bce(jnp.array([200.0, -200.0]), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(big, [200.0, 200.0], rtol=1e-6)
