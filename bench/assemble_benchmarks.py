"""Builds BENCHMARKS.md from the per-benchmark results in bench/results/.

Each bench script writes its own markdown section (machine, command,
numbers); this only orders them under one header.

  python bench/assemble_benchmarks.py
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("suite", "suite_avx2", "suite_avx2_s15", "conv3x3", "host_allocator", "xla_cpu_flags", "xla_cpu_flags_dots", "tiny_convs", "tiny_convs_winograd", "model", "ops", "oim", "evaluation", "pipeline",
         "dataset_loaders", "synthetic", "training")

HEADER = """# Benchmarks

Every number below was measured by a script in `bench/` (the command is given
with each table) on the machine named there. The development machine is a
2-core x86_64 CPU VM without a GPU, shared with other jobs while these ran:
the load average is recorded with the numbers; treat CPU wall times as upper
bounds. GPU rows appear when the suite (`python bench/run_suite.py`) runs on a
machine with a GPU backend. Regenerate this file with
`python bench/assemble_benchmarks.py`.

The suite below (`bench/results/suite.md`) was rerun in full in session 10
(5.5 minutes, load 1.5-2.0, noisier than session 9's 1.4-1.9) with jemalloc
preloaded and purging off (MALLOC_CONF dirty/muzzy decay -1, what train.py
uses) for JAX and torch alike, after the change of session 10: 3x3 convs with
>= 512 input channels (the RPN conv, res5) compute their weight gradient as one
im2col matmul on CPU (`conv3x3.md`). ResNet-50 C4 at 900x1500, batch 1, same
run: train step JAX 7.31 s vs torchvision 6.00 s (**1.22x**; 1.13x on the best
runs; session 9: 1.26x), detect + embed 3.96 vs 3.11 s (**1.27x**, 1.06x best;
session 9: 1.10x; inference code unchanged, so that is the load). The suite's
own A/B row: 7.31 s with the im2col weight gradients vs 7.55 s with XLA's;
interleaved runs outside the suite: 6.63 vs 7.38 s. With jemalloc's default
purging on both sides (session 9's cross-check) the ratios were 0.87x / 0.80x.
The train-step target (<= 1.0x) and the inference target (<= 0.6x) are not
met. The VM's matmul peak was 0.402 TFLOP/s that day (0.379 in session 9,
0.325 in session 8, 0.183 in session 5): compare ratios, not absolute times,
across sessions.
The second suite (`suite_avx2.md`) is the same command on the other VM kind
these sessions get, an AVX2-only AMD EPYC (session 13; matmul peak 0.159
TFLOP/s vs 0.402), with XLA's own CPU convolutions instead of jaxlib's
default YNNPACK ones (`xla_cpu_flags.md`, `oim_jax/xla_flags.py`; since
session 12 train.py, eval.py, search.py, the tests and the suite set that
flag): train step 12.06 vs 11.80 s (**1.02x**), detect + embed 6.67 vs
6.07 s (**1.10x**); the synthetic train step 0.33 s (session 10's suite on
the AVX-512 kind: 0.21 s). Session 12's suite on the AVX2 kind, before the
flag: 12.44 vs 11.72 s (1.06x), 7.47 vs 5.78 s (1.29x), synthetic 0.405 s.
The session-10 suite above predates the flag (not rerun on that kind yet).
Since session 15 the flag also takes unfused dots off YNNPACK
(`xla_cpu_flags_dots.md`: synthetic train step 0.374 -> 0.361 s, 7 of 9
paired rounds faster); the suites
above predate that. `suite_avx2_s15.md` is the suite rerun with it on the
AVX2 kind (session 15, `--skip breakdown,experiment`): ResNet-50 train step
JAX/torch **1.02x** (0.98x best runs), detect + embed **1.11x**, the same
ratios as session 13; that run's matmul peak came out at 0.087 TFLOP/s
(0.136 earlier the same day on the same VM), so its "fraction of peak"
columns (over 100 %) are not meaningful: the VM's speed drifted.
The machine line of each suite names the ISA (recorded from session 12 on).
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
