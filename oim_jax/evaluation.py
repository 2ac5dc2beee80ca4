"""Person-search evaluation: search mAP / top-k and detection AP / recall.

The rules are those of the published evaluation code (person_search
`psdb.py`, SeqNet/NAE `eval_func.py`), computed with whole-array NumPy instead
of their per-query, per-image Python loops:

Search (per query; mAP and top-k are means over queries):
  - gallery: CUHK-SYSU the `TestG{G}` list of the query (`G = -1`: the
    protocol's positives plus every other gallery image but the query's own);
    PRW every gallery image but the query's own (`ignore_cam_id=False`: only
    images of other cameras). This is `SearchDataset.gallery_for`.
  - detections with score < det_thresh are dropped; similarity is the dot
    product of the embeddings (computed in float32, or float64 if given).
  - in a gallery image holding the query person (GT box, w x h), the
    detections are taken in decreasing similarity and the first with
    IoU >= min(0.5, w*h / ((w+10)*(h+10))) is the one true positive.
  - count_gt = gallery entries holding the person (also those whose image has
    no detection); AP = average_precision_score(labels, sims) * count_tp /
    count_gt, and 0 when no true positive was found (or count_gt is 0).
  - top-k: any true positive among the k highest similarities. Ties are broken
    as the published `np.argsort(y_score)[::-1]` with a stable sort does: of
    equal scores, the one later in the published concatenation order (gallery
    entries in list order; inside a positive image by decreasing similarity,
    later detection first on ties; inside a negative image detection order)
    ranks higher.
  - an image listed twice in a gallery counts its positives each time in
    count_gt but its detections once (the first listing's box is used).

Detection: over all gallery images, detections with score >= det_thresh
against the GT boxes (`labeled_only`: only pid >= 0, images without one are
skipped). A detection is a true positive for GT box i if IoU >= iou_thresh, i
is its highest-IoU box and it is i's highest-IoU detection (first index on
equal IoUs). recall = TP / #GT, ap = average_precision_score * recall.

Known differences from SeqNet's code, on purpose: SeqNet's full-set (-1)
CUHK-SYSU branch adds the TestG50 images twice (once as negatives) because it
fills `tested` only afterwards; we follow the original person_search code
(each image once). For top-k ties we follow SeqNet's `argsort(...)[::-1]`
(person_search's top-1 used `argmax`, the first of equal scores). SeqNet's
PRW IoU runs in float32 when both boxes are float32; we compute every search
IoU in float64 (as the original does with its int32 GT boxes). The
similarity of two embeddings may differ from the reference's in the last bit
(matrix product vs. per-image product); this only matters for exact ties of
distinct detections.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import operator
from typing import Mapping, Optional, Sequence

from etils import epath
import numpy as np

from oim_jax.data.dataset import SearchDataset

__all__ = ["average_precision_score", "evaluate_search", "evaluate_detection",
           "save_results", "load_results", "format_table"]

Detections = Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]

# Bytes of the [queries, detections] similarity block handled at once.
_BLOCK_BYTES = 64 << 20
# Above this many true positives per query the per-TP counts come from sorted
# rows instead of one comparison pass per true positive.
_SORT_ABOVE_TPS = 8
# Fixed-size galleries holding fewer detections than this fraction of all are
# gathered into [Qc, L] rows; larger ones mask the [Qc, N] block instead.
_GATHER_BELOW = 0.25
TOPK = (1, 5, 10)


def average_precision_score(y_true: np.ndarray, y_score: np.ndarray) -> float:
  """sklearn.metrics.average_precision_score for binary labels.

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score values taken as
  thresholds in decreasing order (tied scores enter together), which equals
  the mean over positives of the precision at the positive's own score.

  Args:
    y_true: [n] bool/0-1 labels.
    y_score: [n] scores.

  Returns:
    The AP; 0.0 when there is no positive (sklearn warns and gives 0 there
    too, and the published code never calls it then).
  """
  y_true = np.asarray(y_true).ravel().astype(bool)
  y_score = np.asarray(y_score).ravel()
  if y_true.shape != y_score.shape:
    raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} "
                     "must have the same length.")
  num_pos = int(y_true.sum())
  if num_pos == 0:
    return 0.0
  s = np.sort(y_score)
  pos_scores = y_score[y_true]
  # For each positive: detections and positives scoring >= its score.
  n_ge = s.size - np.searchsorted(s, pos_scores, side="left")
  p_ge = num_pos - np.searchsorted(np.sort(pos_scores), pos_scores, "left")
  return float(np.sum(p_ge / n_ge) / num_pos)


# ---------------------------------------------------------------------------
# Detections, flattened.


@dataclasses.dataclass
class _Dets:
  """Thresholded detections of the images, concatenated in image order.

  start/count: [I] slice of each image; boxes [N, 4] float64; scores [N];
  emb [N, D]; image [N] image index of each detection.
  """
  start: np.ndarray
  count: np.ndarray
  boxes: np.ndarray
  scores: np.ndarray
  emb: Optional[np.ndarray]
  image: np.ndarray


def _check_entry(name, value, need_emb):
  try:
    boxes, scores, emb = value
  except (TypeError, ValueError):
    raise ValueError(
        f"detections[{name!r}] must be a tuple (boxes[n,4], scores[n], "
        f"embeddings[n,D]); got {type(value).__name__}.") from None
  boxes = np.asarray(boxes)
  scores = np.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"detections[{name!r}] boxes must be [n, 4] (x1, y1, x2, "
                     f"y2); got shape {boxes.shape}.")
  if scores.shape != (boxes.shape[0],):
    raise ValueError(f"detections[{name!r}] scores must be [n] with n = "
                     f"{boxes.shape[0]} boxes; got shape {scores.shape}.")
  if need_emb:
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != boxes.shape[0]:
      raise ValueError(f"detections[{name!r}] embeddings must be [n, D] with "
                       f"n = {boxes.shape[0]}; got shape {emb.shape}.")
  return boxes, scores, emb


def _flatten_detections(names: Sequence[str], detections: Detections,
                        det_thresh: float, need_emb: bool) -> _Dets:
  """Detections of `names` (in that order) with score >= det_thresh."""
  boxes, scores, embs, counts = [], [], [], []
  dim = None
  for name in names:
    value = detections.get(name)
    if value is None:
      counts.append(0)
      continue
    b, s, e = _check_entry(name, value, need_emb)
    keep = s >= det_thresh
    counts.append(int(keep.sum()))
    boxes.append(b[keep])
    scores.append(s[keep])
    if need_emb:
      if dim is None:
        dim = e.shape[1]
      elif e.shape[1] != dim:
        raise ValueError(f"detections[{name!r}] embeddings have dimension "
                         f"{e.shape[1]}, others {dim}.")
      embs.append(e[keep])
  count = np.asarray(counts, np.int64)
  start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
  cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)
  emb = None
  if need_emb:
    emb = cat(embs, (0, dim or 0))
    if not np.all(np.isfinite(emb)):
      raise ValueError("detections: embeddings hold NaN or inf values.")
  return _Dets(start=start, count=count,
               boxes=cat(boxes, (0, 4)).astype(np.float64),
               scores=cat(scores, (0,)), emb=emb,
               image=np.repeat(np.arange(len(names)), count))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of broadcastable box arrays [..., 4], float64, no +1.

  Same operations in the same order as the published `_compute_iou(a, b)`.
  """
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  x1 = np.maximum(a[..., 0], b[..., 0])
  y1 = np.maximum(a[..., 1], b[..., 1])
  x2 = np.minimum(a[..., 2], b[..., 2])
  y2 = np.minimum(a[..., 3], b[..., 3])
  inter = np.maximum(0, x2 - x1) * np.maximum(0, y2 - y1)
  union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) +
           (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    return inter * 1.0 / union


def _small_box_thresh(gt: np.ndarray) -> np.ndarray:
  """min(0.5, w*h / ((w+10)(h+10))) of GT boxes [..., 4] (w, h of the GT)."""
  w = gt[..., 2].astype(np.float64) - gt[..., 0]
  h = gt[..., 3].astype(np.float64) - gt[..., 1]
  return np.minimum(0.5, (w * h * 1.0) / ((w + 10) * (h + 10)))


# ---------------------------------------------------------------------------
# Galleries of the queries.


@dataclasses.dataclass
class _Galleries:
  """Who is searched where, for the evaluated queries (local index j).

  Sparse (CUHK-SYSU fixed G): the images of query j are
  `lists[offsets[j]:offsets[j+1]]` (image indices, first listing only).
  Dense (G = -1, PRW): every image but `own[j]` (-1: none) and, with
  `cams` set, but those with `image_cam == cams[j]`; order for ties:
  the positives of j first (CUHK-SYSU -1), then image order.
  Positives: `pair_q/pair_img/pair_box`, sorted by query and in gallery
  order; count_gt [Q] counts positive listings; pair_entry (sparse) the
  pair's position in `lists`.
  """
  sparse: bool
  lists: Optional[np.ndarray]
  offsets: Optional[np.ndarray]
  own: np.ndarray
  cams: Optional[np.ndarray]
  image_cam: Optional[np.ndarray]
  positives_first: bool
  pair_q: np.ndarray
  pair_img: np.ndarray
  pair_box: np.ndarray
  count_gt: np.ndarray
  pair_entry: Optional[np.ndarray] = None  # Sparse: index into `lists`.

  def ordered_images(self, j: int, num_images: int) -> np.ndarray:
    """Image indices of query j's gallery in list order (ties fallback)."""
    if self.sparse:
      return self.lists[self.offsets[j]:self.offsets[j + 1]]
    keep = np.ones(num_images, bool)
    if self.own[j] >= 0:
      keep[self.own[j]] = False
    if self.cams is not None:
      keep &= self.image_cam != self.cams[j]
    images = np.flatnonzero(keep)
    if self.positives_first:
      lo, hi = np.searchsorted(self.pair_q, [j, j + 1])
      pos = self.pair_img[lo:hi]
      images = np.concatenate([pos, images[~np.isin(images, pos)]])
    return images


def _image_index(dataset: SearchDataset):
  names = [a.name for a in dataset.gallery]
  index = {n: i for i, n in enumerate(names)}
  if len(index) != len(names):
    raise ValueError(f"{dataset.name}: gallery image names are not unique.")
  return names, index


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def _sparse_galleries(dataset, gallery_size, queries, names, index):
  """CUHK-SYSU fixed-size protocols: the TestG lists via gallery_for."""
  lists, offsets = [], [0]
  pair_q, pair_img, pair_box, count_gt, pair_entry = [], [], [], [], []
  for j, q in enumerate(queries):
    entries = dataset.gallery_for(q, gallery_size)
    n = len(entries)
    # C-level iteration throughout: TestG4000 has 11.6M entries.
    entry_names = list(map(_FIRST, entries))
    entry_boxes = list(map(_SECOND, entries))
    try:
      ids = np.fromiter(map(index.__getitem__, entry_names), np.int64, n)
    except KeyError:  # Listed but not a gallery image: give it a slot.
      for name in entry_names:
        if name not in index:
          index[name] = len(names)
          names.append(name)
      ids = np.fromiter(map(index.__getitem__, entry_names), np.int64, n)
    has_box = np.fromiter(
        map(operator.is_not, entry_boxes, itertools.repeat(None)), bool, n)
    # First listing of each image wins (published: `if name in name2sim`).
    if n and np.bincount(ids).max() > 1:
      _, first = np.unique(ids, return_index=True)
      is_first = np.zeros(n, bool)
      is_first[first] = True
    else:
      is_first = np.ones(n, bool)
    lists.append(ids[is_first])
    offsets.append(offsets[-1] + int(is_first.sum()))
    count_gt.append(int(has_box.sum()))
    entry = offsets[-2] + np.cumsum(is_first) - 1
    for k in np.flatnonzero(has_box & is_first):
      pair_q.append(j)
      pair_img.append(ids[k])
      pair_box.append(entries[k][1])
      pair_entry.append(entry[k])
  return _Galleries(
      sparse=True, lists=np.concatenate(lists) if lists else np.zeros(0, int),
      offsets=np.asarray(offsets, np.int64), own=np.full(len(queries), -1),
      cams=None, image_cam=None, positives_first=False,
      pair_q=np.asarray(pair_q, np.int64),
      pair_img=np.asarray(pair_img, np.int64),
      pair_box=np.asarray(pair_box, np.float64).reshape(-1, 4),
      count_gt=np.asarray(count_gt, np.int64),
      pair_entry=np.asarray(pair_entry, np.int64))


def _dense_galleries(dataset, queries, names, index, ignore_cam_id):
  """Whole-test-set galleries: CUHK-SYSU -1 and PRW (see gallery_for)."""
  own = np.asarray([index.get(dataset.queries[q].name, -1) for q in queries],
                   np.int64)
  pair_q, pair_img, pair_box, count_gt = [], [], [], []
  cams = image_cam = None
  if dataset.protocols:
    # gallery_for(-1): the positives of the smallest protocol (each image
    # once, with its last listed box), then every other image.
    smallest = dataset.protocols[min(dataset.protocols)]
    for j, q in enumerate(queries):
      positives = {n: b for n, b in smallest[q] if b is not None}
      for n, box in positives.items():
        i = index.get(n)
        if i is None:
          raise ValueError(
              f"{dataset.name}: query {q}'s positive {n!r} of TestG"
              f"{min(dataset.protocols)} is not a gallery image.")
        pair_q.append(j)
        pair_img.append(i)
        pair_box.append(box)
      count_gt.append(len(positives))
  else:
    # PRW: the images holding the query pid (first such box of each image).
    by_pid: dict[int, list] = {}
    for i, a in enumerate(dataset.gallery):
      pids = np.asarray(a.pids)
      for pid in np.unique(pids[pids >= 0]):
        k = int(np.flatnonzero(pids == pid)[0])
        by_pid.setdefault(int(pid), []).append((i, a.boxes[k]))
    image_cam = np.asarray([a.cam_id for a in dataset.gallery], np.int64)
    if not ignore_cam_id:
      cams = np.asarray([dataset.queries[q].cam_id for q in queries], np.int64)
    for j, q in enumerate(queries):
      ngt = 0
      for i, box in by_pid.get(int(dataset.queries[q].pid), ()):
        if i == own[j] or (cams is not None and image_cam[i] == cams[j]):
          continue
        ngt += 1
        pair_q.append(j)
        pair_img.append(i)
        pair_box.append(box)
      count_gt.append(ngt)
  return _Galleries(
      sparse=False, lists=None, offsets=None, own=own, cams=cams,
      image_cam=image_cam, positives_first=bool(dataset.protocols),
      pair_q=np.asarray(pair_q, np.int64),
      pair_img=np.asarray(pair_img, np.int64),
      pair_box=np.asarray(pair_box, np.float64).reshape(-1, 4),
      count_gt=np.asarray(count_gt, np.int64))


# ---------------------------------------------------------------------------
# Search.


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + c) for each (s, c)."""
  total = int(counts.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  offs = np.cumsum(counts) - counts
  return np.repeat(starts - offs, counts) + np.arange(total)


def _pair_dets(pair_img, dets):
  """Detections of each pair's image, padded: det [P, K], valid [P, K]."""
  count = dets.count[pair_img]
  kmax = max(int(count.max()) if count.size else 0, 1)
  k = np.arange(kmax)
  valid = k[None, :] < count[:, None]
  det = np.where(valid, dets.start[pair_img][:, None] + k[None, :], 0)
  return det, valid


