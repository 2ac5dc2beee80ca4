"""The synthetic train step under different host allocators.

  python experiments/host_allocator.py --mode train [--variants glibc,jemalloc_no_purge]
      [--rounds 6 --window 20]
  python experiments/host_allocator.py --mode step [--variants default,...]
      [--rounds 25] [--preset tiny --height 288 --width 480 --batch 4]

An allocator is chosen when a process starts, so each variant is its own
process, and the processes take turns so that no two run at once and the
VM's drift over minutes (this 2-core VM's step time moves by 20-30 % with
the hour) hits every variant alike.

--mode train: the real thing. One `python train.py --config=configs/synthetic.py`
  per variant (no evaluation, no checkpoints, log every 5 steps); each
  compiles alone, then they run in turns of --window seconds (SIGSTOP /
  SIGCONT). s/step from the log lines that fall inside a turn.
--mode step: the bare jitted train step on random batches, one step per
  turn; also minor page faults and system CPU time per step (getrusage).

Variants:
  glibc               glibc malloc (train mode: OIM_JAX_MALLOC=system)
  glibc_mallopt       (step mode) glibc with 4 arenas, no mmap, no trim,
                      set by mallopt before JAX starts
  jemalloc            LD_PRELOAD=libjemalloc.so.2, jemalloc's defaults
                      (freed pages purged after 10 s)
  jemalloc_no_purge   the same with MALLOC_CONF dirty/muzzy decay -1: what
                      train.py and eval.py do when jemalloc is installed
  mimalloc            LD_PRELOAD=libmimalloc.so.3 of the cmeel-mimalloc
                      wheel (pip), mimalloc's defaults
  mimalloc_no_purge   the same with MIMALLOC_PURGE_DELAY=-1 (never give
                      freed pages back)
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from oim_jax.cpu_host import allocator  # pylint: disable=g-import-not-at-top,wrong-import-position

JEMALLOC = allocator.find_jemalloc() or "libjemalloc.so.2"
NO_PURGE = allocator.NO_PURGE
# mimalloc from the cmeel-mimalloc wheel (pip), purging on / off.
MIMALLOC = allocator.find_mimalloc() or "libmimalloc.so"
# Environment per variant. train.py preloads jemalloc itself unless
# OIM_JAX_MALLOC=system; an explicit LD_PRELOAD (with MALLOC_CONF) takes over.
VARIANTS = {
    "glibc": {"OIM_JAX_MALLOC": "system"},
    "glibc_mallopt": {"OIM_JAX_MALLOC": "system", "OIM_BENCH_MALLOPT": "1"},
    "jemalloc": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": ""},
    "jemalloc_no_purge": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": NO_PURGE},
    "mimalloc": {"LD_PRELOAD": MIMALLOC},
    "mimalloc_no_purge": {"LD_PRELOAD": MIMALLOC, "MIMALLOC_PURGE_DELAY": "-1"},
}


def _mallopt():
  """glibc: 4 arenas, no mmap, no trim (before any thread starts)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  mallopt = ctypes.CDLL(None).mallopt
  for param, value in ((-8, 4), (-4, 0), (-1, 2**31 - 1)):
    if mallopt(param, value) != 1:
      raise SystemExit(f"mallopt({param}, {value}) refused")


def worker(args):
  """Builds the step, then runs one step per line read from stdin."""
  if os.environ.get("OIM_BENCH_MALLOPT"):
    _mallopt()
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import suite_jax  # pylint: disable=g-import-not-at-top
  from oim_jax import train_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search as ps  # pylint: disable=g-import-not-at-top

  config = suite_jax.bench_config(args.preset, args.height, args.width,
                                  args.batch, "float32")
  model, tx, _, state = train_lib.create_model_and_state(
      config, 1000, jax.random.key(0))
  loss_fn = functools.partial(ps.loss_fn, model, config)
  step = jax.jit(lambda st, b, k: train_lib.train_step(
      st, b, k, loss_fn=loss_fn, tx=tx, config=config, axis_name=None))
  rng = np.random.default_rng(0)
  batches = [suite_jax.random_batch(rng, args.batch, args.height, args.width,
                                    config.data.max_gt) for _ in range(2)]
  key = jax.random.key(1)
  for i in range(3):  # compile, then let the heap reach its working size
    state, m = step(state, batches[i % 2], key)
    jax.block_until_ready(m)
  print("READY", flush=True)
  i = 0
  for line in sys.stdin:
    if line.strip() != "step":
      break
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    state, m = step(state, batches[i % 2], jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    t = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    i += 1
    print(json.dumps({"s": t, "faults": r1.ru_minflt - r0.ru_minflt,
                      "sys_s": r1.ru_stime - r0.ru_stime}), flush=True)


def _env(name: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY",
                      "OIM_JAX_MALLOC", "OIM_JAX_MALLOC_REEXEC")}
  env.update(VARIANTS[name])
  return env


def _summary(values: list[float]) -> dict:
  return {"s_per_step_median": statistics.median(values),
          "s_per_step_mean": statistics.mean(values), "n": len(values)}


