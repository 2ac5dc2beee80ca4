"""Tests for oim_jax.ops.nms against a NumPy greedy loop (torchvision rules)."""

import functools

import jax
import numpy as np

from conftest import np_greedy_nms as _np_greedy_nms
from oim_jax import ops


def _clustered_boxes(rng, n, size=200.0):
  """Boxes jittered around a few centres so that many overlap."""
  centres = rng.uniform(20, size, (max(1, n // 6), 2))
  c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, (n, 2))
  wh = rng.uniform(10, 40, (n, 2))
  return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _nms(boxes, scores, valid, max_output, block_size):
  return ops.nms(boxes, scores, 0.5, max_output, valid=valid,
                 block_size=block_size)


def _check(keep, count, expected, max_output):
  keep, count = np.asarray(keep), int(count)
  exp = expected[:max_output]
  assert count == len(exp)
  np.testing.assert_array_equal(keep[:count], exp)
  assert np.all(keep[count:] == -1)


def test_hand_case_ties_and_duplicates():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10],
                    [20, 20, 30, 30], [0, 0, 10, 10], [20, 20, 30, 30]],
                   np.float32)
  scores = np.array([0.5, 0.9, 0.9, 0.3, 0.9, -np.inf], np.float32)
  valid = np.ones(6, bool)
  keep, count = _nms(boxes, scores, valid, 6, 4)
  # Ties keep input order: 1 (0.9) first, suppresses 2, 4 and 0; 5 is invalid.
  _check(keep, count, np.array([1, 3]), 6)


def test_random_with_ties_duplicates_inf_and_mask():
  rng = np.random.default_rng(0)
  n = 150
  boxes = _clustered_boxes(rng, n)
  boxes[10:20] = boxes[0:10]  # exact duplicates
  scores = np.round(rng.uniform(0, 1, n), 1).astype(np.float32)  # many ties
  scores[rng.choice(n, 15, replace=False)] = -np.inf
  valid = rng.uniform(size=n) > 0.1
  expected = _np_greedy_nms(boxes, scores, 0.5, valid)
  assert 10 < len(expected) < n
  for max_output, block in [(n, 16), (n, 256), (7, 16)]:
    keep, count = _nms(boxes, scores, valid, max_output, block)
    _check(keep, count, expected, max_output)
  keep = np.asarray(keep)
  kept = boxes[expected]
  iou = np.asarray(ops.box_iou(kept, kept))
  assert np.all(iou[~np.eye(len(kept), dtype=bool)] <= 0.5)
  assert valid[expected].all() and np.isfinite(scores[expected]).all()


def test_all_invalid():
  boxes = np.zeros((5, 4), np.float32)
  scores = np.full(5, -np.inf, np.float32)
  keep, count = _nms(boxes, scores, np.ones(5, bool), 3, 4)
  assert int(count) == 0 and np.all(np.asarray(keep) == -1)


def test_tiling_at_scale_and_vmap():
  rng = np.random.default_rng(1)
  n, b = 2000, 3
  boxes = np.stack([_clustered_boxes(rng, n, 800.0) for _ in range(b)])
  scores = rng.uniform(size=(b, n)).astype(np.float32)
  scores[:, ::7] = np.round(scores[:, ::7], 2)
  valid = np.ones((b, n), bool)
  valid[1, n // 2:] = False  # a padded image
  fn = jax.jit(jax.vmap(lambda x, s, v: ops.nms(x, s, 0.5, 600, valid=v,
                                                block_size=64)))
  keep, count = fn(boxes, scores, valid)
  for i in range(b):
    expected = _np_greedy_nms(boxes[i], scores[i], 0.5, valid[i])
    _check(keep[i], count[i], expected, 600)


def test_batched_nms_per_class():
  rng = np.random.default_rng(2)
  n = 120
  boxes = _clustered_boxes(rng, n)
  scores = rng.uniform(size=n).astype(np.float32)
  idxs = rng.integers(0, 3, n)
  keep, count = jax.jit(
      lambda x, s, c: ops.batched_nms(x, s, c, 0.4, n, block_size=32))(
          boxes, scores, idxs)
  per_class = []
  for c in range(3):
    sel = np.nonzero(idxs == c)[0]
    per_class.extend(sel[_np_greedy_nms(boxes[sel], scores[sel], 0.4)])
  per_class = np.array(per_class)
  expected = per_class[np.argsort(-scores[per_class], kind="stable")]
  _check(keep, count, expected, n)


def test_more_slots_than_boxes_empty_input_and_traced_threshold():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]],
                   np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  # IoU(0, 1) = 81 / 100: suppressed at 0.5, kept at 0.9.
  fn = jax.jit(lambda b, s, t: ops.nms(b, s, t, 5))
  _check(*fn(boxes, scores, 0.5), np.array([0, 2]), 5)
  _check(*fn(boxes, scores, 0.9), np.array([0, 1, 2]), 5)
  keep, count = ops.nms(np.zeros((0, 4), np.float32), np.zeros((0,)), 0.5, 2)
  assert int(count) == 0 and np.all(np.asarray(keep) == -1)
  # Per-class NMS under vmap: in image 1 box 1 is another class.
  keep, count = jax.vmap(lambda b, s, c: ops.batched_nms(b, s, c, 0.5, 3))(
      np.stack([boxes, boxes]), np.stack([scores, scores]),
      np.array([[0, 0, 0], [0, 1, 0]]))
  _check(keep[0], count[0], np.array([0, 2]), 3)
  _check(keep[1], count[1], np.array([0, 1, 2]), 3)
