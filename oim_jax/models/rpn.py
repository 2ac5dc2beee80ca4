"""Region proposal network with static shapes: head, targets, losses, proposals.

Everything per image is written for one image and vmapped over the batch.
Anchors follow `oim_jax.ops.anchors` (torchvision order): the head's outputs
`[h, w, A]` flatten to `[h*w*A]` in the same order.

Anchor validity: images sit top-left on a padded canvas; an anchor whose
centre lies outside the true image (`x_c >= w` or `y_c >= h`) is invalid. It
is never a training target (neither fg nor bg) and never a proposal.
"""

from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oim_jax import ops
from oim_jax.models import resnet

# Sampling labels.
FG, BG, IGNORE = 1, 0, -1


class RPNHead(nn.Module):
  """3x3 conv + ReLU, then 1x1 objectness and 1x1 box deltas per anchor.

  Attributes:
    num_anchors: A, anchors per feature-map cell.
    channels: channels of the 3x3 conv (torchvision: = input channels).
    dtype: compute dtype; outputs are float32.
    wgrad_im2col_min_channels: the 3x3 conv's weight gradient as an im2col
      matmul from this many input channels (resnet.Conv3x3; 0 = never).
  """
  num_anchors: int
  channels: int
  dtype: Any = jnp.float32
  wgrad_im2col_min_channels: int = 0  # see resnet.Conv3x3

  @nn.compact
  def __call__(self, x):
    """x: [N, h, w, C] -> (logits [N, h*w*A], deltas [N, h*w*A, 4]) float32."""
    init = nn.initializers.normal(0.01)  # torchvision RPNHead init
    conv = lambda f, name: nn.Conv(
        f, (1, 1), padding="SAME", kernel_init=init, dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    t = resnet.Conv3x3(self.channels, 1, self.dtype, use_bias=True,
                       kernel_init=init, name="conv",
                       wgrad_im2col_min_channels=(
                           self.wgrad_im2col_min_channels))(
                               x.astype(self.dtype))
    t = nn.relu(t)
    logits = conv(self.num_anchors, "cls_logits")(t)
    deltas = conv(self.num_anchors * 4, "bbox_pred")(t)
    n = x.shape[0]
    return (logits.reshape(n, -1).astype(jnp.float32),
            deltas.reshape(n, -1, 4).astype(jnp.float32))


def anchor_valid_mask(anchors, image_size):
  """anchors: [A, 4], image_size: [2] (h, w) -> bool [A], centre inside."""
  cx = (anchors[:, 0] + anchors[:, 2]) * 0.5
  cy = (anchors[:, 1] + anchors[:, 3]) * 0.5
  h, w = image_size[0].astype(jnp.float32), image_size[1].astype(jnp.float32)
  return (cx < w) & (cy < h)


def match(iou, row_valid, gt_valid, fg_thresh, bg_thresh, low_quality: bool,
          bg_thresh_lo: float = 0.0):
  """Matches rows (anchors / proposals) to GTs by IoU.

  torchvision `Matcher` semantics: fg iff best IoU >= fg_thresh, bg iff
  bg_thresh_lo <= best IoU < bg_thresh, ignored in between. With
  `low_quality`, every row that attains some GT's highest IoU (> 0) is also
  fg (matched to its own best GT, as torchvision does).

  Args:
    iou: [R, G] float32.
    row_valid: bool [R]; invalid rows are IGNORE.
    gt_valid: bool [G]; padded GTs are never matched.
    fg_thresh, bg_thresh, bg_thresh_lo: thresholds.
    low_quality: allow low-quality matches (RPN: True, RoI head: False).

  Returns:
    (labels int32 [R] in {FG, BG, IGNORE}, matched int32 [R] GT index).
  """
  iou = jnp.where(gt_valid[None, :], iou, -1.0)
  best = jnp.max(iou, axis=1)
  matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
  labels = jnp.where(best >= fg_thresh, FG,
                     jnp.where((best < bg_thresh) & (best >= bg_thresh_lo),
                               BG, IGNORE))
  if low_quality:
    masked = jnp.where(row_valid[:, None], iou, -1.0)
    gt_best = jnp.max(masked, axis=0)  # [G]
    is_best = (masked == gt_best[None, :]) & (gt_best[None, :] > 0)
    labels = jnp.where(jnp.any(is_best, axis=1), FG, labels)
  # No valid GT at all: every valid row is background.
  labels = jnp.where(jnp.any(gt_valid), labels, BG)
  labels = jnp.where(row_valid, labels, IGNORE)
  return labels.astype(jnp.int32), matched


def sample(labels, key, num_samples: int, fg_fraction: float):
  """Balanced fg/bg sampling with static shapes.

  Up to `int(num_samples * fg_fraction)` fg rows chosen uniformly at random,
  then bg rows fill up to `num_samples` (torchvision
  BalancedPositiveNegativeSampler), via random priorities + top_k.

  Args:
    labels: int32 [R] in {FG, BG, IGNORE}.
    key: PRNG key (one per image).
    num_samples: samples per image (static).
    fg_fraction: maximum fraction of fg samples.

  Returns:
    (index int32 [S], kind int32 [S]) with S = min(num_samples, R): the
    sampled rows and their label, IGNORE for unused slots (too few
    candidates), whose index is arbitrary. Fg samples come first.
  """
  r = labels.shape[0]
  s = min(num_samples, r)
  max_fg = int(num_samples * fg_fraction)
  prio = jax.random.uniform(key, (r,))
  is_fg, is_bg = labels == FG, labels == BG
  num_fg = jnp.minimum(jnp.sum(is_fg), max_fg)
  num_bg = jnp.minimum(jnp.sum(is_bg), s - num_fg)
  # Priority in (1, 2) for candidates so that they beat every non-candidate.
  fg_idx = jax.lax.top_k(jnp.where(is_fg, 1.0 + prio, prio - 1.0), s)[1]
  bg_idx = jax.lax.top_k(jnp.where(is_bg, 1.0 + prio, prio - 1.0), s)[1]
  slot = jnp.arange(s)
  # Slot i < num_fg: i-th fg; num_fg <= i < num_fg + num_bg: (i-num_fg)-th bg.
  bg_pos = jnp.clip(slot - num_fg, 0, s - 1)
  index = jnp.where(slot < num_fg, fg_idx, bg_idx[bg_pos])
  kind = jnp.where(slot < num_fg, FG,
                   jnp.where(slot < num_fg + num_bg, BG, IGNORE))
  return index.astype(jnp.int32), kind.astype(jnp.int32)


class RPNTargets(NamedTuple):
  """Per-anchor training targets of one image (or a batch: leading B)."""
  labels: jax.Array  # int32 [A]: FG / BG for sampled anchors, else IGNORE
  deltas: jax.Array  # float32 [A, 4] regression targets (valid where FG)


def rpn_targets(anchors, anchor_valid, gt_boxes, gt_valid, key, *,
                fg_iou: float = 0.7, bg_iou: float = 0.3,
                batch_size: int = 256, fg_fraction: float = 0.5):
  """Anchor labels and regression targets for one image.

  Args:
    anchors: [A, 4]; anchor_valid: bool [A].
    gt_boxes: [G, 4]; gt_valid: bool [G] (padding masked).
    key: PRNG key for the sampling.
  Returns:
    RPNTargets with labels of the sampled anchors only; deltas are 0 except
    at fg anchors. With no valid GT every valid anchor is BG (torchvision).
  """
  iou = ops.box_iou(anchors, gt_boxes)
  labels, matched = match(iou, anchor_valid, gt_valid, fg_iou, bg_iou, True)
  index, kind = sample(labels, key, batch_size, fg_fraction)
  # Unused slots may repeat a sampled row: send them out of range (dropped),
  # so the scatter has unique indices.
  sampled = jnp.full_like(labels, IGNORE).at[
      jnp.where(kind >= 0, index, labels.shape[0])].set(kind, mode="drop")
  # Non-fg anchors may be matched to a padded all-zero GT (always so in an
  # image without GT): encoding it gives log(0) = -inf. Encode the anchor
  # against itself there instead (deltas 0), so the targets stay finite.
  fg = (labels == FG)[:, None]
  target = jnp.where(fg, gt_boxes[matched], anchors)
  deltas = jnp.where(fg, ops.encode_boxes(target, anchors, ops.RPN_WEIGHTS),
                     0.0)
  return RPNTargets(sampled, deltas)


def smooth_l1(x, beta: float):
  """Elementwise smooth-L1 (torch's, beta > 0), float32."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def rpn_losses(logits, deltas, targets: RPNTargets, beta: float = 1.0 / 9):
  """torchvision RPN losses over a batch.

  Args:
    logits: [B, A]; deltas: [B, A, 4]; targets: RPNTargets with [B, A] labels.
    beta: smooth-L1 beta (torchvision: 1/9).

  Returns:
    (cls_loss, reg_loss): BCE averaged over sampled anchors; smooth-L1 summed
    over fg anchors and divided by the number of sampled anchors (exactly 0,
    with zero gradient, when no anchor is fg, e.g. an image without GT).
  """
  labels = targets.labels
  sampled = (labels >= 0).astype(jnp.float32)
  is_fg = labels == FG
  n = jnp.maximum(jnp.sum(sampled), 1.0)
  bce = optax_sigmoid_bce(logits, is_fg.astype(jnp.float32))
  cls = jnp.sum(bce * sampled) / n
  reg = jnp.sum(masked_smooth_l1(deltas - targets.deltas, is_fg, beta)) / n
  return cls, reg


def masked_smooth_l1(x, mask, beta: float):
  """smooth_l1(x) where mask ([...] bool, over x [..., 4]), else exactly 0.

  The mask is applied to the input as well as to the output: a non-finite x
  outside the mask then reaches neither the value (0 * inf = NaN) nor the
  gradient (the unselected branch's inf * 0 cotangent).
  """
  m = mask[..., None]
  return jnp.where(m, smooth_l1(jnp.where(m, x, 0.0), beta), 0.0)


def optax_sigmoid_bce(logits, labels):
  """Numerically stable binary cross-entropy with logits."""
  return (jnp.maximum(logits, 0) - logits * labels +
          jnp.log1p(jnp.exp(-jnp.abs(logits))))


def proposals(logits, deltas, anchors, anchor_valid, image_size, *,
              pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
              min_size: float) -> Tuple[jax.Array, jax.Array]:
  """Proposals of one image (torchvision RegionProposalNetwork.filter_proposals).

  Top-k by objectness, decode, clip to the image, drop tiny boxes, NMS,
  keep the best `post_nms_top_n`.

  Args:
    logits: [A]; deltas: [A, 4]; anchors: [A, 4]; anchor_valid: bool [A];
    image_size: [2] (h, w).
  Returns:
    (boxes float32 [P, 4], valid bool [P]), P = post_nms_top_n, by score.
  """
  k = min(pre_nms_top_n, logits.shape[0])
  scores = jnp.where(anchor_valid, logits, -jnp.inf)
  top, idx = jax.lax.top_k(scores, k)
  boxes = ops.decode_boxes(deltas[idx], anchors[idx], ops.RPN_WEIGHTS)
  boxes = ops.clip_boxes(boxes, image_size)
  valid = (top > -jnp.inf) & ops.small_box_mask(boxes, min_size)
  keep, _ = ops.nms(boxes, top, nms_thresh, post_nms_top_n, valid=valid)
  out = boxes[jnp.maximum(keep, 0)]
  ok = keep >= 0
  return jnp.where(ok[:, None], out, 0.0), ok
