"""Tests of oim_jax.evaluation against hand-computed cases and a literal
per-query loop port of the published evaluation (person_search psdb.py,
SeqNet eval_func.py), written here independently of the vectorised code."""

import os

import numpy as np
import pytest

from oim_jax import evaluation
from oim_jax.data.dataset import ImageAnnotation, Query, SearchDataset

TOPK = (1, 5, 10)

# ---------------------------------------------------------------------------
# Reference: literal loop ports of the published rules.


def ref_average_precision(y_true, y_score):
  """sklearn's step-wise definition, written out (sklearn is not installed).

  precision_recall_curve: sort by decreasing score (mergesort), thresholds at
  the distinct values, tps/fps cumulated up to each threshold;
  AP = sum_n (R_n - R_{n-1}) * P_n.
  """
  y_true = np.asarray(y_true, dtype=np.float64)
  y_score = np.asarray(y_score)
  order = np.argsort(y_score, kind="mergesort")[::-1]
  y_score, y_true = y_score[order], y_true[order]
  distinct = np.where(np.diff(y_score))[0]
  thr_idx = np.r_[distinct, y_true.size - 1]
  tps = np.cumsum(y_true)[thr_idx]
  fps = 1 + thr_idx - tps
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  ap, prev = 0.0, 0.0
  for p, r in zip(precision, recall):
    ap += (r - prev) * p
    prev = r
  return ap


def ref_iou(a, b):
  a = [float(v) for v in a]
  b = [float(v) for v in b]
  x1, y1 = max(a[0], b[0]), max(a[1], b[1])
  x2, y2 = min(a[2], b[2]), min(a[3], b[3])
  inter = max(0, x2 - x1) * max(0, y2 - y1)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter * 1.0 / union


def ref_search(dataset, detections, qemb, gallery_size=100, det_thresh=0.5,
               ignore_cam_id=True, queries=None):
  """eval_search_cuhk / eval_search_prw as a per-query, per-image loop.

  `np.argsort(x)[::-1]` of the published code is taken with a stable sort.
  """
  name_to_det = {}
  for name, (boxes, scores, emb) in detections.items():
    inds = np.where(np.asarray(scores) >= det_thresh)[0]
    if len(inds) > 0:
      name_to_det[name] = (np.asarray(boxes)[inds], np.asarray(emb)[inds])
  aps, accs, ranks = [], [], []
  queries = range(len(dataset.queries)) if queries is None else queries
  for i in queries:
    query = dataset.queries[i]
    entries = dataset.gallery_for(i, gallery_size)
    if not ignore_cam_id:
      entries = [(n, b) for n, b in entries
                 if dataset.gallery_image(n).cam_id != query.cam_id]
    feat_q = qemb[i]
    y_true, y_score = [], []
    count_gt, count_tp = 0, 0
    seen = set()
    for name, gt in entries:
      count_gt += gt is not None
      if name not in name_to_det:
        continue
      det, feat_g = name_to_det[name]
      sim = feat_g.dot(feat_q).ravel()
      if name in seen:
        continue
      seen.add(name)
      label = np.zeros(len(sim), dtype=np.int32)
      if gt is not None:
        w, h = float(gt[2]) - float(gt[0]), float(gt[3]) - float(gt[1])
        iou_thresh = min(0.5, (w * h * 1.0) / ((w + 10) * (h + 10)))
        inds = np.argsort(sim, kind="stable")[::-1]
        sim, det = sim[inds], det[inds]
        for j, roi in enumerate(det[:, :4]):
          if ref_iou(roi, gt) >= iou_thresh:
            label[j] = 1
            count_tp += 1
            break
      y_true.extend(list(label))
      y_score.extend(list(sim))
    y_score = np.asarray(y_score)
    y_true = np.asarray(y_true)
    ap = 0.0
    if count_tp:
      ap = ref_average_precision(y_true, y_score) * count_tp * 1.0 / count_gt
    aps.append(ap)
    inds = np.argsort(y_score, kind="stable")[::-1]
    y_true = y_true[inds]
    accs.append([min(1, sum(y_true[:k])) for k in TOPK])
    hits = np.flatnonzero(y_true)
    ranks.append(hits[0] if hits.size else -1)
  accs = np.mean(accs, axis=0)
  return {"mAP": float(np.mean(aps)), "top1": accs[0], "top5": accs[1],
          "top10": accs[2]}, (np.asarray(aps), np.asarray(ranks))


