"""Builds BENCHMARKS.md from the per-benchmark results in bench/results/.

Each bench script writes its own markdown section (machine, command,
numbers); this only orders them under one header.

  python bench/assemble_benchmarks.py
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("suite", "host_allocator", "model", "ops", "oim", "evaluation", "pipeline",
         "dataset_loaders", "synthetic", "training")

HEADER = """# Benchmarks

Every number below was measured by a script in `bench/` (the command is given
with each table) on the machine named there. The development machine is a
2-core x86_64 CPU VM without a GPU, shared with other jobs while these ran:
the load average is recorded with the numbers; treat CPU wall times as upper
bounds. GPU rows appear when the suite (`python bench/run_suite.py`) runs on a
machine with a GPU backend. Regenerate this file with
`python bench/assemble_benchmarks.py`.

The suite below (`bench/results/suite.md`) was rerun in full in session 9
(5.5 minutes, load 1.4-1.9) with jemalloc preloaded *and purging off*
(MALLOC_CONF dirty/muzzy decay -1, what train.py now uses) for JAX and torch
alike. That setting changed the side-by-side more than any kernel work:
ResNet-50 C4 at 900x1500, batch 1, same run, train step JAX 7.34 s vs
torchvision 5.83 s (**1.26x**), detect + embed 3.21 vs 2.93 s (**1.10x**).
Rerun minutes later with jemalloc's default purging on both sides (session 8's
setting): JAX train 8.88 s, torchvision 10.04 s train and 5.71 s inference,
i.e. session 8's 0.87x / 0.80x. torch gains 42-49 % from keeping freed pages,
JAX 17-28 %: under each side's best allocator setting, the train-step target
(<= 1.0x) is no longer met and inference (<= 0.6x) is further away. The host
allocator section (`host_allocator.md`) has the synthetic-step A/B. The VM's
matmul peak was 0.379 TFLOP/s that day (0.325 in session 8, 0.183 in session
5): compare ratios, not absolute times, across sessions.
The tiny rows measure today's `configs/synthetic.py` model, whose inference
includes two refinement passes of the box head and the flip test (16.6
GFLOP/image).
The investigation section at the end
(`suite_investigation.md`) is from session 1, measured under load 4-6:
its absolute times are not comparable with the suite's.
"""


def main():
  results = os.path.join(REPO, "bench", "results")
  names = [n[:-3] for n in sorted(os.listdir(results)) if n.endswith(".md")]
  names = [n for n in ORDER if n in names] + [n for n in names
                                              if n not in ORDER]
  parts = [HEADER]
  for n in names:
    with open(os.path.join(results, n + ".md")) as f:
      parts.append(f.read().strip() + "\n")
  with open(os.path.join(REPO, "BENCHMARKS.md"), "w") as f:
    f.write("\n".join(parts))
  print(f"BENCHMARKS.md: {', '.join(names)}")


if __name__ == "__main__":
  main()
