"""Horizontal flips of padded images and their boxes (test-time flipping).

Images sit top-left in a zero-padded canvas, so a flip mirrors each image
within its own width and leaves its padding where it was: the flipped batch
looks like one the input pipeline could have produced.
"""

import jax.numpy as jnp


def flip_images(images, widths):
  """images [B, H, W, C], widths [B] (valid columns) -> mirrored [B, H, W, C].

  Column x < width reads column width - 1 - x; padding columns stay.
  """
  cols = jnp.arange(images.shape[2], dtype=jnp.int32)[None, :]
  w = jnp.asarray(widths, jnp.int32)[:, None]
  src = jnp.where(cols < w, w - 1 - cols, cols)  # [B, W]
  return jnp.take_along_axis(images, src[:, None, :, None], axis=2)


def flip_boxes(boxes, widths):
  """boxes [B, K, 4] (x1, y1, x2, y2), widths [B] -> the mirrored boxes.

  Pixel edges map x -> width - x, so x1' = width - x2 and x2' = width - x1.
  """
  w = jnp.asarray(widths, jnp.float32)[:, None]
  return jnp.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0],
                    boxes[..., 3]], axis=-1)
