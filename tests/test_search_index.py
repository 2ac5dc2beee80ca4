"""The index's storage and its exact search, against NumPy references."""

import fnmatch
import json
import os

import numpy as np
import pytest

from oim_jax import search_index
from oim_jax import vector_search

DIM = 8


def _manifest(**kw):
  m = {"embedding_dim": DIM, "workdir": "/w", "checkpoint_step": 3,
       "det_thresh": 0.5, "sampling": {"every_frames": 0, "every_seconds": 1.0},
       "config": {}}
  m.update(kw)
  return m


def _fill(path, rng, num_sources=5, frames=4, dets=3):
  """An index of random unit embeddings; returns the reference table."""
  ref = []  # (path, frame, timestamp, box, score, embedding) in id order
  for s in range(num_sources):
    src = path / f"cam{s % 2}_{s}.mp4"
    src.write_bytes(b"x")
  with search_index.SearchIndex.create_or_open(str(path / "idx"),
                                               _manifest()) as index:
    for s in range(num_sources):
      src = str(path / f"cam{s % 2}_{s}.mp4")
      sid = index.source_id(src, "video")
      fr, det, emb = [], [], []
      for f in range(frames):
        t = 0.5 * f
        fr.append((sid, f, t, 100, 200))
        for _ in range(dets):
          box = rng.uniform(0, 100, 4).astype(np.float32)
          score = float(rng.uniform())
          e = rng.normal(size=DIM).astype(np.float32)
          e /= np.linalg.norm(e)
          det.append((sid, f, box, score))
          emb.append(e)
          ref.append((src, f, t, box, score, e))
      index.add_batch(fr, det, np.stack(emb))
      index.set_status(sid, "done")
  return ref


def _reference(ref, q, top_k, min_score=0.0, glob=None, time_range=None,
               one_per_frame=False):
  sims = np.array([e @ q for *_, e in ref], np.float32)
  order = sorted(range(len(ref)), key=lambda i: (-sims[i], i))
  out, seen = [], set()
  for i in order:
    src, f, t, box, score, _ = ref[i]
    if score < min_score or (glob and not fnmatch.fnmatch(src, glob)):
      continue
    if time_range and not time_range[0] <= t <= time_range[1]:
      continue
    if one_per_frame:
      if (src, f) in seen:
        continue
      seen.add((src, f))
    out.append(i)
  return out[:top_k], sims


def test_search_equals_brute_force_with_filters(tmp_path):
  rng = np.random.default_rng(0)
  ref = _fill(tmp_path, rng)
  with search_index.SearchIndex.open(str(tmp_path / "idx")) as index:
    assert index.num_rows == len(ref) == 60
    np.testing.assert_array_equal(index.embeddings(),
                                  np.stack([r[-1] for r in ref]))
    q = rng.normal(size=DIM).astype(np.float32)
    cases = [dict(), dict(min_score=0.6), dict(glob="*cam1_*"),
             dict(time_range=(0.4, 1.1)), dict(one_per_frame=True),
             dict(min_score=0.3, glob="*cam0*", one_per_frame=True)]
    for kw in cases:
      for top_k in (1, 7, 100):
        want, sims = _reference(ref, q, top_k, **kw)
        hits = index.search(
            q, top_k, min_score=kw.get("min_score", 0.0),
            source_glob=kw.get("glob"), time_range=kw.get("time_range"),
            one_per_frame=kw.get("one_per_frame", False))
        assert [h.id for h in hits] == want, kw
        assert [h.rank for h in hits] == list(range(1, len(want) + 1))
        for h in hits:
          src, f, t, box, score, _ = ref[h.id]
          assert (h.image, h.frame, h.timestamp) == (src, f, t)
          np.testing.assert_allclose(h.box, box, rtol=1e-6)
          assert h.score == pytest.approx(score)
          assert h.similarity == pytest.approx(float(sims[h.id]), abs=1e-6)
    ids, boxes, scores = index.detections_of(ref[5][0], ref[5][1])
    assert list(ids) == [i for i, r in enumerate(ref)
                         if r[:2] == ref[5][:2]]
    assert [s["status"] for s in index.sources()] == ["done"] * 5


