"""JAX side of the benchmark suite: one measurement per process, JSON out.

  python bench/suite_jax.py matmul --dtype float32 [--n 4096]
  python bench/suite_jax.py train --preset tiny|resnet50 --height H --width W
      --batch B --dtype float32|bfloat16 [--steps 3]
  python bench/suite_jax.py infer --preset resnet50 --height H --width W
      --batch B --dtype float32 [--iters 2]

Run by bench/run_suite.py, each in its own subprocess, so that the peak RSS
(ru_maxrss) belongs to that measurement alone and every process has the
same environment (allocator, threads) as the torch reference. The last line
of stdout is one JSON object.

Train: the real step, `train_lib.train_step` under
`parallel.data_parallel(..., "shard_map", mesh)` exactly as train_lib runs
it, on random uint8 batches in the pipeline's format with a few GT boxes
per image (half labeled). Compilations are counted twice: traces of the
per-device function (a Python side-effect counter) and XLA backend compiles
(jax.monitoring '/jax/core/compile/backend_compile_duration' events).
FLOPs come from XLA's cost analysis of the compiled executable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oim_jax import parallel  # pylint: disable=g-import-not-at-top
from oim_jax import train_lib  # pylint: disable=g-import-not-at-top
from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from oim_jax.models import person_search as ps  # pylint: disable=g-import-not-at-top

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) from now on."""

  def __init__(self):
    self.n, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del kwargs
    if event == COMPILE_EVENT:
      self.n += 1
      self.seconds += duration


def bench_config(preset: str, height: int, width: int, batch: int,
                 dtype: str, model_overrides: dict | None = None
                 ) -> ml_collections.ConfigDict:
  """configs/synthetic.py (tiny) or configs/cuhk.py (resnet50), no weights.

  model_overrides: {field: value} set on config.model (bench variants); a
    dotted field ("roi.pool_size") names a nested one.
  """
  if preset == "tiny":
    from configs import synthetic as cfg  # pylint: disable=g-import-not-at-top
  elif preset == "resnet50":
    from configs import cuhk as cfg  # pylint: disable=g-import-not-at-top
  else:
    raise ValueError(f"--preset must be tiny or resnet50, got {preset!r}")
  c = cfg.get_config()
  c.model.pretrained = ""  # random weights: timings do not depend on them
  c.model.dtype = dtype
  c.data.min_size, c.data.max_size = min(height, width), max(height, width)
  c.train.batch_size = batch
  for key, value in (model_overrides or {}).items():
    *path, field = key.split(".")  # "roi.pool_size" -> c.model.roi
    node = c.model
    for part in path:
      node = node[part]
    node[field] = value
  return c


def random_batch(rng, batch: int, height: int, width: int, max_gt: int,
                 num_gt: int = 4) -> dict[str, np.ndarray]:
  """Pipeline-format batch: uint8 canvases, `num_gt` person boxes each."""
  hc, wc = pipeline.ceil32(height), pipeline.ceil32(width)
  images = rng.integers(0, 256, (batch, hc, wc, 3), dtype=np.uint8)
  boxes = np.zeros((batch, max_gt, 4), np.float32)
  pids = np.full((batch, max_gt), -2, np.int32)
  k = min(num_gt, max_gt)
  for b in range(batch):
    bw = rng.uniform(0.05, 0.2, k) * width
    bh = np.minimum(bw * rng.uniform(2.0, 3.0, k), 0.9 * height)
    x1 = rng.uniform(0, width - bw)
    y1 = rng.uniform(0, height - bh)
    boxes[b, :k] = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    # Half labeled identities, half unlabeled persons (-1).
    pids[b, :k] = np.where(np.arange(k) % 2 == 0,
                           rng.integers(0, 100, k), -1)
  return {
      "image": images,
      "image_size": np.tile(np.array([[height, width]], np.int32),
                            (batch, 1)),
      "boxes": boxes, "pids": pids,
      "box_mask": np.arange(max_gt)[None, :] < k + np.zeros((batch, 1), int),
      "scale": np.ones((batch,), np.float32),
      "index": np.arange(batch, dtype=np.int32),
      "flipped": np.zeros((batch,), bool),
  }


