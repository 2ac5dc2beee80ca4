"""ImageNet normalisation of the pipeline's uint8 images, on device."""

from typing import Optional

import jax
import jax.numpy as jnp

# torchvision's ImageNet statistics (RGB, [0, 1] scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, dtype=jnp.float32,
              image_size: Optional[jax.Array] = None) -> jax.Array:
  """ImageNet normalisation of uint8 images, on device.

  The pipeline ships uint8 so that the host->device copy is 4x smaller than
  float32; the model calls this as its first op.

  Args:
    images: uint8 [B, H, W, 3] RGB canvases.
    dtype: output dtype (float32 or bfloat16).
    image_size: optional int [B, 2] (h, w) of the image on each canvas: the
      padding outside it is set to 0 after normalising, as torchvision's
      GeneralizedRCNNTransform pads. Without it the padding (0) becomes
      -mean/std.

  Returns:
    [B, H, W, 3] (images - 255 * mean) / (255 * std) in `dtype`.
  """
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  out = (images.astype(jnp.float32) - mean) / std
  if image_size is not None:
    h, w = images.shape[1:3]
    inside = ((jnp.arange(h)[None, :, None] < image_size[:, 0, None, None]) &
              (jnp.arange(w)[None, None, :] < image_size[:, 1, None, None]))
    out = jnp.where(inside[..., None], out, 0.0)
  return out.astype(dtype)