def test_ties_break_by_id_like_a_stable_sort(tmp_path):
  # Identical frames (a still camera) give identical embeddings.
  (tmp_path / "a.png").write_bytes(b"x")
  e = np.ones((200, DIM), np.float32) / np.sqrt(DIM)
  e[150:] *= -1
  with search_index.SearchIndex.create_or_open(str(tmp_path / "i"),
                                               _manifest()) as index:
    sid = index.source_id(str(tmp_path / "a.png"), "image")
    index.add_batch([(sid, 0, None, 10, 10)],
                    [(sid, 0, np.zeros(4), 1.0)] * 200, e)
    q = e[0]
    for k in (1, 63, 64, 65, 149, 150, 151, 200):
      assert [h.id for h in index.search(q, k)] == list(range(k))


def test_uncommitted_rows_are_dropped_on_open(tmp_path):
  rng = np.random.default_rng(1)
  ref = _fill(tmp_path, rng, num_sources=2)
  emb = tmp_path / "idx" / search_index.EMBEDDINGS
  committed = os.path.getsize(emb)
  with open(emb, "ab") as f:  # a batch written, its transaction never run
    f.write(b"\0" * DIM * 4 * 3)
  with search_index.SearchIndex.open(str(tmp_path / "idx")) as index:
    assert os.path.getsize(emb) == committed
    assert index.num_rows == len(ref)
  with open(emb, "r+b") as f:
    f.truncate(committed - DIM * 4)
  with pytest.raises(ValueError, match="damaged"):
    search_index.SearchIndex.open(str(tmp_path / "idx"))


def test_refuses_other_settings_and_versions(tmp_path):
  path = str(tmp_path / "idx")
  search_index.SearchIndex.create_or_open(path, _manifest()).close()
  for key, value in [("checkpoint_step", 4), ("embedding_dim", 16),
                     ("det_thresh", 0.1),
                     ("sampling", {"every_frames": 5, "every_seconds": 1.0})]:
    with pytest.raises(ValueError, match=key):
      search_index.SearchIndex.create_or_open(path, _manifest(**{key: value}))
  manifest = os.path.join(path, search_index.MANIFEST)
  m = json.load(open(manifest))
  m["version"] = search_index.VERSION + 1
  json.dump(m, open(manifest, "w"))
  with pytest.raises(ValueError, match="version"):
    search_index.SearchIndex.open(path)
  with pytest.raises(FileNotFoundError, match="index.py"):
    search_index.SearchIndex.open(str(tmp_path / "nothing"))


def test_empty_index_searches_to_nothing(tmp_path):
  with search_index.SearchIndex.create_or_open(str(tmp_path / "i"),
                                               _manifest()) as index:
    assert index.search(np.ones(DIM), 5) == []


def test_exact_top_and_chunked_similarities():
  rng = np.random.default_rng(2)
  m = rng.normal(size=(50, DIM)).astype(np.float32)
  q = rng.normal(size=DIM).astype(np.float32)
  sims = vector_search.similarities(m, q, chunk_rows=7)
  np.testing.assert_allclose(sims, m @ q, rtol=1e-6)
  sims[[3, 9, 20]] = sims.max() + 1  # a three-way tie at the top
  ids, top = vector_search.exact_top(sims, 2)
  assert list(ids) == [3, 9, 20]  # the tie is kept whole, by id
  ids, top = vector_search.exact_top(sims, 10)
  assert list(ids) == sorted(range(50), key=lambda i: (-sims[i], i))[:10]
  np.testing.assert_array_equal(top, sims[ids])


@pytest.mark.skipif(not vector_search.have_faiss(),
                    reason="faiss not installed (pip install faiss-cpu)")
