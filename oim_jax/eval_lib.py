"""Evaluation: restore parameters, detect + embed the gallery, embed queries,
score with the dataset's standard protocol.

Raw outputs are saved under DIR/eval/ (detections and embeddings keyed by
image name, query embeddings in protocol order) so that re-scoring, e.g.
with another gallery size, needs no model run (`from_saved=True`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from oim_jax import checkpointing
from oim_jax import evaluation
from oim_jax.data.dataset import ImageAnnotation, SearchDataset

RAW_FILE = "raw_outputs.npz"


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   step: Optional[int] = None) -> tuple[Any, int]:
  """Restores the model variables alone (works for any training device count).

  With config.train.ema_decay > 0 these are the checkpoint's moving average
  (item "ema"), else its live weights (item "params").

  Returns:
    (variables {"params", and "batch_stats" with the BN neck}, step).
  """
  from oim_jax import train_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  model = person_search.create_model(config)
  abstract = jax.eval_shape(
      lambda k: person_search.init_variables(model, config, k,
                                             pretrained=False),
      jax.random.key(0))
  mgr = checkpointing.manager(workdir, read_only=True, async_saves=False)
  item = "params"
  if train_lib.ema_decay(config) > 0:
    item = checkpointing.EMA_ITEM
    at = mgr.latest_step() if step is None else step
    if at is not None and not checkpointing.has_item(mgr, at, item):
      raise ValueError(
          f"config.train.ema_decay={config.train.ema_decay} but the checkpoint "
          f"at step {at} under {mgr.directory} has no moving average (it was "
          "trained with ema_decay=0): evaluate its weights with "
          "--config.train.ema_decay=0.")
  step, items, _ = checkpointing.restore(mgr, {item: abstract}, step)
  return items[item], step


class Inference:
  """Jit-compiled detection and box embedding over static-shape batches."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any):
    from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
    self.config = config
    self.params = params
    self.options = pipeline.PipelineOptions.from_config(config.data)
    model = person_search.create_model(config)
    self._detect = jax.jit(lambda p, im, sz: person_search.detect(
        model, config, p, im, sz))
    self._embed = jax.jit(lambda p, im, bx, sz: person_search.embed_boxes(
        model, config, p, im, bx, sz))

  def _batches(self, annotations: Sequence[ImageAnnotation], what: str):
    from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    it = pipeline.EvalIterator(pipeline.AnnotationSource(annotations),
                               batch_size=self.config.eval.batch_size,
                               options=self.options)
    return _progress(it, it.num_batches, what)

  def detect(self, images: Sequence[ImageAnnotation], what: str = "gallery"):
    """Detects and embeds persons in every image.

    Returns:
      {name: (boxes [n, 4], scores [n], embeddings [n, D])}, boxes in the
      original image's pixels.
    """
    detections = {}
    t0 = time.time()
    for batch in self._batches(images, what):
      out = jax.device_get(self._detect(self.params, batch["image"],
                                        batch["image_size"]))
      for i, idx in enumerate(batch["index"]):
        if idx < 0:
          continue
        keep = out["valid"][i]
        detections[images[idx].name] = (
            (out["boxes"][i][keep] / batch["scale"][i]).astype(np.float32),
            out["scores"][i][keep].astype(np.float32),
            out["embeddings"][i][keep].astype(np.float32))
    logging.info("%s: %d images in %.1f s", what, len(images),
                 time.time() - t0)
    return detections

  def embed(self, images: Sequence[ImageAnnotation],
            what: str = "queries") -> np.ndarray:
    """Embeds the first box of every image (a query's GT box): [N, D]."""
    out = [None] * len(images)
    for batch in self._batches(images, what):
      emb = jax.device_get(self._embed(self.params, batch["image"],
                                       batch["boxes"][:, :1],
                                       batch["image_size"]))
      for i, idx in enumerate(batch["index"]):
        if idx >= 0:
          out[idx] = emb[i, 0]
    return np.stack(out).astype(np.float32)


