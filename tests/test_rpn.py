"""RPN: matching, sampling, targets, losses and proposals vs NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from oim_jax import ops
from oim_jax.models import rpn


def _np_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = iw * ih
      union = ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])
               - inter)
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def _np_labels(anchors, valid, gts, fg=0.7, bg=0.3):
  """Reference: torchvision Matcher(0.7, 0.3, allow_low_quality_matches)."""
  iou = _np_iou(anchors, gts)
  labels = np.full(len(anchors), -1)
  best = iou.max(1)
  labels[best >= fg] = 1
  labels[best < bg] = 0
  vi = np.where(valid)[0]
  for j in range(len(gts)):
    m = iou[vi, j].max()
    if m > 0:
      labels[vi[iou[vi, j] == m]] = 1
  labels[~valid] = -1
  return labels, iou.argmax(1)


def _np_encode(gt, an):
  aw, ah = an[2] - an[0], an[3] - an[1]
  ax, ay = an[0] + 0.5 * aw, an[1] + 0.5 * ah
  gw, gh = gt[2] - gt[0], gt[3] - gt[1]
  gx, gy = gt[0] + 0.5 * gw, gt[1] + 0.5 * gh
  return np.array([(gx - ax) / aw, (gy - ay) / ah, np.log(gw / aw),
                   np.log(gh / ah)])


def test_hand_checked_matching():
  anchors = jnp.array([[0, 0, 10, 10],      # IoU 1 with GT0 -> fg
                       [0, 0, 20, 20],      # IoU 100/400 = 0.25 -> bg
                       [100, 100, 110, 110],  # IoU 0 -> bg
                       [48, 48, 58, 58],    # IoU 64/156 = 0.41 with GT1:
                                            # GT1's best anchor -> fg
                       [0, 0, 14, 10],      # IoU 100/140 = 0.714 -> fg
                       [0, 0, 10, 20],      # 0.5: between -> ignored
                       [300, 300, 310, 310]], jnp.float32)  # outside image
  valid = jnp.array([True] * 6 + [False])
  gts = jnp.array([[0, 0, 10, 10], [50, 50, 60, 62], [0, 0, 500, 500]],
                  jnp.float32)
  gt_valid = jnp.array([True, True, False])  # third GT is padding
  labels, matched = rpn.match(ops.box_iou(anchors, gts), valid, gt_valid,
                              0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [1, 0, 0, 1, 1, -1, -1])
  np.testing.assert_array_equal(np.asarray(matched)[[0, 3, 4]], [0, 1, 0])


def test_targets_vs_numpy_reference():
  anchors = ops.anchors((5, 6), 16, (16, 32), (0.5, 1.0, 2.0))
  image_size = jnp.array([60, 70])  # canvas 80 x 96: some anchors outside
  valid = rpn.anchor_valid_mask(anchors, image_size)
  an = np.asarray(anchors, np.float64)
  centre = (an[:, :2] + an[:, 2:]) / 2
  np.testing.assert_array_equal(valid, (centre[:, 0] < 70) &
                                (centre[:, 1] < 60))
  gts = np.array([[10, 12, 30, 44], [40, 5, 66, 38], [0, 0, 1, 1]],
                 np.float32)
  gt_valid = np.array([True, True, False])
  ref_labels, ref_match = _np_labels(an, np.asarray(valid), gts[:2])
  assert (ref_labels == 1).sum() >= 2 and (ref_labels == -1).any()

  # Sample size larger than all candidates: every labeled anchor is sampled.
  t = rpn.rpn_targets(anchors, valid, jnp.asarray(gts), jnp.asarray(gt_valid),
                      jax.random.PRNGKey(0), batch_size=1000, fg_fraction=0.5)
  np.testing.assert_array_equal(t.labels, ref_labels)
  for i in np.where(ref_labels == 1)[0]:
    np.testing.assert_allclose(t.deltas[i], _np_encode(gts[ref_match[i]],
                                                       an[i]), rtol=1e-5,
                               atol=1e-5)

  # Small sample: counts, subsets, determinism per key.
  n_fg, n_bg = (ref_labels == 1).sum(), (ref_labels == 0).sum()
  sample = lambda k: rpn.rpn_targets(
      anchors, valid, jnp.asarray(gts), jnp.asarray(gt_valid),
      jax.random.PRNGKey(k), batch_size=16, fg_fraction=0.25).labels
  a, b, c = np.asarray(sample(1)), np.asarray(sample(1)), np.asarray(sample(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for lab in (a, c):
    assert (lab == 1).sum() == min(n_fg, 4)
    assert (lab == 0).sum() == min(n_bg, 16 - min(n_fg, 4))
    assert np.all(ref_labels[lab == 1] == 1)
    assert np.all(ref_labels[lab == 0] == 0)


def test_sample_with_too_few_candidates():
  labels = jnp.array([1, -1, 0, -1, 0, -1])
  index, kind = rpn.sample(labels, jax.random.PRNGKey(0), 5, 0.5)
  np.testing.assert_array_equal(kind, [1, 0, 0, -1, -1])
  assert int(index[0]) == 0 and set(np.asarray(index[1:3])) == {2, 4}


def test_losses_vs_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 7)).astype(np.float32)
  deltas = rng.normal(size=(2, 7, 4)).astype(np.float32)
  tdeltas = rng.normal(size=(2, 7, 4)).astype(np.float32)
  labels = np.array([[1, 0, -1, 0, 1, -1, -1], [0, 0, 1, -1, -1, -1, 0]])
  cls, reg = rpn.rpn_losses(jnp.asarray(logits), jnp.asarray(deltas),
                            rpn.RPNTargets(jnp.asarray(labels),
                                           jnp.asarray(tdeltas)))
  s = labels >= 0
  y = (labels == 1).astype(np.float64)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ref_cls = -(y * np.log(p) + (1 - y) * np.log(1 - p))[s].mean()
  d = np.abs(deltas - tdeltas).astype(np.float64)
  sl1 = np.where(d < 1 / 9, 0.5 * d * d * 9, d - 0.5 / 9)
  ref_reg = sl1[labels == 1].sum() / s.sum()
  np.testing.assert_allclose(cls, ref_cls, rtol=1e-5)
  np.testing.assert_allclose(reg, ref_reg, rtol=1e-5)


def test_head_shapes_and_proposals():
  head = rpn.RPNHead(num_anchors=6, channels=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 4))
  params = head.init(jax.random.PRNGKey(1), x)
  logits, deltas = head.apply(params, x)
  assert logits.shape == (2, 180) and deltas.shape == (2, 180, 4)
  assert logits.dtype == deltas.dtype == jnp.float32

  anchors = ops.anchors((5, 6), 16, (16, 32), (0.5, 1.0, 2.0))
  image_size = jnp.array([60, 70])
  valid = rpn.anchor_valid_mask(anchors, image_size)
  scores = jax.random.normal(jax.random.PRNGKey(2), (180,))
  d = 0.2 * jax.random.normal(jax.random.PRNGKey(3), (180, 4))
  boxes, ok = jax.jit(lambda s, d: rpn.proposals(
      s, d, anchors, valid, image_size, pre_nms_top_n=50, post_nms_top_n=20,
      nms_thresh=0.7, min_size=1.0))(scores, d)
  assert boxes.shape == (20, 4) and ok.shape == (20,)
  b = np.asarray(boxes)[np.asarray(ok)]
  assert len(b) > 3
  assert (b[:, 0] >= 0).all() and (b[:, 2] <= 70).all()
  assert (b[:, 3] <= 60).all() and (b[:, 2] - b[:, 0] >= 1).all()
  iou = _np_iou(b, b) - np.eye(len(b))
  assert iou.max() <= 0.7 + 1e-6
  # The best valid anchor's box is the first proposal.
  s = np.where(np.asarray(valid), np.asarray(scores), -np.inf)
  best = int(np.argmax(s))
  ref = np.asarray(ops.clip_boxes(ops.decode_boxes(d[best:best + 1],
                                                   anchors[best:best + 1]),
                                  image_size))[0]
  np.testing.assert_allclose(b[0], ref, rtol=1e-5)
