"""Builds BENCHMARKS.md from the per-benchmark results in bench/results/.

Each bench script writes its own markdown section (machine, command,
numbers); this only orders them under one header.

  python bench/assemble_benchmarks.py
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("suite", "suite_avx2", "suite_avx2_dots", "tpu_aot", "tpu_aot_parts", "accelerator", "tpu_aot_roi_bwd_trial", "model", "ops", "oim", "evaluation", "search_index", "pipeline",
         "dataset_loaders", "synthetic")

HEADER = """# Benchmarks

Tables written by the scripts in `bench/` (`bench/results/*.md`); each section names its
command, date and machine. Regenerate this file with `python bench/assemble_benchmarks.py`, the
suite with `python bench/run_suite.py` (GPU rows only where it ran on a GPU). Training runs:
`docs/training_runs.md`; the CPU tuning behind these numbers: `docs/cpu_performance.md`, from the
one-off investigations in `experiments/` (allocator, XLA:CPU flags, per-conv timing, Winograd).

| name | CPU | float32 matmul peak | used |
|---|---|---|---|
| AVX-512 machine | 2-core AMD EPYC with AVX-512 | 0.32-0.40 TFLOP/s (0.183 on 2026-11-25) | 2026-11-25 to 2026-12-02; 2026-12-06 (search index at 7b01791, TPU compiles at HEAD); 2026-12-07 (TPU compiles, HBM bytes) |
| AVX2 machine | 2-core AMD EPYC Zen 3, AVX2 only (no AVX-512) | 0.13-0.17 TFLOP/s (0.087 during the 26d8a82 suite) | 2026-12-02 (320df6e) to 2026-12-03 |
| Intel machine | 2-core Intel Xeon with AVX-512 | not measured | 2026-12-04 (TPU compiles, `tpu_aot` / `accelerator`) |

Both are VMs shared with other jobs whose speed drifts between runs (each row records its load
average): compare ratios measured in one run, not absolute times across dates; the 26d8a82
suite's fraction-of-peak columns (over 100 %) reflect that drift. Earlier versions of each table:
`git log -p bench/results/NAME.md`.
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
