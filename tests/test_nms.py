"""Tests for oim_jax.ops.nms against a NumPy greedy loop (torchvision rules)."""

import functools

import jax
import jax.extend
import numpy as np
import pytest

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


# Inputs of many tiles: boxes of one cluster spread over the score order, so
# that boxes of later tiles are suppressed by boxes kept in earlier ones.

def _tile_suppressions(boxes, scores, valid, thr, block, keep, idxs=None):
  """Suppressed boxes classified by where their suppressors are.

  Tiles are blocks of `block` in the order nms visits (valid boxes by stable
  descending score). Returns (cross, within): the number of suppressed valid
  boxes whose every kept suppressor (same category when idxs is given) lies
  in an earlier tile / in their own tile.
  """
  ok = (np.isfinite(scores) | (scores == np.inf)) & valid
  order = [i for i in np.argsort(-scores, kind="stable") if ok[i]]
  tile = np.full(len(boxes), -1)
  tile[order] = np.arange(len(order)) // block
  kept = np.zeros(len(boxes), bool)
  kept[keep] = True
  iou = np.asarray(ops.box_iou(boxes[keep], boxes))  # [kept, all]
  if idxs is not None:
    iou = np.where(idxs[keep][:, None] == idxs[None, :], iou, 0.0)
  cross = within = 0
  for j in np.nonzero(ok & ~kept)[0]:
    sup = tile[keep][iou[:, j] > thr]
    assert len(sup), "a suppressed box without a suppressor"
    cross += int(np.all(sup < tile[j]))
    within += int(np.all(sup == tile[j]))
  return cross, within


