"""Box geometry and box coding.

Convention everywhere: a box is ``(x1, y1, x2, y2)`` in float32 pixels, with
no "+1": width = x2 - x1, height = y2 - y1, centre = x1 + 0.5 * width. This is
torchvision's convention (``torchvision.ops.boxes`` and the detection
``BoxCoder``), so numbers agree with it.

All functions are pure jax.numpy, jit-able with static shapes, and broadcast or
vmap over leading batch dimensions.
"""

import math
from typing import Sequence

import jax.numpy as jnp

# Upper clamp of the decoded log-scale dw/dh (torchvision's bbox_xform_clip):
# stops exp() from blowing up early in training.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def box_area(boxes):
  """Area of boxes.

  Args:
    boxes: ``[..., 4]`` (x1, y1, x2, y2).

  Returns:
    ``[...]`` float32, (x2 - x1) * (y2 - y1) (negative for inverted boxes, as
    in torchvision).
  """
  boxes = _f32(boxes)
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
  """Pairwise intersection-over-union.

  Args:
    boxes1: ``[A, 4]`` (x1, y1, x2, y2).
    boxes2: ``[B, 4]``.

  Returns:
    ``[A, B]`` float32 IoU, computed as inter / (area1 + area2 - inter) like
    torchvision; 0 where the union is 0 (e.g. two empty boxes).
  """
  boxes1 = _f32(boxes1)
  boxes2 = _f32(boxes2)
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  safe = union > 0
  return jnp.where(safe, inter / jnp.where(safe, union, 1.0), 0.0)


def clip_boxes(boxes, image_hw):
  """Clips boxes to the image: x to [0, w], y to [0, h].

  Args:
    boxes: ``[..., 4]`` (x1, y1, x2, y2).
    image_hw: ``[2]`` (height, width); may be a traced array (per-image sizes
      inside a padded canvas).

  Returns:
    ``[..., 4]`` float32 clipped boxes (= torchvision clip_boxes_to_image).
  """
  boxes = _f32(boxes)
  image_hw = _f32(image_hw)
  h, w = image_hw[..., 0], image_hw[..., 1]
  x = jnp.clip(boxes[..., 0::2], 0.0, jnp.expand_dims(w, -1))
  y = jnp.clip(boxes[..., 1::2], 0.0, jnp.expand_dims(h, -1))
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def small_box_mask(boxes, min_size):
  """Mask of boxes that are large enough to keep.

  Static-shape replacement of torchvision's ``remove_small_boxes``: instead of
  returning the kept indices, returns a mask to combine with other masks.

  Args:
    boxes: ``[..., 4]`` (x1, y1, x2, y2).
    min_size: minimum width and height in pixels.

  Returns:
    ``bool[...]``: True where width >= min_size and height >= min_size.
  """
  boxes = _f32(boxes)
  ws = boxes[..., 2] - boxes[..., 0]
  hs = boxes[..., 3] - boxes[..., 1]
  return (ws >= min_size) & (hs >= min_size)


def _centers(boxes):
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  ctr_x = boxes[..., 0] + 0.5 * widths
  ctr_y = boxes[..., 1] + 0.5 * heights
  return widths, heights, ctr_x, ctr_y


def encode_boxes(boxes, reference_boxes,
                 weights: Sequence[float] = RPN_WEIGHTS):
  """Regression targets that turn ``reference_boxes`` into ``boxes``.

  Same numbers as torchvision's ``BoxCoder(weights).encode_single(boxes,
  reference_boxes)`` (torchvision calls the targets "reference_boxes" and the
  anchors "proposals"; here ``boxes`` are the targets, e.g. matched GT, and
  ``reference_boxes`` the anchors/proposals). No clamping on encode.

  Args:
    boxes: ``[..., 4]`` target boxes.
    reference_boxes: ``[..., 4]`` anchors or proposals (positive w, h).
    weights: (wx, wy, ww, wh), e.g. (1, 1, 1, 1) for the RPN and
      (10, 10, 5, 5) for the RoI head.

  Returns:
    ``[..., 4]`` float32 deltas (dx, dy, dw, dh).
  """
  wx, wy, ww, wh = (float(w) for w in weights)
  gw, gh, gx, gy = _centers(_f32(boxes))
  ew, eh, ex, ey = _centers(_f32(reference_boxes))
  dx = wx * (gx - ex) / ew
  dy = wy * (gy - ey) / eh
  dw = ww * jnp.log(gw / ew)
  dh = wh * jnp.log(gh / eh)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(deltas, reference_boxes,
                 weights: Sequence[float] = RPN_WEIGHTS,
                 bbox_xform_clip: float = BBOX_XFORM_CLIP):
  """Applies regression deltas to reference boxes (inverse of encode_boxes).

  Same numbers as torchvision's ``BoxCoder(weights).decode_single``: dw/dh are
  divided by the weights and then clamped above at ``bbox_xform_clip``
  (log(1000/16)).

  Args:
    deltas: ``[..., 4]`` (dx, dy, dw, dh).
    reference_boxes: ``[..., 4]`` anchors or proposals.
    weights: (wx, wy, ww, wh).
    bbox_xform_clip: upper clamp of dw/dh.

  Returns:
    ``[..., 4]`` float32 boxes (x1, y1, x2, y2).
  """
  wx, wy, ww, wh = (float(w) for w in weights)
  deltas = _f32(deltas)
  widths, heights, ctr_x, ctr_y = _centers(_f32(reference_boxes))
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, bbox_xform_clip)
  dh = jnp.minimum(deltas[..., 3] / wh, bbox_xform_clip)
  pred_ctr_x = dx * widths + ctr_x
  pred_ctr_y = dy * heights + ctr_y
  pred_w = jnp.exp(dw) * widths
  pred_h = jnp.exp(dh) * heights
  half_w = 0.5 * pred_w
  half_h = 0.5 * pred_h
  return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                    pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)
