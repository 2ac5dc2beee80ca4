"""Top-k inner-product search over an embedding matrix: exact, or
approximate with faiss (optional dependency: pip install faiss-cpu).

Both return candidates best first as (ids [k], similarities [k]); ties in
similarity are ordered by id, so the exact order is a prefix of a stable
sort of the whole matrix.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


def similarities(matrix: np.ndarray, query: np.ndarray,
                 chunk_rows: int = 1 << 16) -> np.ndarray:
  """[n] inner products of the rows of `matrix` [n, D] with `query` [D],
  in chunks of `chunk_rows` (bounds the temporary memory of a memmap)."""
  sims = np.empty((len(matrix),), np.float32)
  for i in range(0, len(matrix), chunk_rows):
    sims[i:i + chunk_rows] = matrix[i:i + chunk_rows] @ query
  return sims


def row_similarities(matrix: np.ndarray, rows: np.ndarray, query: np.ndarray,
                     chunk_rows: int = 1 << 16) -> np.ndarray:
  """[len(rows)] inner products of matrix[rows] [m, D] with `query` [D]:
  reads only those rows (a selective filter costs what it keeps)."""
  sims = np.empty((len(rows),), np.float32)
  for i in range(0, len(rows), chunk_rows):
    sims[i:i + chunk_rows] = matrix[rows[i:i + chunk_rows]] @ query
  return sims


def exact_top(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k best of `sims` [n], and ties: every id at least as similar as
  the k-th best (more than k when it is tied), in (similarity desc, id)
  order."""
  n = len(sims)
  if k >= n:
    cand = np.arange(n)
  else:
    kth = -np.partition(-sims, k - 1)[k - 1]
    cand = np.flatnonzero(sims >= kth)
  order = cand[np.lexsort((cand, -sims[cand]))]
  return order, sims[order]


def have_faiss() -> bool:
  try:
    import faiss  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


class FaissIVF:
  """An inverted-file index (faiss IndexIVFFlat, inner product) over the
  first `rows` rows of a matrix.

  nlist = 2 sqrt(rows) clusters trained by k-means on up to 64 x nlist rows;
  a query scans the `nprobe` nearest clusters (default max(32, nlist / 16):
  about 1/16 of the rows at scale, all of them below ~1,250 rows). Its
  recall against exact search is measured by bench/bench_search_index.py
  (docs/search_index.md).
  """

  def __init__(self, index, rows: int):
    self.index = index
    self.rows = rows

  @classmethod
  def build(cls, matrix: np.ndarray, seed: int = 0) -> "FaissIVF":
    faiss = _faiss()
    n, dim = matrix.shape
    nlist = max(1, min(n // 39, int(2 * math.sqrt(n))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist,
                               faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))
    index.cp.seed = seed
    index.train(np.ascontiguousarray(matrix[sample], np.float32))
    for i in range(0, n, 1 << 16):
      index.add(np.ascontiguousarray(matrix[i:i + (1 << 16)], np.float32))
    return cls(index, n)

  def save(self, path: str):
    tmp = path + ".tmp"
    _faiss().write_index(self.index, tmp)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "FaissIVF":
    index = _faiss().read_index(path)
    return cls(index, index.ntotal)

  def default_nprobe(self) -> int:
    return min(self.index.nlist, max(32, self.index.nlist // 16))

  def top(self, query: np.ndarray, k: int, nprobe: Optional[int] = None,
          mask: Optional[np.ndarray] = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Approximately the k most similar of the indexed rows, best first.

    Args:
      query: [D].
      k: candidates wanted (fewer come back when the probed clusters hold
        fewer rows, or fewer rows that `mask` keeps).
      nprobe: clusters scanned (default `default_nprobe()`; at most nlist,
        which scans every row: exact, at the cost of a full scan).
      mask: optional bool [>= rows]: only rows where it is True are
        returned (faiss skips the others while it scans).
    """
    faiss = _faiss()
    nprobe = self.default_nprobe() if nprobe is None else int(nprobe)
    if nprobe < 1:
      raise ValueError(f"nprobe={nprobe}: scan at least 1 cluster")
    nprobe = min(nprobe, self.index.nlist)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if mask is not None:
      # faiss reads bit (id & 7) of byte (id >> 3): little-endian packing.
      bits = np.packbits(np.asarray(mask[:self.rows], bool),
                         bitorder="little")
      selector = faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(bits))
      params.sel = selector
    k = min(k, self.rows)
    sims, ids = self.index.search(
        np.ascontiguousarray(query, np.float32)[None], k, params=params)
    ids, sims = ids[0], sims[0]
    ok = ids >= 0  # fewer than k rows in the probed clusters
    ids, sims = ids[ok], sims[ok]
    order = np.lexsort((ids, -sims))
    return ids[order].astype(np.int64), sims[order]


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("approximate search needs faiss: pip install "
                      "faiss-cpu (or use exact search)") from e
  return faiss