def flops_of(compiled) -> float | None:
  """XLA's cost-analysis FLOP count of a compiled executable (or None)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def memory() -> dict[str, float | None]:
  """Peak host RSS of this process, device peak bytes where reported."""
  out = {"peak_rss_gib": resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  out["device_peak_gib"] = (stats["peak_bytes_in_use"] / 1024 ** 3
                            if stats and "peak_bytes_in_use" in stats
                            else None)
  return out


def _timed_calls(fn, iters: int) -> list[float]:
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return times


def run_matmul(dtype: str, n: int, repeats: int) -> dict:
  """Best-of-`repeats` FLOP/s of an n^3 jnp.dot: the machine's peak."""
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  best = min(_timed_calls(lambda: f(a, b), repeats))
  return {"n": n, "dtype": dtype, "seconds": best,
          "tflops": 2 * n ** 3 / best / 1e12}


def run_train(preset: str, height: int, width: int, batch: int, dtype: str,
              steps: int, num_gt: int,
              model_overrides: dict | None = None) -> dict:
  config = bench_config(preset, height, width, batch, dtype, model_overrides)
  counter = CompileCounter()
  mesh = parallel.make_mesh()
  mode = "shard_map"
  model, tx, _, state = train_lib.create_model_and_state(
      config, 1000, jax.random.key(0))
  state = parallel.put_replicated(state, mesh, mode)
  traces = {"n": 0}

  def on_trace():
    traces["n"] += 1

  step = train_lib.make_train_step(model, config, tx, mesh, mode,
                                   on_trace=on_trace)
  rng = np.random.default_rng(0)
  batches = [parallel.put_batch(
      random_batch(rng, batch, height, width, config.data.max_gt, num_gt),
      mesh, mode) for _ in range(2)]
  key = jax.random.key(1)
  keys = [jax.random.fold_in(key, i) for i in range(steps)]
  compiles_before, compile_s_before = counter.n, counter.seconds
  # First call through the jitted step, as the training loop makes it:
  # trace + compile + one step.
  t = time.perf_counter()
  state, m = step(state, batches[0], key)
  jax.block_until_ready(m)
  first_call_s = time.perf_counter() - t
  traces_after_warmup = traces["n"]
  compiles_after_warmup = counter.n
  # XLA backend compile seconds of the first call (trace and lowering not
  # included: first_call_s has everything).
  compile_s = counter.seconds - compile_s_before
  times = []
  for i in range(steps):
    b = batches[(i + 1) % 2]
    t = time.perf_counter()
    state, m = step(state, b, keys[i])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  loss = float(m["loss"])
  step_s = statistics.median(times)
  compiles_timed = counter.n - compiles_after_warmup
  # XLA's FLOP count of the same executable (lower + compile hit the
  # cache of the jitted step: no new compile).
  flops = flops_of(step.lower(state, batches[0], key).compile())
  return {
      "what": "train", "preset": preset, "height": height, "width": width,
      "batch": batch, "dtype": dtype, "steps": steps,
      "compile_s": compile_s, "first_call_s": first_call_s,
      "step_s": step_s, "step_times": times,
      "images_per_s": batch / step_s,
      "flops_per_step": flops,
      "flops_per_image": flops / batch if flops else None,
      "tflops_achieved": flops / step_s / 1e12 if flops else None,
      # Traces of the per-device step and XLA compiles: during the first
      # call (expected 1 / 1), during the timed steps (expected 0 / 0).
      "step_traces_warmup": traces_after_warmup,
      "step_traces_timed": traces["n"] - traces_after_warmup,
      "backend_compiles_step": compiles_after_warmup - compiles_before,
      "backend_compiles_timed": compiles_timed,
      "backend_compiles_total": counter.n,
      "loss": loss, "finite": bool(np.isfinite(loss)),
      "num_gt": num_gt, **memory(),
  }


