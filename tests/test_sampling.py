"""Tests for oim_jax/ops/sampling.py: matching rows to GTs, balanced sampling."""

import jax
import jax.numpy as jnp
import numpy as np

from oim_jax import ops
from oim_jax.ops import sampling


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
  labels, matched = sampling.match(ops.box_iou(anchors, gts), valid, gt_valid,
                              0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [1, 0, 0, 1, 1, -1, -1])
  np.testing.assert_array_equal(np.asarray(matched)[[0, 3, 4]], [0, 1, 0])


def test_sample_with_too_few_candidates():
  labels = jnp.array([1, -1, 0, -1, 0, -1])
  index, kind = sampling.sample(labels, jax.random.PRNGKey(0), 5, 0.5)
  np.testing.assert_array_equal(kind, [1, 0, 0, -1, -1])
  assert int(index[0]) == 0 and set(np.asarray(index[1:3])) == {2, 4}