def _many_tiles_case(seed, n):
  rng = np.random.default_rng(seed)
  boxes = _clustered_boxes(rng, n, 60.0 * np.sqrt(n))
  scores = rng.uniform(size=n).astype(np.float32)
  scores[::5] = np.round(scores[::5], 2)  # ties
  # Invalid entries in every part of the input: -inf scores, and masked
  # entries that duplicate valid boxes with top scores (if they were not
  # ignored, they would suppress those boxes).
  scores[rng.choice(n, n // 10, replace=False)] = -np.inf
  valid = np.ones(n, bool)
  masked = rng.choice(n, n // 10, replace=False)
  valid[masked] = False
  boxes[masked] = boxes[rng.integers(0, n, len(masked))]
  scores[masked[::2]] = 1.0
  return boxes, scores, valid


def test_hand_chain_across_tiles():
  # Box k = [3k, 0, 3k + 10, 10]: IoU(k, k+1) = 70/130 > 0.5, IoU(k, k+2) =
  # 40/160 < 0.5. Greedy in index order keeps the even boxes: an odd box is
  # suppressed by its left neighbour (kept), an even box's left neighbour was
  # itself suppressed. With tiles of 7 both happen across tile boundaries
  # (6 suppresses 7; suppressed 13 does not suppress 14).
  n = 100
  x = 3.0 * np.arange(n)
  boxes = np.stack([x, 0 * x, x + 10, 0 * x + 10], 1).astype(np.float32)
  perm = np.random.default_rng(0).permutation(n)
  scores = (1.0 - np.arange(n) / n).astype(np.float32)
  # Shuffled input: box perm[k] holds chain box k.
  shuffled, shuffled_scores = np.empty_like(boxes), np.empty_like(scores)
  shuffled[perm], shuffled_scores[perm] = boxes, scores
  expected = perm[0::2]
  np.testing.assert_array_equal(
      _np_greedy_nms(shuffled, shuffled_scores, 0.5), expected)
  for block in (7, 16, 64):
    keep, count = _nms(shuffled, shuffled_scores, np.ones(n, bool), n, block)
    _check(keep, count, expected, n)
    keep, count = _nms(shuffled, shuffled_scores, np.ones(n, bool), 20, block)
    _check(keep, count, expected, 20)


def test_identical_boxes_over_many_tiles():
  # 1000 copies of one box with tied scores: the first suppresses the rest.
  boxes = np.tile(np.array([[5, 5, 25, 45]], np.float32), (1000, 1))
  scores = np.full(1000, 0.5, np.float32)
  scores[:3] = -np.inf
  keep, count = _nms(boxes, scores, np.ones(1000, bool), 4, 16)
  _check(keep, count, np.array([3]), 4)


@pytest.mark.parametrize("n,block", [(1000, 16), (1000, 64), (3000, 64),
                                     (3000, 256)])
def test_suppression_across_tiles_vs_greedy_reference(n, block):
  boxes, scores, valid = _many_tiles_case(n + block, n)
  expected = _np_greedy_nms(boxes, scores, 0.5, valid)
  cross, within = _tile_suppressions(boxes, scores, valid, 0.5, block,
                                     expected)
  num_valid = int((np.isfinite(scores) & valid).sum())
  # Many tiles, many suppressions that only an earlier tile explains (and
  # some that only the own tile does).
  assert num_valid > 4 * block and cross > 20 and within > 0, (cross, within)
  assert 2 * block < len(expected) < num_valid
  for max_output in (n, len(expected) // 2 + 3):
    keep, count = _nms(boxes, scores, valid, max_output, block)
    _check(keep, count, expected, max_output)


def test_batched_nms_across_tiles():
  rng = np.random.default_rng(5)
  n, block = 1500, 64
  boxes, scores, valid = _many_tiles_case(5, n)
  # Quarter-pixel coordinates: the category offsets are exact in float32,
  # so the offset boxes have the same IoUs as the per-category reference.
  boxes = np.round(boxes * 4) / 4
  idxs = rng.integers(0, 3, n)
  per_class = []
  for c in range(3):
    sel = np.nonzero(idxs == c)[0]
    per_class.extend(sel[_np_greedy_nms(boxes[sel], scores[sel], 0.4,
                                        valid[sel])])
  per_class = np.array(per_class)
  # Merged by decreasing score, ties in input order (one sort over all).
  expected = per_class[np.lexsort((per_class, -scores[per_class]))]
  cross, within = _tile_suppressions(boxes, scores, valid, 0.4, block,
                                     expected, idxs)
  assert cross > 20 and within > 0, (cross, within)
  fn = jax.jit(lambda x, s, c, v, m: ops.batched_nms(
      x, s, c, 0.4, m, valid=v, block_size=block), static_argnums=4)
  for max_output in (n, len(expected) // 3):
    keep, count = fn(boxes, scores, idxs, valid, max_output)
    _check(keep, count, expected, max_output)


@pytest.mark.parametrize("n,block,max_output", [(600, 64, 150), (3000, 256,
                                                                 2000)])
def test_presorted_top_k_input_vs_greedy_reference(n, block, max_output):
  # As in rpn.proposals: lax.top_k orders the scores (ties by index, -inf
  # last) and NMS visits that order without sorting again; masked entries sit
  # anywhere in it.
  boxes, scores, valid = _many_tiles_case(n + 7, n)
  top, idx = jax.lax.top_k(scores, n)
  top, idx = np.asarray(top), np.asarray(idx)
  np.testing.assert_array_equal(idx, np.argsort(-scores, kind="stable"))
  boxes, valid = boxes[idx], valid[idx]
  expected = _np_greedy_nms(boxes, top, 0.5, valid)
  assert block < len(expected), len(expected)
  fn = jax.jit(lambda b, s, v: ops.nms(b, s, 0.5, max_output, valid=v,
                                       block_size=block, presorted=True))
  _check(*fn(boxes, top, valid), expected, max_output)
  # A batch of images under vmap, as the model calls it.
  keep, count = jax.vmap(fn)(np.stack([boxes, boxes[::-1]]),
                             np.stack([top, top]), np.stack([valid, valid]))
  _check(keep[0], count[0], expected, max_output)
  _check(keep[1], count[1],
         _np_greedy_nms(boxes[::-1], top, 0.5, valid), max_output)


def _primitives(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _primitives(sub, out)
  return out


@pytest.mark.parametrize("presorted", [False, True])
def test_serial_structure(presorted):
  # One loop over blocks with the fixed-point loop inside (no loop over the
  # kept boxes); a sort only when the input is not presorted.
  boxes = np.zeros((1000, 4), np.float32)
  jaxpr = jax.make_jaxpr(lambda b, s: ops.nms(b, s, 0.5, 300, block_size=64,
                                              presorted=presorted))(
                                                  boxes, boxes[:, 0])
  prims = _primitives(jaxpr.jaxpr, [])
  assert prims.count("while") == 2, prims.count("while")
  assert prims.count("sort") == (0 if presorted else 1)