def _true_positives(pair_sims, det, valid, pair_box, dets):
  """The one true positive of each (query, positive image) pair.

  Args:
    pair_sims: [P, K] similarity of the pair's query to the image's
      detections (any value where not valid).
    det, valid: [P, K] detection indices and mask (_pair_dets).
    pair_box: [P, 4] GT box of the query person in the image.
    dets: the flattened detections.

  Returns:
    found [P] bool, tp [P] detection index and score [P] (where found).
    Among the detections passing the IoU threshold, the most similar; on
    equal similarity the later detection (published `argsort(sim)[::-1]`).
  """
  kmax = det.shape[1]
  iou = _iou(dets.boxes[det], pair_box[:, None, :])
  ok = valid & (iou >= _small_box_thresh(pair_box)[:, None])
  cand = np.where(ok, pair_sims, -np.inf)
  best = cand.max(axis=1, initial=-np.inf)
  is_best = ok & (cand == best[:, None])
  last = kmax - 1 - np.argmax(is_best[:, ::-1], axis=1)
  rows = np.arange(det.shape[0])
  return ok.any(axis=1), det[rows, last], pair_sims[rows, last]


def _exact_first_tp_position(j, row, gal, dets, num_images, tp_det):
  """Rank of the first true positive in the published tie order (fallback).

  Builds the published y_score / y_true concatenation for query j from its
  similarity row ([N], by detection index) and sorts it as
  `np.argsort(y_score)[::-1]` with a stable sort. Used only when the best
  true positive ties with other detections.
  """
  scores, labels = [], []
  lo, hi = np.searchsorted(gal.pair_q, [j, j + 1])
  positive = set(gal.pair_img[lo:hi].tolist())
  for i in gal.ordered_images(j, num_images):
    d = np.arange(dets.start[i], dets.start[i] + dets.count[i])
    if d.size == 0:
      continue
    s = row[d]
    lab = np.isin(d, tp_det)
    if i in positive:  # Published: a positive image is sorted by similarity.
      order = np.argsort(s, kind="stable")[::-1]
      s, lab = s[order], lab[order]
    scores.append(s)
    labels.append(lab)
  scores = np.concatenate(scores)
  labels = np.concatenate(labels)
  order = np.argsort(scores, kind="stable")[::-1]
  return int(np.flatnonzero(labels[order])[0])


