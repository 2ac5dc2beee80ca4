"""OIM scaling benchmark: loss + grad + state update vs table size L+Q.

  python bench/bench_oim.py [--sizes 10000,30000,100000,300000,1000000]

One jitted step = oim_loss value and gradient w.r.t. the embeddings x [K, D]
plus update_state (state donated, as in the train step). Reports the median
wall time, the XLA memory analysis of the compiled step (temporaries, which
hold the [K, L+Q] logits) and the process peak RSS (monotone: sizes run in
increasing order). Also times the two exact LUT update methods.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from oim_jax import oim  # noqa: E402

D, K, Q = 256, 640, 5000


def make_batch(num_labeled, seed=0):
  """640 entries as a 5-image x 128-RoI batch looks: half background (-2),
  a quarter unlabeled (-1), a quarter labeled from 20 ids (many repeats)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(K, D)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  kind = rng.permutation(np.repeat([-2, -2, -1, 0], K // 4))
  ids = rng.choice(num_labeled, size=20, replace=False)
  pids = np.where(kind == 0, rng.choice(ids, size=K), kind).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(pids)


def step_fn(chunk_size):
  def step(state, x, pids):
    loss, g = jax.value_and_grad(lambda x: oim.oim_loss(
        state, x, pids, scalar=30.0, chunk_size=chunk_size))(x)
    new = oim.update_state(state, x, pids, momentum=0.5, normalize=True)
    return loss, g, new
  return jax.jit(step, donate_argnums=0)


def _state(total):
  num_labeled = total - Q
  lut = np.random.default_rng(1).standard_normal((num_labeled, D),
                                                 dtype=np.float32)
  lut /= np.linalg.norm(lut, axis=1, keepdims=True)
  return oim.OIMState(lut=jnp.asarray(lut, jnp.float32),
                      queue=jnp.zeros((Q, D), jnp.float32),
                      pointer=jnp.int32(0))


def _run(fn, state, x, pids, calls):
  """Min wall / CPU seconds over `calls` calls (state donated, fed back)."""
  walls, cpus = [], []
  for _ in range(calls):
    t, c = time.perf_counter(), time.process_time()
    out = fn(state, x, pids)
    jax.block_until_ready(out)
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
    state = out if isinstance(out, oim.OIMState) else out[-1]
  return min(walls), min(cpus)


def bench_step(total, chunk_size, calls):
  """-> (wall s, cpu s, XLA temp MiB, peak RSS GiB); calls=0: compile only."""
  state = _state(total)
  x, pids = make_batch(total - Q)
  fn = step_fn(chunk_size)
  compiled = fn.lower(state, x, pids).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  wall = cpu = float("nan")
  if calls:
    wall, cpu = _run(fn, state, x, pids, calls)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return wall, cpu, temp, rss


def bench_update(total, calls=10):
  x, pids = make_batch(total - Q)
  res = {}
  for method in ("rounds", "scan"):
    fn = jax.jit(lambda s, x, p, m=method: oim.update_state(
        s, x, p, lut_method=m), donate_argnums=0)
    st = fn(_state(total), x, pids)  # compile + warm
    res[method] = _run(fn, st, x, pids, calls)[0]
  return res


def _child(mode, total, calls):
  """Runs one configuration in a fresh process (honest peak RSS)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--one",
         f"{mode},{total},{calls}"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
  parser.add_argument("--chunk_size", type=int, default=8192)
  parser.add_argument("--dense_max_run", type=int, default=100_000,
                      help="largest L+Q whose dense step is run (above: "
                      "compile + XLA memory analysis only)")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    mode, total, calls = args.one.split(",")
    chunk = None if mode == "dense" else int(mode)
    wall, cpu, temp, rss = bench_step(int(total), chunk, int(calls))
    print(json.dumps(dict(wall=wall, cpu=cpu, temp=temp, rss=rss)))
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  print(f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} cpus,"
        f" load avg {os.getloadavg()[0]:.1f}; D={D}, K={K}, Q={Q}")
  _, pids = make_batch(sizes[0] - Q)
  p = np.asarray(pids)
  print(f"batch: {np.sum(p >= 0)} labeled (max pid multiplicity "
        f"{np.bincount(p[p >= 0]).max()}), {np.sum(p == -1)} unlabeled, "
        f"{np.sum(p == -2)} ignored")
  print("\nloss + grad(x) + update step (one process per row; wall = min over"
        " calls, CPU = process CPU seconds of that call):")
  print("| loss | L+Q | wall ms | CPU s | CPU ms per 1k classes "
        "| XLA temp MiB | peak RSS GiB |\n|---|---|---|---|---|---|---|")
  for mode in ("dense", str(args.chunk_size)):
    for total in sizes:
      run = mode != "dense" or total <= args.dense_max_run
      calls = (3 if total <= 30_000 else 2 if total <= 100_000 else 1)
      r = _child(mode, total, calls if run else 0)
      name = "dense" if mode == "dense" else f"chunk {mode}"
      if run:
        print(f"| {name} | {total} | {r['wall'] * 1e3:.0f} | {r['cpu']:.2f} "
              f"| {r['cpu'] * 1e6 / total:.1f} | {r['temp']:.0f} "
              f"| {r['rss']:.2f} |", flush=True)
      else:
        print(f"| {name} | {total} | not run | | | {r['temp']:.0f} | |",
              flush=True)
  print("\nupdate_state only (donated state), wall ms (min of 10):")
  print("| L+Q | rounds | scan |\n|---|---|---|")
  for total in (sizes[0], sizes[-1]):
    r = bench_update(total)
    print(f"| {total} | {r['rounds'] * 1e3:.2f} | {r['scan'] * 1e3:.2f} |",
          flush=True)


if __name__ == "__main__":
  main()