def run_infer(preset: str, height: int, width: int, batch: int, dtype: str,
              iters: int, queries: int,
              model_overrides: dict | None = None) -> dict:
  config = bench_config(preset, height, width, batch, dtype, model_overrides)
  counter = CompileCounter()
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.key(0))
  rng = np.random.default_rng(0)
  b = random_batch(rng, batch, height, width, config.data.max_gt)
  images = jnp.asarray(b["image"])
  sizes = jnp.asarray(b["image_size"])
  out = {"what": "infer", "preset": preset, "height": height,
         "width": width, "batch": batch, "dtype": dtype, "iters": iters}

  detect = jax.jit(lambda v, im, sz: ps.detect(
      model, v, im, sz, flip_test=config.eval.flip_test))
  t = time.perf_counter()
  compiled = detect.lower(variables, images, sizes).compile()
  out["detect_compile_s"] = time.perf_counter() - t
  flops = flops_of(compiled)
  jax.block_until_ready(compiled(variables, images, sizes))
  times = _timed_calls(lambda: compiled(variables, images, sizes), iters)
  s = statistics.median(times)
  out.update(detect_s=s, detect_times=times, images_per_s=batch / s,
             flops_per_call=flops,
             flops_per_image=flops / batch if flops else None,
             tflops_achieved=flops / s / 1e12 if flops else None)

  # Query embeddings: one scene image per query with its GT box (embed_boxes
  # runs the stem on the whole image, as eval does for each query).
  # With the config's flip test (configs/synthetic.py) that is two stems.
  qimages = images[:1]
  qsizes = sizes[:1]
  qboxes = jnp.asarray(b["boxes"][:1, :queries])
  embed = jax.jit(lambda v, im, bx, sz: ps.embed_boxes(
      model, v, im, bx, sz, flip_test=config.eval.flip_test))
  t = time.perf_counter()
  ce = embed.lower(variables, qimages, qboxes, qsizes).compile()
  out["embed_compile_s"] = time.perf_counter() - t
  jax.block_until_ready(ce(variables, qimages, qboxes, qsizes))
  et = _timed_calls(lambda: ce(variables, qimages, qboxes, qsizes), iters)
  out.update(embed_s=statistics.median(et), embed_boxes_per_call=queries,
             query_images_per_s=1.0 / statistics.median(et),
             embed_flops_per_call=flops_of(ce))
  out["backend_compiles_total"] = counter.n
  out.update(memory())
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=["matmul", "train", "infer"])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--height", type=int, default=288)
  p.add_argument("--width", type=int, default=480)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--num_gt", type=int, default=4)
  p.add_argument("--queries", type=int, default=1)
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                 help="config.model override for train/infer (repeatable), "
                 "e.g. --set wgrad_im2col_min_channels=0")
  a = p.parse_args()
  overrides = {}
  for item in a.set:
    field, sep, value = item.partition("=")
    if not sep:
      p.error(f"--set {item!r}: expected FIELD=INT")
    overrides[field] = int(value)
  if a.what == "matmul":
    res = run_matmul(a.dtype, a.n, a.repeats)
  elif a.what == "train":
    res = run_train(a.preset, a.height, a.width, a.batch, a.dtype, a.steps,
                    a.num_gt, overrides)
  else:
    res = run_infer(a.preset, a.height, a.width, a.batch, a.dtype, a.iters,
                    a.queries, overrides)
  if overrides:
    res["model_overrides"] = overrides
  res.update(backend=jax.default_backend(),
             device_kind=jax.devices()[0].device_kind,
             device_count=jax.device_count(), jax_version=jax.__version__)
  print(json.dumps(res))


if __name__ == "__main__":
  main()
