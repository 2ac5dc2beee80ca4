"""Where the ResNet-50 train step's time goes: each part timed on its own.

  python bench/train_breakdown.py [--height 900 --width 1500 --iters 2]
      [--parts stem_fwd,stem_fwd_bwd,...] [--dtype float32]

Parts (batch 1, DESIGN §3 sizes, random weights), each its own jit:
  stem_fwd          conv1..res4 forward (uint8 image -> C4)
  stem_fwd_bwd      + backward to the trainable params (freeze_at=2: res3,
                    res4), cotangent on C4
  rpn_fwd_bwd       RPN head (3x3 conv + 1x1s) forward + backward on C4
  proposals         anchors, decode, top-12000, NMS -> 2000 (no gradient)
  roi_align_fwd_bwd RoIAlign of 128 RoIs (14x14) + gradient to C4
  res5_fwd_bwd      res5 + avgpool + predictor on 128 RoIs, gradient to its
                    params and its input
  conv_* micro-benchmarks: one conv layer's weight gradient (what XLA:CPU is
                    known to do slowly), 1x1 and 3x3 at res4 / res5 sizes.
Run under different XLA_FLAGS to compare XLA:CPU code paths. The last line
of stdout is one JSON object {part: seconds}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oim_jax import ops  # pylint: disable=g-import-not-at-top
from oim_jax.models import person_search as ps  # pylint: disable=g-import-not-at-top
import suite_jax  # pylint: disable=g-import-not-at-top

ALL_PARTS = ("stem_fwd", "stem_fwd_bwd", "rpn_fwd_bwd", "proposals",
             "roi_align_fwd_bwd", "res5_fwd_bwd")
# (name, [N, H, W, Cin], kernel, Cout, stride): convs of the C4 model.
CONVS = (("conv_res4_1x1_1024to256", (1, 57, 94, 1024), 1, 256, 1),
         ("conv_res4_3x3_256", (1, 57, 94, 256), 3, 256, 1),
         ("conv_res5_3x3_512_128rois", (128, 7, 7, 512), 3, 512, 1),
         ("conv_res5_1x1_512to2048_128rois", (128, 7, 7, 512), 1, 2048, 1))


def _time(fn, args, iters):
  f = jax.jit(fn)
  t = time.perf_counter()
  c = f.lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(c(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(c(*args))
    times.append(time.perf_counter() - t)
  return {"s": statistics.median(times), "compile_s": compile_s,
          "gflops": (suite_jax.flops_of(c) or 0) / 1e9}


def _sum_dot(tree, ct):
  return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
             for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ct)))


def conv_parts(names, iters):
  out = {}
  rng = np.random.default_rng(0)
  for name, shape, k, cout, stride in CONVS:
    if name not in names:
      continue
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], cout),
                                        np.float32) * 0.01)

    def conv(w, x):
      return jax.lax.conv_general_dilated(
          x, w, (stride, stride), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = conv(w, x)
    ct = jnp.ones_like(y)
    out[name + "_fwd"] = _time(conv, (w, x), iters)
    out[name + "_wgrad"] = _time(
        lambda w, x, ct: jax.vjp(lambda w: conv(w, x), w)[1](ct)[0],
        (w, x, ct), iters)
    out[name + "_dgrad"] = _time(
        lambda w, x, ct: jax.vjp(lambda x: conv(w, x), x)[1](ct)[0],
        (w, x, ct), iters)
    if k == 1:  # The same 1x1 conv as a matmul (dot_general, no conv op).
      mm = lambda w, x: jnp.einsum("nhwc,cd->nhwd", x, w[0, 0])
      out[name + "_as_dot_wgrad"] = _time(
          lambda w, x, ct: jax.vjp(lambda w: mm(w, x), w)[1](ct)[0],
          (w, x, ct), iters)
    if k == 3 and stride == 1:  # 9 shifted matmuls: wgrad = 9 dots.
      def taps(w, x):
        h, wd = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(jnp.einsum("nhwc,cd->nhwd",
                              xp[:, i:i + h, j:j + wd], w[i, j])
                   for i in range(3) for j in range(3))
      out[name + "_as_dots_wgrad"] = _time(
          lambda w, x, ct: jax.vjp(lambda w: taps(w, x), w)[1](ct)[0],
          (w, x, ct), iters)
      out[name + "_as_dots_fwd"] = _time(taps, (w, x), iters)
  return out


def model_parts(names, height, width, dtype, iters):
  config = suite_jax.bench_config("resnet50", height, width, 1, dtype)
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.key(0))
  params = variables["params"]
  rng = np.random.default_rng(0)
  b = suite_jax.random_batch(rng, 1, height, width, config.data.max_gt)
  images = jnp.asarray(b["image"])
  size = jnp.asarray(b["image_size"])
  apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)
  c4 = jax.jit(lambda p, im: apply(p, im, method=ps.PersonSearch.features))(
      params, images)
  # What the RPN reads (C4 itself unless config.model.rpn.stride pools it).
  rpn_map = apply(params, c4, method=ps.PersonSearch.rpn_input)
  ct = jnp.asarray(rng.standard_normal(c4.shape, np.float32), c4.dtype)
  out = {}
  if "stem_fwd" in names:
    out["stem_fwd"] = _time(
        lambda p, im: apply(p, im, method=ps.PersonSearch.features),
        (params, images), iters)
  if "stem_fwd_bwd" in names:
    out["stem_fwd_bwd"] = _time(lambda p, im, ct: jax.grad(
        lambda p: _sum_dot(apply(p, im, method=ps.PersonSearch.features),
                           ct))(p), (params, images, ct), iters)
  if "rpn_fwd_bwd" in names:
    rpn_fn = lambda m, x: m.rpn_head(x)
    out["rpn_fwd_bwd"] = _time(lambda p, x: jax.grad(
        lambda p, x: sum(jnp.sum(v.astype(jnp.float32)) for v in
                         apply(p, x, method=rpn_fn)), (0, 1))(p, x),
                               (params, rpn_map), iters)
  if "proposals" in names:
    def props(p, x, s):
      logits, deltas = apply(p, x, method=lambda m, x: m.rpn_head(x))
      return apply(p, x, s, logits, deltas,
                   method=lambda m, x, s, l, d: m.proposals(x, s, l, d, True))
    out["proposals"] = _time(props, (params, rpn_map, size), iters)
  # 128 RoIs inside the image (sizes as sampled proposals would have).
  k = 128
  bw = rng.uniform(20, min(300, width / 3), k)
  bh = rng.uniform(40, min(600, height / 2), k)
  x1 = rng.uniform(0, width - bw)
  y1 = rng.uniform(0, height - bh)
  boxes = jnp.asarray(np.stack([x1, y1, x1 + bw, y1 + bh], 1), jnp.float32)
  idx = jnp.zeros((k,), jnp.int32)
  if "roi_align_fwd_bwd" in names:
    out["roi_align_fwd_bwd"] = _time(lambda x: jax.grad(
        lambda x: jnp.sum(ops.roi_align(x, boxes, idx, (14, 14), 1 / 16, 2)
                          .astype(jnp.float32)))(x), (c4,), iters)
  if "res5_fwd_bwd" in names:
    rois = ops.roi_align(c4, boxes, idx, (14, 14), 1 / 16, 2)

    def head(m, r):
      cls, reg, emb = m.predictor(m.res5(r), True)
      return jnp.sum(cls) + jnp.sum(reg) + jnp.sum(emb)
    out["res5_fwd_bwd"] = _time(lambda p, r: jax.grad(
        lambda p, r: apply(p, r, method=head), (0, 1))(p, r),
                                (params, rois), iters)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--height", type=int, default=900)
  p.add_argument("--width", type=int, default=1500)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--parts", default=",".join(ALL_PARTS))
  a = p.parse_args()
  names = set(a.parts.split(","))
  if "conv" in names:
    names |= {c[0] for c in CONVS}
  out = conv_parts(names, a.iters)
  out.update(model_parts(names, a.height, a.width, a.dtype, a.iters))
  out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  out["dtype"] = a.dtype
  print(json.dumps(out))


if __name__ == "__main__":
  main()