def ref_detection(dataset, detections, det_thresh=0.5, iou_thresh=0.5,
                  labeled_only=False):
  """eval_detection as a per-image, per-box loop."""
  y_true, y_score = [], []
  count_gt, count_tp = 0, 0
  for anno in dataset.gallery:
    gt_boxes = anno.boxes
    if labeled_only:
      inds = np.where(anno.pids.ravel() >= 0)[0]
      if len(inds) == 0:
        continue
      gt_boxes = gt_boxes[inds]
    num_gt = gt_boxes.shape[0]
    det = detections.get(anno.name)
    if det is not None and len(det[1]):
      boxes, scores = np.asarray(det[0]), np.asarray(det[1])
      inds = np.where(scores >= det_thresh)[0]
      boxes, scores = boxes[inds], scores[inds]
      num_det = len(inds)
    else:
      num_det = 0
    if num_det == 0:
      count_gt += num_gt
      continue
    ious = np.zeros((num_gt, num_det), dtype=np.float32)
    for i in range(num_gt):
      for j in range(num_det):
        ious[i, j] = ref_iou(gt_boxes[i], boxes[j])
    tfmat = ious >= iou_thresh
    for j in range(num_det):
      largest_ind = np.argmax(ious[:, j])
      for i in range(num_gt):
        if i != largest_ind:
          tfmat[i, j] = False
    for i in range(num_gt):
      largest_ind = np.argmax(ious[i, :])
      for j in range(num_det):
        if j != largest_ind:
          tfmat[i, j] = False
    for j in range(num_det):
      y_score.append(scores[j])
      y_true.append(tfmat[:, j].any())
    count_tp += tfmat.sum()
    count_gt += num_gt
  det_rate = count_tp * 1.0 / count_gt
  ap = ref_average_precision(y_true, y_score) * det_rate if count_tp else 0.0
  return {"ap": ap, "recall": det_rate}


# ---------------------------------------------------------------------------
# Hand-computed cases.


def _ann(name, boxes, pids, cam=-1):
  return ImageAnnotation(name, "/x/" + name,
                         np.asarray(boxes, np.float32).reshape(-1, 4),
                         np.asarray(pids, np.int32), cam)


def _det(boxes, scores, emb):
  return (np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(scores, np.float32), np.asarray(emb, np.float32))


def _emb(*firsts, second=None):
  """Embeddings whose dot with e0 / e1 are exactly the given values."""
  second = second or [0.0] * len(firsts)
  return [[f, s, 0.0] for f, s in zip(firsts, second)]