def _rank_counts(gallery, tp_q, tp_s, count_gt):
  """AP and first-TP rank of a block of queries from their gallery rows.

  Args:
    gallery: [Qc, W] similarity of each query to its gallery detections,
      -inf in the other columns.
    tp_q, tp_s: [T] row and score of each true positive.
    count_gt: [Qc] positives in each query's gallery.

  Returns:
    ap [Qc]; first [Qc], the number of gallery detections scoring above the
    best TP (-1: no TP); tied [Qc] bool, rows whose best TP ties with another
    detection (their rank needs the exact published tie order).
  """
  qc = gallery.shape[0]
  tcount = np.bincount(tp_q, minlength=qc)
  tmax = int(tcount.max()) if tp_q.size else 0
  if tmax == 0:
    return np.zeros(qc), np.full(qc, -1, np.int64), np.zeros(qc, bool)
  # TP scores per row, padded with +inf (reached by no detection).
  slot = np.arange(tp_q.size) - np.repeat(np.cumsum(tcount) - tcount, tcount)
  thr = np.full((qc, tmax), np.inf, gallery.dtype)
  thr[tp_q, slot] = tp_s
  best = np.full(qc, -np.inf, gallery.dtype)
  np.maximum.at(best, tp_q, tp_s)
  best_slot = np.zeros(qc, np.int64)
  np.maximum.at(best_slot, tp_q, np.where(tp_s == best[tp_q], slot, 0))
  has = tcount > 0
  # Gallery detections >= each TP score, and > the best TP score.
  if tmax > _SORT_ABOVE_TPS:
    srt = np.sort(gallery, axis=1)
    w = srt.shape[1]
    n_ge = np.zeros((qc, tmax), np.int64)
    n_gt = np.zeros(qc, np.int64)
    for r in np.flatnonzero(has):
      n_ge[r] = w - np.searchsorted(srt[r], thr[r], side="left")
      n_gt[r] = w - np.searchsorted(srt[r], best[r], side="right")
  else:
    n_ge = np.stack([(gallery >= thr[:, t:t + 1]).sum(axis=1)
                     for t in range(tmax)], axis=1)
    n_gt = (gallery > best[:, None]).sum(axis=1)
  # AP = sum over TPs of the precision at the TP's score / count_gt.
  valid = np.isfinite(thr)
  p_ge = ((thr[:, None, :] >= thr[:, :, None]) & valid[:, None, :]).sum(axis=2)
  prec = np.where(valid, p_ge / np.maximum(n_ge, 1), 0.0)
  ap = np.where(count_gt > 0, prec.sum(axis=1) / np.maximum(count_gt, 1), 0.0)
  first = np.where(has, n_gt, -1)
  tied = has & (n_ge[np.arange(qc), best_slot] - n_gt > 1)
  return ap, first, tied


