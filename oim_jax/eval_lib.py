"""Evaluation: restore parameters, detect + embed the gallery, embed queries,
score with the dataset's standard protocol.

Raw outputs are saved under DIR/eval/ (detections and embeddings keyed by
image name, query embeddings in protocol order) so that re-scoring, e.g.
with another gallery size, needs no model run (`from_saved=True`).

Inference runs data-parallel on every device of every process: parameters
are replicated over the ('data',) mesh, each global batch is split over the
devices (each process reads its own rows), and detections and embeddings
are gathered to every process before scoring, so the metrics of a
multi-process evaluation equal those of one process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import logging
from etils import epath
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import tqdm

from oim_jax import checkpointing
from oim_jax import ema
from oim_jax import evaluation
from oim_jax import parallel
from oim_jax.data import cuhk_sysu
from oim_jax.data import datasets as data_lib
from oim_jax.data import pipeline
from oim_jax.data import sources
from oim_jax.data.dataset import ImageAnnotation, SearchDataset, query_annotations
from oim_jax.models import person_search

RAW_FILE = "raw_outputs.npz"


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   step: Optional[int] = None,
                   mesh: Optional[jax.sharding.Mesh] = None) -> tuple[Any, int]:
  """Restores the model variables alone (works for any training device count).

  With config.train.ema_decay > 0 these are the checkpoint's moving average
  (item "ema"), else its live weights (item "params"). They land replicated
  on `mesh` (default: all devices, `parallel.make_mesh()`), i.e. on the
  accelerators where there are some.

  Returns:
    (variables {"params", and "batch_stats" with the BN neck}, step).
  """
  model = person_search.create_model(config)
  abstract = jax.eval_shape(
      lambda k: person_search.init_variables(model, config, k,
                                             pretrained=False),
      jax.random.key(0))
  mgr = checkpointing.manager(workdir, read_only=True, async_saves=False)
  item = "params"
  if ema.decay(config) > 0:
    item = checkpointing.EMA_ITEM
    at = mgr.latest_step() if step is None else step
    if at is not None and not checkpointing.has_item(mgr, at, item):
      raise ValueError(
          f"config.train.ema_decay={config.train.ema_decay} but the checkpoint "
          f"at step {at} under {mgr.directory} has no moving average (it was "
          "trained with ema_decay=0): evaluate its weights with "
          "--config.train.ema_decay=0.")
  mesh = parallel.make_mesh() if mesh is None else mesh
  step, items, _ = checkpointing.restore(
      mgr, {item: abstract}, step,
      sharding=parallel.replicated_sharding(mesh))
  return items[item], step


def eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """config.eval.batch_size rounded up to a multiple of the device count
  (every device gets the same number of images; the last batch is padded)."""
  b = max(1, int(config.eval.batch_size))
  return -(-b // num_devices) * num_devices


class Inference:
  """Jit-compiled detection and box embedding over static-shape batches,
  split over all devices of `mesh` (default: every device of every process).

  Attributes:
    batch_size: global images per batch (`eval_batch_size`).
    params: the variables, replicated on the mesh (assigning places them).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.batch_size = eval_batch_size(config, self.mesh.devices.size)
    self.params = params
    self.options = pipeline.PipelineOptions.from_config(config.data)
    model = person_search.create_model(config)
    flip_test = bool(config.eval.get("flip_test", False))

    def detect(p, b):
      out = person_search.detect(model, p, b["image"], b["image_size"],
                                 flip_test=flip_test)
      # The batch's own rows travel with the outputs: the gathered result
      # says which image each row is, whatever the device order.
      return dict(out, index=b["index"], scale=b["scale"])

    def embed(p, b):
      emb = person_search.embed_boxes(model, p, b["image"],
                                      b["boxes"][:, :1], b["image_size"],
                                      flip_test=flip_test)
      return {"embeddings": emb, "index": b["index"]}

    self._detect = self._data_parallel(detect)
    self._embed = self._data_parallel(embed)

  def _data_parallel(self, fn):
    rows = P(parallel.AXIS)
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), rows),
                                 out_specs=rows, check_vma=False))

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, value):
    self._params = parallel.put_replicated(value, self.mesh, "shard_map")

  def _run(self, fn, batch, keys):
    """One global batch through `fn`; the outputs of all processes, numpy."""
    local = {k: batch[k] for k in keys}
    return parallel.gather_to_host(
        fn(self.params, parallel.put_batch(local, self.mesh, "shard_map")))

  def _batches(self, annotations: Sequence[ImageAnnotation], what: str,
               source: Optional[sources.ImageSource], progress: bool = True):
    if source is None:
      source = sources.AnnotationSource(annotations)
    it = pipeline.EvalIterator(source,
                               batch_size=self.batch_size,
                               options=self.options)
    return _progress(it, it.num_batches, what) if progress else it

  def detect(self, images: Sequence[ImageAnnotation], what: str = "gallery",
             source: Optional[sources.ImageSource] = None,
             progress: bool = True):
    """Detects and embeds persons in every image.

    `source` (optional) reads the same images, in the same order, from
    elsewhere (prepared TFDS records); default: the files of `images`.
    `progress`: show a bar / log lines (callers with their own bar: False).

    Returns:
      {name: (boxes [n, 4], scores [n], embeddings [n, D])}, boxes in the
      original image's pixels.
    """
    detections = {}
    t0 = time.time()
    for batch in self._batches(images, what, source, progress):
      out = self._run(self._detect, batch,
                      ("image", "image_size", "index", "scale"))
      for i, idx in enumerate(out["index"]):
        if idx < 0:
          continue
        keep = out["valid"][i]
        detections[images[idx].name] = (
            (out["boxes"][i][keep] / out["scale"][i]).astype(np.float32),
            out["scores"][i][keep].astype(np.float32),
            out["embeddings"][i][keep].astype(np.float32))
    if progress:
      logging.info("%s: %d images in %.1f s", what, len(images),
                   time.time() - t0)
    return detections

  def embed(self, images: Sequence[ImageAnnotation], what: str = "queries",
            source: Optional[sources.ImageSource] = None) -> np.ndarray:
    """Embeds the first box of every image (a query's GT box): [N, D].

    `source`: as in `detect`.
    """
    out = [None] * len(images)
    for batch in self._batches(images, what, source):
      res = self._run(self._embed, batch,
                      ("image", "image_size", "boxes", "index"))
      for i, idx in enumerate(res["index"]):
        if idx >= 0:
          out[idx] = res["embeddings"][i, 0]
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
  if inference is None:
    inference = Inference(config, params)
  inference.params = params
  detections = inference.detect(
      dataset.gallery, "gallery",
      pipeline.dataset_source(dataset, "gallery", config.data))
  query_emb = inference.embed(
      query_annotations(dataset.queries), "queries",
      pipeline.dataset_source(dataset, "queries", config.data))
  return detections, query_emb


def _progress(batches, total, what, interactive=None):
  """Yields `batches`, showing progress: a tqdm bar on a terminal, else a log
  line every 10 batches (log files stay readable)."""
  if interactive is None:
    interactive = sys.stderr.isatty()
  if interactive:
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

  out_dir = epath.Path(workdir) / "eval"
  raw_path = out_dir / RAW_FILE
  primary = jax.process_index() == 0
  if primary:
    out_dir.mkdir(parents=True, exist_ok=True)
  if dataset is None:
    dataset = data_lib.load_dataset(config.data)
  if from_saved:
    if not raw_path.exists():
      raise FileNotFoundError(
          f"{raw_path} does not exist: run eval.py once without --from_saved "
          "to compute the raw outputs.")
    detections, query_emb = evaluation.load_results(raw_path)
  else:
    if params is None:
      params, step = restore_params(config, workdir, step)
    detections, query_emb = run_inference(config, params, dataset, inference)
    if primary:  # every process holds all results (gathered)
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
  if primary:
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    table = evaluation.format_table(metrics)
    print(f"{dataset.name} (gallery size {c.gallery_size}, step {step}):\n"
          f"{table}", flush=True)
  return metrics