def _hand_cuhk():
  """Three queries; sims to query 0 = column 0, to query 2 = column 1."""
  box = lambda *b: np.asarray(b, np.float32)
  gallery = [
      _ann("q.jpg", [[0, 0, 50, 100], [60, 0, 110, 100]], [0, 1]),
      _ann("a.jpg", [[0, 0, 10, 20], [300, 300, 310, 310]], [0, 1]),
      _ann("b.jpg", [[0, 0, 40, 80]], [0]),
      _ann("c.jpg", [[0, 0, 20, 20]], [2]),
      _ann("d.jpg", [[100, 100, 200, 300]], [0]),
      _ann("e.jpg", [[5, 5, 50, 50]], [-1]),
      _ann("f.jpg", [[5, 5, 50, 50]], [-1]),
      _ann("q2.jpg", [[0, 0, 30, 60]], [2]),
  ]
  queries = [Query("q.jpg", "/x/q.jpg", box(0, 0, 50, 100), 0),
             Query("q.jpg", "/x/q.jpg", box(60, 0, 110, 100), 1),
             Query("q2.jpg", "/x/q2.jpg", box(0, 0, 30, 60), 2)]
  protocols = {4: [
      [("a.jpg", box(0, 0, 10, 20)), ("b.jpg", box(0, 0, 40, 80)),
       ("c.jpg", None), ("d.jpg", box(100, 100, 200, 300)), ("e.jpg", None)],
      [("c.jpg", None), ("a.jpg", box(300, 300, 310, 310))],
      [("a.jpg", None), ("c.jpg", box(0, 0, 20, 20)), ("d.jpg", None)],
  ]}
  ds = SearchDataset("cuhk_sysu", "/x", [], gallery, queries, 0, protocols)
  dets = {
      # a: det0 sim .875 misses the GT; det1 IoU 0.4 >= 1/3 (10x20 box).
      "a.jpg": _det([[50, 50, 60, 70], [0, 0, 10, 8]], [0.9, 0.8],
                    _emb(0.875, 0.75, second=[0.25, 0.25])),
      # b: absent (a positive with no detection).
      # c: det0 ties with a's true positive for query 0; for query 2 its
      # IoU 0.45 >= 0.444 (20x20 box) makes it the true positive.
      "c.jpg": _det([[0, 0, 20, 9], [40, 40, 60, 60]], [0.7, 0.6],
                    _emb(0.75, 0.25, second=[0.9375, 0.125])),
      # d: duplicate detections of the GT, same embedding.
      "d.jpg": _det([[100, 100, 200, 300], [100, 100, 200, 300]], [0.9, 0.9],
                    _emb(0.5, 0.5, second=[0.5, 0.5])),
      # e: every detection below the score threshold.
      "e.jpg": _det([[5, 5, 50, 50]], [0.3], _emb(0.99)),
      # f: outside query 0's TestG4 list; in its whole-set gallery.
      "f.jpg": _det([[5, 5, 50, 50]], [0.6], _emb(0.96875)),
      # q: the query image itself, never in its own gallery.
      "q.jpg": _det([[0, 0, 50, 100]], [0.99], _emb(1.0)),
  }
  qemb = np.asarray([[1, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
  return ds, dets, qemb


def test_average_precision_hand_computed_with_ties():
  y_true = [1, 0, 1, 1, 0]
  y_score = [0.9, 0.8, 0.8, 0.3, 0.3]
  # Thresholds .9: P 1, R 1/3; .8: P 2/3, R 2/3; .3: P 3/5, R 1.
  expected = 1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5
  assert ref_average_precision(y_true, y_score) == pytest.approx(expected)
  assert evaluation.average_precision_score(y_true, y_score) == (
      pytest.approx(expected, abs=1e-12))
  assert evaluation.average_precision_score([0, 0], [0.1, 0.2]) == 0.0


def test_average_precision_matches_stepwise_reference_randomly():
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = rng.integers(1, 40)
    y_true = rng.random(n) < 0.3
    y_true[rng.integers(n)] = True
    y_score = rng.integers(0, 6, n) / 4.0  # Many ties.
    assert evaluation.average_precision_score(y_true, y_score) == (
        pytest.approx(ref_average_precision(y_true, y_score), abs=1e-12))


def test_search_hand_computed_cuhk():
  ds, dets, qemb = _hand_cuhk()
  out = evaluation.evaluate_search(ds, dets, qemb, gallery_size=4,
                                   return_per_query=True)
  # Query 0: published y = a[.875 F, .75 T], c[.75 F, .25 F], d[.5 T, .5 F]
  # (b has no detection, e none above 0.5): count_gt 3, count_tp 2;
  # AP_sklearn = 1/2 * 1/3 + 1/2 * 2/5; ranking: .875, c's .75 (later entry
  # wins the tie), a's TP .75 -> first TP at rank 2.
  ap0 = (1 / 2 * 1 / 3 + 1 / 2 * 2 / 5) * 2 / 3
  # Query 1: its GT in a is 10x10 (threshold .25), no detection overlaps.
  # Query 2: c's det0 is the top-scored and a true positive (IoU .45).
  np.testing.assert_allclose(out["ap"], [ap0, 0.0, 1.0], atol=1e-12)
  np.testing.assert_array_equal(out["first_tp_rank"], [2, -1, 0])
  assert out["mAP"] == pytest.approx((ap0 + 1) / 3, abs=1e-12)
  assert out["top1"] == pytest.approx(1 / 3)
  assert out["top5"] == pytest.approx(2 / 3)
  assert out["top10"] == pytest.approx(2 / 3)
  ref, _ = ref_search(ds, dets, qemb, gallery_size=4)
  for k in ("mAP", "top1", "top5", "top10"):
    assert ref[k] == pytest.approx(out[k], abs=1e-12)


def test_search_hand_computed_full_set_and_subset():
  ds, dets, qemb = _hand_cuhk()
  out = evaluation.evaluate_search(ds, dets, qemb, gallery_size=-1,
                                   query_subset=[0], return_per_query=True)
  # Query 0, whole set: positives a, b, d first, then c, e, f (q excluded):
  # y = a[.875, .75T], d[.5T, .5], c[.75, .25], f[.96875].
  # Thresholds: .75 -> P 1/4, R 1/2; .5 -> P 2/6, R 1.
  ap0 = (1 / 2 * 1 / 4 + 1 / 2 * 2 / 6) * 2 / 3
  np.testing.assert_allclose(out["ap"], [ap0], atol=1e-12)
  np.testing.assert_array_equal(out["first_tp_rank"], [3])
  assert (out["top1"], out["top5"]) == (0.0, 1.0)
  ref, _ = ref_search(ds, dets, qemb, gallery_size=-1, queries=[0])
  assert ref["mAP"] == pytest.approx(out["mAP"], abs=1e-12)


def _hand_prw():
  box = lambda *b: np.asarray(b, np.float32)
  gallery = [
      _ann("c1s1_q.jpg", [[0, 0, 40, 80]], [7], cam=1),
      _ann("c1s1_a.jpg", [[0, 0, 40, 80], [50, 0, 90, 80]], [7, -1], cam=1),
      _ann("c2s1_b.jpg", [[0, 0, 10, 10]], [7], cam=2),
      _ann("c2s1_c.jpg", [[0, 0, 40, 80]], [3], cam=2),
  ]
  queries = [Query("c1s1_q.jpg", "/x", box(0, 0, 40, 80), 7, cam_id=1)]
  ds = SearchDataset("prw", "/x", [], gallery, queries, 0)
  dets = {
      "c1s1_q.jpg": _det([[0, 0, 40, 80]], [0.9], _emb(1.0)),
      "c1s1_a.jpg": _det([[0, 0, 40, 80], [50, 0, 90, 80]], [0.9, 0.9],
                         _emb(0.875, 0.25)),
      # Tiny GT (10x10, threshold .25): IoU .3 is a match.
      "c2s1_b.jpg": _det([[0, 0, 10, 3]], [0.8], _emb(0.5)),
      "c2s1_c.jpg": _det([[0, 0, 40, 80]], [0.8], _emb(0.75)),
  }
  return ds, dets, np.asarray([[1, 0, 0]], np.float32)


def test_search_hand_computed_prw_cameras():
  ds, dets, qemb = _hand_prw()
  # All cameras: y = a[.875 T, .25], b[.5 T], c[.75]: AP = (1 + 2/3) / 2.
  out = evaluation.evaluate_search(ds, dets, qemb, ignore_cam_id=True)
  assert out["mAP"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
  assert out["top1"] == 1.0
  # Other cameras only: y = b[.5 T], c[.75]: AP 1/2, count_gt 1.
  out = evaluation.evaluate_search(ds, dets, qemb, ignore_cam_id=False)
  assert out["mAP"] == pytest.approx(0.5, abs=1e-12)
  assert (out["top1"], out["top5"]) == (0.0, 1.0)
  for flag in (True, False):
    ref, _ = ref_search(ds, dets, qemb, ignore_cam_id=flag)
    got = evaluation.evaluate_search(ds, dets, qemb, ignore_cam_id=flag)
    assert ref["mAP"] == pytest.approx(got["mAP"], abs=1e-12)


def test_detection_hand_computed():
  gallery = [
      _ann("A", [[0, 0, 10, 10], [20, 0, 30, 10]], [3, -1]),
      _ann("B", [[0, 0, 10, 10]], [5]),
      _ann("C", [[0, 0, 10, 10]], [-1]),
  ]
  ds = SearchDataset("cuhk_sysu", "/x", [], gallery, [], 0)
  z = np.zeros((4, 2))
  dets = {
      # d0 matches g0 (IoU 1); d1 (IoU .9 with g0) is g0's second best: FP;
      # d2 matches g1; d3 is below the score threshold.
      "A": (np.asarray([[0, 0, 10, 10], [0, 0, 10, 9], [20, 0, 30, 10],
                        [0, 0, 10, 10]], np.float32),
            np.asarray([0.9, 0.8, 0.7, 0.4], np.float32), z),
      "C": (np.asarray([[0, 0, 10, 4]], np.float32),
            np.asarray([0.95], np.float32), z[:1]),  # IoU .4: FP.
  }
  out = evaluation.evaluate_detection(ds, dets)
  # 4 GT, 2 TP; ranking .95 F, .9 T, .8 F, .7 T: AP = 1/2*1/2 + 1/2*2/4.
  assert out["recall"] == pytest.approx(0.5)
  assert out["ap"] == pytest.approx(0.5 * 0.5, abs=1e-12)
  out = evaluation.evaluate_detection(ds, dets, labeled_only=True)
  # Labeled GT: A's g0 and B's: 1 TP of 2; C skipped; ranking .9 T, .8, .7.
  assert out["recall"] == pytest.approx(0.5)
  assert out["ap"] == pytest.approx(0.5, abs=1e-12)
  for lo in (False, True):
    ref = ref_detection(ds, dets, labeled_only=lo)
    got = evaluation.evaluate_detection(ds, dets, labeled_only=lo)
    assert got["ap"] == pytest.approx(ref["ap"], abs=1e-12)
    assert got["recall"] == pytest.approx(ref["recall"], abs=1e-12)


# ---------------------------------------------------------------------------
# Randomized comparison with the loop reference.


def _random_box(rng, tiny):
  w = rng.integers(3, 12) if tiny else rng.integers(12, 120)
  h = rng.integers(3, 20) if tiny else rng.integers(24, 240)
  x, y = rng.integers(0, 400), rng.integers(0, 300)
  return [x, y, x + w, y + h]


def random_setup(seed, prw, quantized, n_images=36, n_ids=7, n_queries=10,
                 dim=6):
  """A random dataset (CUHK-SYSU style protocols, or PRW style cameras),
  detections jittered around the GT boxes (tiny boxes, duplicates, missing
  images, all-below-threshold images) and embeddings (quantized: many ties).
  """
  rng = np.random.default_rng(seed)
  gallery = []
  for i in range(n_images):
    ids = rng.choice(n_ids, rng.integers(0, 4), replace=False)
    n_unl = rng.integers(0 if len(ids) else 1, 3)
    boxes = [_random_box(rng, rng.random() < 0.3)
             for _ in range(len(ids) + n_unl)]
    pids = list(ids) + [-1] * n_unl
    gallery.append(_ann(f"c{i % 3 + 1}s1_{i:04d}.jpg", boxes, pids,
                        cam=i % 3 + 1 if prw else -1))
  occ = [(i, k) for i, a in enumerate(gallery) for k, p in enumerate(a.pids)
         if p >= 0]
  picks = rng.choice(len(occ), n_queries, replace=False)
  queries = []
  for t in picks:
    i, k = occ[t]
    a = gallery[i]
    queries.append(Query(a.name, a.path, a.boxes[k], int(a.pids[k]),
                         a.cam_id))
  protocols = {}
  if not prw:
    for size in (5, 12):
      lists = []
      for q in queries:
        pos, neg = [], []
        for a in gallery:
          if a.name == q.name:
            continue
          hit = np.flatnonzero(a.pids == q.pid)
          (pos if hit.size else neg).append(
              (a.name, a.boxes[hit[0]] if hit.size else None))
        negs = [neg[j] for j in rng.permutation(len(neg))[:size]]
        entries = pos + negs
        if rng.random() < 0.3 and entries:  # An image listed twice.
          entries.append(entries[rng.integers(len(entries))])
        lists.append(entries)
      protocols[size] = lists
  ds = SearchDataset("prw" if prw else "cuhk_sysu", "/x", [], gallery,
                     queries, 0, protocols)

  def emb(n):
    if quantized:
      return (rng.integers(-2, 3, (n, dim)) / 4.0).astype(np.float32)
    return rng.standard_normal((n, dim))

  dets = {}
  for a in gallery:
    r = rng.random()
    if r < 0.1:
      continue  # No entry at all.
    boxes = []
    for b in a.boxes:
      if rng.random() < 0.85:
        jit = rng.integers(-4, 5, 4)
        boxes.append(b + jit)
        if rng.random() < 0.2:  # Duplicate detection.
          boxes.append(b + jit)
    for _ in range(rng.integers(0, 4)):
      boxes.append(_random_box(rng, rng.random() < 0.3))
    n = len(boxes)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.random(n).astype(np.float32)
    if r < 0.15:
      scores *= 0.4  # All below the threshold.
    e = emb(n)
    if n > 1 and rng.random() < 0.3:
      e[1] = e[0]  # Same embedding twice (ties inside one image).
    dets[a.name] = (boxes, scores, e)
  qemb = emb(n_queries)
  return ds, dets, qemb


def _assert_same(got, ref, per_query):
  for k in ("mAP", "top1", "top5", "top10"):
    assert got[k] == pytest.approx(ref[k], abs=1e-9), k
  np.testing.assert_allclose(got["ap"], per_query[0], atol=1e-9)
  np.testing.assert_array_equal(got["first_tp_rank"], per_query[1])


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_random_cuhk_matches_loop_reference(seed, quantized,
                                                   monkeypatch):
  ds, dets, qemb = random_setup(seed, prw=False, quantized=quantized)
  for size in (5, 12, -1):
    ref, per_query = ref_search(ds, dets, qemb, gallery_size=size)
    got = evaluation.evaluate_search(ds, dets, qemb, gallery_size=size,
                                     return_per_query=True)
    _assert_same(got, ref, per_query)
  # The sorted-row counting path, several query blocks, and both layouts
  # of fixed-size galleries (gathered rows / masked block).
  monkeypatch.setattr(evaluation, "_SORT_ABOVE_TPS", 0)
  monkeypatch.setattr(evaluation, "_BLOCK_BYTES", 1)
  for size, gather_below in ((5, 0.0), (12, 2.0), (-1, 0.0)):
    monkeypatch.setattr(evaluation, "_GATHER_BELOW", gather_below)
    ref, per_query = ref_search(ds, dets, qemb, gallery_size=size)
    got = evaluation.evaluate_search(ds, dets, qemb, gallery_size=size,
                                     return_per_query=True)
    _assert_same(got, ref, per_query)


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("seed", [3, 4])
def test_search_random_prw_matches_loop_reference(seed, quantized,
                                                  monkeypatch):
  ds, dets, qemb = random_setup(seed, prw=True, quantized=quantized)
  for flag in (True, False):
    # Drop queries whose person is never seen by another camera (the
    # published code divides by count_gt = 0 there).
    ok = [i for i, q in enumerate(ds.queries) if any(
        n_b[1] is not None and (flag or ds.gallery_image(n_b[0]).cam_id !=
                                q.cam_id) for n_b in ds.gallery_for(i))]
    ref, per_query = ref_search(ds, dets, qemb, ignore_cam_id=flag, queries=ok)
    got = evaluation.evaluate_search(ds, dets, qemb, ignore_cam_id=flag,
                                     query_subset=ok, return_per_query=True)
    _assert_same(got, ref, per_query)
    monkeypatch.setattr(evaluation, "_SORT_ABOVE_TPS", 0)
    got = evaluation.evaluate_search(ds, dets, qemb, ignore_cam_id=flag,
                                     query_subset=ok, return_per_query=True)
    _assert_same(got, ref, per_query)
    monkeypatch.undo()


@pytest.mark.parametrize("seed", [5, 6])
def test_detection_random_matches_loop_reference(seed):
  ds, dets, _ = random_setup(seed, prw=False, quantized=True)
  for lo in (False, True):
    for iou in (0.5, 0.7):
      ref = ref_detection(ds, dets, iou_thresh=iou, labeled_only=lo)
      got = evaluation.evaluate_detection(ds, dets, iou_thresh=iou,
                                          labeled_only=lo)
      assert got["ap"] == pytest.approx(ref["ap"], abs=1e-9)
      assert got["recall"] == pytest.approx(ref["recall"], abs=1e-12)


# ---------------------------------------------------------------------------
# Files, table, errors.


def test_save_load_round_trip(tmp_path):
  ds, dets, qemb = _hand_cuhk()
  dets["empty.jpg"] = _det(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 3)))
  path = os.path.join(tmp_path, "results.npz")
  evaluation.save_results(path, dets, qemb)
  loaded, q = evaluation.load_results(path)
  assert sorted(loaded) == sorted(dets)
  for name, (b, s, e) in dets.items():
    np.testing.assert_array_equal(loaded[name][0], b)
    np.testing.assert_array_equal(loaded[name][1], s)
    np.testing.assert_array_equal(loaded[name][2], e)
  np.testing.assert_array_equal(q, qemb)
  a = evaluation.evaluate_search(ds, dets, qemb, gallery_size=4)
  b = evaluation.evaluate_search(ds, loaded, q, gallery_size=4)
  assert a == b
  with pytest.raises(FileNotFoundError, match="eval.py"):
    evaluation.load_results(os.path.join(tmp_path, "missing.npz"))


def test_format_table():
  text = evaluation.format_table(
      {"gallery_100": {"mAP": 0.875, "top1": 0.5}, "detection": {"ap": 1.0}})
  lines = text.splitlines()
  assert len(lines) == 5
  assert "gallery_100/mAP" in lines[2] and "87.50" in lines[2]
  assert "detection/ap" in lines[4] and "100.00" in lines[4]


def test_bad_inputs_raise_clear_errors():
  ds, dets, qemb = _hand_cuhk()
  with pytest.raises(ValueError, match="query_embeddings"):
    evaluation.evaluate_search(ds, dets, qemb[:2], gallery_size=4)
  bad = dict(dets)
  bad["a.jpg"] = (np.zeros((2, 3)), np.zeros(2), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="a.jpg.*boxes"):
    evaluation.evaluate_search(ds, bad, qemb, gallery_size=4)
  with pytest.raises(ValueError, match="gallery_size=7"):
    evaluation.evaluate_search(ds, dets, qemb, gallery_size=7)
  with pytest.raises(ValueError, match="ignore_cam_id"):
    evaluation.evaluate_search(ds, dets, qemb, gallery_size=4,
                               ignore_cam_id=False)


def test_detection_iou_is_rounded_to_float32_as_published():
  # IoU = (1 + 2^-23)(1 - 2^-23) / 2 = 0.5 - 2^-47: below 0.5 in float64,
  # exactly 0.5 once stored in the published float32 IoU matrix -> a match.
  eps = 2.0**-23
  ds = SearchDataset("cuhk_sysu", "/x", [], [_ann("A", [[0, 0, 2, 1]], [0])],
                     [], 0)
  box = np.asarray([[0, 0, 1 + eps, 1 - eps]], np.float32)
  assert ref_iou(box[0], [0, 0, 2, 1]) < 0.5
  dets = {"A": (box, np.asarray([0.9], np.float32), np.zeros((1, 2)))}
  out = evaluation.evaluate_detection(ds, dets)
  assert out == {"ap": 1.0, "recall": 1.0}
  assert ref_detection(ds, dets) == pytest.approx(out)


def test_det_thresh_is_inclusive_as_the_reference_evaluation():
  # The published evaluation keeps det[:, 4] >= det_thresh (psdb.py,
  # SeqNet eval_func.py), unlike the detector's strict score_thresh: a
  # score equal to the threshold is kept, the next float32 below dropped.
  box = lambda *b: np.asarray(b, np.float32)
  gallery = [_ann("q.jpg", [[0, 0, 40, 80]], [4]),
             _ann("g.jpg", [[0, 0, 40, 80]], [4])]
  queries = [Query("q.jpg", "/x/q.jpg", box(0, 0, 40, 80), 4)]
  ds = SearchDataset("cuhk_sysu", "/x", [], gallery, queries, 0)
  below = np.nextafter(np.float32(0.5), np.float32(0))
  for score, found in ((np.float32(0.5), 1.0), (below, 0.0)):
    dets = {"g.jpg": _det([[0, 0, 40, 80]], [score], _emb(1.0)),
            "q.jpg": _det([[0, 0, 40, 80]], [0.9], _emb(1.0))}
    qemb = np.asarray([[1, 0, 0]], np.float32)
    search = evaluation.evaluate_search(ds, dets, qemb, gallery_size=-1,
                                        det_thresh=0.5)
    assert (search["mAP"], search["top1"]) == (found, found), score
    detection = evaluation.evaluate_detection(ds, dets, det_thresh=0.5)
    # q.jpg's detection (0.9) is always found: 1 or 2 of the 2 GT boxes.
    assert detection["recall"] == pytest.approx((1 + found) / 2), score