def _search_block(qemb, dets, gal, rows, num_images):
  """Queries `rows` against all detections at once: [Qc, N] block.

  For the whole-set galleries (CUHK-SYSU -1, PRW) and large fixed lists.
  """
  qc = len(rows)
  sims = qemb[rows] @ dets.emb.T  # [Qc, N]
  lo, hi = np.searchsorted(gal.pair_q, [rows[0], rows[-1] + 1])
  pq = gal.pair_q[lo:hi] - rows[0]
  det, valid = _pair_dets(gal.pair_img[lo:hi], dets)
  found, tp, tp_s = _true_positives(sims[pq[:, None], det], det, valid,
                                    gal.pair_box[lo:hi], dets)
  tp_q, tp_det, tp_s = pq[found], tp[found], tp_s[found]
  if gal.sparse:  # Mask by list membership.
    lists = [gal.lists[gal.offsets[j]:gal.offsets[j + 1]] for j in rows]
    member = np.zeros((qc, num_images), bool)
    member[np.repeat(np.arange(qc), [l.size for l in lists]),
           np.concatenate(lists)] = True
    np.putmask(sims, ~member[:, dets.image], -np.inf)
  else:  # Everything but the query's own image (and same-camera images).
    for r, j in enumerate(rows):
      i = gal.own[j]
      if i >= 0:
        sims[r, dets.start[i]:dets.start[i] + dets.count[i]] = -np.inf
    if gal.cams is not None:
      same = gal.image_cam[dets.image][None, :] == gal.cams[rows][:, None]
      np.putmask(sims, same, -np.inf)
  ap, first, tied = _rank_counts(sims, tp_q, tp_s, gal.count_gt[rows])
  for r in np.flatnonzero(tied):
    first[r] = _exact_first_tp_position(rows[r], sims[r], gal, dets,
                                        num_images, tp_det[tp_q == r])
  return ap, first


