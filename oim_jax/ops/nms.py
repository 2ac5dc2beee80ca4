"""Greedy non-maximum suppression with static shapes, tiled (no K x K matrix).

Result = torchvision.ops.nms in set and order: boxes visited in stable
descending score order (ties keep input order), a box is dropped iff its IoU
with an already kept box is > iou_threshold (strictly), IoU computed as
inter / (area_i + area_j - inter) in float32.

Tiled formulation (the sorted boxes are cut into blocks of ``block_size``):
for block b,
  1. drop the boxes that overlap a box kept in earlier blocks: one
     ``block x max_output`` comparison against the kept boxes, stored
     compactly, with the unused slots masked (no loop over them);
  2. resolve the block internally: ``keep = cand & ~any(M & keep)`` over the
     strictly-upper-triangular "overlaps an earlier box" matrix ``M``, iterated
     to its fixed point. The recursion has a unique solution (box i depends
     only on boxes < i) and the iteration fixes one more box per step, so any
     fixed point is the greedy answer; in practice it takes a few steps.
The block loop stops as soon as ``max_output`` boxes are kept or the valid
boxes run out, so the cost follows the work actually needed. Serial work per
call: one loop over blocks, one short fixed-point loop per block, and the
sort unless the caller's scores are already sorted (``presorted``, e.g. the
output of ``lax.top_k``).
"""

import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_SIZE = 256


