"""Straightforward per-query loop of the published search / detection rules.

The baseline of bench_evaluation.py: the shape of the published
`eval_search_cuhk` / `eval_search_prw` / `eval_detection` (SeqNet
eval_func.py, person_search psdb.py), on a SearchDataset and the
{name: (boxes, scores, embeddings)} detections of oim_jax.evaluation.
`np.argsort(x)[::-1]` of the published code is taken with a stable sort.
"""

import numpy as np

TOPK = (1, 5, 10)


def average_precision(y_true, y_score):
  """sklearn average_precision_score, step-wise: sum (R_n - R_n-1) P_n."""
  y_true = np.asarray(y_true, np.float64)
  y_score = np.asarray(y_score)
  order = np.argsort(y_score, kind="mergesort")[::-1]
  y_score, y_true = y_score[order], y_true[order]
  thr_idx = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
  tps = np.cumsum(y_true)[thr_idx]
  fps = 1 + thr_idx - tps
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def compute_iou(a, b):
  x1, y1 = max(a[0], b[0]), max(a[1], b[1])
  x2, y2 = min(a[2], b[2]), min(a[3], b[3])
  inter = max(0, x2 - x1) * max(0, y2 - y1)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter * 1.0 / union


def index_detections(detections, det_thresh=0.5):
  """The published name_to_det_feat: detections above the threshold."""
  name_to_det = {}
  for name, (boxes, scores, emb) in detections.items():
    inds = np.where(scores >= det_thresh)[0]
    if len(inds) > 0:
      name_to_det[name] = (boxes[inds].astype(np.float64), emb[inds])
  return name_to_det


def search(dataset, detections, qemb, gallery_size=100, det_thresh=0.5,
           ignore_cam_id=True, queries=None, name_to_det=None):
  """Returns ({"mAP", "top1", "top5", "top10"}, per-query APs)."""
  if name_to_det is None:
    name_to_det = index_detections(detections, det_thresh)
  aps, accs = [], []
  queries = range(len(dataset.queries)) if queries is None else queries
  for i in queries:
    query = dataset.queries[i]
    entries = dataset.gallery_for(i, gallery_size)
    if not ignore_cam_id:
      entries = [(n, b) for n, b in entries
                 if dataset.gallery_image(n).cam_id != query.cam_id]
    feat_q = qemb[i]
    y_true, y_score = [], []
    count_gt = count_tp = 0
    seen = set()
    for name, gt in entries:
      count_gt += gt is not None
      if name not in name_to_det or name in seen:
        continue
      seen.add(name)
      det, feat_g = name_to_det[name]
      sim = feat_g.dot(feat_q)
      label = np.zeros(len(sim), np.int32)
      if gt is not None:
        gt = gt.astype(np.float64)
        w, h = gt[2] - gt[0], gt[3] - gt[1]
        iou_thresh = min(0.5, (w * h * 1.0) / ((w + 10) * (h + 10)))
        inds = np.argsort(sim, kind="stable")[::-1]
        sim, det = sim[inds], det[inds]
        for j, roi in enumerate(det):
          if compute_iou(roi, gt) >= iou_thresh:
            label[j] = 1
            count_tp += 1
            break
      y_true.extend(list(label))
      y_score.extend(list(sim))
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    ap = 0.0
    if count_tp:
      ap = average_precision(y_true, y_score) * count_tp / count_gt
    aps.append(ap)
    y_true = y_true[np.argsort(y_score, kind="stable")[::-1]]
    accs.append([min(1, int(y_true[:k].sum())) for k in TOPK])
  accs = np.mean(accs, axis=0)
  return ({"mAP": float(np.mean(aps)), "top1": float(accs[0]),
           "top5": float(accs[1]), "top10": float(accs[2])}, np.asarray(aps))


def detection(dataset, detections, det_thresh=0.5, iou_thresh=0.5,
              labeled_only=False):
  """eval_detection: {"ap", "recall"}."""
  y_true, y_score = [], []
  count_gt = count_tp = 0
  for anno in dataset.gallery:
    gt_boxes = anno.boxes.astype(np.float64)
    if labeled_only:
      gt_boxes = gt_boxes[anno.pids >= 0]
      if len(gt_boxes) == 0:
        continue
    num_gt = len(gt_boxes)
    det = detections.get(anno.name)
    num_det = 0
    if det is not None:
      keep = det[1] >= det_thresh
      boxes, scores = det[0][keep].astype(np.float64), det[1][keep]
      num_det = len(scores)
    if num_det == 0:
      count_gt += num_gt
      continue
    ious = np.zeros((num_gt, num_det), np.float32)
    for i in range(num_gt):
      for j in range(num_det):
        ious[i, j] = compute_iou(gt_boxes[i], boxes[j])
    tfmat = ious >= iou_thresh
    for j in range(num_det):
      largest = np.argmax(ious[:, j])
      for i in range(num_gt):
        if i != largest:
          tfmat[i, j] = False
    for i in range(num_gt):
      largest = np.argmax(ious[i, :])
      for j in range(num_det):
        if j != largest:
          tfmat[i, j] = False
    for j in range(num_det):
      y_score.append(scores[j])
      y_true.append(tfmat[:, j].any())
    count_tp += int(tfmat.sum())
    count_gt += num_gt
  rate = count_tp / count_gt
  ap = average_precision(y_true, y_score) * rate if count_tp else 0.0
  return {"ap": ap, "recall": rate}
