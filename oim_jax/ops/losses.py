"""Elementwise detection losses (float32), as torch defines them."""

import jax.numpy as jnp


def smooth_l1(x, beta: float):
  """Elementwise smooth-L1 (torch's, beta > 0), float32."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def masked_smooth_l1(x, mask, beta: float):
  """smooth_l1(x) where mask ([...] bool, over x [..., 4]), else exactly 0.

  The mask is applied to the input as well as to the output: a non-finite x
  outside the mask then reaches neither the value (0 * inf = NaN) nor the
  gradient (the unselected branch's inf * 0 cotangent).
  """
  m = mask[..., None]
  return jnp.where(m, smooth_l1(jnp.where(m, x, 0.0), beta), 0.0)


def sigmoid_bce(logits, labels):
  """Numerically stable binary cross-entropy with logits."""
  return (jnp.maximum(logits, 0) - logits * labels +
          jnp.log1p(jnp.exp(-jnp.abs(logits))))
