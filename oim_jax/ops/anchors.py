"""Anchor boxes for one stride-``s`` feature map (torchvision AnchorGenerator).

Anchors depend only on static Python values (feature map size, stride, sizes,
ratios), so they are computed once in NumPy float32 and returned as a constant:
no work inside jit, and no recompilation as long as the canvas bucket is the
same.
"""

from typing import Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np


def base_anchors(sizes: Sequence[float],
                 aspect_ratios: Sequence[float]) -> np.ndarray:
  """Cell anchors centred on (0, 0), exactly as torchvision rounds them.

  Order: aspect ratio outer, size inner (``A = len(ratios) * len(sizes)``);
  a ratio is h / w; w = size / sqrt(ratio), h = size * sqrt(ratio); the
  half-extents are rounded half-to-even (torch.round) in float32.

  Args:
    sizes: anchor sizes in pixels, e.g. (32, 64, 128, 256, 512).
    aspect_ratios: h / w ratios, e.g. (0.5, 1.0, 2.0).

  Returns:
    ``[A, 4]`` float32 NumPy array (x1, y1, x2, y2).
  """
  scales = np.asarray(sizes, np.float32)
  ratios = np.asarray(aspect_ratios, np.float32)
  if scales.ndim != 1 or ratios.ndim != 1 or not scales.size or not ratios.size:
    raise ValueError(
        f"anchors: sizes and aspect_ratios must be non-empty 1-D sequences, got "
        f"sizes={sizes!r}, aspect_ratios={aspect_ratios!r}")
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1.0) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
  return np.round(base).astype(np.float32)


def num_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> int:
  """Anchors per feature-map cell, ``A``."""
  return len(sizes) * len(aspect_ratios)


def anchors(feature_hw: Tuple[int, int],
            stride: Union[int, Tuple[int, int]],
            sizes: Sequence[float],
            aspect_ratios: Sequence[float]):
  """All anchors of one feature map, in torchvision's order.

  Row-major over cells (y outer, x inner), then the ``A`` base anchors of each
  cell in ``base_anchors`` order, shifted by (x * stride_w, y * stride_h).
  The RPN head's outputs ``[h, w, A]`` reshaped to ``[h*w*A]`` line up with
  this order.

  Args:
    feature_hw: static (h, w) of the feature map.
    stride: static int, or (stride_h, stride_w), in image pixels per cell
      (torchvision: image_size // feature_size).
    sizes: anchor sizes in pixels.
    aspect_ratios: h / w ratios.

  Returns:
    ``[h * w * A, 4]`` float32 (x1, y1, x2, y2).
  """
  try:
    fh, fw = (int(v) for v in feature_hw)
  except TypeError as e:
    raise TypeError(
        "anchors: feature_hw must be static Python ints (h, w), e.g. "
        "features.shape[1:3]; got a traced value") from e
  if isinstance(stride, (tuple, list)):
    sh, sw = (int(s) for s in stride)
  else:
    sh = sw = int(stride)
  base = base_anchors(sizes, aspect_ratios)
  shift_x = np.arange(fw, dtype=np.int64) * sw
  shift_y = np.arange(fh, dtype=np.int64) * sh
  sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
  sx = sx.reshape(-1).astype(np.float32)
  sy = sy.reshape(-1).astype(np.float32)
  shifts = np.stack([sx, sy, sx, sy], axis=1)
  out = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
  return jnp.asarray(out, jnp.float32)
