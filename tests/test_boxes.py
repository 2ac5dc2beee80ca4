"""Tests for oim_jax.ops.boxes against NumPy loop references and hand cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from conftest import np_decode as _np_decode
from oim_jax import ops


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _np_iou(a, b):
  out = np.zeros((len(a), len(b)), np.float64)
  for i in range(len(a)):
    for j in range(len(b)):
      iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
      ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
      inter = iw * ih
      union = ((a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) +
               (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter)
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def test_area_and_iou_hand_case():
  a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
  b = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 5, 10]], np.float32)
  np.testing.assert_allclose(ops.box_area(a), [100, 100])
  iou = np.asarray(ops.box_iou(a, b))
  expected = [[1.0, 0.0, 0.5], [25 / 175, 25 / 175, 0.0]]
  np.testing.assert_allclose(iou, expected, rtol=1e-6)


def test_iou_matches_loop_symmetric_and_zero_union():
  rng = np.random.default_rng(0)
  a = _random_boxes(rng, 7)
  b = _random_boxes(rng, 5)
  b[0] = a[3]  # identical box -> IoU 1
  iou = np.asarray(ops.box_iou(a, b))
  np.testing.assert_allclose(iou, _np_iou(a, b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(iou[3, 0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(iou, np.asarray(ops.box_iou(b, a)).T)
  empty = np.array([[3, 3, 3, 3]], np.float32)
  assert float(ops.box_iou(empty, empty)[0, 0]) == 0.0


def test_clip_with_traced_image_size():
  boxes = np.array([[-5, -3, 50, 40], [10, 20, 30, 200]], np.float32)
  clip = jax.jit(ops.clip_boxes)
  out = np.asarray(clip(boxes, jnp.array([30, 45])))
  np.testing.assert_array_equal(out, [[0, 0, 45, 30], [10, 20, 30, 30]])


def test_small_box_mask():
  boxes = np.array([[0, 0, 5, 5], [0, 0, 4.9, 10], [0, 0, 10, 4.99],
                    [2, 2, 1, 8]], np.float32)
  np.testing.assert_array_equal(ops.small_box_mask(boxes, 5.0),
                                [True, False, False, False])


def _np_encode(gt, ref, w):
  out = np.zeros_like(gt, np.float64)
  for i in range(len(gt)):
    ew, eh = ref[i, 2] - ref[i, 0], ref[i, 3] - ref[i, 1]
    ex, ey = ref[i, 0] + 0.5 * ew, ref[i, 1] + 0.5 * eh
    gw, gh = gt[i, 2] - gt[i, 0], gt[i, 3] - gt[i, 1]
    gx, gy = gt[i, 0] + 0.5 * gw, gt[i, 1] + 0.5 * gh
    out[i] = [w[0] * (gx - ex) / ew, w[1] * (gy - ey) / eh,
              w[2] * math.log(gw / ew), w[3] * math.log(gh / eh)]
  return out


def test_encode_decode_match_loop_and_roundtrip():
  rng = np.random.default_rng(1)
  gt = _random_boxes(rng, 9)
  ref = _random_boxes(rng, 9)
  for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    d = np.asarray(ops.encode_boxes(gt, ref, w))
    np.testing.assert_allclose(d, _np_encode(gt, ref, w), rtol=1e-5,
                               atol=1e-5)
    back = np.asarray(ops.decode_boxes(d, ref, w))
    np.testing.assert_allclose(back, gt, rtol=1e-5, atol=1e-3)
    deltas = rng.normal(0, 1, (9, 4)).astype(np.float32)
    np.testing.assert_allclose(ops.decode_boxes(deltas, ref, w),
                               _np_decode(deltas, ref, w), rtol=1e-5,
                               atol=1e-3)


def test_decode_clamps_dw_dh():
  ref = np.array([[0, 0, 10, 20]], np.float32)
  d = np.array([[0, 0, 100, 100]], np.float32)
  out = np.asarray(ops.decode_boxes(d, ref))
  # exp(log(1000/16)) = 62.5 times the size, centred on (5, 10).
  np.testing.assert_allclose(out, [[5 - 312.5, 10 - 625, 5 + 312.5, 10 + 625]],
                             rtol=1e-5)


def test_vmap_over_images():
  rng = np.random.default_rng(2)
  a = np.stack([_random_boxes(rng, 4) for _ in range(3)])
  b = np.stack([_random_boxes(rng, 6) for _ in range(3)])
  iou = np.asarray(jax.vmap(ops.box_iou)(a, b))
  for i in range(3):
    np.testing.assert_allclose(iou[i], _np_iou(a[i], b[i]), rtol=1e-5,
                               atol=1e-7)
  hw = np.array([[20, 30], [50, 10], [100, 100]], np.float32)
  clipped = np.asarray(jax.vmap(ops.clip_boxes)(a, hw))
  for i in range(3):
    np.testing.assert_array_equal(
        clipped[i], np.stack([np.clip(a[i, :, 0], 0, hw[i, 1]),
                              np.clip(a[i, :, 1], 0, hw[i, 0]),
                              np.clip(a[i, :, 2], 0, hw[i, 1]),
                              np.clip(a[i, :, 3], 0, hw[i, 0])], 1))
