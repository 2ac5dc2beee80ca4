"""Benchmarks of the detection ops: tiled NMS and RoIAlign gather vs einsum.

  python bench/bench_ops.py                 # the full set (~2-3 min on 2 CPUs)
  python bench/bench_ops.py --skip_roi      # NMS only

NMS: 12000 RPN-like boxes (clustered around objects), IoU 0.7, 2000 outputs,
jit; reports compile time and the median of the timed runs after warm-up.
RoIAlign: a C4-sized map (1 image, 57x94x1024), 640 RoIs, 14x14, sampling 2,
forward + backward w.r.t. the features, for both formulations.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from oim_jax import ops  # noqa: E402


def _timeit(fn, args, repeats):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times)), compiled(*args)


def rpn_like_boxes(rng, n, img_hw=(900, 1500), objects=40):
  """Proposals around a few objects plus background clutter, with scores."""
  h, w = img_hw
  centres = rng.uniform([0, 0], [w, h], (objects, 2))
  sizes = rng.uniform(30, 300, (objects, 2))
  pick = rng.integers(0, objects, n)
  near = rng.uniform(size=n) < 0.7
  c = np.where(near[:, None],
               centres[pick] + rng.normal(0, 1, (n, 2)) * sizes[pick] * 0.15,
               rng.uniform([0, 0], [w, h], (n, 2)))
  wh = np.where(near[:, None], sizes[pick] * rng.uniform(0.6, 1.4, (n, 2)),
                rng.uniform(16, 400, (n, 2)))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
  boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
  scores = rng.uniform(size=n).astype(np.float32)
  return boxes, scores


def bench_nms(args, lines):
  rng = np.random.default_rng(0)
  boxes, scores = rpn_like_boxes(rng, args.nms_boxes)
  lines.append(f"### NMS: {args.nms_boxes} boxes, IoU 0.7, max_output "
               f"{args.nms_max_output}")
  lines.append("")
  lines.append("| block size | compile (s) | run (ms, median) | kept |")
  lines.append("|---|---|---|---|")
  for bs in args.nms_block_sizes:
    fn = lambda b, s, bs=bs: ops.nms(b, s, 0.7, args.nms_max_output,
                                     block_size=bs)
    comp, run, (keep, count) = _timeit(fn, (boxes, scores), args.repeats)
    lines.append(f"| {bs} | {comp:.2f} | {run * 1e3:.1f} | {int(count)} |")
    print(lines[-1], flush=True)
  lines.append("")


def bench_roi_align(args, lines):
  rng = np.random.default_rng(1)
  h, w, c = 57, 94, 1024
  feat = jnp.asarray(rng.normal(size=(1, h, w, c)).astype(np.float32))
  xy = rng.uniform([0, 0], [w * 16, h * 16], (args.rois, 2))
  wh = rng.uniform(16, 400, (args.rois, 2))
  boxes = jnp.asarray(np.concatenate([xy - wh / 2, xy + wh / 2], 1),
                      jnp.float32)
  idx = jnp.zeros((args.rois,), jnp.int32)
  chan_w = jnp.asarray(rng.normal(size=(c,)).astype(np.float32))
  lines.append(f"### RoIAlign: map 1x{h}x{w}x{c}, {args.rois} RoIs, 14x14, "
               "sampling 2, forward + backward (grad w.r.t. features)")
  lines.append("")
  lines.append("| method | compile (s) | fwd (ms) | fwd+bwd (ms) |")
  lines.append("|---|---|---|---|")
  outs = {}
  for method in args.methods:
    def fwd(f, b, method=method):
      return ops.roi_align(f, b, idx, (14, 14), 1 / 16, 2, False,
                           method=method)

    def loss(f, b, method=method):
      return jnp.sum(fwd(f, b) * chan_w)

    _, fwd_s, out = _timeit(fwd, (feat, boxes), args.repeats)
    outs[method] = np.asarray(out[:8])
    del out
    comp, both_s, _ = _timeit(jax.value_and_grad(loss), (feat, boxes),
                              args.repeats)
    lines.append(f"| {method} | {comp:.2f} | {fwd_s * 1e3:.0f} | "
                 f"{both_s * 1e3:.0f} |")
    print(lines[-1], flush=True)
  if len(outs) == 2:
    diff = np.max(np.abs(outs["gather"] - outs["einsum"]))
    lines.append("")
    lines.append(f"max |gather - einsum| on the first 8 RoIs: {diff:.2e}")
  lines.append("")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--nms_boxes", type=int, default=12000)
  p.add_argument("--nms_max_output", type=int, default=2000)
  p.add_argument("--nms_block_sizes", type=int, nargs="+", default=[256, 512])
  p.add_argument("--rois", type=int, default=640)
  p.add_argument("--methods", nargs="+", default=["gather", "einsum"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip_roi", action="store_true")
  p.add_argument("--skip_nms", action="store_true")
  p.add_argument("--out", default=None, help="write markdown here")
  args = p.parse_args()

  lines = ["## Detection ops (oim_jax.ops)", "",
           f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, "
           f"no GPU; jax {jax.__version__}, backend "
           f"{jax.default_backend()}.",
           "Command: `python bench/bench_ops.py" +
           (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "") + "`", ""]
  if not args.skip_nms:
    bench_nms(args, lines)
  if not args.skip_roi:
    bench_roi_align(args, lines)
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
