"""The paper's comparison on the synthetic dataset: OIM vs the Softmax baseline.

Same model, data, budget and seeds; only `config.oim.loss` differs. Each run
evaluates every --eval_every steps (gallery 50); the script plots mAP and
top-1 against steps (mean over seeds, band = min..max) and writes a table.

  python experiments/oim_vs_softmax.py --seeds=0,1,2 --steps=1500 --eval_every=300
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run(args, loss, seed):
  from oim_jax import train_lib  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, f"{loss}_seed{seed}")
  config = load_config(args.config)
  config.oim.loss = loss
  config.seed = seed
  config.train.num_steps = args.steps
  config.train.schedule_unit = "step"
  config.train.warmup_steps = args.steps // 20
  config.train.lr_milestones = (int(args.steps * 0.8),)
  config.train.log_every = 50
  config.train.checkpoint_every = args.steps
  config.eval.every_steps = args.eval_every
  config.data.root = args.data_root
  t0 = time.time()
  result = train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "history.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "eval_mAP" in r]
  train = [r for r in rows if "loss" in r]
  return {"loss": loss, "seed": seed, "seconds": time.time() - t0,
          "steps": [r["step"] for r in evals],
          "mAP": [r["eval_mAP"] for r in evals],
          "top1": [r["eval_top1"] for r in evals],
          "det_recall": [r["eval_det_recall"] for r in evals],
          "reid_loss": [(r["step"], r["reid"]) for r in train],
          "final": {k: result[k] for k in ("mAP", "top1", "det_recall")}}


def summarize(runs, out_prefix):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  lines = ["| loss | seeds | final mAP (%) | final top-1 (%) | det. recall (%) |",
           "|---|---|---|---|---|"]
  for loss, colour in (("oim", "tab:blue"), ("softmax", "tab:orange")):
    rs = [r for r in runs if r["loss"] == loss]
    if not rs:
      continue
    steps = rs[0]["steps"]
    for ax, key in zip(axes, ("mAP", "top1")):
      vals = 100 * np.array([r[key] for r in rs])
      ax.plot(steps, vals.mean(0), "o-", color=colour, label=loss.upper())
      ax.fill_between(steps, vals.min(0), vals.max(0), color=colour,
                      alpha=0.2)
    fin = {k: 100 * np.array([r["final"][k] for r in rs])
           for k in ("mAP", "top1", "det_recall")}
    lines.append(
        f"| {loss} | {len(rs)} | {fin['mAP'].mean():.1f} ± "
        f"{fin['mAP'].std():.1f} | {fin['top1'].mean():.1f} ± "
        f"{fin['top1'].std():.1f} | {fin['det_recall'].mean():.1f} |")
  for ax, key in zip(axes, ("mAP", "top-1")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} (%), gallery 50")
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_title("search mAP (mean over seeds, band = min..max)")
  axes[1].set_title("top-1")
  fig.tight_layout()
  fig.savefig(out_prefix + ".png", dpi=100)
  plt.close(fig)
  table = "\n".join(lines)
  with open(out_prefix + ".md", "w") as f:
    f.write(table + "\n")
  with open(out_prefix + ".json", "w") as f:
    json.dump(runs, f, indent=1)
  print(table)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default=os.path.join(REPO, "configs",
                                                  "synthetic.py"))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--eval_every", type=int, default=300)
  p.add_argument("--workdir", default=os.path.join(REPO, "runs",
                                                   "oim_vs_softmax"))
  p.add_argument("--data_root", default=os.path.join(REPO, "data",
                                                     "synthetic"))
  p.add_argument("--out", default=os.path.join(REPO, "docs",
                                               "oim_vs_softmax"))
  args = p.parse_args()
  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for loss in ("oim", "softmax"):
      r = run(args, loss, seed)
      print(f"{loss} seed {seed}: {r['final']} in {r['seconds']:.0f} s",
            flush=True)
      runs.append(r)
      summarize(runs, args.out)


if __name__ == "__main__":
  main()
