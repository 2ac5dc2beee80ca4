"""faiss IVF search with nprobe and a row mask, against NumPy brute force."""

import numpy as np
import pytest

from oim_jax import vector_search

pytestmark = pytest.mark.skipif(
    not vector_search.have_faiss(),
    reason="faiss not installed (pip install faiss-cpu)")


def _data(n=6000, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, dim)).astype(np.float32)
  m /= np.linalg.norm(m, axis=1, keepdims=True)
  q = rng.normal(size=(12, dim)).astype(np.float32)
  return m, q / np.linalg.norm(q, axis=1, keepdims=True), rng


def _brute(m, q, k, mask=None):
  sims = m @ q
  ids = np.arange(len(m)) if mask is None else np.flatnonzero(mask)
  return sorted(ids, key=lambda i: (-sims[i], i))[:k]


def test_all_clusters_with_a_mask_is_exact():
  m, queries, rng = _data()
  ann = vector_search.FaissIVF.build(m)
  nlist = ann.index.nlist
  # 2 sqrt(n), capped at n / 39 (faiss wants >= 39 training rows a cluster).
  assert nlist == min(len(m) // 39, int(2 * np.sqrt(len(m)))) == 153
  assert ann.default_nprobe() == 32
  mask = rng.uniform(size=len(m)) < 0.3
  for q in queries:
    ids, sims = ann.top(q, 25, nprobe=nlist, mask=mask)
    assert list(ids) == _brute(m, q, 25, mask)
    np.testing.assert_allclose(sims, m[ids] @ q, atol=1e-5)
    ids, _ = ann.top(q, 25, nprobe=10 * nlist)  # clamped to nlist
    assert list(ids) == _brute(m, q, 25)


def test_mask_and_nprobe_properties():
  m, queries, rng = _data(seed=1)
  ann = vector_search.FaissIVF.build(m)
  mask = rng.uniform(size=len(m)) < 0.5
  found = []
  for nprobe in (1, 4, 16, 64, ann.index.nlist):
    hits = 0
    for q in queries:
      ids, _ = ann.top(q, 10, nprobe=nprobe, mask=mask)
      assert mask[ids].all()  # masked rows never come back
      hits += len(set(ids) & set(_brute(m, q, 10, mask)))
    found.append(hits)
  # More clusters scan a superset of rows: recall never drops, and the
  # full scan finds all 10 of every query.
  assert found == sorted(found) and found[-1] == 10 * len(queries)
  assert found[0] < found[-1]
  with pytest.raises(ValueError, match="nprobe=0"):
    ann.top(queries[0], 10, nprobe=0)


def test_row_similarities_reads_the_given_rows():
  m, queries, _ = _data(n=100)
  rows = np.array([3, 4, 50, 99])
  np.testing.assert_allclose(
      vector_search.row_similarities(m, rows, queries[0], chunk_rows=3),
      m[rows] @ queries[0], rtol=1e-6)
