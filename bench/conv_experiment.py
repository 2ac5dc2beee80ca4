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

import flax.linen as nn
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oim_jax.models import resnet  # pylint: disable=g-import-not-at-top


class DotConv1x1(nn.Module):
  """A 1x1 convolution (stride s, no padding, no bias) as one matmul."""
  features: int
  strides: int
  dtype: object
  kernel_init: object

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", self.kernel_init,
                   (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides]
    return jnp.einsum("nhwc,cd->nhwd", x.astype(self.dtype),
                      k[0, 0].astype(self.dtype))


def patch_1x1():
  original = resnet._conv  # pylint: disable=protected-access

  def conv(features, kernel, strides, dtype, name):
    if kernel == 1:
      return DotConv1x1(features, strides, dtype, resnet._conv_init,  # pylint: disable=protected-access
                        name=name)
    return original(features, kernel, strides, dtype, name)
  resnet._conv = conv  # pylint: disable=protected-access


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--what", default="parts", choices=["parts", "train"])
  p.add_argument("--dot_1x1", type=int, default=1)
  p.add_argument("--height", type=int, default=900)
  p.add_argument("--width", type=int, default=1500)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--parts", default="stem_fwd_bwd,res5_fwd_bwd")
  a = p.parse_args()
  if a.dot_1x1:
    patch_1x1()
  if a.what == "parts":
    import train_breakdown  # pylint: disable=g-import-not-at-top
    out = train_breakdown.model_parts(set(a.parts.split(",")), a.height,
                                      a.width, "float32", a.iters)
  else:
    import suite_jax  # pylint: disable=g-import-not-at-top
    out = suite_jax.run_train("resnet50", a.height, a.width, 1, "float32",
                              a.iters, 4)
  out["dot_1x1"] = a.dot_1x1
  print(json.dumps(out))


if __name__ == "__main__":
  main()
