"""Re-id quality alone: search with perfect detection.

Embeds every ground-truth gallery box (score 1) with a trained model and
scores the search protocol on them, next to the model's own detections: the
gap says how much mAP the detector costs, the oracle value what the
embedding alone can do.

  python experiments/oracle_detection.py --workdir=runs/demo [--gallery_size=50]
"""

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--gallery_size", type=int, default=None)
  p.add_argument("--checkpoint_step", type=int, default=None)
  args = p.parse_args()
  from oim_jax import eval_lib, evaluation, search_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from oim_jax.data.dataset import query_annotations  # pylint: disable=g-import-not-at-top
  config = search_lib.config_from_workdir(args.workdir)
  gallery_size = args.gallery_size or config.eval.gallery_size
  ds = datasets.load_dataset(config.data)
  variables, step = eval_lib.restore_params(config, args.workdir,
                                            args.checkpoint_step)
  inference = eval_lib.Inference(config, variables)
  gallery_boxes, gallery_pids = _one_box_images(ds.gallery)
  emb = inference.embed(gallery_boxes, "gallery GT boxes")
  oracle, k = {}, 0
  for a in ds.gallery:
    n = len(a.boxes)
    oracle[a.name] = (a.boxes.astype(np.float32), np.ones(n, np.float32),
                      emb[k:k + n])
    k += n
  queries = inference.embed(query_annotations(ds.queries),
                            "queries")
  detections = inference.detect(ds.gallery)
  rows = {"own detections": detections, "oracle (GT boxes)": oracle}
  print(f"{ds.name}, gallery {gallery_size}, step {step}")
  print("| boxes | mAP | top-1 | top-5 | top-10 |\n|---|---|---|---|---|")
  for name, dets in rows.items():
    r = evaluation.evaluate_search(ds, dets, queries,
                                   gallery_size=gallery_size,
                                   det_thresh=config.eval.det_thresh)
    print(f"| {name} | {100 * r['mAP']:.1f} | {100 * r['top1']:.1f} | "
          f"{100 * r['top5']:.1f} | {100 * r['top10']:.1f} |")

  bins = ((0, 60), (60, 90), (90, 130), (130, None))
  print("\nBox-level retrieval mAP (%) among labeled GT boxes, by box height:")
  print("| pool | boxes | identities | all | "
        + " | ".join(f"{lo}-{hi or ''} px" for lo, hi in bins)
        + " |\n|---|---|---|---|" + "---|" * len(bins))
  num_test_ids = len(ds.queries)
  train_boxes, train_pids = _one_box_images(
      ds.train, lambda pid: 0 <= pid < num_test_ids)
  labeled = gallery_pids >= 0  # the test pool: already embedded above
  pools = (
      ("test identities", [b for b, l in zip(gallery_boxes, labeled) if l],
       gallery_pids[labeled], emb[labeled]),
      (f"train identities 0-{num_test_ids - 1}", train_boxes, train_pids,
       inference.embed(train_boxes, "train GT boxes")))
  for name, boxes, pids, pool_emb in pools:
    aps = box_retrieval_aps(pool_emb, pids)
    heights = np.array([b.boxes[0, 3] - b.boxes[0, 1] for b in boxes])
    cells = []
    for lo, hi in bins:
      sel = ~np.isnan(aps) & (heights >= lo) & (heights < (hi or np.inf))
      cells.append(f"{100 * aps[sel].mean():.1f} (n={sel.sum()})"
                   if sel.any() else "-")
    print(f"| {name} | {(~np.isnan(aps)).sum()} | {len(set(pids))} | "
          f"{100 * np.nanmean(aps):.1f} | " + " | ".join(cells) + " |")


def _one_box_images(images, keep=lambda pid: True):
  """One pseudo-image per kept GT box (Inference.embed embeds each image's
  first box) -> (annotations, pids [N])."""
  from oim_jax.data.dataset import ImageAnnotation  # pylint: disable=g-import-not-at-top
  out, pids = [], []
  for a in images:
    for b, pid in zip(a.boxes, a.pids):
      if keep(pid):
        out.append(ImageAnnotation(a.name, a.path,
                                   b.reshape(1, 4).astype(np.float32),
                                   np.array([-1], np.int32)))
        pids.append(pid)
  return out, np.asarray(pids, np.int64)


def box_retrieval_aps(emb, pids):
  """Per-box AP of retrieving same-identity boxes by cosine similarity.

  Args:
    emb: [N, D] embeddings; pids: [N] identities.
  Returns:
    [N] average precision, NaN for boxes whose identity has no other box.
  """
  from oim_jax import evaluation  # pylint: disable=g-import-not-at-top
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  sims = emb @ emb.T
  out = np.full(len(pids), np.nan)
  for i in range(len(pids)):
    others = np.arange(len(pids)) != i
    labels = pids[others] == pids[i]
    if labels.any():
      out[i] = evaluation.average_precision_score(labels.astype(np.int64),
                                                  sims[i, others])
  return out


if __name__ == "__main__":
  main()
