"""Dataset-independent containers for person-search annotations.

Boxes are (x1, y1, x2, y2) float32 pixels, no +1 (width = x2 - x1).
Identity labels (pids): train identities 0..L-1, test identities numbered by
query order (0..num_queries-1 where distinct), -1 for an unlabeled person
(oim_jax/pids.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageAnnotation:
  """One scene image and the persons annotated in it.

  Attributes:
    name: the image file name as in the dataset ("s15535.jpg", "c1s1_000151.jpg").
    path: absolute path of the image file.
    boxes: [n, 4] float32 person boxes, (x1, y1, x2, y2).
    pids: [n] int32 identity of each box, -1 unlabeled.
    cam_id: camera index (PRW), -1 when the dataset has none.
  """
  name: str
  path: str
  boxes: np.ndarray
  pids: np.ndarray
  cam_id: int = -1


@dataclasses.dataclass(frozen=True)
class Query:
  """A query person: one ground-truth box in one scene image."""
  name: str
  path: str
  box: np.ndarray  # [4] float32
  pid: int
  cam_id: int = -1


# One gallery entry of a query's protocol: the gallery image name and the
# query person's ground-truth box in it ([4] float32), or None when absent.
GalleryEntry = tuple[str, Optional[np.ndarray]]


@dataclasses.dataclass
class SearchDataset:
  """A person-search dataset: train images, gallery images, queries.

  Attributes:
    name: "cuhk_sysu", "prw" or "synthetic".
    root: directory the dataset was read from.
    train: training images (labeled pids 0..num_train_ids-1, or -1).
    gallery: test images (the search gallery).
    queries: query persons, in protocol order.
    num_train_ids: L, the number of labeled training identities (LUT rows).
    protocols: CUHK-SYSU style fixed galleries, {gallery_size: [per query
      list of GalleryEntry]}; empty for datasets whose gallery is "every test
      image but the query's own" (PRW).
    train_id_names: original identity names/numbers, index = train pid.
  """
  name: str
  root: str
  train: list[ImageAnnotation]
  gallery: list[ImageAnnotation]
  queries: list[Query]
  num_train_ids: int
  protocols: dict[int, list[list[GalleryEntry]]] = dataclasses.field(
      default_factory=dict)
  train_id_names: Sequence = ()

  def __post_init__(self):
    self._gallery_index = {a.name: i for i, a in enumerate(self.gallery)}

  def gallery_image(self, name: str) -> ImageAnnotation:
    return self.gallery[self._gallery_index[name]]

  def gallery_for(self, query_index: int,
                  gallery_size: int = 100) -> list[GalleryEntry]:
    """The gallery a query is searched in, per the dataset's protocol.

    CUHK-SYSU: the TestG{gallery_size} list; gallery_size -1 means every
    gallery image except the query's own, the protocol's positives carrying
    their boxes and every other image a negative (counted once).
    PRW (no fixed protocols): every gallery image except the query's own, with
    the query person's box where the annotation holds its pid; gallery_size is
    ignored.
    """
    query = self.queries[query_index]
    if self.protocols:
      if gallery_size in self.protocols:
        return list(self.protocols[gallery_size][query_index])
      if gallery_size != -1:
        raise ValueError(
            f"{self.name}: no protocol for gallery_size={gallery_size}; "
            f"available: {sorted(self.protocols)} or -1 (whole test set).")
      # Every TestG list holds all of the query's positives: read the
      # smallest (TestG4000 is slow to load).
      smallest = self.protocols[min(self.protocols)][query_index]
      positives = {n: b for n, b in smallest if b is not None}
      entries = list(positives.items())
      entries += [(a.name, None) for a in self.gallery
                  if a.name != query.name and a.name not in positives]
      return entries
    entries = []
    for a in self.gallery:
      if a.name == query.name:
        continue
      hit = np.flatnonzero(a.pids == query.pid)
      entries.append((a.name, a.boxes[hit[0]].astype(np.float32)
                      if hit.size else None))
    return entries


def query_annotations(queries: Sequence[Query]) -> list[ImageAnnotation]:
  """Queries as one-box ImageAnnotations, to run them through eval_iterator."""
  return [ImageAnnotation(q.name, q.path,
                          np.asarray(q.box, np.float32).reshape(1, 4),
                          np.asarray([q.pid], np.int32), q.cam_id)
          for q in queries]


def split_annotations(dataset: "SearchDataset", split: str) -> list[ImageAnnotation]:
  """The images of a SearchDataset split; "queries" as one-box images."""
  if split == "queries":
    return query_annotations(dataset.queries)
  if split not in ("train", "gallery"):
    raise ValueError(f"split must be train, gallery or queries, got {split!r}")
  return list(getattr(dataset, split))
