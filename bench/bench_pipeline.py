"""Input pipeline throughput: images/s at 900x1500 with 0, 1, 2 workers.

  python bench/bench_pipeline.py [--num_images=48] [--batch_size=4]

Writes CUHK-SYSU-like JPEGs (600x800 landscape, some 800x600 portrait,
textured so that JPEG decoding costs what a photo costs) to a temp dir, then
times the training iterator (decode, resize to shorter side 900 / longer
<= 1500, flip, pad to the canvas, stack) for each worker count, plus the
single-thread cost of each stage, and how long a training loop with a
simulated device step (--step_ms) waits for data per batch.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from oim_jax.data import sources  # pylint: disable=g-import-not-at-top
from oim_jax.data.dataset import ImageAnnotation  # pylint: disable=g-import-not-at-top


def _photo_like(rng, h, w):
  """Smooth colour fields + edges + mild noise: JPEG size of a real photo."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    fx, fy, ph = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6)]
    img[..., c] = 128 + 80 * np.sin(fx * xx + ph) * np.cos(fy * yy)
  for _ in range(30):  # Rectangles = edges.
    y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
    img[y0:y0 + rng.integers(20, 200), x0:x0 + rng.integers(20, 120)] = (
        rng.uniform(0, 255, 3))
  img += rng.normal(0, 6, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_images(root, n, seed=0):
  rng = np.random.default_rng(seed)
  anns = []
  for i in range(n):
    h, w = (800, 600) if i % 4 == 3 else (600, 800)
    path = os.path.join(root, f"s{i}.jpg")
    Image.fromarray(_photo_like(rng, h, w)).save(path, quality=90)
    k = int(rng.integers(1, 8))
    x1 = rng.uniform(0, w - 100, k)
    y1 = rng.uniform(0, h - 200, k)
    boxes = np.stack([x1, y1, x1 + 60, y1 + 180], 1).astype(np.float32)
    anns.append(ImageAnnotation(f"s{i}.jpg", path, boxes,
                                np.arange(k, dtype=np.int32)))
  return anns


def stage_times(anns, reps=10):
  """Single-thread ms per image of decode / resize / pad."""
  data = [open(a.path, "rb").read() for a in anns[:reps]]
  t = time.perf_counter()
  ims = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
  t_dec = (time.perf_counter() - t) / reps
  t = time.perf_counter()
  res = [np.asarray(im.resize((1200, 900), Image.BILINEAR)) for im in ims]
  t_res = (time.perf_counter() - t) / reps
  t = time.perf_counter()
  for r in res:
    canvas = np.zeros((928, 1504, 3), np.uint8)
    canvas[:r.shape[0], :r.shape[1]] = r
  t_pad = (time.perf_counter() - t) / reps
  return 1e3 * t_dec, 1e3 * t_res, 1e3 * t_pad


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_images", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--step_ms", type=float, default=200.0,
                      help="simulated accelerator step per batch (sleep)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    anns = write_images(root, args.num_images)
    size = os.path.getsize(anns[0].path) / 1024
    print(f"{len(anns)} JPEGs 600x800 (1 in 4 portrait), ~{size:.0f} KiB "
          f"each; cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    dec, res, pad = stage_times(anns)
    print(f"single thread per image: decode {dec:.1f} ms, resize to 900x1200 "
          f"{res:.1f} ms, pad to 928x1504 {pad:.1f} ms")
    source = sources.AnnotationSource(anns)
    for w in [int(v) for v in args.workers.split(",")]:
      opts = pipeline.PipelineOptions(num_workers=w, prefetch_batches=2)
      it = pipeline.TrainIterator(source, batch_size=args.batch_size, seed=0,
                                  options=opts, process_index=0,
                                  process_count=1)
      next(it)  # Warm-up: start threads, first batch.
      steps = it.steps_per_epoch * 2 - 1
      t = time.perf_counter()
      for _ in range(steps):
        b = next(it)
      dt = time.perf_counter() - t
      n = steps * args.batch_size
      print(f"num_workers={w}: {n / dt:.1f} images/s ({n} images, "
            f"{1e3 * dt / steps:.0f} ms/batch of {args.batch_size}, "
            f"batch {b['image'].shape})", flush=True)
      # With a (simulated) device step between batches: how long the train
      # loop waits for the next batch. Sleeping releases the GIL like a
      # device step does, so the workers decode meanwhile.
      waits = []
      for _ in range(steps):
        time.sleep(args.step_ms / 1e3)
        t = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - t)
      print(f"  with a {args.step_ms:.0f} ms step per batch: waits "
            f"{1e3 * np.mean(waits):.0f} ms/batch for data (median "
            f"{1e3 * np.median(waits):.0f} ms)", flush=True)


if __name__ == "__main__":
  main()
