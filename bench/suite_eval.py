"""Evaluation-protocol time at CUHK-SYSU scale, for the benchmark suite.

  python bench/suite_eval.py [--gallery_sizes 100,-1]

Reuses bench/bench_evaluation.py's CUHK-SYSU-sized synthetic inputs (6,978
gallery images, 2,900 queries, ~10 detections per image, D = 256) and times
`oim_jax.evaluation.evaluate_search` over all queries per gallery size, and
`evaluate_detection`. (bench_evaluation.py also times the published
per-query loop; the suite leaves that to it.) Last stdout line: JSON.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_evaluation  # pylint: disable=g-import-not-at-top
from oim_jax import evaluation  # pylint: disable=g-import-not-at-top


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gallery_sizes", default="100,-1")
  a = p.parse_args()
  rng = np.random.default_rng(0)
  sizes = [int(g) for g in a.gallery_sizes.split(",")]
  protocols = tuple(g for g in sizes if g > 0) or (100,)
  (ds, dets, qemb), build_s = bench_evaluation.timed(
      lambda: bench_evaluation.build(rng, 6978, 2900, (2, 6), 2900, 0,
                                     protocols))
  out = {"what": "eval", "gallery_images": len(ds.gallery),
         "queries": len(ds.queries),
         "detections": int(sum(len(d[1]) for d in dets.values())),
         "build_s": build_s, "search": {}}
  for g in sizes:
    m, s = bench_evaluation.timed(
        lambda: evaluation.evaluate_search(ds, dets, qemb, gallery_size=g))
    out["search"][str(g)] = {"seconds": s, "mAP": m["mAP"],
                             "top1": m["top1"]}
  m, s = bench_evaluation.timed(
      lambda: evaluation.evaluate_detection(ds, dets))
  out["detection"] = {"seconds": s, **m}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
