"""A person-search index on disk: every detection of a gallery, searchable.

Layout of an index directory (format version `VERSION`; nothing is pickled):

  index.json      {"format", "version", "embedding_dim", "workdir",
                   "checkpoint_step", "det_thresh", "sampling", "config"}
  meta.sqlite     tables sources, frames, detections (below)
  embeddings.f32  float32 [rows, embedding_dim], row = detections.id
  approximate.faiss  optional faiss index of the embeddings (derived data,
                  rebuilt when missing or stale; see vector_search.py)

Crash safety: a batch appends its embeddings to embeddings.f32 (flushed and
fsynced), then commits its detections, frames and the new row count in one
SQLite transaction. Opening truncates embeddings.f32 to the committed row
count, so a crash loses at most the batch that was being written.

  sources(id, path UNIQUE, kind, size, mtime, status, error, num_frames)
    status: "partial" (some frames indexed), "done" or "failed" (error says
    why; a rerun tries it again)
  frames(source_id, frame, timestamp, height, width)  every indexed frame,
    with or without detections, so that a rerun skips it
  detections(id, source_id, frame, x1, y1, x2, y2, score)  boxes in the
    frame's pixels
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import sqlite3
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from oim_jax import vector_search

FORMAT = "oim-jax-search-index"
VERSION = 1
MANIFEST = "index.json"
DATABASE = "meta.sqlite"
EMBEDDINGS = "embeddings.f32"
ANN = "approximate.faiss"
# From this many detections on, search method "auto" is approximate.
APPROXIMATE_FROM = 1_000_000
# Filters that keep at most this share of the rows are searched exactly over
# the kept rows, also by "approximate": reading them costs less than faiss's
# default scan of ~1/16 of the rows, and the result is exact.
SELECTIVE = 1 / 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources(
  id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
  size INTEGER, mtime REAL, status TEXT NOT NULL, error TEXT,
  num_frames INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS frames(
  source_id INTEGER NOT NULL, frame INTEGER NOT NULL, timestamp REAL,
  height INTEGER, width INTEGER, PRIMARY KEY(source_id, frame));
CREATE TABLE IF NOT EXISTS detections(
  id INTEGER PRIMARY KEY, source_id INTEGER NOT NULL, frame INTEGER NOT NULL,
  x1 REAL, y1 REAL, x2 REAL, y2 REAL, score REAL);
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value INTEGER);
"""


@dataclasses.dataclass(frozen=True)
class Match:
  """One ranked detection (of an index, or of search_lib's folder search)."""
  rank: int
  image: str  # path of the image or video file
  box: np.ndarray  # [4] x1, y1, x2, y2 in the frame's pixels
  similarity: float  # inner product with the query embedding
  score: float  # detection confidence
  frame: int = 0  # frame index in a video (0 for an image)
  timestamp: Optional[float] = None  # seconds, videos only
  id: int = -1  # row of the index's embedding matrix


