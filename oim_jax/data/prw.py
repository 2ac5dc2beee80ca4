"""PRW (Person Re-identification in the Wild) for person search.

Files and variables read (relative to `root`):

- `frames/` must be a directory; frames are not opened. Up to `check_images`
  evenly spaced frame paths are tested for existence (a warning for misses).
- `frame_train.mat`, variable `img_index_train`, and `frame_test.mat`,
  variable `img_index_test`: cell arrays of frame names without extension
  ("c1s1_000151"); ".jpg" is appended. Train images / gallery images follow
  these orders.
- `annotations/<frame>.jpg.mat`, one per listed frame: variable `box_new`, or
  if absent `anno_file`, or if absent `anno_previous`: [n, 5] rows
  [pid, x, y, w, h]. pid -2 (any negative pid) marks an unlabeled person.
- `query_info.txt`: one query per line, `pid x y w h frame_name` separated by
  whitespace (lines may end in CRLF; blank lines skipped), frame name without
  extension. Query order is the protocol order.
- `ID_train.mat` (variable `ID_train`), optional: only compared with the ids
  found in the train annotations (a warning when they differ). `ID_test.mat`
  is not read.

Identities. Train: every labeled id found in the train annotations is mapped
to 0..L-1 in increasing order of the original id; the full dataset has 483 ids
(1-478, 480-483 and 932) -> 0..482, so id 932 -> 482 and 483 -> 481
(`train_id_names[k]` is the original id of pid k). Test: ids are numbered by
the order of their first query in query_info.txt (0..449 on the full
dataset); labeled test-frame persons whose id has no query (e.g. train
identities seen in test frames) get the numbers after those, by increasing
original id. Unlabeled persons are -1.

Boxes follow the reference loaders (SeqNet / COAT): annotation rows with raw
w <= 0 or h <= 0 are dropped (counted and logged); then x, y, w, h are
clipped at 0, x2 = x + w, y2 = y + h, and all four truncated to integers.
Query boxes: [x, y, x + w, y + h] truncated to integers, then clipped at 0.
The camera id is the number after "c" in the frame name (`c<cam>s<seq>_...`).
Gallery protocol: every test frame except the query's own
(`SearchDataset.gallery_for`), so `protocols` is empty.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from oim_jax.data import _matio
from oim_jax.data._matio import DatasetFormatError, DatasetNotFoundError
from oim_jax.data.dataset import ImageAnnotation, Query, SearchDataset

__all__ = ["load", "camera_id", "DatasetFormatError", "DatasetNotFoundError",
           "EXPECTED_COUNTS", "ANNOTATION_KEYS"]

log = logging.getLogger(__name__)

HOW_TO_GET = (
    "Download PRW (PRW-v16.04.20) following "
    "https://github.com/liangzheng06/PRW-baseline and extract it so that "
    "<root>/frames/, <root>/annotations/, <root>/frame_train.mat, "
    "<root>/frame_test.mat and <root>/query_info.txt exist; pass that "
    "directory as the root (config.data.root).")

EXPECTED_COUNTS = dict(train_frames=5704, test_frames=6112, queries=2057,
                       train_ids=483)
ANNOTATION_KEYS = ("box_new", "anno_file", "anno_previous")

_CAMERA = re.compile(r"^c(\d+)s(\d+)_")


def camera_id(frame_name: str) -> int:
  """The camera of a PRW frame: "c3s2_044587.jpg" -> 3."""
  m = _CAMERA.match(os.path.basename(frame_name))
  if m is None:
    raise DatasetFormatError(
        f"PRW frame name {frame_name!r} does not start with c<cam>s<seq>_.")
  return int(m.group(1))


def _frame_names(path: str, var: str) -> list[str]:
  mat = _matio.load_mat(path, "PRW split file", HOW_TO_GET)
  try:
    names = _matio.strings(_matio.get_var(mat, path, [var]))
  except (ValueError, TypeError) as e:
    if isinstance(e, DatasetFormatError):
      raise
    raise _matio.format_error(path, e, f"`{var}`: cell array of frame names"
                              ) from e
  return [n if n.endswith(".jpg") else n + ".jpg" for n in names]


def _read_annotation(path: str) -> np.ndarray:
  """[n, 5] float64 rows [pid, x, y, w, h] of one annotation file."""
  mat = _matio.load_mat(path, "PRW annotation file", HOW_TO_GET)
  rows = np.asarray(_matio.unwrap(_matio.get_var(mat, path, ANNOTATION_KEYS)))
  if rows.size == 0:
    return np.zeros((0, 5))
  if rows.dtype == object or rows.ndim != 2 or rows.shape[1] != 5:
    raise DatasetFormatError(
        f"{path}: expected a numeric [n, 5] array [pid, x, y, w, h], got "
        f"shape {rows.shape} dtype {rows.dtype}.")
  return rows.astype(np.float64)


def _annotation_boxes(rows: np.ndarray):
  """[n, 5] raw rows -> (boxes [m, 4] float32, raw ids [m] int64, dropped)."""
  keep = (rows[:, 3] > 0) & (rows[:, 4] > 0)
  rows = rows[keep]
  xywh = np.maximum(rows[:, 1:5], 0)  # Several coordinates are negative.
  xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  boxes = np.trunc(xyxy).astype(np.float32)
  return boxes, rows[:, 0].astype(np.int64), int((~keep).sum())


def _read_queries(path: str):
  """query_info.txt -> [(frame name, box [4] float32, raw id)]."""
  _matio.require_path(path, "PRW query file", HOW_TO_GET)
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetFormatError(f"{path}: cannot read ({e}).") from e
  queries = []
  for line_no, line in enumerate(text.splitlines(), 1):
    tokens = line.split()
    if not tokens:
      continue
    try:
      if len(tokens) != 6:
        raise ValueError(f"{len(tokens)} fields")
      pid = int(float(tokens[0]))
      x, y, w, h = (float(t) for t in tokens[1:5])
    except ValueError as e:
      raise DatasetFormatError(
          f"{path}:{line_no}: expected 'pid x y w h frame_name', got "
          f"{line.strip()!r} ({e}).") from e
    box = np.maximum(np.trunc([x, y, x + w, y + h]), 0).astype(np.float32)
    name = tokens[5] if tokens[5].endswith(".jpg") else tokens[5] + ".jpg"
    queries.append((name, box, pid))
  return queries


def load(root: str, *, check_counts: bool = True,
         check_images: int = 16) -> SearchDataset:
  """Reads PRW from `root`.

  Args:
    root: the dataset directory (holding frames/, annotations/, ...).
    check_counts: warn when the counts differ from EXPECTED_COUNTS.
    check_images: how many frame paths to test for existence (0: none).

  Returns:
    A SearchDataset: train (pids 0..L-1 or -1, cam_id), gallery = test frames
    (test pids by query order, or -1, cam_id), queries (cam_id), num_train_ids
    = L, no protocols, train_id_names = original ids (index = train pid).

  Raises:
    DatasetNotFoundError: root, frames/, or a listed file is missing.
    DatasetFormatError: a file is unreadable or has another layout.
  """
  root = os.path.abspath(os.fspath(root))
  _matio.require_path(root, "PRW root", HOW_TO_GET, is_dir=True)
  frame_dir = _matio.require_path(os.path.join(root, "frames"), "PRW frame",
                                  HOW_TO_GET, is_dir=True)
  ann_dir = _matio.require_path(os.path.join(root, "annotations"),
                                "PRW annotation", HOW_TO_GET, is_dir=True)
  query_path = _matio.require_path(os.path.join(root, "query_info.txt"),
                                   "PRW query file", HOW_TO_GET)
  train_names = _frame_names(os.path.join(root, "frame_train.mat"),
                             "img_index_train")
  test_names = _frame_names(os.path.join(root, "frame_test.mat"),
                            "img_index_test")
  queries_raw = _read_queries(query_path)

  dropped = 0

  def read_split(names):
    nonlocal dropped
    out = []
    for name in names:
      boxes, ids, n = _annotation_boxes(
          _read_annotation(os.path.join(ann_dir, name + ".mat")))
      dropped += n
      out.append((name, boxes, ids))
    return out

  train_raw = read_split(train_names)
  test_raw = read_split(test_names)
  if dropped:
    log.info("PRW: dropped %d boxes with w <= 0 or h <= 0.", dropped)

  # Train ids: all labeled ids, increasing -> 0..L-1.
  all_train = (np.concatenate([ids for _, _, ids in train_raw])
               if train_raw else np.zeros((0,), np.int64))
  train_ids = np.unique(all_train[all_train >= 0])
  id_train_path = os.path.join(root, "ID_train.mat")
  if os.path.isfile(id_train_path):
    listed = np.unique(_matio.to_floats(_matio.get_var(
        _matio.load_mat(id_train_path, "PRW id file", HOW_TO_GET),
        id_train_path, ["ID_train"])).astype(np.int64))
    if not np.array_equal(listed, train_ids):
      log.warning("%s lists %d ids; the train annotations hold %d labeled "
                  "ids; using the annotations' ids.", id_train_path,
                  len(listed), len(train_ids))

  # Test ids: first query order, then the other labeled test ids.
  test_map: dict[int, int] = {}
  for _, _, pid in queries_raw:
    test_map.setdefault(pid, len(test_map))
  all_test = (np.concatenate([ids for _, _, ids in test_raw])
              if test_raw else np.zeros((0,), np.int64))
  for pid in np.unique(all_test[all_test >= 0]):
    test_map.setdefault(int(pid), len(test_map))

  def relabel(ids, keys, values):
    # Vectorised lookup: keys sorted, every labeled id present in keys.
    out = np.full(ids.shape, -1, np.int32)
    labeled = ids >= 0
    out[labeled] = values[np.searchsorted(keys, ids[labeled])]
    return out

  train_keys = train_ids
  train_values = np.arange(len(train_ids), dtype=np.int32)
  test_keys = np.array(sorted(test_map), np.int64)
  test_values = np.array([test_map[k] for k in test_keys], np.int32)

  def annotations(raw, keys, values):
    return [ImageAnnotation(name=n, path=os.path.join(frame_dir, n), boxes=b,
                            pids=relabel(ids, keys, values),
                            cam_id=camera_id(n)) for n, b, ids in raw]

  train = annotations(train_raw, train_keys, train_values)
  gallery = annotations(test_raw, test_keys, test_values)
  queries = [Query(name=n, path=os.path.join(frame_dir, n), box=b,
                   pid=test_map[pid], cam_id=camera_id(n))
             for n, b, pid in queries_raw]
  test_set = set(test_names)
  outside = [q.name for q in queries if q.name not in test_set]
  if outside:
    log.warning("%s: %d queries are in frames not listed in frame_test.mat, "
                "e.g. %s", query_path, len(outside), outside[0])

  if check_counts:
    counts = dict(train_frames=len(train), test_frames=len(gallery),
                  queries=len(queries), train_ids=len(train_ids))
    diff = {k: (counts[k], v) for k, v in EXPECTED_COUNTS.items()
            if counts[k] != v}
    if diff:
      log.warning(
          "PRW at %s: counts differ from the full dataset (partial copy?): %s",
          root, ", ".join(f"{k}={c} (expected {e})"
                          for k, (c, e) in diff.items()))
  _matio.check_image_sample([a.path for a in train + gallery], check_images,
                            f"PRW at {root}", log)
  log.info("PRW: %d train frames (%d ids), %d test frames, %d queries (%d "
           "ids); %d degenerate boxes dropped.", len(train), len(train_ids),
           len(gallery), len(queries), len({q.pid for q in queries}), dropped)
  return SearchDataset(
      name="prw", root=root, train=train, gallery=gallery, queries=queries,
      num_train_ids=len(train_ids), protocols={},
      train_id_names=tuple(int(i) for i in train_ids))
