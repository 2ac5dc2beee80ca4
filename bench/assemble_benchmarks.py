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

The suite below (`bench/results/suite.md`) was rerun in session 5 (load
1.1-1.8, i.e. mostly its own two threads; breakdown/experiment parts skipped,
`--skip=breakdown,experiment`) after `configs/synthetic.py` moved to a stride-8
C4 with the RPN at stride 16: the tiny rows measure that model (train 0.316 ->
0.372 s/step, 6.2 -> 7.4 GFLOP/image; inference 0.267 -> 0.305 s). The
ResNet-50 code path did not change since session 2 (train step 13.2 / 13.9 /
13.4 s vs torchvision 15.7 / 14.8 / 14.6 s in sessions 2 / 4 / 5): the
differences are run-to-run spread. The investigation section at the end
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
