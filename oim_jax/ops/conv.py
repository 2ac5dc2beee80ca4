"""3x3 convolution (padding 1, NHWC / HWIO), optionally with an im2col weight gradient.

`conv3x3` is the plain XLA convolution (what `nn.Conv` emits).
`conv3x3_im2col_wgrad` has the same forward and input gradient, and computes
the weight gradient as one matmul over the 3x3 patches of its input:

  dK[(i, j, c), d] = sum_{n, y, x} xpad[n, s*y + i, s*x + j, c] * g[n, y, x, d]

Why: XLA:CPU lowers a 3x3 weight gradient to a convolution with a huge
"kernel" (the output map) that Eigen runs at a fraction of its matmul speed.
At ResNet-50's shapes (experiments/results/conv3x3.md) the matmul form is 2x
faster for the RPN's 3x3 1024 -> 1024 conv on a 57x94 map (0.76 -> 0.35 s)
and 1.4-2.1x for res5's 3x3 512 convs over 128 RoIs; at <= 128 input
channels it is not faster, and it materialises the patches
([N, Ho, Wo, 9 Cin]), so models use it only from a channel count up
(`model.wgrad_im2col_min_channels`). On GPUs/TPUs the library's convolution
gradient is the better choice.
"""

import functools

import jax
import jax.numpy as jnp

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv3x3(x, kernel, stride: int = 1):
  """x: [N, H, W, Cin], kernel: [3, 3, Cin, Cout] -> [N, Ho, Wo, Cout].

  Padding 1 on each side, so Ho = ceil(H / stride), Wo = ceil(W / stride).
  """
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                      ((1, 1), (1, 1)),
                                      dimension_numbers=_DIMENSIONS)


def patches_3x3(x, stride: int, out_hw):
  """x: [N, H, W, C] -> [N, Ho, Wo, 9 C], taps in (row, column, channel) order.

  Tap (i, j) of output (y, x) reads padded input (stride*y + i, stride*x + j):
  the row order of kernel.reshape(9 C, Cout).
  """
  ho, wo = out_hw
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate(
      [xp[:, i:i + stride * (ho - 1) + 1:stride,
          j:j + stride * (wo - 1) + 1:stride]
       for i in range(3) for j in range(3)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_im2col_wgrad(x, kernel, stride):
  """`conv3x3` whose weight gradient is one im2col matmul (module docstring)."""
  return conv3x3(x, kernel, stride)


def _forward(x, kernel, stride):
  return conv3x3(x, kernel, stride), (x, kernel)


def _backward(stride, residuals, g):
  x, kernel = residuals
  dx = jax.vjp(lambda v: conv3x3(v, kernel, stride), x)[1](g)[0]
  p = patches_3x3(x, stride, g.shape[1:3])
  dk = jnp.einsum("nhwk,nhwd->kd", p, g.astype(p.dtype))
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv3x3_im2col_wgrad.defvjp(_forward, _backward)
