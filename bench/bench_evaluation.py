"""Search / detection evaluation: vectorised (ours) vs the per-query loop.

  python bench/bench_evaluation.py [--loop_queries=40] [--seed=0]

Builds a CUHK-SYSU-sized synthetic SearchDataset (6,978 gallery images,
2,900 queries, random TestG100 / TestG4000-style protocols: the query's
positives, then random negatives), ~10 detections per image (score-thresholded
at 0.5, so ~8 survive), D = 256 float32 embeddings with an identity signal
(mAP in a realistic range), and a PRW-sized one (6,112 frames, 6 cameras,
450 identities in 25-55 frames each, 2,057 queries: many true positives per
query, so the sorted-row counting path runs). Times oim_jax.evaluation over
every query, and the loop port of the published code
(bench/reference_search_loop.py) over a subset of the queries, extrapolated
linearly to all of them (its cost is per query; its one-off detection
indexing is timed separately and added once); checks both give the same
per-query APs and top-k on that subset.
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oim_jax import evaluation  # pylint: disable=g-import-not-at-top
from oim_jax.data.dataset import (  # pylint: disable=g-import-not-at-top
    ImageAnnotation, Query, SearchDataset)
import reference_search_loop as loop  # pylint: disable=g-import-not-at-top

DIM = 256


def _box(rng):
  w = rng.integers(10, 120)
  h = int(w * rng.uniform(1.8, 2.8))
  x, y = rng.integers(0, 700), rng.integers(0, 500)
  return [x, y, x + w, y + h]


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build(rng, num_images, num_ids, appearances, num_queries, num_cams,
          protocol_sizes):
  """Synthetic dataset, detections and query embeddings.

  Identity p appears in `appearances` (low, high) images; the queries are
  `num_queries` distinct appearances (one per identity when equal to
  num_ids, as in CUHK-SYSU; several per identity as in PRW).
  """
  prefix = "c{}s1_{:06d}.jpg" if num_cams else "s{1}.jpg"
  names = [prefix.format(i % max(num_cams, 1) + 1, i)
           for i in range(num_images)]
  persons = [[] for _ in range(num_images)]  # (pid, box)
  occurrences = []
  for pid in range(num_ids):
    imgs = rng.choice(num_images, rng.integers(*appearances), replace=False)
    for i in imgs:
      persons[i].append((pid, _box(rng)))
    occurrences.append([(pid, i) for i in imgs])
  if num_queries == num_ids:
    picks = [occ[0] for occ in occurrences]
  else:
    flat = [o for occ in occurrences for o in occ]
    picks = [flat[t] for t in rng.choice(len(flat), num_queries, False)]
  gallery = []
  for i, name in enumerate(names):
    for _ in range(rng.integers(0 if persons[i] else 1, 3)):
      persons[i].append((-1, _box(rng)))
    boxes = np.asarray([b for _, b in persons[i]], np.float32)
    pids = np.asarray([p for p, _ in persons[i]], np.int32)
    gallery.append(ImageAnnotation(name, "/synthetic/" + name, boxes, pids,
                                   i % num_cams + 1 if num_cams else -1))
  queries = []
  for pid, i in picks:
    k = int(np.flatnonzero(gallery[i].pids == pid)[0])
    queries.append(Query(names[i], gallery[i].path, gallery[i].boxes[k], pid,
                         gallery[i].cam_id))
  protocols = {}
  negative = [(n, None) for n in names]  # Shared entries (memory).
  for size in protocol_sizes:
    lists = []
    for (pid, qi), q in zip(picks, queries):
      holders = [i for i in _holders(gallery, pid) if i != qi]
      pos = [(names[i], gallery[i].boxes[gallery[i].pids == pid][0])
             for i in holders]
      perm = rng.permutation(num_images)
      bad = set(holders) | {qi}
      negs = [negative[i] for i in perm[:size + len(bad)] if i not in bad]
      lists.append(pos + negs[:size - len(pos)])
    protocols[size] = lists
  ds = SearchDataset("prw" if num_cams else "cuhk_sysu", "/synthetic", [],
                     gallery, queries, 0, protocols)
  ids = rng.standard_normal((num_ids, DIM))
  dets = {}
  for a in gallery:
    boxes, emb = [], []
    for pid, b in zip(a.pids, a.boxes):
      if rng.random() < 0.9:
        boxes.append(b + rng.integers(-6, 7, 4))
        signal = ids[pid] if pid >= 0 else 0
        emb.append(signal + 1.2 * rng.standard_normal(DIM))
    while len(boxes) < 10:
      boxes.append(_box(rng))
      emb.append(rng.standard_normal(DIM))
    scores = np.concatenate([rng.uniform(0.6, 1.0, len(a.pids)),
                             rng.uniform(0.0, 1.0, 10)])[:len(boxes)]
    dets[a.name] = (np.asarray(boxes, np.float32),
                    scores.astype(np.float32), _unit(np.asarray(emb)))
  qids = np.asarray([q.pid for q in queries])
  qemb = _unit(ids[qids] + 1.2 * rng.standard_normal((len(qids), DIM)))
  return ds, dets, qemb


_HOLDERS = {}


def _holders(gallery, pid):
  if not _HOLDERS:
    for i, a in enumerate(gallery):
      for p in a.pids[a.pids >= 0]:
        _HOLDERS.setdefault(int(p), []).append(i)
  return _HOLDERS.get(pid, [])


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def compare(name, ds, dets, qemb, n_loop, rng, **kw):
  nq = len(ds.queries)
  ours, t_ours = timed(lambda: evaluation.evaluate_search(ds, dets, qemb, **kw))
  subset = np.sort(rng.choice(nq, n_loop, replace=False))
  # The loop's one-off set-up (thresholded detection dict) is not per query.
  index, t_setup = timed(lambda: loop.index_detections(dets))
  (ref, ref_aps), t_loop = timed(lambda: loop.search(
      ds, dets, qemb, queries=subset, name_to_det=index, **kw))
  sub = evaluation.evaluate_search(ds, dets, qemb, query_subset=subset,
                                   return_per_query=True, **kw)
  diff = float(np.max(np.abs(sub["ap"] - ref_aps)))
  same_topk = all(sub[k] == ref[k] for k in ("top1", "top5", "top10"))
  t_full = t_setup + t_loop / n_loop * nq
  print(f"| {name} | {ours['mAP']:.4f} / {ours['top1']:.4f} | {t_ours:.2f} | "
        f"{t_full:.1f} (from {n_loop} queries, {t_loop:.1f} s) | "
        f"{t_full / t_ours:.0f}x | {diff:.1e} / {same_topk} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--loop_queries", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"numpy {np.__version__}")
  (ds, dets, qemb), t = timed(
      lambda: build(rng, 6978, 2900, (2, 6), 2900, 0, (100, 4000)))
  n = sum(len(d[1]) for d in dets.values())
  print(f"CUHK-SYSU-sized: {len(ds.gallery)} images, {len(ds.queries)} "
        f"queries, {n} detections (built in {t:.0f} s)\n")
  print("| case | ours mAP / top-1 | ours s (all queries) | loop s (all, "
        "extrapolated) | speed-up | max abs AP diff / same top-k |")
  print("|---|---|---|---|---|---|")
  compare("CUHK-SYSU G=100", ds, dets, qemb, 5 * args.loop_queries, rng,
          gallery_size=100)
  compare("CUHK-SYSU G=4000", ds, dets, qemb, args.loop_queries, rng,
          gallery_size=4000)
  compare("CUHK-SYSU full set (-1)", ds, dets, qemb, args.loop_queries, rng,
          gallery_size=-1)
  for lo in (False, True):
    ours, t_ours = timed(lambda: evaluation.evaluate_detection(
        ds, dets, labeled_only=lo))
    ref, t_loop = timed(lambda: loop.detection(ds, dets, labeled_only=lo))
    diff = max(abs(ours[k] - ref[k]) for k in ours)
    print(f"| detection{' labeled' if lo else ''} | ap {ours['ap']:.4f} "
          f"recall {ours['recall']:.4f} | {t_ours:.2f} | {t_loop:.1f} (all "
          f"images) | {t_loop / t_ours:.0f}x | {diff:.1e} |", flush=True)
  del ds, dets, qemb
  _HOLDERS.clear()
  (ds, dets, qemb), t = timed(
      lambda: build(rng, 6112, 450, (25, 56), 2057, 6, ()))
  print(f"\nPRW-sized: {len(ds.gallery)} frames, 6 cameras, 450 identities "
        f"in 25-55 frames each, {len(ds.queries)} queries (built in {t:.0f} "
        "s)\n")
  for flag in (True, False):
    compare(f"PRW ignore_cam_id={flag}", ds, dets, qemb,
            args.loop_queries // 2, rng, ignore_cam_id=flag)


if __name__ == "__main__":
  main()