def _pairwise_iou(a, b):
  """[A, 4] x [B, 4] -> [A, B] with torchvision's nms arithmetic (0/0 -> 0)."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  w = jnp.maximum(
      jnp.minimum(a[:, None, 2], b[None, :, 2]) -
      jnp.maximum(a[:, None, 0], b[None, :, 0]), 0.0)
  h = jnp.maximum(
      jnp.minimum(a[:, None, 3], b[None, :, 3]) -
      jnp.maximum(a[:, None, 1], b[None, :, 1]), 0.0)
  inter = w * h
  union = area_a[:, None] + area_b[None, :] - inter
  ok = union > 0
  return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def nms(boxes, scores, iou_threshold, max_output: int, valid=None,
        block_size: int = DEFAULT_BLOCK_SIZE, presorted: bool = False):
  """Greedy NMS returning a fixed number of indices.

  Args:
    boxes: ``[K, 4]`` (x1, y1, x2, y2) pixels.
    scores: ``[K]``. Entries with score -inf or NaN are invalid: never kept and
      they suppress nothing.
    iou_threshold: suppress a box iff IoU with a kept box is > this (may be a
      traced scalar).
    max_output: static number of output slots (e.g. post-NMS top-n).
    valid: optional ``bool[K]`` mask; False entries are treated as invalid
      (padding).
    block_size: static tile size (a performance knob; results do not depend on
      it).
    presorted: the valid entries' scores are already in non-increasing order
      (ties in index order, as ``lax.top_k`` returns them): the sort is
      skipped and boxes are visited in input order; invalid entries may sit
      anywhere.

  Returns:
    ``(keep, num_kept)``: ``keep`` is ``int32[max_output]``, indices into
    ``boxes`` of the kept boxes in decreasing score order (the first
    ``max_output`` of torchvision's result), padded with -1; ``num_kept`` is an
    int32 scalar, the number of non-padding entries.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(
        f"nms: expected boxes [K, 4] and scores [K], got {boxes.shape} and "
        f"{scores.shape}; use jax.vmap for a batch of images")
  max_output = int(max_output)
  if max_output < 1:
    raise ValueError(f"nms: max_output must be >= 1, got {max_output}")
  num_boxes = boxes.shape[0]
  if num_boxes == 0:
    return jnp.full((max_output,), -1, jnp.int32), jnp.int32(0)
  is_valid = (scores > -jnp.inf) & ~jnp.isnan(scores)
  if valid is not None:
    is_valid = is_valid & jnp.asarray(valid, bool)
  if presorted:
    order = jnp.arange(num_boxes, dtype=jnp.int32)
    sorted_boxes, sorted_valid = boxes, is_valid
  else:
    # +0.0 maps -0.0 to 0.0 so that they tie, as in torch's sort.
    sort_key = jnp.where(is_valid, scores.astype(jnp.float32) + 0.0, -jnp.inf)
    order = jnp.argsort(-sort_key, stable=True).astype(jnp.int32)
    sorted_boxes, sorted_valid = boxes[order], is_valid[order]
  # One past the last valid sorted position: the blocks after it hold none.
  limit = jnp.max(jnp.where(sorted_valid, jnp.arange(1, num_boxes + 1), 0))

  bs = max(1, min(int(block_size), num_boxes))
  num_blocks = -(-num_boxes // bs)
  pad = num_blocks * bs - num_boxes
  sorted_boxes = jnp.pad(sorted_boxes, ((0, pad), (0, 0)))
  sorted_idx = jnp.pad(order, (0, pad), constant_values=-1)
  sorted_valid = jnp.pad(sorted_valid, (0, pad))
  lane = jnp.arange(bs, dtype=jnp.int32)
  slot = jnp.arange(max_output, dtype=jnp.int32)
  earlier = lane[:, None] < lane[None, :]

  def block_body(state):
    b, count, kept_boxes, keep = state
    start = b * bs
    blk = lax.dynamic_slice_in_dim(sorted_boxes, start, bs)
    blk_idx = lax.dynamic_slice_in_dim(sorted_idx, start, bs)
    blk_valid = lax.dynamic_slice_in_dim(sorted_valid, start, bs)

    # 1. Suppression by the boxes kept in earlier blocks (all slots at once:
    # a fixed-size comparison instead of a loop whose trips grow with count).
    over = (_pairwise_iou(blk, kept_boxes) > iou_threshold) & (
        slot < count)[None, :]
    cand = blk_valid & ~jnp.any(over, axis=1)

    # 2. Greedy resolution inside the block (fixed point, see module doc).
    m = (_pairwise_iou(blk, blk) > iou_threshold) & earlier

    def fix_body(carry):
      k, _ = carry
      new = cand & ~jnp.any(m & k[:, None], axis=0)
      return new, jnp.any(new != k)

    blk_keep, _ = lax.while_loop(lambda c: c[1], fix_body,
                                 (cand, jnp.array(True)))

    # 3. Append the kept boxes (compact, in order); overflow is dropped.
    pos = jnp.where(blk_keep, count + jnp.cumsum(blk_keep, dtype=jnp.int32) - 1,
                    max_output)
    kept_boxes = kept_boxes.at[pos].set(blk, mode="drop")
    keep = keep.at[pos].set(blk_idx, mode="drop")
    count = jnp.minimum(count + jnp.sum(blk_keep, dtype=jnp.int32),
                        max_output)
    return b + 1, count, kept_boxes, keep

  def block_cond(state):
    b, count, _, _ = state
    return (b < num_blocks) & (b * bs < limit) & (count < max_output)

  init = (jnp.int32(0), jnp.int32(0),
          jnp.zeros((max_output, 4), jnp.float32),
          jnp.full((max_output,), -1, jnp.int32))
  _, count, _, keep = lax.while_loop(block_cond, block_body, init)
  return keep, count


def batched_nms(boxes, scores, idxs, iou_threshold, max_output: int,
                valid=None, block_size: int = DEFAULT_BLOCK_SIZE):
  """NMS applied independently per category (coordinate-offset trick).

  Boxes of different ``idxs`` are moved apart by a per-category offset larger
  than the extent of all valid boxes, so they never overlap; one ``nms`` then
  gives the per-category results merged in decreasing score order (as
  torchvision.ops.batched_nms). For several images use jax.vmap.

  Args:
    boxes: ``[K, 4]``.
    scores: ``[K]`` (-inf / NaN invalid).
    idxs: ``int[K]`` category of each box.
    iou_threshold: as in ``nms``.
    max_output: static number of output slots.
    valid: optional ``bool[K]``.
    block_size: static tile size.

  Returns:
    ``(keep int32[max_output] -1 padded, num_kept)`` as in ``nms``.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  ok = (scores > -jnp.inf) & ~jnp.isnan(scores)
  if valid is not None:
    ok = ok & jnp.asarray(valid, bool)
  hi = jnp.max(jnp.where(ok[:, None], boxes, -jnp.inf))
  lo = jnp.min(jnp.where(ok[:, None], boxes, jnp.inf))
  extent = jnp.where(jnp.any(ok), hi - lo + 1.0, 1.0)
  offsets = jnp.asarray(idxs).astype(jnp.float32) * extent
  return nms(boxes + offsets[:, None], scores, iou_threshold, max_output,
             valid=ok, block_size=block_size)
