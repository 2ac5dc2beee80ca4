"""Image sources: random access to a split's encoded images, boxes and pids.

A source also gives every image's original size and box counts without
decoding anything, which is what the input pipeline plans batches from.
`AnnotationSource` reads the image files of a list of ImageAnnotation;
oim_jax.data.tfds_builders.TfdsSource reads prepared array_record files.
"""

from __future__ import annotations

from concurrent import futures
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from oim_jax.data.dataset import ImageAnnotation


class ImageSource:
  """Random access to a split: names, original sizes, boxes, encoded images.

  Attributes:
    names: [N] image names.
    sizes: int [N, 2] original (h, w), known without decoding.
    num_boxes, num_labeled: int [N] box counts (all / pid >= 0).
  """
  names: list[str]
  sizes: np.ndarray
  num_boxes: np.ndarray
  num_labeled: np.ndarray

  def __len__(self) -> int:
    return len(self.names)

  def read(self, index: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(encoded image bytes, boxes [n, 4] float32, pids [n] int32)."""
    raise NotImplementedError


def image_size(path: str) -> tuple[int, int]:
  """(h, w) of an image file, from its header."""
  try:
    with Image.open(path) as im:  # Reads the header only.
      w, h = im.size
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except Exception as e:  # PIL raises several types for bad files.
    raise ValueError(f"cannot read image {path}: {e}") from e
  return h, w


class AnnotationSource(ImageSource):
  """Reads the image files named by a list of ImageAnnotation."""

  def __init__(self, annotations: Sequence[ImageAnnotation],
               sizes: Optional[np.ndarray] = None, num_threads: int = 8):
    """Args: annotations; sizes [N, 2] (h, w) if known, else read headers."""
    self.annotations = list(annotations)
    self.names = [a.name for a in self.annotations]
    if sizes is None:
      with futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        sizes = list(pool.map(image_size, [a.path for a in self.annotations]))
    self.sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    self.num_boxes = np.array([len(a.pids) for a in self.annotations], np.int64)
    self.num_labeled = np.array(
        [int(np.sum(np.asarray(a.pids) >= 0)) for a in self.annotations],
        np.int64)

  def read(self, index):
    a = self.annotations[index]
    try:
      with open(a.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      raise FileNotFoundError(
          f"image file not found: {a.path} (image {a.name!r})") from None
    return (data, np.asarray(a.boxes, np.float32).reshape(-1, 4),
            np.asarray(a.pids, np.int32).reshape(-1))