def run_inference(config: ml_collections.ConfigDict, params: Any,
                  dataset: SearchDataset,
                  inference: Optional[Inference] = None):
  """Detects + embeds every gallery image; embeds every query box.

  Args:
    config, params, dataset: what to run.
    inference: an Inference to reuse (its compiled functions are kept, its
      params replaced), e.g. across evaluations during training.

  Returns:
    (detections {name: (boxes[n,4], scores[n], embeddings[n,D])} in original
    image pixels, query_embeddings [num_queries, D]).
  """
  from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if inference is None:
    inference = Inference(config, params)
  inference.params = params
  detections = inference.detect(dataset.gallery, "gallery")
  query_emb = inference.embed(pipeline.query_annotations(dataset.queries),
                              "queries")
  return detections, query_emb


def _progress(batches, total, what, interactive=None):
  """Yields `batches`, showing progress: a tqdm bar on a terminal, else a log
  line every 10 batches (log files stay readable)."""
  if interactive is None:
    interactive = sys.stderr.isatty()
  if interactive:
    import tqdm  # pylint: disable=g-import-not-at-top
    with tqdm.tqdm(total=total, desc=what, unit="batch",
                   dynamic_ncols=True) as bar:
      for batch in batches:
        yield batch
        bar.update(1)
    return
  t0 = time.time()
  for i, batch in enumerate(batches):
    yield batch
    if (i + 1) % 10 == 0 or i + 1 == total:
      rate = (i + 1) * len(batch["index"]) / max(time.time() - t0, 1e-9)
      logging.info("%s: batch %d/%d (%.1f images/s)", what, i + 1, total,
                   rate)


def _subset_metrics(dataset, detections, query_emb, eval_config) -> dict:
  """CUHK-SYSU occlusion / resolution subsets, when their files are present.

  Keys "occlusion_mAP", "occlusion_top1", ... (empty for other datasets).
  """
  from oim_jax.data import cuhk_sysu  # pylint: disable=g-import-not-at-top
  if not dataset.protocols or not os.path.isdir(dataset.root):
    return {}
  out = {}
  for name in cuhk_sysu.QUERY_SUBSETS:
    subset = cuhk_sysu.load_query_subset(dataset, name)
    if subset is None:
      continue
    indices, view = subset
    result = evaluation.evaluate_search(
        view, detections, np.asarray(query_emb)[indices],
        gallery_size=max(view.protocols), det_thresh=eval_config.det_thresh)
    out.update({f"{name}_{k}": v for k, v in result.items()})
  return out


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             params: Any = None, dataset: Optional[SearchDataset] = None,
             step: Optional[int] = None,
             from_saved: bool = False,
             inference: Optional[Inference] = None) -> dict[str, Any]:
  """Runs (or reloads) inference and scores it; writes DIR/eval/metrics.json.

  `inference` (optional) is reused instead of compiling a new one.
  """
  from oim_jax.data import datasets as data_lib  # pylint: disable=g-import-not-at-top

  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  raw_path = os.path.join(out_dir, RAW_FILE)
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  if from_saved:
    if not os.path.exists(raw_path):
      raise FileNotFoundError(
          f"{raw_path} does not exist: run eval.py once without --from_saved "
          "to compute the raw outputs.")
    detections, query_emb = evaluation.load_results(raw_path)
  else:
    if params is None:
      params, step = restore_params(config, workdir, step)
    detections, query_emb = run_inference(config, params, dataset, inference)
    evaluation.save_results(raw_path, detections, query_emb)

  c = config.eval
  metrics = dict(evaluation.evaluate_search(
      dataset, detections, query_emb, gallery_size=c.gallery_size,
      det_thresh=c.det_thresh, ignore_cam_id=c.ignore_cam_id))
  det = evaluation.evaluate_detection(dataset, detections,
                                      det_thresh=c.det_thresh)
  metrics["det_ap"] = det["ap"]
  metrics["det_recall"] = det["recall"]
  labeled = evaluation.evaluate_detection(dataset, detections,
                                          det_thresh=c.det_thresh,
                                          labeled_only=True)
  metrics["det_recall_labeled"] = labeled["recall"]
  metrics.update(_subset_metrics(dataset, detections, query_emb, c))
  metrics = {k: float(v) for k, v in metrics.items()}
  record = {"dataset": dataset.name, "gallery_size": c.gallery_size,
            "step": step, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(record, f, indent=2)
    table = evaluation.format_table(metrics)
    print(f"{dataset.name} (gallery size {c.gallery_size}, step {step}):\n"
          f"{table}", flush=True)
  return metrics
