"""3x3 convolutions of ResNet-50 person search: XLA's weight gradient vs im2col.

  python experiments/conv3x3.py [--shapes rpn_1024,res5_512_s2] [--iters 5] [--no_torch]

For each layer shape (input [N, H, W, Cin], Cout, stride): forward, input
gradient, weight gradient as XLA computes it and as one im2col matmul
(`oim_jax.ops.conv3x3_im2col_wgrad`, what `model.wgrad_im2col_min_channels`
switches on), and torch's CPU kernels for the same layer when torch is
installed. Best of --iters, seconds. Prints a markdown table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oim_jax import ops  # pylint: disable=g-import-not-at-top

# name: ([N, H, W, Cin], Cout, stride, where in the 900x1500 model).
SHAPES = {
    "rpn_1024": ((1, 57, 94, 1024), 1024, 1, "RPN conv on C4"),
    "res3_128": ((1, 113, 188, 128), 128, 1, "res3 blocks 2-4"),
    "res3_128_s2": ((1, 225, 375, 128), 128, 2, "res3 block 1"),
    "res4_256": ((1, 57, 94, 256), 256, 1, "res4 blocks 2-6"),
    "res4_256_s2": ((1, 113, 188, 256), 256, 2, "res4 block 1"),
    "res5_512": ((128, 7, 7, 512), 512, 1, "res5 blocks 2-3, 128 RoIs"),
    "res5_512_s2": ((128, 14, 14, 512), 512, 2, "res5 block 1, 128 RoIs"),
}


def _best(fn, args, iters):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def time_jax(shape, cout, stride, iters):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout), np.float32)
                  * 0.01)
  y = ops.conv3x3(x, k, stride)
  g = jnp.asarray(rng.standard_normal(y.shape, np.float32))

  def wgrad(conv):
    return jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k, stride), k)[1](
        g)[0])
  fwd = jax.jit(lambda x, k: ops.conv3x3(x, k, stride))
  dgrad = jax.jit(lambda x, k, g: jax.vjp(
      lambda x: ops.conv3x3(x, k, stride), x)[1](g)[0])
  xla_w, im2col_w = wgrad(ops.conv3x3), wgrad(ops.conv3x3_im2col_wgrad)
  a, b = np.asarray(xla_w(x, k, g)), np.asarray(im2col_w(x, k, g))
  return {"fwd": _best(fwd, (x, k), iters),
          "dgrad": _best(dgrad, (x, k, g), iters),
          "wgrad_xla": _best(xla_w, (x, k, g), iters),
          "wgrad_im2col": _best(im2col_w, (x, k, g), iters),
          "wgrad_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
          "gflop_fwd": 2 * float(np.prod(y.shape)) * 9 * shape[-1] / 1e9}


def time_torch(shape, cout, stride, iters):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  n, h, w, c = shape
  x = torch.randn(n, c, h, w)
  k = torch.randn(cout, c, 3, 3) * 0.01
  g = torch.randn(*torch.nn.functional.conv2d(x, k, stride=stride,
                                              padding=1).shape)

  def best(fn):
    fn()
    times = []
    for _ in range(iters):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return min(times)
  with torch.no_grad():
    return {"torch_fwd": best(lambda: torch.nn.functional.conv2d(
                x, k, stride=stride, padding=1)),
            "torch_dgrad": best(lambda: torch.nn.grad.conv2d_input(
                x.shape, k, g, stride=stride, padding=1)),
            "torch_wgrad": best(lambda: torch.nn.grad.conv2d_weight(
                x, k.shape, g, stride=stride, padding=1))}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--no_torch", action="store_true")
  a = p.parse_args()
  names = a.shapes.split(",")
  unknown = sorted(set(names) - set(SHAPES))
  if unknown:
    p.error(f"unknown --shapes {unknown}; choose from {sorted(SHAPES)}")
  out = {}
  for name in names:
    shape, cout, stride, _ = SHAPES[name]
    out[name] = time_jax(shape, cout, stride, a.iters)
    if not a.no_torch:
      try:
        out[name].update(time_torch(shape, cout, stride, a.iters))
      except ImportError:
        pass
  print("| layer | input | GFLOP (fwd) | fwd s | dgrad s | wgrad XLA s | "
        "wgrad im2col s | XLA / im2col | torch fwd / dgrad / wgrad s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in out.items():
    shape, cout, stride, where = SHAPES[name]
    t = (f"{r['torch_fwd']:.3f} / {r['torch_dgrad']:.3f} / "
         f"{r['torch_wgrad']:.3f}" if "torch_fwd" in r else "–")
    print(f"| {where} | {'x'.join(map(str, shape))} -> {cout}, stride "
          f"{stride} | {r['gflop_fwd']:.1f} | {r['fwd']:.3f} | "
          f"{r['dgrad']:.3f} | {r['wgrad_xla']:.3f} | "
          f"{r['wgrad_im2col']:.3f} | "
          f"{r['wgrad_xla'] / r['wgrad_im2col']:.2f}x | {t} |")
  print(json.dumps({"backend": jax.default_backend(), "results": out}))


if __name__ == "__main__":
  main()
