"""The synthetic train step, conv by conv: where its time goes on XLA:CPU.

  python experiments/tiny_convs.py [--iters 20] [--parts split,layers]
      [--set model_field=value ...] [--out bench/results/tiny_convs]

Runs as train.py does (jemalloc / mimalloc preloaded, XLA's own CPU
convolutions: oim_jax/cpu_host/allocator.py, oim_jax/cpu_host/xla_flags.py), on the
configs/synthetic.py model at 288x480, batch 4, random weights and images.

Parts:
  split   the step's two halves, each its own jit: the backbone (uint8
          images -> C4) forward and forward + backward (to its params), and
          RoIAlign + res5 on 4 x 32 RoIs forward and forward + backward (to
          its params and to C4); plus the whole train step. --set changes
          config.model fields for this part (e.g. --set
          wgrad_im2col_min_channels=16).
  layers  every 3x3 / strided conv shape of the model (backbone at batch 4,
          res5 at 128 RoIs of 14x14): forward, input gradient (dgrad) and
          weight gradient (wgrad) as XLA compiles them, with GFLOP and
          TFLOP/s; and the formulations tried instead: wgrad as one im2col
          matmul, wgrad as nine per-tap matmuls, forward as one im2col matmul,
          forward in NCHW layout; on the stride-1 layers Winograd F(2x2)
          and F(4x4) (experiments/winograd_conv.py) forward, and forward + both
          gradients. Each alternative is checked against XLA's result
          before it is timed.
Medians over --iters calls. Writes experiments/results/tiny_convs.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # suite_jax's timing loop
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oim_jax.cpu_host import allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
allocator.use_fast_malloc()  # as train.py: re-executes the process
from oim_jax.cpu_host import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
xla_flags.use_fast_cpu_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jaxlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from oim_jax.cpu_host import cpu_info  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.models import person_search as ps  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.ops import conv as oconv  # pylint: disable=g-import-not-at-top,wrong-import-position
import suite_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import winograd_conv  # pylint: disable=g-import-not-at-top,wrong-import-position

HEIGHT, WIDTH, BATCH = 288, 480, 4
# (name, input [N, H, W, Cin], Cout, stride, count in the model) of the
# tiny ResNet-18 layout at width 16, stride-8 C4, res5 on 4 x 32 RoIs.
LAYERS = (("res2 3x3 16->16", (4, 72, 120, 16), 16, 1, 4),
          ("res3 3x3 16->32 /2", (4, 72, 120, 16), 32, 2, 1),
          ("res3 3x3 32->32", (4, 36, 60, 32), 32, 1, 3),
          ("res4 3x3 32->64", (4, 36, 60, 32), 64, 1, 1),
          ("res4 3x3 64->64", (4, 36, 60, 64), 64, 1, 3),
          ("rpn 3x3 64->64", (4, 18, 30, 64), 64, 1, 1),
          ("res5 3x3 64->128 /2", (128, 14, 14, 64), 128, 2, 1),
          ("res5 3x3 128->128", (128, 7, 7, 128), 128, 1, 3))


def _ms(fn, args, iters):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))  # compile outside the timing
  return 1e3 * statistics.median(
      suite_jax._timed_calls(lambda: fn(*args), iters))  # pylint: disable=protected-access


def split_part(iters, overrides):
  config = suite_jax.bench_config("tiny", HEIGHT, WIDTH, BATCH, "float32",
                                  overrides)
  model = ps.create_model(config)
  params, state = ps.split_variables(
      ps.init_variables(model, config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (BATCH, HEIGHT, WIDTH, 3),
                                    dtype=np.uint8))
  k = config.model.roi.batch_size
  x1 = jnp.asarray(rng.uniform(0, WIDTH - 80, (BATCH, k)), jnp.float32)
  y1 = jnp.asarray(rng.uniform(0, HEIGHT - 160, (BATCH, k)), jnp.float32)
  boxes = jnp.stack([x1, y1, x1 + 40, y1 + 120], axis=-1)

  def backbone(p, im):
    return model.apply({**state, "params": p}, im,
                       method=ps.PersonSearch.features)

  def head(p, c4):
    return model.apply({**state, "params": p}, c4, boxes,
                       method=ps.PersonSearch.box_features)

  c4 = jax.jit(backbone)(params, images)
  ct4 = jnp.asarray(rng.normal(size=c4.shape), jnp.float32)
  ct5 = jnp.asarray(rng.normal(size=jax.jit(head)(params, c4).shape),
                    jnp.float32)
  out = {
      "backbone_fwd_ms": _ms(backbone, (params, images), iters),
      "backbone_fwd_bwd_ms": _ms(jax.grad(
          lambda p, im: jnp.vdot(backbone(p, im), ct4)), (params, images),
                                 iters),
      "roi_head_fwd_ms": _ms(head, (params, c4), iters),
      "roi_head_fwd_bwd_ms": _ms(jax.grad(
          lambda p, c: jnp.vdot(head(p, c), ct5), (0, 1)), (params, c4),
                                 iters),
  }
  r = suite_jax.run_train("tiny", HEIGHT, WIDTH, BATCH, "float32", iters, 4,
                          overrides)
  out["train_step_ms"] = 1e3 * r["step_s"]
  out["train_step_gflop"] = r["flops_per_step"] / 1e9
  return out


def wgrad_taps(x, g, stride):
  """Weight gradient as nine [Cin, NHW] @ [NHW, Cout] matmuls."""
  _, ho, wo, cout = g.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g2 = g.reshape(-1, cout)
  taps = [xp[:, i:i + stride * (ho - 1) + 1:stride,
             j:j + stride * (wo - 1) + 1:stride].reshape(-1, x.shape[-1]).T
          @ g2 for i in range(3) for j in range(3)]
  return jnp.stack(taps).reshape(3, 3, x.shape[-1], cout)


def fwd_im2col(x, k, stride):
  out_hw = ((x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1)
  p = oconv.patches_3x3(x, stride, out_hw)
  return jnp.einsum("nhwk,kd->nhwd", p, k.reshape(-1, k.shape[-1]))


def fwd_nchw(x, k, stride):
  y = jax.lax.conv_general_dilated(
      x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1), (stride, stride),
      [(1, 1), (1, 1)], dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return y.transpose(0, 2, 3, 1)


def _check(name, got, want):
  got, want = np.asarray(got), np.asarray(want)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
  if err > 1e-4:
    raise AssertionError(f"{name}: relative error {err:.2e} vs XLA's")


def layers_part(iters):
  rng = np.random.default_rng(0)
  rows = []
  for name, shape, cout, stride, count in LAYERS:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) * 0.1,
                    jnp.float32)
    y = oconv.conv3x3(x, k, stride)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dgrad = lambda x, k, g, s=stride: jax.vjp(
        lambda v: oconv.conv3x3(v, k, s), x)[1](g)[0]
    wgrad = lambda x, k, g, s=stride: jax.vjp(
        lambda w: oconv.conv3x3(x, w, s), k)[1](g)[0]
    want_w = wgrad(x, k, g)
    alternatives = {
        # The project's im2col weight gradient (model.wgrad_im2col_min_channels).
        "wgrad_im2col": (lambda x, k, g, s=stride: jax.vjp(
            lambda w: oconv.conv3x3_im2col_wgrad(x, w, s), k)[1](g)[0],
                         (x, k, g), want_w),
        "wgrad_taps": (lambda x, g, s=stride: wgrad_taps(x, g, s), (x, g),
                       want_w),
        "fwd_im2col": (lambda x, k, s=stride: fwd_im2col(x, k, s), (x, k), y),
        "fwd_nchw": (lambda x, k, s=stride: fwd_nchw(x, k, s), (x, k), y),
    }
    row = {"layer": name, "input": list(shape), "cout": cout,
           "stride": stride, "count": count,
           "gflop": 2 * y.size * 9 * shape[-1] / 1e9,
           "fwd_ms": _ms(lambda x, k, s=stride: oconv.conv3x3(x, k, s), (x, k),
                         iters),
           "dgrad_ms": _ms(dgrad, (x, k, g), iters),
           "wgrad_ms": _ms(wgrad, (x, k, g), iters)}
    if stride == 1:
      # Winograd (experiments/winograd_conv.py): forward, and forward + both
      # gradients (plain autodiff) against XLA's forward + both gradients.
      both = lambda f: (lambda x, k, g: jax.vjp(f, x, k)[1](g))
      xla_both = both(lambda x, k: oconv.conv3x3(x, k, 1))
      row["fwd_bwd_ms"] = _ms(xla_both, (x, k, g), iters)
      want_both = xla_both(x, k, g)
      for m in winograd_conv.TILE_SIZES:
        f = lambda x, k, m=m: winograd_conv.conv3x3_winograd(x, k, m)
        alternatives[f"winograd{m}_fwd"] = (f, (x, k), y)
        alternatives[f"winograd{m}_fwd_bwd"] = (both(f), (x, k, g), want_both)
    for alt, (fn, args, want) in alternatives.items():
      got = jax.jit(fn)(*args)
      for i, (a, b) in enumerate(zip(jax.tree.leaves(got),
                                     jax.tree.leaves(want))):
        _check(f"{name} {alt} [{i}]", a, b)
      row[alt + "_ms"] = _ms(fn, args, iters)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return {"layers": rows}


def markdown(res, command, when):
  lines = ["## The synthetic train step, conv by conv (XLA:CPU)", "",
           f"Date {when}. {cpu_info.cpu_summary()}; jaxlib "
           f"{jaxlib.__version__}; "
           f"XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`; allocator "
           f"{allocator.loaded_allocator() or 'system'}. Command: "
           f"`{command}`. configs/synthetic.py model at {HEIGHT}x{WIDTH}, "
           f"batch {BATCH}, random weights; medians.", ""]
  if "train_step_ms" in res:
    lines += ["| part | forward ms | forward + backward ms |", "|---|---|---|",
              f"| backbone (images -> C4) | {res['backbone_fwd_ms']:.1f} | "
              f"{res['backbone_fwd_bwd_ms']:.1f} |",
              f"| RoIAlign + res5, 128 RoIs | {res['roi_head_fwd_ms']:.1f} | "
              f"{res['roi_head_fwd_bwd_ms']:.1f} |",
              f"| whole train step ({res['train_step_gflop']:.1f} GFLOP) | | "
              f"{res['train_step_ms']:.1f} |", ""]
  if "layers" in res:
    lines += ["Each conv layer shape (x count in the model): XLA's forward, "
              "input and weight gradients (ms, TFLOP/s), then the "
              "alternatives (ms).", "",
              "| layer | x | GFLOP | fwd | dgrad | wgrad | wgrad im2col | "
              "wgrad 9 taps | fwd im2col | fwd NCHW |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    tot = {k: 0.0 for k in ("fwd", "dgrad", "wgrad")}
    for r in res["layers"]:
      cell = lambda k, r=r: (f"{r[k + '_ms']:.2f} "
                             f"({r['gflop'] / r[k + '_ms']:.3f})")
      lines.append(
          f"| {r['layer']} | {r['count']} | {r['gflop']:.3f} | {cell('fwd')} "
          f"| {cell('dgrad')} | {cell('wgrad')} | "
          f"{r['wgrad_im2col_ms']:.2f} | {r['wgrad_taps_ms']:.2f} | "
          f"{r['fwd_im2col_ms']:.2f} | {r['fwd_nchw_ms']:.2f} |")
      for k in tot:
        tot[k] += r["count"] * r[k + "_ms"]
    lines += ["", f"Sum over the model's layers (x count): forward "
              f"{tot['fwd']:.1f} ms, dgrad {tot['dgrad']:.1f} ms, wgrad "
              f"{tot['wgrad']:.1f} ms (the 7x7 stem, 1x1 shortcuts and the "
              "RPN's 1x1s not included).", "",
              "Winograd F(2x2, 3x3) and F(4x4, 3x3) (experiments/winograd_conv.py, "
              "plain autodiff) on the stride-1 layers, ms: forward, and "
              "forward + both gradients (one vjp) against XLA's.", "",
              "| layer | x | XLA fwd | F(2x2) fwd | F(4x4) fwd | XLA fwd+bwd "
              "| F(2x2) fwd+bwd | F(4x4) fwd+bwd |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["layers"]:
      if "fwd_bwd_ms" in r:
        lines.append(
            f"| {r['layer']} | {r['count']} | {r['fwd_ms']:.2f} | "
            f"{r['winograd2_fwd_ms']:.2f} | {r['winograd4_fwd_ms']:.2f} | "
            f"{r['fwd_bwd_ms']:.2f} | {r['winograd2_fwd_bwd_ms']:.2f} | "
            f"{r['winograd4_fwd_bwd_ms']:.2f} |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--parts", default="split,layers")
  p.add_argument("--set", action="append", default=[],
                 help="model_field=value (a Python literal), split part only")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments",
                                               "results", "tiny_convs"))
  a = p.parse_args()
  parts = set(a.parts.split(","))
  res = {}
  if "split" in parts:
    overrides = {}
    for item in a.set:
      key, sep, value = item.partition("=")
      if not sep:
        p.error(f"--set {item!r}: use model_field=value")
      overrides[key] = ast.literal_eval(value)
    res.update(split_part(a.iters, overrides))
    print(json.dumps(res), flush=True)
  if "layers" in parts:
    res.update(layers_part(a.iters))
  when = datetime.datetime.now().isoformat(timespec="seconds")
  command = "python experiments/tiny_convs.py" + "".join(
      f" {x}" for x in sys.argv[1:])
  with open(a.out + ".json", "w") as f:
    json.dump({"date": when, "command": command, "cpu": cpu_info.cpu_summary(),
               "xla_flags": os.environ.get("XLA_FLAGS", ""), **res}, f,
              indent=1)
  with open(a.out + ".md", "w") as f:
    f.write(markdown(res, command, when))
  print(f"wrote {a.out}.json and {a.out}.md")


if __name__ == "__main__":
  main()