def test_approximate_search_with_rows_added_after_it(tmp_path):
  # 1,000 rows: nlist = 25 <= nprobe = 32 clusters, so the IVF scan is
  # exhaustive and must give the exact ranking, also over the rows added
  # after the faiss index was built (merged from an exact scan).
  rng = np.random.default_rng(3)
  (tmp_path / "a.png").write_bytes(b"x")
  e = rng.normal(size=(1110, DIM)).astype(np.float32)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  with search_index.SearchIndex.create_or_open(str(tmp_path / "i"),
                                               _manifest()) as index:
    sid = index.source_id(str(tmp_path / "a.png"), "image")
    index.add_batch([(sid, 0, None, 10, 10)],
                    [(sid, 0, np.zeros(4), i / 1000) for i in range(1000)],
                    e[:1000])
    assert index.approximate().rows == 1000
    assert os.path.exists(tmp_path / "i" / search_index.ANN)
    index.add_batch([], [(sid, 0, np.zeros(4), 1.0)] * 50, e[1000:1050])
    for q in e[990:1010] + 0.1 * rng.normal(size=(20, DIM)):
      q = (q / np.linalg.norm(q)).astype(np.float32)
      want = [h.id for h in index.search(q, 20, method="exact")]
      got = [h.id for h in index.search(q, 20, method="approximate")]
      assert got == want
      want = [h.id for h in index.search(q, 20, method="exact",
                                         min_score=0.7)]
      assert want and all(i >= 700 for i in want)
      assert want == [h.id for h in index.search(q, 20, min_score=0.7,
                                                 method="approximate")]
  with search_index.SearchIndex.open(str(tmp_path / "i")) as index:
    assert index.approximate(build=False).rows == 1000  # loaded, still fresh
    index.add_batch([], [(sid, 0, np.zeros(4), 1.0)] * 60, e[1050:])
    assert index.approximate(build=False) is None  # > 10 % newer: stale
    assert index.approximate().rows == 1110
  with pytest.raises(ValueError, match="method"):
    search_index.SearchIndex.open(str(tmp_path / "i")).search(e[0], 1,
                                                              method="ann")


@pytest.mark.skipif(not vector_search.have_faiss(),
                    reason="faiss not installed (pip install faiss-cpu)")
def test_approximate_search_under_filters_and_nprobe(tmp_path):
  # 6,000 rows in 60 files: nlist = 153 clusters, the default scans 32.
  rng = np.random.default_rng(4)
  e = rng.normal(size=(6000, DIM)).astype(np.float32)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  scores = rng.uniform(size=6000)
  path = str(tmp_path / "i")
  with search_index.SearchIndex.create_or_open(path, _manifest()) as index:
    for s in range(60):
      src = tmp_path / f"cam{s:02d}.png"
      src.write_bytes(b"x")
      sid = index.source_id(str(src), "image")
      rows = range(100 * s, 100 * s + 100)
      index.add_batch([(sid, 0, None, 10, 10)],
                      [(sid, 0, np.zeros(4), scores[i]) for i in rows],
                      e[100 * s:100 * s + 100])
    nlist = index.approximate().index.nlist
    assert nlist == 153
    for q in e[:8] + 0.2 * rng.normal(size=(8, DIM)).astype(np.float32):
      q /= np.linalg.norm(q)
      sims = e @ q
      ranked = lambda keep: sorted(np.flatnonzero(keep),
                                   key=lambda i: (-sims[i], i))[:10]
      # One file in 60 (< SELECTIVE): searched exactly over its rows.
      one = np.zeros(6000, bool)
      one[700:800] = True
      got = index.search(q, 10, source_glob="*cam07.png",
                         method="approximate")
      assert [h.id for h in got] == ranked(one)
      # Half the rows: faiss with the mask; all clusters is exact.
      half = scores >= 0.5
      got = index.search(q, 10, min_score=0.5, method="approximate",
                         nprobe=nlist)
      assert [h.id for h in got] == ranked(half)
      got = index.search(q, 10, min_score=0.5, method="approximate")
      assert len(got) == 10 and all(h.score >= 0.5 for h in got)
      got = index.search(q, 10, method="approximate", nprobe=nlist)
      assert [h.id for h in got] == ranked(np.ones(6000, bool))
      # One cluster (~40 rows, ~20 passing) cannot give 60 hits: the
      # search falls back to the exact scan instead of returning fewer.
      got = index.search(q, 60, min_score=0.5, method="approximate",
                         nprobe=1)
      assert [h.id for h in got] == sorted(
          np.flatnonzero(half), key=lambda i: (-sims[i], i))[:60]
