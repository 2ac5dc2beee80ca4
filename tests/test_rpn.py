"""RPN: targets, losses and proposals vs NumPy references."""

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


# An image without any GT box (all gt_valid False): torchvision's RPN labels
# every valid anchor background, samples batch_size of them, and its loss is
# the BCE of those against 0 with a regression term of exactly 0.

def _empty_image_setup():
  anchors = ops.anchors((8, 10), 16, (32, 64), (0.5, 1.0, 2.0))  # 480
  image_size = jnp.array([100, 130])  # canvas 128 x 160: some invalid
  valid = rpn.anchor_valid_mask(anchors, image_size)
  gts = jnp.zeros((3, 4), jnp.float32)  # padding only
  return anchors, valid, gts


def _np_bce(logits, y):
  z = np.asarray(logits, np.float64)
  return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def _np_sl1(d, beta=1 / 9):
  a = np.abs(np.asarray(d, np.float64))
  return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def test_image_without_gt_vs_torchvision_semantics():
  anchors, valid, gts = _empty_image_setup()
  valid_np = np.asarray(valid)
  assert 256 < valid_np.sum() < len(valid_np)
  t = rpn.rpn_targets(anchors, valid, gts, jnp.zeros(3, bool),
                      jax.random.PRNGKey(0), batch_size=256, fg_fraction=0.5)
  labels = np.asarray(t.labels)
  # Every valid anchor is background: 256 bg sampled among the valid ones.
  assert (labels == 1).sum() == 0 and (labels == 0).sum() == 256
  assert np.all(valid_np[labels == 0]) and np.all(labels[~valid_np] == -1)
  assert np.all(np.isfinite(np.asarray(t.deltas)))

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 480)).astype(np.float32)
  deltas = rng.normal(size=(1, 480, 4)).astype(np.float32)
  batch = jax.tree_util.tree_map(lambda x: x[None], t)
  cls, reg = rpn.rpn_losses(jnp.asarray(logits), jnp.asarray(deltas), batch)
  s = labels >= 0
  ref_cls = _np_bce(logits[0][s], 0.0).mean()
  np.testing.assert_allclose(float(cls), ref_cls, rtol=1e-5)
  assert float(reg) == 0.0
  g_logits, g_deltas = jax.grad(
      lambda l, d: sum(rpn.rpn_losses(l, d, batch)), (0, 1))(
          jnp.asarray(logits), jnp.asarray(deltas))
  # d/dz mean BCE(z, 0) = sigmoid(z) / 256 on sampled anchors, else 0.
  ref_g = np.where(s, 1 / (1 + np.exp(-logits[0].astype(np.float64))), 0.0)
  np.testing.assert_allclose(g_logits[0], ref_g / 256, rtol=1e-5, atol=1e-9)
  assert np.all(np.asarray(g_deltas) == 0.0)


def test_losses_ignore_non_finite_targets_outside_fg():
  # Non-finite regression targets where no fg anchor is (what encoding a
  # padded all-zero GT box gives: log(0) = -inf) reach neither the loss nor
  # its gradient.
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 7)).astype(np.float32)
  deltas = rng.normal(size=(2, 7, 4)).astype(np.float32)
  tdeltas = rng.normal(size=(2, 7, 4)).astype(np.float32)
  labels = np.array([[1, 0, -1, 0, 1, -1, -1], [0, 0, 0, -1, -1, -1, 0]])
  tdeltas[labels != 1, 2:] = -np.inf
  tdeltas[1, 3, 0] = np.nan
  targets = rpn.RPNTargets(jnp.asarray(labels), jnp.asarray(tdeltas))
  cls, reg = rpn.rpn_losses(jnp.asarray(logits), jnp.asarray(deltas),
                            targets)
  g_l, g_d = jax.grad(lambda l, d: sum(rpn.rpn_losses(l, d, targets)),
                      (0, 1))(jnp.asarray(logits), jnp.asarray(deltas))
  s, fg = labels >= 0, labels == 1
  np.testing.assert_allclose(cls, _np_bce(logits, fg)[s].mean(), rtol=1e-5)
  np.testing.assert_allclose(
      reg, _np_sl1(deltas - tdeltas)[fg].sum() / s.sum(), rtol=1e-5)
  assert np.all(np.isfinite(g_l)) and np.all(np.isfinite(g_d))
  assert np.all(np.asarray(g_d)[~fg] == 0.0)