def run_steps(args, names: list[str]) -> dict:
  """--mode step: bare train steps, one per turn."""
  argv = [sys.executable, os.path.abspath(__file__), "--worker",
          "--preset", args.preset, "--height", str(args.height),
          "--width", str(args.width), "--batch", str(args.batch)]
  procs = {}
  for name in names:
    proc = subprocess.Popen(argv, env=_env(name), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "READY":
      raise SystemExit(f"variant {name}: worker failed to start")
    procs[name] = proc
    print(f"{name}: compiled", file=sys.stderr, flush=True)
  rows = {name: [] for name in names}
  for r in range(args.rounds):
    for name, proc in procs.items():
      proc.stdin.write("step\n")
      proc.stdin.flush()
      rows[name].append(json.loads(proc.stdout.readline()))
    if (r + 1) % 5 == 0:
      print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
  out = {}
  for name, proc in procs.items():
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait()
    v = _summary([x["s"] for x in rows[name]])
    v["faults_per_step"] = statistics.mean(x["faults"] for x in rows[name])
    v["sys_s_per_step"] = statistics.mean(x["sys_s"] for x in rows[name])
    out[name] = v
  return out


_LOG_LINE = re.compile(
    r"I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .* step (\d+)/")


def _log_points(path: str) -> list[tuple[float, int]]:
  """(wall time, step) of each progress line of a train.py log."""
  year = time.localtime().tm_year
  points = []
  with open(path) as f:
    for line in f:
      m = _LOG_LINE.match(line)
      if m:
        t = time.mktime((year, int(m[1]), int(m[2]), int(m[3]), int(m[4]),
                         0, 0, 0, -1)) + float(m[5])
        points.append((t, int(m[6])))
  return points


def run_train(args, names: list[str], workdir: str) -> dict:
  """--mode train: train.py processes in turns of args.window seconds."""
  procs, logs = {}, {}
  for name in names:
    wd = os.path.join(workdir, name)
    shutil.rmtree(wd, ignore_errors=True)
    logs[name] = os.path.join(workdir, f"{name}.log")
    with open(logs[name], "w") as log:
      proc = subprocess.Popen(
          [sys.executable, "train.py", "--config=configs/synthetic.py",
           f"--workdir={wd}", f"--config.data.root={args.data_root}",
           "--config.eval.every_steps=0", "--config.eval.at_end=False",
           "--config.train.checkpoint_every=1000000",
           "--config.train.log_every=5"],
          cwd=_ROOT, env=_env(name), stdout=log, stderr=subprocess.STDOUT)
    while True:  # compile alone, up to step 20
      time.sleep(2)
      if proc.poll() is not None:
        raise SystemExit(f"variant {name}: train.py exited, see {logs[name]}")
      points = _log_points(logs[name])
      if points and points[-1][1] >= 20:
        break
    os.kill(proc.pid, signal.SIGSTOP)
    procs[name] = proc
    print(f"{name}: compiled", file=sys.stderr, flush=True)
  turns = {name: [] for name in names}
  try:
    for r in range(args.rounds):
      for name, proc in procs.items():
        os.kill(proc.pid, signal.SIGCONT)
        t0 = time.time()
        time.sleep(args.window)
        os.kill(proc.pid, signal.SIGSTOP)
        turns[name].append((t0, time.time()))
      print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
  finally:
    for proc in procs.values():
      proc.kill()
      proc.wait()
  out = {}
  for name in names:
    points = _log_points(logs[name])
    per_step = [(tb - ta) / (sb - sa)
                for (ta, sa), (tb, sb) in zip(points, points[1:])
                if sb > sa and any(t0 + 1 < ta and tb < t1
                                   for t0, t1 in turns[name])]
    out[name] = _summary(per_step)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("train", "step"), default="train")
  p.add_argument("--variants", default=None,
                 help="default: glibc,jemalloc,jemalloc_no_purge (train); "
                 "all four (step)")
  p.add_argument("--rounds", type=int, default=None,
                 help="turns per variant (default 6 train, 25 step)")
  p.add_argument("--window", type=float, default=20.0,
                 help="train mode: seconds per turn")
  p.add_argument("--data_root", default="data/synthetic",
                 help="train mode: synthetic dataset (generated if absent)")
  p.add_argument("--workdir", default="/tmp/oim_host_allocator")
  p.add_argument("--preset", default="tiny")
  p.add_argument("--height", type=int, default=288)
  p.add_argument("--width", type=int, default=480)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  sys.path.insert(0, _ROOT)
  sys.path.insert(0, os.path.join(_ROOT, "bench"))
  if args.worker:
    worker(args)
    return
  default = ("glibc,jemalloc,jemalloc_no_purge" if args.mode == "train"
             else ",".join(VARIANTS))
  names = (args.variants or default).split(",")
  for name in names:
    if name not in VARIANTS:
      p.error(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    if args.mode == "train" and name == "glibc_mallopt":
      p.error("glibc_mallopt is a --mode step variant")
    if (name.startswith("jemalloc")
        and allocator.find_jemalloc() is None):
      p.error(f"variant {name}: no libjemalloc.so.2 found (apt-get install "
              "libjemalloc2), or leave the variant out")
    if (name.startswith("mimalloc")
        and allocator.find_mimalloc() is None):
      p.error(f"variant {name}: no libmimalloc found (pip install "
              "cmeel-mimalloc), or leave the variant out")
  if args.rounds is None:
    args.rounds = 6 if args.mode == "train" else 25
  if args.mode == "train":
    os.makedirs(args.workdir, exist_ok=True)
    variants = run_train(args, names, args.workdir)
  else:
    variants = run_steps(args, names)
  for name, v in variants.items():
    extra = (f"  faults/step {v['faults_per_step']:8.0f}  sys/step "
             f"{1e3 * v['sys_s_per_step']:5.1f} ms"
             if "faults_per_step" in v else "")
    print(f"{name:18s} median {v['s_per_step_median']:.3f} s/step  "
          f"(mean {v['s_per_step_mean']:.3f}, n={v['n']}){extra}")
  print(json.dumps({"mode": args.mode, "rounds": args.rounds,
                    "window_s": args.window if args.mode == "train" else None,
                    "preset": args.preset, "height": args.height,
                    "width": args.width, "batch": args.batch,
                    "variants": variants}))


if __name__ == "__main__":
  main()
