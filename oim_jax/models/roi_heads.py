"""RoI heads: RoI sampling, box/identity predictors, losses, post-processing.

Per-image functions are written for one image and vmapped over the batch.
Detection has two classes (background, person); box regression is for the
person class with weights (10, 10, 5, 5).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oim_jax import ops
from oim_jax.pids import IGNORE
from oim_jax.ops import losses
from oim_jax.ops import sampling



class RoISamples(NamedTuple):
  """Sampled RoIs of one image (or a batch: leading B)."""
  boxes: jax.Array   # float32 [R, 4]
  labels: jax.Array  # int32 [R]: 1 person, 0 background, -1 unused slot
  deltas: jax.Array  # float32 [R, 4] regression targets (valid where 1)
  pids: jax.Array    # int32 [R]: matched GT pid (>= 0 / -1) for fg, else -2


def sample_rois(proposals, proposal_valid, gt_boxes, gt_pids, gt_valid, key,
                *, batch_size: int = 128, fg_fraction: float = 0.5,
                fg_iou: float = 0.5, bg_iou: float = 0.5,
                bg_iou_lo: float = 0.0) -> RoISamples:
  """Training RoIs of one image: proposals and GT boxes, matched and sampled.

  Args:
    proposals: [P, 4]; proposal_valid: bool [P].
    gt_boxes: [G, 4]; gt_pids: int32 [G]; gt_valid: bool [G].
    key: PRNG key.
    batch_size: RoIs per image (static), fg_fraction: max fg share.
    fg_iou: fg iff best IoU >= fg_iou; bg iff bg_iou_lo <= IoU < bg_iou.
  Returns:
    RoISamples with R = min(batch_size, P + G) rows, fg first.
  """
  cand = jnp.concatenate([proposals, gt_boxes], axis=0)
  cand_valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
  iou = ops.box_iou(cand, gt_boxes)
  labels, matched = sampling.match(iou, cand_valid, gt_valid, fg_iou, bg_iou,
                              False, bg_iou_lo)
  index, kind = sampling.sample(labels, key, batch_size, fg_fraction)
  boxes = cand[index]
  # Non-fg rows may pair a padded all-zero GT (always so in an image without
  # GT) or an empty box (an unused slot's arbitrary row): encode a unit box
  # against itself there, so no inf / NaN is ever computed (deltas 0).
  fg = (kind == sampling.FG)[:, None]
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  deltas = ops.encode_boxes(jnp.where(fg, gt_boxes[matched[index]], unit),
                            jnp.where(fg, boxes, unit), ops.ROI_HEAD_WEIGHTS)
  deltas = jnp.where(fg, deltas, 0.0)
  pids = jnp.where(kind == sampling.FG, gt_pids[matched[index]], IGNORE)
  return RoISamples(boxes, kind, deltas, pids.astype(jnp.int32))


class BoxPredictor(nn.Module):
  """res5 RoI features -> person logits, box deltas, identity embedding.

  Attributes:
    embedding_dim: D (256).
    embedding_norm: normalisation of the projection before L2 normalisation:
      "none"; "batchnorm" (the "BN neck" of the PyTorch reimplementations:
      batch statistics of the sampled RoIs in training, synchronised over
      `axis_name`, running averages in the `batch_stats` collection at test
      time); or "layernorm" (stateless, per embedding).
    det_features: what the person classifier and the box regressor see:
      "pooled" (the paper: the average-pooled res5 vector) or "spatial"
      (the flattened res5 map, [h*w*C]).
    embedding_features: the same choice for the identity projection, plus
      "stripes" (the map averaged over its width, [h*C]: mirror-invariant).
    dtype: compute dtype; outputs are float32.
    axis_name: data-parallel axis for synchronised BN statistics, or None.
  """
  embedding_dim: int = 256
  embedding_norm: str = "none"
  dtype: Any = jnp.float32
  axis_name: Any = None
  det_features: str = "pooled"
  embedding_features: str = "pooled"

  @nn.compact
  def __call__(self, x, train: bool = False, stats_mask=None):
    """x: [K, C] or [K, h, w, C] -> (cls [K, 2], deltas [K, 4], emb [K, D]).

    A pooled input [K, C] needs both feature modes "pooled". `train` selects
    batch statistics (and their running-average update) for the BatchNorm
    neck; it has no other effect. `stats_mask` (bool [K], optional): the RoIs
    whose projections form those statistics (e.g. persons only, the population
    the neck sees at test time); None: all K.
    """
    det, det_scale = _features(x, self.det_features, "det_features")
    emb, emb_scale = _features(x, self.embedding_features,
                               "embedding_features")
    dense = lambda n, std, name: nn.Dense(
        n, kernel_init=nn.initializers.normal(std), dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    det = det.astype(self.dtype)
    cls = dense(2, 0.01 * det_scale, "cls_score")(det).astype(jnp.float32)
    deltas = dense(4, 0.001 * det_scale, "bbox_pred")(det).astype(
        jnp.float32)
    emb = dense(self.embedding_dim, 0.01 * emb_scale, "embedding")(
        emb.astype(self.dtype)).astype(jnp.float32)
    if self.embedding_norm == "layernorm":
      emb = nn.LayerNorm(name="embedding_norm")(emb)
    elif self.embedding_norm == "batchnorm":
      # Centres the projections over RoIs: without it a from-scratch network
      # maps every RoI (post-ReLU, all-positive features) to nearly the same
      # direction and the OIM gradient, s * (E_p[v] - v_target), vanishes.
      emb = NeckBatchNorm(axis_name=self.axis_name if train else None,
                          name="embedding_norm")(emb, not train, stats_mask)
    elif self.embedding_norm != "none":
      raise ValueError(f"model.embedding_norm={self.embedding_norm!r}: use "
                       "'none', 'batchnorm' or 'layernorm'")
    emb = emb * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(emb * emb, axis=-1, keepdims=True), 1e-12))
    return cls, deltas, emb


class NeckBatchNorm(nn.Module):
  """BatchNorm over RoIs [K, D] with an optional mask, exact across devices.

  Same variables as flax's nn.BatchNorm ("scale", "bias"; batch_stats
  "mean", "var", biased variance, momentum on the running averages), but the
  statistics are psum'd sums over the masked rows of every device (flax
  averages per-device masked means, which differs from the global-batch
  statistic when devices hold different numbers of masked rows).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: bool, mask=None):
    """x: [K, D] float32; mask: bool [K] or None (all rows) -> [K, D].

    The statistics use the masked rows of all devices (all rows if there are
    none); every row is normalised with them.
    """
    d = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((d,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((d,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      total = lambda v: (v if self.axis_name is None else
                         jax.lax.psum(v, self.axis_name))
      w = jnp.ones(x.shape[:1], jnp.float32)
      if mask is not None:
        # No masked row on any device (no person in the batch): all rows,
        # not an empty (NaN) statistic.
        m = jnp.asarray(mask, jnp.float32)
        w = jnp.where(total(jnp.sum(m)) > 0, m, w)
      n = jnp.maximum(total(jnp.sum(w)), 1.0)
      mean = total(jnp.sum(x * w[:, None], axis=0)) / n
      var = total(jnp.sum(jnp.square(x - mean) * w[:, None], axis=0)) / n
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _features(x, mode: str, what: str):
  """res5 output -> (predictor input [K, F], init scale for its kernel).

  "pooled": the average over the map; "spatial": the flattened map, which
  keeps where things are inside the RoI (what the average throws away and a
  small from-scratch network cannot encode in its channels: on the synthetic
  data, 16 overfit images, det AP 0.60 pooled vs 0.95 spatial); "stripes":
  the map averaged over its width, flattened ([K, h*C]): keeps head / torso /
  legs apart but not left from right, so a mirrored person gives the same
  input (for the embedding; the box regressor needs left vs right). The
  kernel's init std is divided by sqrt(h*w) (sqrt(h) for stripes) so that
  initial outputs have the pooled scale.
  """
  if mode == "pooled":
    return (x if x.ndim == 2 else jnp.mean(x, axis=(1, 2))), 1.0
  if mode in ("spatial", "stripes") and x.ndim != 4:
    raise ValueError(f"{what}={mode!r} needs the res5 map [K, h, w, C], got "
                     f"{x.shape}")
  if mode == "spatial":
    return x.reshape(x.shape[0], -1), float(x.shape[1] * x.shape[2]) ** -0.5
  if mode == "stripes":
    return jnp.mean(x, axis=2).reshape(x.shape[0], -1), float(x.shape[1])**-0.5
  raise ValueError(f"model.roi.{what}={mode!r}: use 'pooled', 'spatial' or "
                   "'stripes'")


def detection_losses(cls_logits, deltas, samples: RoISamples,
                     beta: float = 1.0 / 9):
  """torchvision fastrcnn_loss over the flattened sampled RoIs.

  Args:
    cls_logits: [K, 2]; deltas: [K, 4]; samples: RoISamples flattened to [K].
  Returns:
    (cls_loss, reg_loss): cross-entropy averaged over used RoIs; smooth-L1
    summed over person RoIs and divided by the number of used RoIs (exactly 0,
    zero gradient, without person RoIs, e.g. in an image without GT).
  """
  used = (samples.labels >= 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(used), 1.0)
  logp = jax.nn.log_softmax(cls_logits, axis=-1)
  target = jnp.clip(samples.labels, 0, 1)
  ce = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
  cls = jnp.sum(ce * used) / n
  reg = jnp.sum(losses.masked_smooth_l1(
      deltas - samples.deltas, samples.labels == sampling.FG, beta)) / n
  return cls, reg


def refine_boxes(boxes, deltas, image_size):
  """One regression step: boxes [P, 4] moved by deltas [P, 4], clipped."""
  return ops.clip_boxes(ops.decode_boxes(deltas, boxes, ops.ROI_HEAD_WEIGHTS),
                        image_size)


def postprocess(proposals, proposal_valid, cls_logits, deltas, image_size, *,
                score_thresh: float, nms_thresh: float, detections: int,
                min_size: float = 1e-2, scores=None):
  """Final detections of one image.

  Decodes the person-class regression on the proposals, clips, drops scores
  <= score_thresh and tiny boxes, NMS, keeps the best `detections`.

  Args:
    proposals: [P, 4]; proposal_valid: bool [P]; cls_logits: [P, 2];
    deltas: [P, 4]; image_size: [2] (h, w); scores: optional person scores
      [P] used instead of softmax(cls_logits) (iterative refinement averages
      the scores of its stages).
  Returns:
    (boxes [M, 4], scores [M], valid bool [M]), M = detections, by score;
    invalid slots have box 0 and score 0.
  """
  if scores is None:
    scores = jax.nn.softmax(cls_logits, axis=-1)[:, 1]
  boxes = refine_boxes(proposals, deltas, image_size)
  # Strictly greater, as torchvision's postprocess_detections (score > thresh).
  valid = (proposal_valid & (scores > score_thresh) &
           ops.small_box_mask(boxes, min_size))
  keep, _ = ops.nms(boxes, scores, nms_thresh, detections, valid=valid)
  ok = keep >= 0
  idx = jnp.maximum(keep, 0)
  return (jnp.where(ok[:, None], boxes[idx], 0.0),
          jnp.where(ok, scores[idx], 0.0), ok)
