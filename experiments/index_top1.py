"""Top-1 of every synthetic query against a whole index (query image left
out), scored against the ground truth: a check that index.py + search.py
--index retrieve what the evaluation protocol measures.

  python experiments/index_top1.py --index=runs/demo/index \
      --data_root=data/synthetic [--source='*/photos/*']

A match is correct when it overlaps (IoU >= 0.5) a gallery box of the
query's identity. Unlike the protocol (gallery 50 per query), every indexed
image competes.
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oim_jax import eval_lib, search_index, search_lib  # pylint: disable=g-import-not-at-top
from oim_jax.data import datasets  # pylint: disable=g-import-not-at-top
from oim_jax.ops import boxes as box_ops  # pylint: disable=g-import-not-at-top


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--index", required=True)
  p.add_argument("--data_root", required=True)
  p.add_argument("--source", default=None, help="glob of the files to rank")
  args = p.parse_args()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "synthetic", os.path.join(repo, "configs", "synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  data = mod.get_config().data
  data.root = args.data_root
  dataset = datasets.load_dataset(data)
  gallery = {a.name: a for a in dataset.gallery}
  with search_index.SearchIndex.open(args.index) as index:
    m = index.manifest
    config = search_lib.config_from_dict(m["config"])
    params, _ = eval_lib.restore_params(config, m["workdir"],
                                        m["checkpoint_step"])
    inference = eval_lib.Inference(config, params)
    correct = 0
    for q in dataset.queries:
      query = search_lib.embed_query(inference, q.path, q.box)
      hits = [h for h in index.search(query, 50, source_glob=args.source)
              if os.path.basename(h.image) != q.name]
      a = gallery.get(os.path.basename(hits[0].image))
      if a is not None and len(a.pids):
        iou = np.asarray(box_ops.box_iou(np.asarray(a.boxes, np.float32),
                                         hits[0].box[None]))[:, 0]
        j = int(iou.argmax())
        correct += int(iou[j] >= 0.5 and a.pids[j] == q.pid)
    rows = index.num_rows
  n = len(dataset.queries)
  print(f"top-1 over the index ({rows} detections), query image "
        f"left out: {correct}/{n} = {100 * correct / n:.1f} %")


if __name__ == "__main__":
  main()
