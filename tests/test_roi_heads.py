"""RoI heads: sampling with pids, predictor, losses, post-processing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax import pids
from oim_jax.models import roi_heads


def test_sample_rois_hand_checked():
  proposals = jnp.array([[0, 0, 10, 20],    # IoU 1 with GT0 -> fg, pid 5
                         [0, 0, 10, 10],    # IoU 0.5 with GT0 -> fg
                         [0, 0, 10, 8],     # IoU 0.4 -> bg
                         [50, 50, 70, 90],  # IoU 1 with GT1 -> fg, pid -1
                         [200, 200, 220, 240],  # IoU 0 -> bg
                         [0, 0, 10, 20]], jnp.float32)  # invalid proposal
  valid = jnp.array([True] * 5 + [False])
  gts = jnp.array([[0, 0, 10, 20], [50, 50, 70, 90], [0, 0, 99, 99]],
                  jnp.float32)
  gt_pids = jnp.array([5, -1, -2])
  gt_valid = jnp.array([True, True, False])
  s = roi_heads.sample_rois(proposals, valid, gts, gt_pids, gt_valid,
                            jax.random.PRNGKey(0), batch_size=16,
                            fg_fraction=0.5)
  # Candidates: 5 valid proposals + 2 GTs = 5 fg, 2 bg; 16 slots.
  labels = np.asarray(s.labels)
  assert labels.shape == (9,)  # min(16, 6 + 3)
  np.testing.assert_array_equal(labels, [1] * 5 + [0] * 2 + [-1] * 2)
  fg_boxes = {tuple(b) for b in np.asarray(s.boxes[:5]).tolist()}
  assert fg_boxes == {(0, 0, 10, 20), (0, 0, 10, 10), (50, 50, 70, 90)}
  pids = np.asarray(s.pids)
  for b, p in zip(np.asarray(s.boxes[:5]).tolist(), pids[:5]):
    assert p == (-1 if b[0] == 50 else 5)
  np.testing.assert_array_equal(pids[5:], -2)
  bg_boxes = {tuple(b) for b in np.asarray(s.boxes[5:7]).tolist()}
  assert bg_boxes == {(0, 0, 10, 8), (200, 200, 220, 240)}
  # Regression target of (0,0,10,10) -> GT (0,0,10,20), weights (10,10,5,5):
  # dx 0, dy 10*(10-5)/10 = 5, dw 0, dh 5*log(2).
  i = [j for j in range(5) if tuple(np.asarray(s.boxes[j])) == (0, 0, 10, 10)]
  np.testing.assert_allclose(s.deltas[i[0]], [0, 5, 0, 5 * np.log(2)],
                             rtol=1e-5, atol=1e-6)
  # fg fraction caps the fg count.
  s2 = roi_heads.sample_rois(proposals, valid, gts, gt_pids, gt_valid,
                             jax.random.PRNGKey(1), batch_size=4,
                             fg_fraction=0.5)
  np.testing.assert_array_equal(s2.labels, [1, 1, 0, 0])


def test_predictor_and_losses_vs_numpy():
  pred = roi_heads.BoxPredictor(embedding_dim=6)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 12))
  params = pred.init(jax.random.PRNGKey(1), x)
  cls, deltas, emb = pred.apply(params, x)
  assert cls.shape == (5, 2) and deltas.shape == (5, 4) and emb.shape == (5, 6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  ln = roi_heads.BoxPredictor(embedding_dim=6, embedding_norm="layernorm")
  _, _, emb2 = ln.apply(ln.init(jax.random.PRNGKey(1), x), x)
  np.testing.assert_allclose(np.linalg.norm(emb2, axis=1), 1.0, rtol=1e-5)

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 2)).astype(np.float32)
  d = rng.normal(size=(5, 4)).astype(np.float32)
  t = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([1, 0, -1, 1, 0])
  samples = roi_heads.RoISamples(jnp.zeros((5, 4)), jnp.asarray(labels),
                                 jnp.asarray(t), jnp.zeros(5, jnp.int32))
  c, r = roi_heads.detection_losses(jnp.asarray(logits), jnp.asarray(d),
                                    samples)
  used = labels >= 0
  lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  ref_c = -np.mean([lp[i, labels[i]] for i in np.where(used)[0]])
  a = np.abs(d - t)
  sl1 = np.where(a < 1 / 9, 4.5 * a * a, a - 1 / 18)
  ref_r = sl1[labels == 1].sum() / used.sum()
  np.testing.assert_allclose(c, ref_c, rtol=1e-5)
  np.testing.assert_allclose(r, ref_r, rtol=1e-5)


def test_predictor_det_features_vs_numpy():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 3, 4))
  for mode, emb_mode in (("pooled", "pooled"), ("spatial", "pooled"),
                         ("spatial", "stripes"), ("pooled", "spatial")):
    pred = roi_heads.BoxPredictor(embedding_dim=6, det_features=mode,
                                  embedding_features=emb_mode)
    params = pred.init(jax.random.PRNGKey(1), x)["params"]
    cls, deltas, emb = pred.apply({"params": params}, x)
    xn = np.asarray(x, np.float64)
    feats = {"pooled": xn.mean(axis=(1, 2)), "spatial": xn.reshape(5, -1),
             "stripes": xn.mean(axis=2).reshape(5, -1)}
    det, pooled = feats[mode], feats[emb_mode]
    lin = lambda name, v: (v @ np.asarray(params[name]["kernel"]) +
                           np.asarray(params[name]["bias"]))
    np.testing.assert_allclose(cls, lin("cls_score", det), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(deltas, lin("bbox_pred", det), rtol=1e-4,
                               atol=1e-7)
    e = lin("embedding", pooled)
    np.testing.assert_allclose(emb, e / np.linalg.norm(e, axis=1,
                                                       keepdims=True),
                               rtol=1e-4, atol=1e-6)
  # A spatial kernel sees every cell: [h*w*C, D].
  assert params["embedding"]["kernel"].shape == (36, 6)
  spatial = roi_heads.BoxPredictor(embedding_dim=6, det_features="spatial")
  with pytest.raises(ValueError, match="res5 map"):
    spatial.init(jax.random.PRNGKey(1), x.mean(axis=(1, 2)))
  bad = roi_heads.BoxPredictor(embedding_dim=6, det_features="flat")
  with pytest.raises(ValueError, match="det_features"):
    bad.init(jax.random.PRNGKey(1), x)


def test_stripes_embedding_is_mirror_invariant():
  # [K, h, w, C] with h != w so rows and columns cannot be confused.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5, 2))
  pred = roi_heads.BoxPredictor(embedding_dim=8, det_features="spatial",
                                embedding_features="stripes")
  params = pred.init(jax.random.PRNGKey(1), x)["params"]
  assert params["embedding"]["kernel"].shape == (3 * 2, 8)
  _, _, emb = pred.apply({"params": params}, x)
  _, _, emb_mirror = pred.apply({"params": params}, x[:, :, ::-1])
  np.testing.assert_allclose(emb_mirror, emb, rtol=1e-5, atol=1e-6)
  # Upside down is a different person: rows stay apart.
  _, _, emb_flipped = pred.apply({"params": params}, x[:, ::-1])
  assert np.max(np.abs(np.asarray(emb_flipped) - np.asarray(emb))) > 1e-2


def test_bn_neck_statistics_over_masked_rois():
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  mask = np.array([1, 0, 1, 1, 0, 0], bool)
  pred = roi_heads.BoxPredictor(embedding_dim=3, embedding_norm="batchnorm")
  variables = pred.init(jax.random.PRNGKey(1), x)
  # None and an all-False mask (no person RoI) both use every row.
  for m in (None, mask, np.zeros(6, bool)):
    (_, _, emb), state = pred.apply(variables, x, True, m,
                                    mutable=["batch_stats"])
    k = variables["params"]["embedding"]
    proj = np.asarray(x) @ np.asarray(k["kernel"]) + np.asarray(k["bias"])
    rows = proj if m is None or not m.any() else proj[m]
    stats = state["batch_stats"]["embedding_norm"]
    # Running averages start at (0, 1), momentum 0.9.
    np.testing.assert_allclose(stats["mean"], 0.1 * rows.mean(0), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * rows.var(0),
                               rtol=1e-4)
    # Every RoI is normalised with those statistics.
    z = (proj - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    p = variables["params"]["embedding_norm"]
    z = z * np.asarray(p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(
        emb, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-4,
        atol=1e-6)


def test_postprocess():
  proposals = jnp.array([[0, 0, 10, 20], [1, 0, 11, 20], [30, 30, 50, 70],
                         [60, 0, 80, 40], [0, 0, 5, 5]], jnp.float32)
  valid = jnp.array([True, True, True, True, False])
  p_person = jnp.array([0.9, 0.8, 0.6, 0.3, 0.99])
  logits = jnp.stack([jnp.zeros(5), jnp.log(p_person / (1 - p_person))], 1)
  deltas = jnp.zeros((5, 4))
  boxes, scores, ok = roi_heads.postprocess(
      proposals, valid, logits, deltas, jnp.array([60, 70]),
      score_thresh=0.5, nms_thresh=0.4, detections=4)
  # Box 1 overlaps box 0 (IoU 0.82) -> suppressed; box 3 below threshold;
  # box 4 invalid; box 2 clipped to the image (y2 70 -> 60).
  np.testing.assert_array_equal(ok, [True, True, False, False])
  np.testing.assert_allclose(scores[:2], [0.9, 0.6], rtol=1e-5)
  np.testing.assert_allclose(boxes[:2], [[0, 0, 10, 20], [30, 30, 50, 60]])
  np.testing.assert_array_equal(boxes[2:], 0)


def test_image_without_gt_sampling_losses_and_oim():
  # No GT at all (all gt_valid False): every valid proposal is background
  # (torchvision), det reg exactly 0, no labeled / unlabeled RoI for OIM.
  from oim_jax import oim
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (20, 2))
  props = np.concatenate([xy, xy + rng.uniform(5, 40, (20, 2))], 1).astype(
      np.float32)
  valid = np.arange(20) < 15
  s = roi_heads.sample_rois(jnp.asarray(props), jnp.asarray(valid),
                            jnp.zeros((3, 4)), jnp.full((3,), -2, jnp.int32),
                            jnp.zeros(3, bool), jax.random.PRNGKey(0),
                            batch_size=16, fg_fraction=0.5)
  labels = np.asarray(s.labels)
  # 15 valid proposals, all bg, then one unused slot of min(16, 20 + 3).
  np.testing.assert_array_equal(labels, [0] * 15 + [-1])
  assert ({tuple(b) for b in np.asarray(s.boxes[:15]).tolist()} ==
          {tuple(b) for b in props[valid].tolist()})
  np.testing.assert_array_equal(s.pids, pids.IGNORE)
  np.testing.assert_array_equal(s.deltas, 0.0)

  logits = rng.normal(size=(16, 2)).astype(np.float32)
  d = rng.normal(size=(16, 4)).astype(np.float32)
  c, r = roi_heads.detection_losses(jnp.asarray(logits), jnp.asarray(d), s)
  lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(1,
                                                             keepdims=True))
  np.testing.assert_allclose(c, -lp[:15, 0].mean(), rtol=1e-5)
  assert float(r) == 0.0
  g_c, g_d = jax.grad(lambda a, b: sum(roi_heads.detection_losses(a, b, s)),
                      (0, 1))(jnp.asarray(logits), jnp.asarray(d))
  assert np.all(np.isfinite(g_c)) and np.all(np.asarray(g_d) == 0.0)

  x = rng.normal(size=(16, 6)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  for state in (oim.init_state(4, 3, 6),  # fresh (all-zero) tables
                oim.OIMState(jnp.asarray(x[:4]), jnp.asarray(x[4:7]),
                             jnp.int32(1))):
    for chunk in (None, 2):
      loss, g = jax.value_and_grad(lambda e: oim.oim_loss(
          state, e, s.pids, chunk_size=chunk))(jnp.asarray(x))
      assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)
    for method in ("rounds", "scan"):
      new = oim.update_state(state, jnp.asarray(x), s.pids,
                             lut_method=method)
      for a, b in zip(new, state):
        np.testing.assert_array_equal(a, b)


def test_detection_losses_ignore_non_finite_targets_outside_fg():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 2)).astype(np.float32)
  d = rng.normal(size=(5, 4)).astype(np.float32)
  t = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([1, 0, -1, 1, 0])
  t[labels != 1, 2:] = -np.inf  # log(0) of an all-zero GT box
  t[2, 0] = np.nan
  samples = roi_heads.RoISamples(jnp.zeros((5, 4)), jnp.asarray(labels),
                                 jnp.asarray(t), jnp.zeros(5, jnp.int32))
  c, r = roi_heads.detection_losses(jnp.asarray(logits), jnp.asarray(d),
                                    samples)
  a = np.abs(d - t)[labels == 1].astype(np.float64)
  sl1 = np.where(a < 1 / 9, 4.5 * a * a, a - 1 / 18)
  np.testing.assert_allclose(r, sl1.sum() / 4, rtol=1e-5)
  assert np.isfinite(float(c))
  g = jax.grad(lambda b: roi_heads.detection_losses(
      jnp.asarray(logits), b, samples)[1])(jnp.asarray(d))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[labels != 1] == 0)


def _postprocess(scores=None, logits=None, thresh=0.5):
  # Four far-apart boxes: NMS suppresses nothing, only the threshold drops.
  proposals = jnp.array([[0, 0, 10, 20], [30, 0, 40, 20], [60, 0, 70, 20],
                         [90, 0, 100, 20]], jnp.float32)
  if logits is None:
    logits = jnp.zeros((4, 2))
  _, out_scores, ok = roi_heads.postprocess(
      proposals, jnp.ones(4, bool), jnp.asarray(logits), jnp.zeros((4, 4)),
      jnp.array([50, 120]), score_thresh=thresh, nms_thresh=0.5,
      detections=4, scores=None if scores is None else jnp.asarray(scores))
  return np.asarray(out_scores)[np.asarray(ok)]


def test_postprocess_threshold_is_strict():
  # torchvision's postprocess_detections keeps score > score_thresh: a score
  # equal to the threshold is dropped, the next float32 above it is kept.
  above = np.nextafter(np.float32(0.5), np.float32(1))
  below = np.nextafter(np.float32(0.5), np.float32(0))
  scores = np.array([0.5, above, below, 0.9], np.float32)
  np.testing.assert_array_equal(_postprocess(scores), scores[[3, 1]])
  thr = np.float32(0.3)  # not exact in binary: the float32 value compares
  s2 = np.array([thr, np.nextafter(thr, np.float32(1)), 0.1, 0.2], np.float32)
  np.testing.assert_array_equal(_postprocess(s2, thresh=float(thr)), s2[1:2])
  # From logits: softmax of equal logits is exactly 0.5 (dropped at 0.5);
  # a person logit 2^-20 higher gives a float32 score above 0.5 (kept).
  eps = np.float32(2.0 ** -20)
  logits = np.array([[0, 0], [0, eps], [1, 1], [0, -eps]], np.float32)
  z = logits - logits.max(1, keepdims=True)
  p = (np.exp(z) / np.exp(z).sum(1, keepdims=True))[:, 1]
  assert p[0] == p[2] == 0.5 and p[1] > 0.5 > p[3]
  out = _postprocess(logits=logits)
  assert len(out) == 1 and out[0] > 0.5
  np.testing.assert_allclose(out, p[1:2], rtol=1e-6)