def _search_gathered(qemb, dets, gal, num_images):
  """Fixed small lists (TestG100): only each query's gallery detections.

  The similarities are computed image by image (the queries listing the
  image x its detections), about G/num_images of the [Q, N] product, and
  laid out per query in list order: flat[row_start[j] + ...].
  """
  nq = len(gal.offsets) - 1
  e_q = np.repeat(np.arange(nq), np.diff(gal.offsets))  # (query, image)
  e_img = gal.lists
  e_cnt = dets.count[e_img]
  e_flat = np.cumsum(e_cnt) - e_cnt
  row_len = np.bincount(e_q, weights=e_cnt, minlength=nq).astype(np.int64)
  row_start = np.cumsum(row_len) - row_len
  flat = np.empty(int(row_len.sum()), qemb.dtype)
  if flat.size == 0:  # No gallery holds a detection.
    return np.zeros(nq), np.full(nq, -1, np.int64)
  order = np.argsort(e_img, kind="stable")
  cuts = np.flatnonzero(np.diff(e_img[order])) + 1
  for group in np.split(order, cuts):
    i = e_img[group[0]]
    k = dets.count[i]
    if k:
      block = qemb[e_q[group]] @ dets.emb[dets.start[i]:dets.start[i] + k].T
      flat[e_flat[group][:, None] + np.arange(k)] = block
  # True positives, from the same numbers.
  det, valid = _pair_dets(gal.pair_img, dets)
  k = np.arange(det.shape[1])
  at = np.where(valid, e_flat[gal.pair_entry][:, None] + k, 0)
  found, tp, tp_s = _true_positives(flat[at], det, valid, gal.pair_box, dets)
  tp_q, tp_det, tp_s = gal.pair_q[found], tp[found], tp_s[found]
  ap = np.zeros(nq)
  first = np.full(nq, -1, np.int64)
  width = max(int(row_len.max(initial=0)), 1)
  chunk = max(1, _BLOCK_BYTES // (width * qemb.dtype.itemsize))
  for j0 in range(0, nq, chunk):
    rows = np.arange(j0, min(nq, j0 + chunk))
    col = np.arange(width)
    inside = col[None, :] < row_len[rows][:, None]
    gallery = np.where(inside, flat[np.where(
        inside, row_start[rows][:, None] + col, 0)], -np.inf)
    lo, hi = np.searchsorted(tp_q, [j0, rows[-1] + 1])
    ap[rows], first[rows], tied = _rank_counts(
        gallery, tp_q[lo:hi] - j0, tp_s[lo:hi], gal.count_gt[rows])
    for r in np.flatnonzero(tied):
      j = rows[r]
      row = np.full(dets.emb.shape[0], -np.inf, qemb.dtype)
      imgs = gal.lists[gal.offsets[j]:gal.offsets[j + 1]]
      row[_expand_ranges(dets.start[imgs], dets.count[imgs])] = (
          flat[row_start[j]:row_start[j] + row_len[j]])
      first[j] = _exact_first_tp_position(j, row, gal, dets, num_images,
                                          tp_det[tp_q == j])
  return ap, first


def evaluate_search(dataset: SearchDataset,
                    detections: Detections,
                    query_embeddings: np.ndarray,
                    gallery_size: int = 100,
                    det_thresh: float = 0.5,
                    ignore_cam_id: bool = True,
                    query_subset: Optional[Sequence[int]] = None,
                    return_per_query: bool = False) -> dict:
  """Person-search mAP and top-1/5/10 (see the module docstring for rules).

  Args:
    dataset: the SearchDataset (queries, gallery, protocols).
    detections: {image name: (boxes [n, 4] x1y1x2y2, scores [n],
      embeddings [n, D])}; images missing from it have no detection.
    query_embeddings: [num_queries, D], in `dataset.queries` order.
    gallery_size: CUHK-SYSU protocol size (50 ... 4000) or -1 (whole test
      set); ignored for datasets without protocols (PRW).
    det_thresh: detections scoring below are dropped.
    ignore_cam_id: PRW: False searches only images of other cameras.
    query_subset: indices of the queries to evaluate (e.g. the CUHK-SYSU
      occlusion / resolution subsets); None: all.
    return_per_query: also return "ap" [Q] and "first_tp_rank" [Q] (-1: no
      true positive) for the evaluated queries.

  Returns:
    {"mAP", "top1", "top5", "top10"} as fractions in [0, 1].
  """
  qemb = np.asarray(query_embeddings)
  nq = len(dataset.queries)
  if qemb.ndim != 2 or qemb.shape[0] != nq:
    raise ValueError(f"query_embeddings must be [num_queries={nq}, D]; got "
                     f"shape {qemb.shape}.")
  if not np.all(np.isfinite(qemb)):
    raise ValueError("query_embeddings hold NaN or inf values.")
  queries = (np.arange(nq) if query_subset is None else
             np.asarray(query_subset, np.int64).ravel())
  if queries.size and (queries.min() < 0 or queries.max() >= nq):
    raise ValueError(f"query_subset indices must lie in [0, {nq}).")
  if dataset.protocols and not ignore_cam_id:
    raise ValueError(f"{dataset.name}: ignore_cam_id=False needs a dataset "
                     "without fixed protocols and with camera ids (PRW).")
  names, index = _image_index(dataset)
  if dataset.protocols and gallery_size != -1:
    gal = _sparse_galleries(dataset, gallery_size, queries, names, index)
  else:
    gal = _dense_galleries(dataset, queries, names, index, ignore_cam_id)
  dets = _flatten_detections(names, detections, det_thresh, need_emb=True)
  if dets.emb.shape[0] and dets.emb.shape[1] != qemb.shape[1]:
    raise ValueError(f"query_embeddings have dimension {qemb.shape[1]}, "
                     f"detection embeddings {dets.emb.shape[1]}.")
  dtype = np.result_type(qemb.dtype, dets.emb.dtype, np.float32)
  qemb = qemb[queries].astype(dtype)
  dets.emb = dets.emb.astype(dtype)
  num_q = queries.size
  ap = np.zeros(num_q)
  first = np.full(num_q, -1, np.int64)
  num_dets = dets.emb.shape[0]
  if num_dets and num_q:
    per_query = (dets.count[gal.lists].sum() / num_q) if gal.sparse else 0
    if gal.sparse and per_query < _GATHER_BELOW * num_dets:
      ap, first = _search_gathered(qemb, dets, gal, len(names))
    else:
      chunk = max(1, _BLOCK_BYTES // (num_dets * dtype.itemsize))
      for j0 in range(0, num_q, chunk):
        rows = np.arange(j0, min(num_q, j0 + chunk))
        ap[rows], first[rows] = _search_block(qemb, dets, gal, rows,
                                              len(names))
  out = {"mAP": float(ap.mean()) if num_q else 0.0}
  for k in TOPK:
    hit = (first >= 0) & (first < k)
    out[f"top{k}"] = float(hit.mean()) if num_q else 0.0
  if return_per_query:
    out["ap"] = ap
    out["first_tp_rank"] = first
  return out


# ---------------------------------------------------------------------------
# Detection.


def evaluate_detection(dataset: SearchDataset,
                       detections: Detections,
                       det_thresh: float = 0.5,
                       iou_thresh: float = 0.5,
                       labeled_only: bool = False) -> dict:
  """Detection recall and AP over the gallery images (published rules).

  Args:
    dataset: its `gallery` images and GT boxes are used.
    detections: {image name: (boxes [n, 4], scores [n], embeddings)}; the
      embeddings are not used (any value).
    det_thresh: detections scoring below are dropped.
    iou_thresh: IoU for a match (compared in float32, as published).
    labeled_only: only GT boxes with pid >= 0; images without one skipped.

  Returns:
    {"ap", "recall"}; both 0.0 when no GT box or no match.
  """
  images = list(dataset.gallery)
  gts = []
  for a in images:
    boxes = np.asarray(a.boxes, np.float64).reshape(-1, 4)
    if labeled_only:
      boxes = boxes[np.asarray(a.pids).ravel() >= 0]
    gts.append(boxes)
  if labeled_only:
    keep = [i for i, g in enumerate(gts) if len(g)]
    images = [images[i] for i in keep]
    gts = [gts[i] for i in keep]
  dets = _flatten_detections([a.name for a in images], detections, det_thresh,
                             need_emb=False)
  ngt = np.asarray([len(g) for g in gts], np.int64)
  count_gt = int(ngt.sum())
  y_true = np.zeros(dets.scores.size, bool)
  count_tp = 0
  thr = np.float32(iou_thresh)
  # Images in blocks, GT and detections padded: [B, Gmax, Kmax] IoUs.
  block = 512
  for b0 in range(0, len(images), block):
    ids = np.arange(b0, min(len(images), b0 + block))
    gmax = int(ngt[ids].max(initial=0))
    kmax = int(dets.count[ids].max(initial=0))
    if gmax == 0 or kmax == 0:
      continue
    gt = np.zeros((ids.size, gmax, 4))
    gvalid = np.arange(gmax)[None, :] < ngt[ids][:, None]
    gt[gvalid] = np.concatenate([gts[i] for i in ids])
    k = np.arange(kmax)
    dvalid = k[None, :] < dets.count[ids][:, None]
    det_idx = np.where(dvalid, dets.start[ids][:, None] + k[None, :], 0)
    iou = _iou(gt[:, :, None, :], dets.boxes[det_idx][:, None, :, :])
    iou = iou.astype(np.float32)  # Published: a float32 IoU matrix.
    valid = gvalid[:, :, None] & dvalid[:, None, :]
    iou = np.where(valid, iou, np.float32(-1))  # Pads never win an argmax.
    tf = valid & (iou >= thr)
    # Keep (i, j) only if i is j's best GT and j is i's best detection.
    best_gt = np.argmax(iou, axis=1)  # [B, K]
    best_det = np.argmax(iou, axis=2)  # [B, G]
    tf &= np.arange(gmax)[None, :, None] == best_gt[:, None, :]
    tf &= k[None, None, :] == best_det[:, :, None]
    count_tp += int(tf.sum())
    y_true[det_idx[dvalid]] = tf.any(axis=1)[dvalid]
  recall = count_tp / count_gt if count_gt else 0.0
  ap = 0.0
  if count_tp:
    ap = average_precision_score(y_true, dets.scores) * recall
  return {"ap": float(ap), "recall": float(recall)}


# ---------------------------------------------------------------------------
# Raw results on disk, and a printable table.


def save_results(path: str, detections: Detections,
                 query_embeddings: Optional[np.ndarray] = None) -> None:
  """Writes detections (+ query embeddings) to one .npz file.

  Layout: `names` [I] image names, `counts` [I], and the concatenations
  `boxes` [N, 4], `scores` [N], `embeddings` [N, D] in `names` order;
  `query_embeddings` [Q, D] when given. Written atomically (tmp + rename).
  """
  names = sorted(detections)
  parts = [_check_entry(n, detections[n], need_emb=True) for n in names]
  dims = {p[2].shape[1] for p in parts}
  if len(dims) > 1:
    raise ValueError(f"save_results: embedding dimensions differ: {dims}.")
  dim = dims.pop() if dims else (
      0 if query_embeddings is None else np.shape(query_embeddings)[1])
  arrays = dict(
      names=np.asarray(names, dtype=str),
      counts=np.asarray([p[0].shape[0] for p in parts], np.int64),
      boxes=np.concatenate([p[0] for p in parts]).astype(np.float32)
      if parts else np.zeros((0, 4), np.float32),
      scores=np.concatenate([p[1] for p in parts]).astype(np.float32)
      if parts else np.zeros(0, np.float32),
      embeddings=np.concatenate([p[2] for p in parts])
      if parts else np.zeros((0, dim), np.float32))
  if query_embeddings is not None:
    arrays["query_embeddings"] = np.asarray(query_embeddings)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path = epath.Path(path)  # a local path or a URI (gs://...)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


def load_results(path: str):
  """Reads a save_results file.

  Returns:
    (detections {name: (boxes, scores, embeddings)}, query_embeddings or
    None).
  """
  try:
    data = np.load(io.BytesIO(epath.Path(path).read_bytes()),
                   allow_pickle=False)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path}: no saved results; run eval.py to write them.") from None
  need = ("names", "counts", "boxes", "scores", "embeddings")
  missing = [k for k in need if k not in data.files]
  if missing:
    raise ValueError(f"{path}: not a save_results file (missing {missing}).")
  counts = data["counts"]
  ends = np.cumsum(counts)
  boxes, scores, emb = data["boxes"], data["scores"], data["embeddings"]
  if ends.size and (ends[-1] != len(boxes) or len(scores) != len(boxes) or
                    len(emb) != len(boxes)):
    raise ValueError(f"{path}: counts do not match the array lengths.")
  dets = {}
  for name, e, c in zip(data["names"].tolist(), ends, counts):
    s = slice(int(e - c), int(e))
    dets[name] = (boxes[s], scores[s], emb[s])
  q = data["query_embeddings"] if "query_embeddings" in data.files else None
  return dets, q


def format_table(metrics: Mapping) -> str:
  """A markdown table of (possibly nested) metrics; fractions as percent.

  {"gallery_100": {"mAP": 0.9, ...}, "detection": {...}} gives one row per
  leaf, named "gallery_100/mAP". Non-float leaves (arrays) are skipped.
  """
  rows = []

  def walk(prefix, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    elif isinstance(value, (float, int, np.floating, np.integer)) and (
        not isinstance(value, bool)):
      rows.append((prefix, float(value)))

  walk("", metrics)
  width = max([len("metric")] + [len(r[0]) for r in rows])
  lines = [f"| {'metric':<{width}} | value (%) |",
           f"|{'-' * (width + 2)}|-----------|"]
  lines += [f"| {n:<{width}} | {100 * v:9.2f} |" for n, v in rows]
  return "\n".join(lines)
