"""Tests for oim_jax.ops.anchors against torchvision's published numbers."""

import numpy as np
import pytest

from oim_jax import ops

# torchvision AnchorGenerator cell anchors for sizes (32, 64, 128, 256, 512),
# ratios (0.5, 1, 2): ratio outer, size inner; half-extents rounded.
_TV_DEFAULT = np.array([
    [-23, -11, 23, 11], [-45, -23, 45, 23], [-91, -45, 91, 45],
    [-181, -91, 181, 91], [-362, -181, 362, 181],
    [-16, -16, 16, 16], [-32, -32, 32, 32], [-64, -64, 64, 64],
    [-128, -128, 128, 128], [-256, -256, 256, 256],
    [-11, -23, 11, 23], [-23, -45, 23, 45], [-45, -91, 45, 91],
    [-91, -181, 91, 181], [-181, -362, 181, 362]], np.float32)


def _np_anchor_loop(fh, fw, stride, sizes, ratios):
  """Independent loop port of torchvision's generate_anchors + grid_anchors."""
  cell = []
  for r in ratios:
    hr = np.sqrt(np.float32(r))
    wr = np.float32(1) / hr
    for s in sizes:
      w = wr * np.float32(s)
      h = hr * np.float32(s)
      cell.append([np.round(-w / 2), np.round(-h / 2), np.round(w / 2),
                   np.round(h / 2)])
  out = []
  for y in range(fh):
    for x in range(fw):
      for c in cell:
        out.append([x * stride + c[0], y * stride + c[1], x * stride + c[2],
                    y * stride + c[3]])
  return np.array(out, np.float32)


def test_base_anchors_match_torchvision_table():
  np.testing.assert_array_equal(
      ops.base_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0)), _TV_DEFAULT)


@pytest.mark.parametrize("sizes,ratios", [
    ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0)),
    ((128, 256, 512), (0.5, 1.0, 2.0)),
    ((8, 16, 32), (1.0, 0.25)),
])
def test_grid_order_matches_loop(sizes, ratios):
  out = np.asarray(ops.anchors((3, 5), 16, sizes, ratios))
  a = len(sizes) * len(ratios)
  assert out.shape == (3 * 5 * a, 4) and out.dtype == np.float32
  assert ops.num_anchors(sizes, ratios) == a
  np.testing.assert_array_equal(out, _np_anchor_loop(3, 5, 16, sizes, ratios))


def test_rectangular_stride_and_cell_layout():
  out = np.asarray(ops.anchors((2, 3), (8, 16), (16,), (1.0,)))
  # cell (y=1, x=2): centre (32, 8).
  np.testing.assert_array_equal(out[5], [24, 0, 40, 16])


def test_traced_feature_hw_is_rejected():
  import jax
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda hw: ops.anchors(hw, 16, (32,), (1.0,)))(np.array([2, 2]))
