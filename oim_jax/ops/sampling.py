"""Matching rows (anchors, proposals) to ground-truth boxes, and sampling them.

The RPN and the RoI head share both (torchvision's `Matcher` and
`BalancedPositiveNegativeSampler`), written with static shapes: every row
gets a label, and sampling returns a fixed number of slots.
"""

import jax
import jax.numpy as jnp

# Row labels. (Not identity labels: those are in oim_jax/pids.py.)
FG, BG, IGNORE = 1, 0, -1


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
