"""Where the synthetic (tiny) train step's time goes, and two speed-ups.

  python experiments/tiny_step.py [--parts gn,conv1,step,roi] [--iters 20] [--steps 25]

Parts:
  gn     GroupNorm forward + backward (to input, scale, bias) at every shape
         the tiny model normalises (batch 4 at 288x384, 128 RoIs at 7x7):
         the textbook two-pass form over a [N, H, W, G, C/G] view (written
         here) vs ours (resnet.FrozenBatchNorm: one pass, folded affine).
  conv1  the 7x7 stride-2 stem convolution, direct vs space-to-depth
         (resnet.StemConv), forward and weight gradient: tiny stem (3 -> 16
         channels, batch 4 at 288x384 and 288x480) and ResNet-50's (3 -> 64,
         896x1504).
  step   the whole synthetic train step (bench/suite_jax.py train, tiny,
         288x384, batch 4, random batches) with and without the
         space-to-depth stem.
  roi    the same step at 288x480 as configs/synthetic.py has it, and with
         the RoI head made cheaper: RoIAlign to 10x10 (res5 on 5x5 instead
         of 7x7) or 16 sampled RoIs per image instead of 32 (res5 on the
         RoIs is most of the step's FLOPs).
Medians over --iters calls (--steps for the train step). The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))  # suite_jax
from oim_jax.models import resnet  # pylint: disable=g-import-not-at-top
import suite_jax  # pylint: disable=g-import-not-at-top

# (name, shape): inputs of the tiny model's GroupNorms at 288x384, batch 4.
GN_SHAPES = (("stem_bn1", (4, 144, 192, 16)), ("res2", (4, 72, 96, 16)),
             ("res3", (4, 36, 48, 32)), ("res4", (4, 18, 24, 64)),
             ("res5_128rois", (128, 7, 7, 128)))
GN_COUNT = {"stem_bn1": 1, "res2": 4, "res3": 5, "res4": 5, "res5_128rois": 5}
CONV1 = (("tiny_288x384_b4", (4, 288, 384, 3), 16),
         ("tiny_288x480_b4", (4, 288, 480, 3), 16),
         ("resnet50_896x1504_b1", (1, 896, 1504, 3), 64))


def _median_ms(fn, args, iters):
  jax.block_until_ready(fn(*args))  # compile outside the timing
  return 1e3 * statistics.median(
      suite_jax._timed_calls(lambda: fn(*args), iters))  # pylint: disable=protected-access


def two_pass_group_norm(x, groups, scale, bias):
  n, h, w, c = x.shape
  y = x.reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(y, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(y - mean), axis=(1, 2, 4), keepdims=True)
  y = ((y - mean) * jax.lax.rsqrt(var + resnet.BN_EPSILON)).reshape(x.shape)
  return y * scale + bias


def gn_part(iters):
  rng = np.random.default_rng(0)
  ours_mod = resnet.FrozenBatchNorm(trainable=True, groups=4)
  forms = {
      "two_pass": lambda x, s, b: two_pass_group_norm(x, 4, s, b),
      "ours": lambda x, s, b: ours_mod.apply(
          {"params": {"scale": s, "bias": b}}, x),
  }
  out = {}
  for name, shape in GN_SHAPES:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    s = jnp.ones(shape[-1])
    b = jnp.zeros(shape[-1])
    ct = jnp.asarray(rng.normal(size=shape), jnp.float32)
    for form, fn in forms.items():
      grad = jax.jit(jax.grad(lambda x, s, b, fn=fn: jnp.vdot(fn(x, s, b), ct),
                              (0, 1, 2)))
      out[f"gn_{name}_{form}_ms"] = _median_ms(grad, (x, s, b), iters)
  for form in forms:
    out[f"gn_model_total_{form}_ms"] = sum(
        GN_COUNT[n] * out[f"gn_{n}_{form}_ms"] for n, _ in GN_SHAPES)
  return out


def conv1_part(iters):
  rng = np.random.default_rng(0)
  out = {}
  for name, shape, cout in CONV1:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    for form, s2d in (("direct", False), ("s2d", True)):
      mod = resnet.StemConv(cout, space_to_depth=s2d)
      params = mod.init(jax.random.key(0), x[:1, :32, :32])
      fwd = jax.jit(mod.apply)
      ct = jnp.ones(fwd(params, x).shape, jnp.float32)
      wgrad = jax.jit(lambda p, x, mod=mod, ct=ct: jax.grad(
          lambda p: jnp.vdot(mod.apply(p, x), ct))(p))
      out[f"conv1_{name}_{form}_fwd_ms"] = _median_ms(fwd, (params, x), iters)
      out[f"conv1_{name}_{form}_wgrad_ms"] = _median_ms(wgrad, (params, x),
                                                        iters)
  return out


def step_part(steps):
  out = {}
  for form, s2d in (("direct", False), ("s2d", True)):
    r = suite_jax.run_train("tiny", 288, 384, 4, "float32", steps, 4,
                            {"stem_space_to_depth": s2d})
    out[f"step_{form}_s"] = r["step_s"]
    out[f"step_{form}_gflop_per_image"] = r["flops_per_image"] / 1e9
  return out


ROI_VARIANTS = (("as_configured", {}), ("pool10", {"roi.pool_size": 10}),
                ("rois16", {"roi.batch_size": 16}))


def roi_part(steps):
  out = {}
  for name, overrides in ROI_VARIANTS:
    r = suite_jax.run_train("tiny", 288, 480, 4, "float32", steps, 4,
                            overrides)
    out[f"roi_{name}_step_s"] = r["step_s"]
    out[f"roi_{name}_gflop_per_image"] = r["flops_per_image"] / 1e9
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="gn,conv1,step")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--steps", type=int, default=25)
  a = p.parse_args()
  parts = set(a.parts.split(","))
  res = {}
  if "gn" in parts:
    res.update(gn_part(a.iters))
  if "conv1" in parts:
    res.update(conv1_part(a.iters))
  if "step" in parts:
    res.update(step_part(a.steps))
  if "roi" in parts:
    res.update(roi_part(a.steps))
  for k, v in res.items():
    print(f"{k:48s} {v:9.3f}")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
