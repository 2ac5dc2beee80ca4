"""Builds BENCHMARKS.md from the per-benchmark results in bench/results/.

Each bench script writes its own markdown section (machine, command,
numbers); this only orders them under one header.

  python bench/assemble_benchmarks.py
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("suite", "model", "ops", "oim", "evaluation", "pipeline",
         "dataset_loaders", "synthetic", "training")

HEADER = """# Benchmarks

Every number below was measured by a script in `bench/` (the command is given
with each table) on the machine named there. The development machine is a
2-core x86_64 CPU VM without a GPU, shared with other jobs while these ran:
the load average is recorded with the numbers; treat CPU wall times as upper
bounds. GPU rows appear when the suite (`python bench/run_suite.py`) runs on a
machine with a GPU backend. Regenerate this file with
`python bench/assemble_benchmarks.py`.

The suite below (`bench/results/suite.md`) was rerun in full in session 8
(10 minutes, load 0.9-2.0, jemalloc preloaded for JAX and torch alike). This
VM was faster that day than in earlier sessions (matmul peak 0.325 TFLOP/s vs
0.183 in session 5), so compare ratios, not absolute times, across sessions.
The tiny rows measure today's `configs/synthetic.py` model, whose inference
now includes two refinement passes of the box head and the flip test (16.6
GFLOP/image; session 5: 6.2 without them); its train step got the session-8
speed-ups (sliced stem max pool, RoIAlign matmul gradient). ResNet-50 (code
path unchanged apart from those two): train step 8.75 s vs torchvision 10.01 s
(0.87x; sessions 2 / 4 / 5: 0.84 / 0.94 / 0.92), detect + embed 4.48 vs 5.57 s
(0.80x; earlier 0.82-0.90). The investigation section at the end
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
