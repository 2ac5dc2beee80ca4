"""Test-time flips of padded images and boxes against NumPy."""

import numpy as np

from oim_jax import ops


def test_flip_images_mirrors_inside_width_keeps_padding():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (3, 5, 9, 3)).astype(np.uint8)
  widths = np.array([9, 6, 0])
  out = np.asarray(ops.flip_images(images, widths))
  for i, w in enumerate(widths):
    np.testing.assert_array_equal(out[i, :, :w], images[i, :, :w][:, ::-1])
    np.testing.assert_array_equal(out[i, :, w:], images[i, :, w:])
  # Flipping twice gives the input back.
  np.testing.assert_array_equal(
      np.asarray(ops.flip_images(out, widths)), images)


def test_flip_boxes_hand_computed():
  boxes = np.array([[[10., 5., 30., 50.], [0., 0., 100., 40.]]], np.float32)
  out = np.asarray(ops.flip_boxes(boxes, np.array([100])))
  np.testing.assert_allclose(out, [[[70., 5., 90., 50.], [0., 0., 100., 40.]]])
  # A box keeps its pixels: a 1-px column at x=0 of a 100-px image is at 99.
  one = np.asarray(ops.flip_boxes(np.array([[[0., 0., 1., 1.]]]), [100]))
  np.testing.assert_allclose(one, [[[99., 0., 100., 1.]]])
