"""Forward / forward+backward time of the full ResNet-50 person-search model.

  python bench/bench_model.py [--height 900 --width 1500 --iters 2]

Batch 1 on a (ceil32(h), ceil32(w)) canvas, random weights (the timing does
not depend on them), DESIGN §3 settings (12000/2000 proposals for training,
6000/300 at test, 128 RoIs, OIM LUT 5532 + queue 5000). Reports compile time,
steady-state time per call, XLA's memory analysis of each executable and
the process's peak RSS. Prints a markdown section.
"""

import argparse
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, ".")
from oim_jax import config_defaults  # noqa: E402
from oim_jax import oim  # noqa: E402
from oim_jax.models import person_search as ps  # noqa: E402


def _config():
  c = ml_collections.ConfigDict()
  c.model = config_defaults.model_config("resnet50")
  c.oim = ml_collections.ConfigDict(dict(
      loss="oim", num_labeled=5532, queue_size=5000, scalar=30.0,
      momentum=0.5, normalize=True))
  return c


def _time(fn, args, iters):
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))  # warm-up
  t = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(compiled(*args))
  run_s = (time.perf_counter() - t) / iters
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  return compile_s, run_s, temp


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--height", type=int, default=900)
  p.add_argument("--width", type=int, default=1500)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args()
  config = _config()
  config.model.dtype = a.dtype
  model = ps.create_model(config)
  params = ps.init_params(model, config, jax.random.PRNGKey(0))
  hc, wc = -(-a.height // 32) * 32, -(-a.width // 32) * 32
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (1, hc, wc, 3), dtype=np.uint8)
  sizes = np.array([[a.height, a.width]], np.int32)
  g = 8
  x1 = rng.uniform(0, a.width - 200, g)
  y1 = rng.uniform(0, a.height - 400, g)
  boxes = np.stack([x1, y1, x1 + rng.uniform(40, 200, g),
                    y1 + rng.uniform(100, 400, g)], 1).astype(np.float32)
  batch = {"image": images, "image_size": sizes, "boxes": boxes[None],
           "pids": np.arange(g, dtype=np.int32)[None] - 1,
           "box_mask": np.ones((1, g), bool)}
  batch = jax.tree_util.tree_map(jnp.asarray, batch)
  state = oim.init_state(5532, 5000, 256)

  fwd = lambda p, im, sz: ps.detect(model, p, im, sz)
  grad = jax.value_and_grad(
      lambda p, s, b, r: ps.loss_fn(model, config, p, s, b, r), has_aux=True)
  res = {}
  res["forward (detect + embed)"] = _time(fwd, (params, images, sizes),
                                          a.iters)
  res["forward+backward (loss_fn grad)"] = _time(
      grad, (params, state, batch, jax.random.PRNGKey(1)), a.iters)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

  print(f"## Model (ResNet-50 person search), {a.height}x{a.width}, batch 1,"
        f" {a.dtype}\n")
  print(f"Machine: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}. Command: `python bench/bench_model.py "
        f"--height {a.height} --width {a.width} --iters {a.iters}`\n")
  print("| what | compile (s) | time / call (s) | XLA temp memory (GiB) |")
  print("|---|---|---|---|")
  for k, (c, r, t) in res.items():
    print(f"| {k} | {c:.1f} | {r:.2f} | {t / 1024 ** 3:.2f} |")
  print(f"\nPeak process RSS (whole run): {rss:.2f} GiB.")


if __name__ == "__main__":
  main()
