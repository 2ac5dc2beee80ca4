"""CUHK-SYSU person-search dataset, read from the original MATLAB files.

Files and variables read (relative to `root`, as read by scipy.io.loadmat with
default options; fields are addressed by name, so their order does not matter):

- `Image/SSM/` must be a directory; image files are not opened. Up to
  `check_images` evenly spaced image paths are tested for existence and a
  warning is logged for misses (a partial copy is allowed).
- `annotation/Images.mat`, variable `Img`: struct array, one element per image,
  fields `imname` (char, "s15535.jpg") and `box` (struct array, one element per
  person, field `idlocate` = [x, y, w, h]). `nAppear` and `ishard` are not read.
  A plain numeric `box` array of shape [n, 4] is accepted too.
- `annotation/pool.mat`, variable `pool`: cell array of the gallery image names.
  Train images = all names in `Img` minus `pool`, sorted as strings; gallery
  images are in `pool` order.
- `annotation/test/train_test/Train.mat`, variable `Train`: cell array, one
  cell per labeled train identity holding a 1x1 struct with fields `idname`
  and `scene` (struct array with fields `imname`, `idlocate`). Identity k of
  the cell array gets train pid k (0..L-1). `nAppear`, `ishard` not read.
- `annotation/test/train_test/TestG{N}.mat`, N in 50, 100, 500, 1000, 2000,
  4000, variable `TestG{N}`: struct array, one element per query, fields
  `Query` (1x1 struct: `imname`, `idlocate`) and `Gallery` (struct array:
  `imname`, `idlocate`; `idlocate` empty when the query person is absent).
  At least one TestG file must exist. The smallest present (TestG50 normally)
  defines the queries (query k has test pid k) and the gallery labels: the
  query box and every non-empty Gallery `idlocate` get pid k in the image they
  name; every other gallery person is unlabeled (-1). Other TestG files are
  loaded lazily, on first use of `dataset.protocols[N]` (TestG4000 holds 11.6M
  entries and takes minutes to parse), and must list the same queries.

Box values follow the reference loaders (person_search psdb.py, SeqNet): a
person is matched between files by its (x, y, w, h) truncated to integers;
boxes with raw w <= 0 or h <= 0 are dropped (counted and logged) before that;
then x1 = trunc(x), y1 = trunc(y), x2 = trunc(x) + trunc(w), y2 = trunc(y) +
trunc(h) (for CUHK-SYSU, whose coordinates are integers, this equals
trunc(x + w)), and finally negative coordinates are clipped to 0. A
Train/TestG person with no matching box in Images.mat is counted and logged.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Optional

import numpy as np

from oim_jax.data import _matio
from oim_jax.data._matio import DatasetFormatError, DatasetNotFoundError
from oim_jax.data.dataset import (GalleryEntry, ImageAnnotation, Query,
                                  SearchDataset)

__all__ = ["load", "load_query_subset", "DatasetFormatError",
           "DatasetNotFoundError", "EXPECTED_COUNTS", "PROTOCOL_SIZES",
           "QUERY_SUBSETS"]

log = logging.getLogger(__name__)

HOW_TO_GET = (
    "CUHK-SYSU cannot be downloaded automatically: request it from the "
    "authors via the project page https://github.com/ShuangLI59/person_search "
    "and extract it so that <root>/Image/SSM/*.jpg and <root>/annotation/ "
    "exist; pass that directory as the root (config.data.root).")

# Counts of the full dataset, checked at load time (a warning when they differ).
EXPECTED_COUNTS = dict(train_images=11206, train_ids=5532,
                       gallery_images=6978, queries=2900)
PROTOCOL_SIZES = (50, 100, 500, 1000, 2000, 4000)
# Query subsets of the CUHK-SYSU paper's analysis: name -> file.
QUERY_SUBSETS = {"occlusion": "Occlusion.mat", "resolution": "Resolution.mat"}

_IMAGES = os.path.join("annotation", "Images.mat")
_POOL = os.path.join("annotation", "pool.mat")
_PROTOCOL_DIR = os.path.join("annotation", "test", "train_test")


def _to_xyxy(xywh: np.ndarray) -> np.ndarray:
  """[n, 4] integer (x, y, w, h) -> [n, 4] float32 (x1, y1, x2, y2), >= 0."""
  xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  return np.maximum(xyxy, 0).astype(np.float32)


def _trunc_box(values: np.ndarray, path: str, where: str) -> np.ndarray:
  if values.size != 4:
    raise DatasetFormatError(
        f"{path}: {where}: idlocate has {values.size} values, expected 4 "
        "(x, y, w, h).")
  return np.trunc(values).astype(np.int64)


class _ImageBoxes:
  """All Images.mat boxes: integer xywh in one array, sliced per image."""

  def __init__(self, names: list[str], xywh: np.ndarray, starts: np.ndarray):
    self.names = names
    self.xywh = xywh  # [total, 4] int64, degenerate boxes already dropped.
    self.starts = starts  # [num_images + 1]
    self.xyxy = _to_xyxy(xywh)  # [total, 4] float32, converted once.
    self.index = {n: i for i, n in enumerate(names)}

  def boxes(self, i: int) -> np.ndarray:
    return self.xywh[self.starts[i]:self.starts[i + 1]]

  def match(self, name: str, box: np.ndarray) -> Optional[int]:
    """Row (within the image) of the first box equal to `box`, or None."""
    i = self.index.get(name)
    if i is None:
      return None
    hit = np.flatnonzero((self.boxes(i) == box).all(axis=1))
    return int(hit[0]) if hit.size else None


def _read_images(path: str) -> _ImageBoxes:
  mat = _matio.load_mat(path, "CUHK-SYSU annotation file", HOW_TO_GET)
  img = _matio.get_var(mat, path, ["Img"])
  names, counts, locs = [], [], []
  try:
    for rec in _matio.records(img):
      names.append(_matio.to_str(_matio.field(rec, "imname")))
      box = _matio.unwrap(_matio.field(rec, "box"))
      if isinstance(box, np.ndarray) and box.dtype.names is not None:
        arr = box["idlocate"].reshape(-1, order="F")  # One object per person.
        counts.append(arr.size)
        locs.extend(np.asarray(a, np.float64).reshape(-1) for a in arr)
      elif isinstance(box, (np.void, np.ndarray)) and (
          isinstance(box, np.void) or box.dtype == object):
        persons = _matio.records(box)  # A cell array of structs.
        counts.append(len(persons))
        locs.extend(_matio.to_floats(_matio.field(r, "idlocate"))
                    for r in persons)
      else:  # A plain [n, 4] numeric array.
        arr = np.asarray(box, np.float64).reshape(-1, 4)
        counts.append(len(arr))
        locs.extend(arr)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    raise _matio.format_error(
        path, e, "`Img` struct array with fields imname and box (struct array "
        "with field idlocate = [x, y, w, h])") from e
  bad = [i for i, a in enumerate(locs) if a.size != 4]
  if bad:
    raise DatasetFormatError(
        f"{path}: {len(bad)} idlocate entries do not have 4 values "
        f"(first has {locs[bad[0]].size}).")
  raw = np.stack(locs) if locs else np.zeros((0, 4))
  image_of_box = np.repeat(np.arange(len(names)), counts)
  keep = (raw[:, 2] > 0) & (raw[:, 3] > 0)
  dropped = int((~keep).sum())
  if dropped:
    log.info("%s: dropped %d boxes with w <= 0 or h <= 0.", path, dropped)
  kept_counts = np.bincount(image_of_box[keep], minlength=len(names))
  starts = np.concatenate([[0], np.cumsum(kept_counts)])
  result = _ImageBoxes(names, np.trunc(raw[keep]).astype(np.int64), starts)
  result.num_dropped = dropped
  if len(result.index) != len(names):
    raise DatasetFormatError(f"{path}: duplicate image names in Img.")
  return result


def _read_pool(path: str) -> list[str]:
  mat = _matio.load_mat(path, "CUHK-SYSU annotation file", HOW_TO_GET)
  try:
    return _matio.strings(_matio.get_var(mat, path, ["pool"]))
  except (ValueError, TypeError) as e:
    if isinstance(e, DatasetFormatError):
      raise
    raise _matio.format_error(path, e, "`pool`: cell array of image names"
                              ) from e


def _read_train(path: str) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
  """Train.mat -> [(idname, [(image name, int xywh[4]), ...]), ...]."""
  mat = _matio.load_mat(path, "CUHK-SYSU annotation file", HOW_TO_GET)
  train = _matio.get_var(mat, path, ["Train"])
  identities = []
  try:
    for k, ident in enumerate(_matio.records(train)):
      idname = _matio.to_str(_matio.field(ident, "idname"))
      scenes = []
      for s in _matio.records(_matio.unwrap(_matio.field(ident, "scene"))):
        scenes.append((_matio.to_str(_matio.field(s, "imname")), _trunc_box(
            _matio.to_floats(_matio.field(s, "idlocate")), path,
            f"identity {k}")))
      identities.append((idname, scenes))
  except (KeyError, ValueError, TypeError, IndexError) as e:
    if isinstance(e, DatasetFormatError):
      raise
    raise _matio.format_error(
        path, e, "`Train`: cell array of 1x1 structs with fields idname and "
        "scene (struct array with fields imname, idlocate)") from e
  return identities


def _read_protocol(path: str, size: Optional[int]):
  """TestG{size}.mat (size None: the file's only variable) -> lists.

  Returns:
    queries: [(image name, int xywh[4])] per query.
    galleries: per query, [(image name, int xywh[4] or None)].
  """
  mat = _matio.load_mat(path, "CUHK-SYSU protocol file", HOW_TO_GET)
  if size is None:
    names = [k for k in mat if not k.startswith("__")]
    if len(names) != 1:
      raise DatasetFormatError(
          f"{path}: expected one variable (a TestG-layout struct array), "
          f"found {sorted(names)}.")
    var = names[0]
  else:
    var = f"TestG{size}"
  protocol = _matio.get_var(mat, path, [var])
  queries, galleries = [], []
  try:
    for k, item in enumerate(_matio.records(protocol)):
      q = _matio.records(_matio.unwrap(_matio.field(item, "Query")))[0]
      queries.append((_matio.to_str(_matio.field(q, "imname")), _trunc_box(
          _matio.to_floats(_matio.field(q, "idlocate")), path, f"query {k}")))
      gallery = _matio.unwrap(_matio.field(item, "Gallery"))
      if isinstance(gallery, np.ndarray) and gallery.dtype.names is not None:
        names = gallery["imname"].reshape(-1, order="F")  # Column access.
        locs = gallery["idlocate"].reshape(-1, order="F")
      else:  # One record, or a cell array of structs.
        rows = _matio.records(gallery)
        names = [_matio.field(r, "imname") for r in rows]
        locs = [_matio.field(r, "idlocate") for r in rows]
      entries = []
      for name, loc in zip(names, locs):
        loc = _matio.to_floats(loc)
        entries.append((_matio.to_str(name), _trunc_box(
            loc, path, f"query {k} gallery") if loc.size else None))
      galleries.append(entries)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    if isinstance(e, DatasetFormatError):
      raise
    raise _matio.format_error(
        path, e, f"`{var}`: struct array with fields Query (imname, idlocate) "
        "and Gallery (struct array: imname, idlocate)") from e
  return queries, galleries


def _protocol_entries(galleries) -> list[list[GalleryEntry]]:
  """Per-query [(name, int xywh or None)] -> [(name, float32 xyxy or None)]."""
  present = [b for g in galleries for _, b in g if b is not None]
  xyxy = iter(_to_xyxy(np.stack(present)) if present else ())
  return [[(n, None if b is None else next(xyxy)) for n, b in g]
          for g in galleries]


def _load_other_protocol(path: str, size: int,
                         queries: list[tuple[str, np.ndarray]]):
  """Loads a lazily read TestG file and checks it lists the same queries."""
  other_queries, galleries = _read_protocol(path, size)
  same = len(other_queries) == len(queries) and all(
      a[0] == b[0] and np.array_equal(a[1], b[1])
      for a, b in zip(other_queries, queries))
  if not same:
    raise DatasetFormatError(
        f"{path}: its queries differ from those of the first TestG file "
        f"({len(other_queries)} vs {len(queries)} queries, or different "
        "images/boxes); all protocol files must come from one dataset copy.")
  log.info("Loaded CUHK-SYSU protocol %s.", path)
  return _protocol_entries(galleries)


def load_query_subset(dataset: SearchDataset, name: str
                      ) -> Optional[tuple[np.ndarray, SearchDataset]]:
  """A CUHK-SYSU query subset ("occlusion" / "resolution"), if its file exists.

  Args:
    dataset: the loaded CUHK-SYSU dataset (its root holds the file).
    name: a key of QUERY_SUBSETS.
  Returns:
    None when the file is absent, else (indices int64 [S] into
    dataset.queries, view): `view` is a SearchDataset with the same gallery,
    the S subset queries and one protocol, {N: the file's gallery lists}
    (N = the longest list), to pass to `evaluation.evaluate_search` with
    `gallery_size=N` and the query embeddings `emb[indices]`.
  Raises:
    DatasetFormatError: unreadable file, or a query that is not one of the
      dataset's queries.
  """
  if name not in QUERY_SUBSETS:
    raise ValueError(f"unknown CUHK-SYSU query subset {name!r}; use one of "
                     f"{sorted(QUERY_SUBSETS)}")
  path = os.path.join(dataset.root, _PROTOCOL_DIR, QUERY_SUBSETS[name])
  if not os.path.isfile(path):
    return None
  queries, galleries = _read_protocol(path, None)
  where = {(q.name, tuple(np.asarray(q.box, np.float32).tolist())): k
           for k, q in enumerate(dataset.queries)}
  indices = []
  for k, (image, xywh) in enumerate(queries):
    box = _to_xyxy(xywh[None].astype(np.float32))[0]
    key = (image, tuple(box.astype(np.float32).tolist()))
    if key not in where:
      raise DatasetFormatError(
          f"{path}: query {k} ({image}, box x,y,w,h {xywh.tolist()}) is not "
          "one of the queries of the TestG files; the subset file and the "
          "protocol files must come from one dataset copy.")
    indices.append(where[key])
  indices = np.asarray(indices, np.int64)
  size = max((len(g) for g in galleries), default=0)
  view = SearchDataset(
      name=f"{dataset.name}/{name}", root=dataset.root, train=[],
      gallery=dataset.gallery,
      queries=[dataset.queries[k] for k in indices],
      num_train_ids=dataset.num_train_ids,
      protocols={size: _protocol_entries(galleries)})
  log.info("CUHK-SYSU %s subset: %d queries, galleries of up to %d images "
           "(%s).", name, len(indices), size, path)
  return indices, view


class _LazyProtocols(dict):
  """{gallery_size: per-query gallery lists}, each read on first access."""

  def __init__(self, loaders: dict[int, Callable[[], list]],
               loaded: Optional[dict[int, list]] = None):
    super().__init__({k: None for k in sorted(loaders)})
    self._loaders = loaders
    for k, v in (loaded or {}).items():
      super().__setitem__(k, v)

  def __getitem__(self, key):
    value = super().__getitem__(key)
    if value is None:
      value = self._loaders[key]()
      super().__setitem__(key, value)
    return value

  def get(self, key, default=None):
    return self[key] if key in self else default

  def values(self):
    return [self[k] for k in self]

  def items(self):
    return [(k, self[k]) for k in self]

  def __reduce__(self):  # Pickle what is loaded, not what is not.
    loaded = {k: v for k, v in dict.items(self) if v is not None}
    return (self.__class__, (self._loaders, loaded))

  def __repr__(self):
    state = {k: ("<not loaded>" if v is None else f"<{len(v)} queries>")
             for k, v in dict.items(self)}
    return f"_LazyProtocols({state})"


def _warn_counts(counts: dict[str, int], expected: dict[str, int], what: str):
  diff = {k: (counts[k], v) for k, v in expected.items() if counts[k] != v}
  if diff:
    log.warning(
        "%s: counts differ from the full dataset (a partial copy or another "
        "dataset in this format?): %s", what,
        ", ".join(f"{k}={c} (expected {e})" for k, (c, e) in diff.items()))


def load(root: str, *, name: str = "cuhk_sysu", check_counts: bool = True,
         eager_protocols: bool = False,
         check_images: int = 16) -> SearchDataset:
  """Reads CUHK-SYSU (or a dataset written in its format) from `root`.

  Args:
    root: the dataset directory, holding Image/SSM/ and annotation/.
    name: SearchDataset.name ("synthetic" for the generated dataset).
    check_counts: warn when the counts differ from EXPECTED_COUNTS.
    eager_protocols: parse every TestG file now instead of on first use.
    check_images: how many image paths to test for existence (0: none).

  Returns:
    A SearchDataset: train (pids 0..L-1 or -1), gallery (test pids = query
    index, or -1), queries, num_train_ids = L, protocols = {N: per-query list
    of (gallery image name, box [4] float32 or None)}, train_id_names = the
    Train.mat idnames.

  Raises:
    DatasetNotFoundError: root, Image/SSM, or an annotation file is missing.
    DatasetFormatError: a .mat file is unreadable or has another layout.
  """
  root = os.path.abspath(os.fspath(root))
  _matio.require_path(root, "CUHK-SYSU root", HOW_TO_GET, is_dir=True)
  image_dir = _matio.require_path(os.path.join(root, "Image", "SSM"),
                                  "CUHK-SYSU image", HOW_TO_GET, is_dir=True)
  images_path = os.path.join(root, _IMAGES)
  pool_path = os.path.join(root, _POOL)
  train_path = os.path.join(root, _PROTOCOL_DIR, "Train.mat")
  protocol_paths = {n: os.path.join(root, _PROTOCOL_DIR, f"TestG{n}.mat")
                    for n in PROTOCOL_SIZES}
  for p in (images_path, pool_path, train_path):
    _matio.require_path(p, "CUHK-SYSU annotation file", HOW_TO_GET)
  sizes = [n for n, p in protocol_paths.items() if os.path.isfile(p)]
  if not sizes:
    raise DatasetNotFoundError(
        f"CUHK-SYSU protocol file: file not found: {protocol_paths[50]} (no "
        f"TestG{{{','.join(map(str, PROTOCOL_SIZES))}}}.mat in "
        f"{os.path.dirname(protocol_paths[50])})\n{HOW_TO_GET}")

  boxes = _read_images(images_path)
  pool = _read_pool(pool_path)
  identities = _read_train(train_path)
  first = sizes[0]
  queries_raw, galleries = _read_protocol(protocol_paths[first], first)

  pids = np.full(len(boxes.xywh), -1, np.int64)  # Per box, global rows.
  unmatched = 0

  def assign(image_name, box, pid, allowed):
    nonlocal unmatched
    row = boxes.match(image_name, box) if image_name in allowed else None
    if row is None:
      unmatched += 1
    else:
      pids[boxes.starts[boxes.index[image_name]] + row] = pid

  pool_set = set(pool)
  missing_pool = [n for n in pool if n not in boxes.index]
  if missing_pool:
    log.warning("%s: %d pool images are not in %s (skipped), e.g. %s",
                pool_path, len(missing_pool), images_path, missing_pool[0])
  train_names = sorted(set(boxes.names) - pool_set)
  train_set = set(train_names)
  for pid, (_, scenes) in enumerate(identities):
    for image_name, box in scenes:
      assign(image_name, box, pid, train_set)
  train_unmatched, unmatched = unmatched, 0
  for k, ((image_name, box), gallery) in enumerate(zip(queries_raw,
                                                       galleries)):
    assign(image_name, box, k, pool_set)
    for image_name, b in gallery:
      if b is not None:
        assign(image_name, b, k, pool_set)
  for count, what in ((train_unmatched, train_path),
                      (unmatched, protocol_paths[first])):
    if count:
      log.warning("%s: %d persons have no matching box (same truncated x, y, "
                  "w, h) in an image of the split in %s; ignored.", what,
                  count, images_path)

  def annotation(image_name):
    i = boxes.index[image_name]
    s, e = boxes.starts[i], boxes.starts[i + 1]
    return ImageAnnotation(
        name=image_name, path=os.path.join(image_dir, image_name),
        boxes=boxes.xyxy[s:e], pids=pids[s:e].astype(np.int32))

  train = [annotation(n) for n in train_names]
  gallery = [annotation(n) for n in pool if n in boxes.index]
  queries = [
      Query(name=n, path=os.path.join(image_dir, n), box=_to_xyxy(b[None])[0],
            pid=k) for k, (n, b) in enumerate(queries_raw)]
  empty = sum(len(a.boxes) == 0 for a in train + gallery)
  if empty:
    log.warning("CUHK-SYSU: %d images have no (valid) person box.", empty)

  # Module-level partials keep the dataset picklable (e.g. for data workers).
  loaders = {n: functools.partial(_load_other_protocol, protocol_paths[n], n,
                                  queries_raw) for n in sizes}
  protocols = _LazyProtocols(loaders, {first: _protocol_entries(galleries)})
  if eager_protocols:
    protocols.values()

  if check_counts:
    _warn_counts(dict(train_images=len(train), train_ids=len(identities),
                      gallery_images=len(gallery), queries=len(queries)),
                 EXPECTED_COUNTS, f"CUHK-SYSU at {root}")
  _matio.check_image_sample([a.path for a in train + gallery], check_images,
                            f"CUHK-SYSU at {root}", log)
  log.info("CUHK-SYSU: %d train images (%d ids), %d gallery images, %d "
           "queries, protocols %s; %d degenerate boxes dropped.", len(train),
           len(identities), len(gallery), len(queries), sizes,
           boxes.num_dropped)
  return SearchDataset(
      name=name, root=root, train=train, gallery=gallery, queries=queries,
      num_train_ids=len(identities), protocols=protocols,
      train_id_names=tuple(idname for idname, _ in identities))
