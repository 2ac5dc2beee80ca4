"""Person search on your own pictures: one query box against a folder.

Embeds the query box, detects and embeds every person in every gallery image
(any size, JPEG or PNG), ranks the detections by cosine similarity and draws
the query crop beside the top-k matches.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
from PIL import Image

from oim_jax import config_defaults
from oim_jax import eval_lib
from oim_jax import media
from oim_jax.data.dataset import ImageAnnotation
from oim_jax.search_index import Match


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config train.py stored in DIR/config.json.

  Read onto `config_defaults.base_config()`: a field added to the code after
  the run was trained takes its default (which keeps the old behaviour), so
  older workdirs keep working.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: pass --config=<the training config> or point "
        "--workdir at a directory written by train.py.")
  with open(path) as f:
    return config_from_dict(json.load(f))


def config_from_dict(stored: dict) -> ml_collections.ConfigDict:
  """A stored config (config.json, an index's manifest) onto the defaults."""
  config = config_defaults.base_config()
  config.update(stored)
  return config


def gallery_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"gallery folder {folder} does not exist")
  paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                 if media.kind_of(n) == "image")
  if not paths:
    raise ValueError(
        f"no {'/'.join(media.IMAGE_EXTENSIONS)} images in {folder}")
  return paths


def embed_query(inference: eval_lib.Inference, query_image: str,
                query_box: Sequence[float]) -> np.ndarray:
  """The [D] embedding of a box (x1, y1, x2, y2 pixels) in an image file."""
  box = np.asarray(query_box, np.float32).reshape(4)
  with Image.open(query_image) as im:
    w, h = im.size
  if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
    raise ValueError(f"query box {tuple(box)} is not inside {query_image} "
                     f"({w}x{h}); expected x1,y1,x2,y2 with x1<x2, y1<y2.")
  query = ImageAnnotation(os.path.basename(query_image), query_image,
                          box[None], np.zeros((1,), np.int32))
  return inference.embed([query], "query")[0]


def search(config: ml_collections.ConfigDict, params, query_image: str,
           query_box: Sequence[float], gallery: Sequence[str],
           top_k: int = 10, det_thresh: Optional[float] = None
           ) -> list[Match]:
  """Ranks every detected person in `gallery` against the query box.

  Args:
    config: the model's config.
    params: trained parameters.
    query_image: path of the query's scene image.
    query_box: (x1, y1, x2, y2) in the query image's pixels.
    gallery: paths of gallery images.
    top_k: how many matches to return.
    det_thresh: minimum detection score (default config.eval.det_thresh).

  Returns:
    the top_k matches, best first.
  """
  thresh = config.eval.det_thresh if det_thresh is None else det_thresh
  inference = eval_lib.Inference(config, params)
  q = embed_query(inference, query_image, query_box)
  images = [ImageAnnotation(p, p, np.zeros((0, 4), np.float32),
                            np.zeros((0,), np.int32)) for p in gallery]
  detections = inference.detect(images, "gallery")
  rows = []
  for path in gallery:
    boxes, scores, emb = detections[path]
    keep = scores >= thresh
    for b, s, e in zip(boxes[keep], scores[keep], emb[keep]):
      rows.append((float(e @ q), float(s), path, b))
  rows.sort(key=lambda r: -r[0])
  return [Match(i + 1, p, b, sim, s)
          for i, (sim, s, p, b) in enumerate(rows[:top_k])]


def draw(query_image: str, query_box: Sequence[float],
         matches: Sequence[Match], out_path: str, columns: int = 5):
  """Query crop, then one panel per match with its box and similarity."""
  # Imported here: the headless backend must be chosen before pyplot loads.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.patches as patches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(matches) + 1
  cols = min(columns, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  x1, y1, x2, y2 = (int(round(v)) for v in query_box)
  with Image.open(query_image) as im:
    crop = np.asarray(im.convert("RGB"))[y1:y2, x1:x2]
  axes.flat[0].imshow(crop)
  axes.flat[0].set_title("query", fontsize=10, color="tab:blue")
  for ax, m in zip(list(axes.flat)[1:], matches):
    ax.imshow(media.load_rgb(m.image, m.frame, m.timestamp))
    bx1, by1, bx2, by2 = m.box
    ax.add_patch(patches.Rectangle((bx1, by1), bx2 - bx1, by2 - by1,
                                   fill=False, lw=2, color="lime"))
    where = os.path.basename(m.image)
    if m.timestamp is not None:
      where += f" @ {m.timestamp:.1f} s"
    ax.set_title(f"#{m.rank} sim {m.similarity:.2f} det {m.score:.2f}\n"
                 f"{where}", fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=90)
  plt.close(fig)
