"""Experiment: ResNet 1x1 convolutions as matmuls (what it would save).

  python bench/conv_experiment.py [--what parts|train] [--dot_1x1 0|1]

XLA:CPU computes a 1x1 convolution's weight gradient 2.5-4x slower than the
same contraction written as a dot_general (bench/train_breakdown.py conv
rows). This script patches `oim_jax.models.resnet._conv` *in this process
only* (no library change) so that 1x1 convs become `einsum("nhwc,cd")` with
the same parameter ("kernel" [1, 1, Cin, Cout]) and the same numbers, then
times the train step's parts (stem, res5 head fwd+bwd) or the whole real
train step. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oim_jax.models import resnet  # pylint: disable=g-import-not-at-top


def _conv3x3(x, w, stride):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_im2col_wgrad(x, w, stride):
  """XLA's conv forward and input gradient; weight gradient as one matmul."""
  return _conv3x3(x, w, stride)


def _c3_fwd(x, w, stride):
  return _conv3x3(x, w, stride), (x, w)


def _c3_bwd(stride, res, g):
  x, w = res
  dx = jax.vjp(lambda x: _conv3x3(x, w, stride), x)[1](g)[0]
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate(
      [xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
       for i in range(3) for j in range(3)], -1)  # [N, ho, wo, 9 Cin]
  dw = jnp.einsum("nhwk,nhwd->kd", patches, g).reshape(w.shape)
  return dx, dw.astype(w.dtype)


conv3x3_im2col_wgrad.defvjp(_c3_fwd, _c3_bwd)


class Conv3x3(nn.Module):
  """3x3 conv (pad 1) whose weight gradient is an im2col matmul."""
  features: int
  strides: int
  dtype: object
  kernel_init: object

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", self.kernel_init,
                   (3, 3, x.shape[-1], self.features), jnp.float32)
    return conv3x3_im2col_wgrad(x.astype(self.dtype), k.astype(self.dtype),
                                self.strides)


def patch_1x1(wgrad_3x3: bool = False):
  original = resnet._conv  # pylint: disable=protected-access

  def conv(features, kernel, strides, dtype, name):
    if kernel == 1:  # The model's own matmul form (the landed change).
      return resnet.Conv1x1(features, strides, dtype, name=name)
    if kernel == 3 and wgrad_3x3:
      return Conv3x3(features, strides, dtype, resnet._conv_init,  # pylint: disable=protected-access
                     name=name)
    return original(features, kernel, strides, dtype, name)
  resnet._conv = conv  # pylint: disable=protected-access


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--what", default="parts", choices=["parts", "train"])
  p.add_argument("--dot_1x1", type=int, default=1)
  p.add_argument("--im2col_wgrad_3x3", type=int, default=0,
                 help="also: 3x3 convs' weight gradient as an im2col matmul")
  p.add_argument("--height", type=int, default=900)
  p.add_argument("--width", type=int, default=1500)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--parts", default="stem_fwd_bwd,res5_fwd_bwd")
  a = p.parse_args()
  if a.dot_1x1:
    patch_1x1(bool(a.im2col_wgrad_3x3))
  if a.what == "parts":
    import train_breakdown  # pylint: disable=g-import-not-at-top
    out = train_breakdown.model_parts(set(a.parts.split(",")), a.height,
                                      a.width, "float32", a.iters)
  else:
    import suite_jax  # pylint: disable=g-import-not-at-top
    out = suite_jax.run_train("resnet50", a.height, a.width, 1, "float32",
                              a.iters, 4)
  out["dot_1x1"] = a.dot_1x1
  out["im2col_wgrad_3x3"] = a.im2col_wgrad_3x3
  print(json.dumps(out))


if __name__ == "__main__":
  main()