def test_batch_with_an_empty_and_a_full_image():
  anchors, valid, _ = _empty_image_setup()
  gts = np.array([[[0, 0, 0, 0]] * 3,  # image 0: no GT
                  [[10, 12, 60, 90], [70, 20, 130, 100], [0, 0, 0, 0]]],
                 np.float32)
  gt_valid = np.array([[False] * 3, [True, True, False]])
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  targets_fn = jax.jit(jax.vmap(lambda g, m, k: rpn.rpn_targets(
      anchors, valid, g, m, k, batch_size=256, fg_fraction=0.5)))
  t = targets_fn(jnp.asarray(gts), jnp.asarray(gt_valid), keys)
  # The full image's targets do not depend on its neighbour.
  alone = rpn.rpn_targets(anchors, valid, jnp.asarray(gts[1]),
                          jnp.asarray(gt_valid[1]), keys[1], batch_size=256,
                          fg_fraction=0.5)
  np.testing.assert_array_equal(t.labels[1], alone.labels)
  np.testing.assert_allclose(t.deltas[1], alone.deltas, rtol=1e-6,
                             atol=1e-6)  # jit vs eager: ulps
  labels = np.asarray(t.labels)
  an = np.asarray(anchors, np.float64)
  ref_labels, ref_match = _np_labels(an, np.asarray(valid), gts[1, :2])
  fg1 = labels[1] == 1
  assert 0 < fg1.sum() <= 128 and (labels[1] >= 0).sum() == 256
  assert np.all(ref_labels[fg1] == 1) and np.all(ref_labels[labels[1] == 0]
                                                 == 0)
  assert (labels[0] == 0).sum() == 256 and (labels[0] == 1).sum() == 0

  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 480)).astype(np.float32)
  deltas = rng.normal(size=(2, 480, 4)).astype(np.float32)
  cls, reg = rpn.rpn_losses(jnp.asarray(logits), jnp.asarray(deltas), t)
  # torchvision averages over the sampled anchors of the whole batch: the
  # sums per image from NumPy, targets of the full image from _np_encode.
  s = labels >= 0
  y = (labels == 1).astype(np.float64)
  sum_cls = [_np_bce(logits[i], y[i])[s[i]].sum() for i in range(2)]
  ref_t = np.array([_np_encode(gts[1, ref_match[a]], an[a])
                    for a in np.where(fg1)[0]])
  sum_reg = _np_sl1(deltas[1, fg1] - ref_t).sum()
  np.testing.assert_allclose(cls, sum(sum_cls) / 512, rtol=1e-5)
  np.testing.assert_allclose(reg, sum_reg / 512, rtol=1e-5)
  # The same numbers as the full image alone, reweighted by its share.
  one = jax.tree_util.tree_map(lambda x: x[1:], t)
  cls1, reg1 = rpn.rpn_losses(jnp.asarray(logits[1:]), jnp.asarray(deltas[1:]),
                              one)
  np.testing.assert_allclose(reg, reg1 * 256 / 512, rtol=1e-6)
  np.testing.assert_allclose(cls1, sum_cls[1] / 256, rtol=1e-5)
  g_l, g_d = jax.grad(lambda l, d: sum(rpn.rpn_losses(l, d, t)), (0, 1))(
      jnp.asarray(logits), jnp.asarray(deltas))
  assert np.all(np.isfinite(g_l)) and np.all(np.isfinite(g_d))
  assert np.all(np.asarray(g_d)[0] == 0.0) and np.any(np.asarray(g_d)[1])