class SearchIndex:
  """An open index directory (see the module docstring).

  Attributes:
    path: the directory.
    manifest: index.json's content.
    dim: embedding dimension.
  """

  def __init__(self, path: str, manifest: dict):
    self.path = path
    self.manifest = manifest
    self.dim = int(manifest["embedding_dim"])
    self.db = sqlite3.connect(os.path.join(path, DATABASE))
    self.db.executescript(_SCHEMA)
    self._emb_path = os.path.join(path, EMBEDDINGS)
    self._truncate_uncommitted()
    self._matrix = None
    self._ann = None
    self._columns = None  # (source_id, score, timestamp) per row, cached

  # -- opening ---------------------------------------------------------------

  @classmethod
  def create_or_open(cls, path: str, manifest: dict) -> "SearchIndex":
    """Opens `path`, or creates it with `manifest` (format/version added).

    Raises:
      ValueError: the existing index was made with another model, checkpoint
        step, threshold or sampling: extending it would mix embeddings.
    """
    file = os.path.join(path, MANIFEST)
    if os.path.exists(file):
      index = cls.open(path)
      for key in ("embedding_dim", "checkpoint_step", "det_thresh",
                  "sampling"):
        if index.manifest.get(key) != manifest.get(key):
          index.close()
          raise ValueError(
              f"{file} was built with {key}={index.manifest.get(key)!r}, this "
              f"run has {manifest.get(key)!r}: rankings would mix them. Use "
              "another --out, or the same settings.")
      return index
    os.makedirs(path, exist_ok=True)
    manifest = dict(manifest, format=FORMAT, version=VERSION)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(tmp, file)
    return cls(path, manifest)

  @classmethod
  def open(cls, path: str) -> "SearchIndex":
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
      raise FileNotFoundError(
          f"{file} not found: --index must be a directory written by "
          "index.py.")
    with open(file) as f:
      manifest = json.load(f)
    if manifest.get("format") != FORMAT:
      raise ValueError(f"{file} is not an oim-jax search index")
    if manifest.get("version") != VERSION:
      raise ValueError(
          f"{file} has format version {manifest.get('version')}; this code "
          f"reads version {VERSION}: rebuild it with this index.py.")
    return cls(path, manifest)

  def close(self):
    self.db.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- writing ---------------------------------------------------------------

  @property
  def num_rows(self) -> int:
    row = self.db.execute("SELECT value FROM state WHERE key='rows'").fetchone()
    return int(row[0]) if row else 0

  def _truncate_uncommitted(self):
    want = self.num_rows * self.dim * 4
    if not os.path.exists(self._emb_path):
      open(self._emb_path, "wb").close()
    if os.path.getsize(self._emb_path) < want:
      raise ValueError(
          f"{self._emb_path} holds fewer rows than {DATABASE} records: the "
          "index is damaged; rebuild it.")
    if os.path.getsize(self._emb_path) > want:  # a batch that never committed
      with open(self._emb_path, "r+b") as f:
        f.truncate(want)

  def source_state(self, path: str) -> Optional[tuple]:
    """(id, status, size, mtime) of a source, or None if never seen."""
    return self.db.execute(
        "SELECT id, status, size, mtime FROM sources WHERE path=?",
        (path,)).fetchone()

  def source_id(self, path: str, kind: str) -> int:
    """The id of `path`, adding it (status "partial") if new."""
    st = os.stat(path)
    with self.db:
      self.db.execute(
          "INSERT OR IGNORE INTO sources(path, kind, size, mtime, status) "
          "VALUES(?, ?, ?, ?, 'partial')", (path, kind, st.st_size,
                                            st.st_mtime))
    return self.source_state(path)[0]

  def indexed_frames(self, source_id: int) -> frozenset[int]:
    return frozenset(r[0] for r in self.db.execute(
        "SELECT frame FROM frames WHERE source_id=?", (source_id,)))

  def set_status(self, source_id: int, status: str,
                 error: Optional[str] = None):
    with self.db:
      self.db.execute(
          "UPDATE sources SET status=?, error=?, num_frames=(SELECT COUNT(*) "
          "FROM frames WHERE source_id=?) WHERE id=?",
          (status, error, source_id, source_id))

  def add_batch(self, frames: Sequence[tuple[int, int, Optional[float], int,
                                             int]],
                detections: Sequence[tuple[int, int, np.ndarray, float]],
                embeddings: np.ndarray):
    """Commits one batch.

    Args:
      frames: (source_id, frame, timestamp, height, width) per indexed frame.
      detections: (source_id, frame, box [4], score) per detection.
      embeddings: float32 [len(detections), dim], in the same order.
    """
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    if embeddings.shape != (len(detections), self.dim):
      raise ValueError(f"embeddings {embeddings.shape} for {len(detections)} "
                       f"detections of dimension {self.dim}")
    start = self.num_rows
    if len(detections):
      with open(self._emb_path, "r+b") as f:
        f.seek(start * self.dim * 4)
        f.write(embeddings.tobytes())
        f.flush()
        os.fsync(f.fileno())
    with self.db:
      self.db.executemany(
          "INSERT OR REPLACE INTO frames VALUES(?, ?, ?, ?, ?)", frames)
      self.db.executemany(
          "INSERT INTO detections VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
          [(start + i, s, fr, *map(float, box), float(score))
           for i, (s, fr, box, score) in enumerate(detections)])
      self.db.execute("INSERT OR REPLACE INTO state VALUES('rows', ?)",
                      (start + len(detections),))
    self._matrix = None

  # -- reading ---------------------------------------------------------------

  def embeddings(self) -> np.ndarray:
    """float32 [rows, dim], memory-mapped (read-only)."""
    if self._matrix is None:
      n = self.num_rows
      self._matrix = (np.zeros((0, self.dim), np.float32) if n == 0 else
                      np.memmap(self._emb_path, np.float32, "r",
                                shape=(n, self.dim)))
    return self._matrix

  def sources(self) -> list[dict[str, Any]]:
    cols = ("id", "path", "kind", "status", "error", "num_frames")
    return [dict(zip(cols, r)) for r in self.db.execute(
        f"SELECT {', '.join(cols)} FROM sources ORDER BY id")]

  def detections_of(self, source: str, frame: int = 0):
    """(ids [n], boxes [n, 4], scores [n]) of one frame, in id order."""
    rows = self.db.execute(
        "SELECT d.id, x1, y1, x2, y2, score FROM detections d JOIN sources s "
        "ON d.source_id = s.id WHERE s.path=? AND d.frame=? ORDER BY d.id",
        (source, frame)).fetchall()
    a = np.asarray(rows, np.float64).reshape(-1, 6)
    return (a[:, 0].astype(np.int64), a[:, 1:5].astype(np.float32),
            a[:, 5].astype(np.float32))

  def _rows(self, ids: Sequence[int]) -> dict[int, tuple]:
    out = {}
    ids = [int(i) for i in ids]
    for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
      chunk = ids[i:i + 900]
      q = ",".join("?" * len(chunk))
      for r in self.db.execute(
          "SELECT d.id, s.path, d.frame, f.timestamp, x1, y1, x2, y2, score "
          "FROM detections d JOIN sources s ON d.source_id = s.id "
          "JOIN frames f ON f.source_id = d.source_id AND f.frame = d.frame "
          f"WHERE d.id IN ({q})", chunk):
        out[r[0]] = r[1:]
    return out

  # -- approximate search ---------------------------------------------------

  def approximate(self, build: bool = True) -> Optional[vector_search.FaissIVF]:
    """The faiss index of the embeddings (ANN file), built if absent or if
    more than a tenth of the rows were added after it; None if absent and
    not `build`."""
    n = self.num_rows
    if self._ann is not None and self._ann.rows * 1.1 >= n:
      return self._ann
    file = os.path.join(self.path, ANN)
    if os.path.exists(file):
      ann = vector_search.FaissIVF.load(file)
      if ann.rows <= n and ann.rows * 1.1 >= n:
        self._ann = ann
        return ann
    if not build:
      return None
    logging.info("building the approximate index of %d embeddings", n)
    self._ann = vector_search.FaissIVF.build(self.embeddings())
    self._ann.save(file)
    return self._ann

  def _filter_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source_id int64 [n], score float32 [n], timestamp float64 [n], NaN
    for images) of every row; read once, then only the rows added since."""
    n = self.num_rows
    have = 0 if self._columns is None else len(self._columns[0])
    if have < n:
      rows = self.db.execute(
          "SELECT d.source_id, d.score, f.timestamp FROM detections d JOIN "
          "frames f ON f.source_id = d.source_id AND f.frame = d.frame "
          "WHERE d.id >= ? AND d.id < ? ORDER BY d.id", (have, n)).fetchall()
      new = np.array([(r[0], r[1], np.nan if r[2] is None else r[2])
                      for r in rows], np.float64).reshape(-1, 3)
      parts = (new[:, 0].astype(np.int64), new[:, 1].astype(np.float32),
               new[:, 2])
      self._columns = parts if self._columns is None else tuple(
          np.concatenate([a, b]) for a, b in zip(self._columns, parts))
    return tuple(c[:n] for c in self._columns)

  def _filter_mask(self, min_score, source_glob, time_range
                   ) -> Optional[np.ndarray]:
    """bool [n]: the rows the filters keep; None without filters."""
    if min_score <= 0 and not source_glob and time_range is None:
      return None
    source_id, score, timestamp = self._filter_columns()
    mask = score >= min_score
    if source_glob:
      keep = [i for i, path in self.db.execute("SELECT id, path FROM sources")
              if fnmatch.fnmatch(path, source_glob)]
      mask &= np.isin(source_id, np.asarray(keep, np.int64))
    if time_range is not None:
      with np.errstate(invalid="ignore"):  # NaN (images) compares False
        mask &= (timestamp >= time_range[0]) & (timestamp <= time_range[1])
    return mask

  def _candidates(self, query, k, method, cache, nprobe=None):
    """Best-first (ids, similarities): at least the k best (exact), or the
    faiss index's k best plus the exact k best of the rows added after it.
    Rows outside cache["mask"] (the filters) are left out. `cache` keeps
    the query's exact similarities between calls."""
    matrix = self.embeddings()
    mask = cache["mask"]
    if mask is not None and "kept" not in cache:
      cache["kept"] = np.flatnonzero(mask)
    kept = cache.get("kept")
    if method == "exact" or (kept is not None
                             and len(kept) <= SELECTIVE * len(matrix)):
      if "sims" not in cache:
        if kept is not None and len(kept) <= len(matrix) // 2:
          # Read only the rows the filters keep.
          cache["rows"] = kept
          cache["sims"] = vector_search.row_similarities(matrix, kept, query)
        else:
          sims = vector_search.similarities(matrix, query)
          if mask is not None:  # filtered rows sort last, and are cut below
            sims[~mask] = -np.inf
          cache["sims"] = sims
      ids, sims = vector_search.exact_top(cache["sims"], k)
      if "rows" in cache:
        ids = cache["rows"][ids]
      elif mask is not None:
        keep = mask[ids]
        ids, sims = ids[keep], sims[keep]
      return ids, sims
    ann = self.approximate()
    ids, sims = ann.top(query, k, nprobe, mask)  # faiss skips masked rows
    if ann.rows < len(matrix):
      if "tail" not in cache:
        rows = np.arange(ann.rows, len(matrix))
        if mask is not None:
          rows = rows[mask[ann.rows:]]
        cache["tail"] = (rows, vector_search.row_similarities(matrix, rows,
                                                              query))
      rows, tail = cache["tail"]
      tail_ids, tail_sims = vector_search.exact_top(tail, k)
      ids = np.concatenate([ids, rows[tail_ids]])
      sims = np.concatenate([sims, tail_sims])
      # Only the first k of the merge are the k best of both parts.
      order = np.lexsort((ids, -sims))[:k]
      ids, sims = ids[order], sims[order]
    return ids, sims

  def search(self, query: np.ndarray, top_k: int = 10, *,
             min_score: float = 0.0, source_glob: Optional[str] = None,
             time_range: Optional[tuple[float, float]] = None,
             one_per_frame: bool = False,
             method: str = "auto",
             nprobe: Optional[int] = None) -> list[Match]:
    """Inner-product search, best first.

    Args:
      query: [dim] embedding (unit length, like the indexed ones).
      top_k: hits to return.
      min_score: keep detections with at least this confidence.
      source_glob: keep sources whose path matches (fnmatch), e.g. "*cam2*".
      time_range: (t0, t1) seconds: keep video frames inside it.
      one_per_frame: at most one hit (the most similar) per source frame.
      method: "exact" (chunked matmul), "approximate" (faiss, see
        oim_jax/vector_search.py) or "auto": approximate from
        APPROXIMATE_FROM rows when faiss is installed. Filters that keep
        at most SELECTIVE of the rows are searched exactly either way.
      nprobe: approximate only: faiss clusters scanned (default
        FaissIVF.default_nprobe(); more: higher recall, slower).
    """
    if method not in ("auto", "exact", "approximate"):
      raise ValueError(f"search method {method!r}: use auto, exact or "
                       "approximate")
    query = np.asarray(query, np.float32).reshape(self.dim)
    n = self.num_rows
    if n == 0 or top_k <= 0:
      return []
    if method == "auto":
      method = ("approximate" if n >= APPROXIMATE_FROM
                and vector_search.have_faiss() else "exact")
    # The filters are one mask over the rows (their columns are read from
    # SQLite once per open index). Candidates are then taken best first in
    # growing blocks, their metadata fetched block by block, until top_k
    # pass one_per_frame; the lists grow by prefixes, so nothing is looked
    # at twice.
    want, hits, seen_frames, pos = max(4 * top_k, 64), [], set(), 0
    cache = {"mask": self._filter_mask(min_score, source_glob, time_range)}
    while len(hits) < top_k:
      order, sims = self._candidates(query, want, method, cache, nprobe)
      meta = self._rows(order[pos:])
      for i, sim in zip(order[pos:], sims[pos:]):
        path, frame, t, x1, y1, x2, y2, score = meta[int(i)]
        pos += 1
        if one_per_frame:
          if (path, frame) in seen_frames:
            continue
          seen_frames.add((path, frame))
        hits.append(Match(len(hits) + 1, path,
                          np.array([x1, y1, x2, y2], np.float32),
                          float(sim), score, frame, t, int(i)))
        if len(hits) == top_k:
          break
      passing = n if cache["mask"] is None else len(cache["kept"])
      if (len(hits) < top_k and method == "approximate"
          and len(order) < min(want, passing)):
        # faiss's probed clusters hold fewer passing rows than asked for:
        # a deeper faiss search cannot find more, the exact scan can.
        logging.info("approximate search found %d of %d candidates; "
                     "searching exactly (or raise nprobe)", len(order), want)
        method, want, hits, seen_frames, pos = "exact", want, [], set(), 0
        cache = {"mask": cache["mask"], "kept": cache.get("kept")}
        continue
      if want >= n:
        break
      want = min(n, want * 4)
    return hits
