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
from oim_jax.ops.losses import masked_smooth_l1, sigmoid_bce
from oim_jax.ops.sampling import FG, IGNORE, match, sample
from oim_jax.models import resnet



class RPNHead(nn.Module):
  """3x3 conv + ReLU, then 1x1 objectness and 1x1 box deltas per anchor.

  Attributes:
    num_anchors: A, anchors per feature-map cell.
    channels: channels of the 3x3 conv (torchvision: = input channels).
    dtype: compute dtype; outputs are float32.
    conv3x3: the 3x3 conv's module (resnet.Conv3x3 or a partial of it).
  """
  num_anchors: int
  channels: int
  dtype: Any = jnp.float32
  conv3x3: resnet.ModuleDef = resnet.Conv3x3

  @nn.compact
  def __call__(self, x):
    """x: [N, h, w, C] -> (logits [N, h*w*A], deltas [N, h*w*A, 4]) float32."""
    init = nn.initializers.normal(0.01)  # torchvision RPNHead init
    conv = lambda f, name: nn.Conv(
        f, (1, 1), padding="SAME", kernel_init=init, dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    t = self.conv3x3(self.channels, 1, self.dtype, use_bias=True,
                     kernel_init=init, name="conv")(x.astype(self.dtype))
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
  bce = sigmoid_bce(logits, is_fg.astype(jnp.float32))
  cls = jnp.sum(bce * sampled) / n
  reg = jnp.sum(masked_smooth_l1(deltas - targets.deltas, is_fg, beta)) / n
  return cls, reg


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
  # top_k already ordered them (ties by index): NMS need not sort again.
  keep, _ = ops.nms(boxes, top, nms_thresh, post_nms_top_n, valid=valid,
                    presorted=True)
  out = boxes[jnp.maximum(keep, 0)]
  ok = keep >= 0
  return jnp.where(ok[:, None], out, 0.0), ok
