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

The suite below (`bench/results/suite.md`) was rerun in session 4 (load
1.2-2.0, i.e. mostly its own two threads) after the faster GroupNorm and
space-to-depth stem of the tiny model; its breakdown/experiment parts were
skipped (`--skip=breakdown,experiment`). The ResNet-50 code path did not
change since session 2's run (train step 13.2 s vs torchvision 15.7 s then,
13.9 vs 14.8 s now): the difference is run-to-run spread. The investigation section at the end
(`suite_investigation.md`) is from session 1, measured under load 4-6 before
that change: its absolute times are not comparable with the suite's.
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
