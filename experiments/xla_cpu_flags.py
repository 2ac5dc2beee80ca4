"""XLA:CPU convolution back ends A/B: YNNPACK's (jaxlib's default) vs XLA's own.

  python experiments/xla_cpu_flags.py [--rounds 2] [--resnet50]
      [--variants ynn_default,no_ynn_conv,no_ynn]

XLA_FLAGS are read when a process starts JAX, so each variant runs in its
own process (bench/suite_jax.py, one JSON line each), with the allocator
train.py preloads (allocator.preload_env), and the variants take turns
round by round so that the machine's drift hits them alike. Variants:

  ynn_default   XLA_FLAGS unset: jaxlib 0.10's default, YNNPACK for dots,
                convolutions, reductions, elementwise fusions
  no_ynn_conv   --xla_cpu_experimental_ynn_fusion_type=-individual_convolution:
                what train.py / eval.py / search.py set from 36a8053
                to 20520f3
  no_ynn        --xla_cpu_experimental_ynn_fusion_type= : no YNNPACK at all
  no_ynn_dot    ...=-individual_dot: YNNPACK for all but dots
  no_ynn_conv_dot ...=-individual_convolution,-individual_dot: XLA's own
                convolutions and unfused dots, YNNPACK for the rest; what
                the entry points set since 20520f3 (oim_jax/cpu_host/xla_flags.py)
  no_ynn_conv_dot_{fused_dot,reduce,eltwise}: that, plus YNNPACK's fused
                dots / reductions / elementwise fusions off

Measures the synthetic config's train step and detect+embed (288x480,
batch 4) and, with --resnet50, ResNet-50 at 900x1500, batch 1. Writes
experiments/results/xla_cpu_flags.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from oim_jax.cpu_host import cpu_info  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.cpu_host import allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.cpu_host import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = {
    "ynn_default": "",
    "no_ynn_conv": xla_flags.NO_YNN_CONV,
    "no_ynn": xla_flags.FLAG + "=",
    "no_ynn_dot": xla_flags.FLAG + "=-individual_dot",
    "no_ynn_conv_dot": xla_flags.NO_YNN_CONV_DOT,
    "no_ynn_conv_dot_fused_dot": xla_flags.NO_YNN_CONV_DOT + ",-dot",
    "no_ynn_conv_dot_reduce": xla_flags.NO_YNN_CONV_DOT + ",-reduce",
    "no_ynn_conv_dot_eltwise": xla_flags.NO_YNN_CONV_DOT + ",-eltwise",
}
TINY = ["--preset", "tiny", "--height", "288", "--width", "480", "--batch",
        "4", "--dtype", "float32"]
R50 = ["--preset", "resnet50", "--height", "900", "--width", "1500",
       "--batch", "1", "--dtype", "float32"]
# (row, suite_jax.py argv, seconds-per-call key)
ROWS_TINY = [("synthetic train step", ["train"] + TINY + ["--steps", "15"],
              "step_s"),
             ("synthetic detect + embed", ["infer"] + TINY + ["--iters", "10"],
              "detect_s")]
ROWS_R50 = [("ResNet-50 train step", ["train"] + R50 + ["--steps", "4"],
             "step_s"),
            ("ResNet-50 detect + embed", ["infer"] + R50 + ["--iters", "2"],
             "detect_s")]


def measure(argv: list[str], flags: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags, **allocator.preload_env())
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "suite_jax.py")]
                     + argv, cwd=ROOT, env=env, capture_output=True,
                     text=True, check=False)
  lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode != 0 or not lines:
    raise RuntimeError(f"XLA_FLAGS={flags!r} suite_jax.py {' '.join(argv)} "
                       f"failed ({p.returncode}):\n{p.stderr[-2000:]}")
  return json.loads(lines[-1])


def markdown(out: dict) -> str:
  variants = out["variants"]
  lines = [
      "## XLA:CPU convolutions: YNNPACK's vs XLA's own", "",
      f"Date {out['date']}. {out['host']}; jaxlib {out['jaxlib']}; "
      f"allocator {out['allocator'] or 'glibc'}. Command: `{out['command']}`. "
      f"Each cell: median over {out['rounds']} rounds of the per-process "
      "median seconds per call (variants in alternating processes; min in "
      "brackets).", "",
      "| row | " + " | ".join(f"{v} s" for v in variants)
      + " | no_ynn_conv / ynn_default |",
      "|---|" + "---|" * (len(variants) + 1)]
  for row, cells in out["rows"].items():
    med = {v: statistics.median(cells[v]) for v in variants if cells.get(v)}
    text = [f"{med[v]:.3f} ({min(cells[v]):.3f})" if v in med else "-"
            for v in variants]
    ratio = (f"{med['no_ynn_conv'] / med['ynn_default']:.2f}"
             if "no_ynn_conv" in med and "ynn_default" in med else "-")
    lines.append(f"| {row} | " + " | ".join(text) + f" | {ratio} |")
  lines += ["", "Flags: " + "; ".join(
      f"{v} = `{VARIANTS[v] or '(none)'}`" for v in variants) + ".", ""]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--resnet50", action="store_true")
  p.add_argument("--variants", default="ynn_default,no_ynn_conv,no_ynn")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments",
                                               "results", "xla_cpu_flags"))
  args = p.parse_args()
  variants = args.variants.split(",")
  for v in variants:
    if v not in VARIANTS:
      p.error(f"--variants: unknown {v!r}; choose from {sorted(VARIANTS)}")
  rows = ROWS_TINY + (ROWS_R50 if args.resnet50 else [])
  results = {row: {v: [] for v in variants} for row, _, _ in rows}
  for r in range(args.rounds):
    for row, argv, key in rows:
      for v in variants:
        res = measure(argv, VARIANTS[v])
        results[row][v].append(res[key])
        print(f"[round {r + 1}/{args.rounds}] {row} {v}: {res[key]:.3f} s",
              flush=True)
  import jaxlib  # pylint: disable=g-import-not-at-top
  out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "host": cpu_info.cpu_summary(), "jaxlib": jaxlib.__version__,
         "allocator": allocator.preload_env().get("LD_PRELOAD", ""),
         "command": "python experiments/xla_cpu_flags.py " + " ".join(sys.argv[1:]),
         "rounds": args.rounds, "variants": variants, "rows": results}
  with open(args.out + ".json", "w") as f:
    json.dump(out, f, indent=1)
  md = markdown(out)
  with open(args.out + ".md", "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
