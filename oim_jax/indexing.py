"""Builds a search index: detect + embed every frame of a gallery once.

Frames of images and videos (oim_jax.media) are grouped into batches of the
inference batch size and run through the same jit-compiled detector as the
evaluation (eval_lib.Inference), so an indexed image carries exactly the
detections and embeddings the evaluation computes for it. Each batch is
committed to the index (oim_jax.search_index) before the next one starts.

Rerunning on the same --out skips every indexed frame; new files extend the
index. Unreadable files are recorded as failed, reported, and tried again
on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
import tqdm

from oim_jax import eval_lib
from oim_jax import media
from oim_jax import search_index
from oim_jax import vector_search
from oim_jax.data import sources
from oim_jax.data.dataset import ImageAnnotation


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Which video frames to index: every N frames, else every S seconds."""
  every_frames: int = 0
  every_seconds: float = 1.0

  def as_dict(self):
    return {"every_frames": int(self.every_frames),
            "every_seconds": float(self.every_seconds)}


@dataclasses.dataclass
class Report:
  """What a run did."""
  frames: int = 0  # frames indexed by this run
  detections: int = 0
  skipped_frames: int = 0  # already in the index
  failed: list = dataclasses.field(default_factory=list)  # (path, error)
  seconds: float = 0.0


class _FrameSource(sources.ImageSource):
  """A batch of decoded-once frames as the input pipeline's ImageSource."""

  def __init__(self, frames: Sequence[media.Frame], names: Sequence[str]):
    self.frames = list(frames)
    self.names = list(names)
    self.sizes = np.array([(f.height, f.width) for f in frames],
                          np.int64).reshape(-1, 2)
    self.num_boxes = np.zeros(len(frames), np.int64)
    self.num_labeled = np.zeros(len(frames), np.int64)

  def read(self, index):
    return (self.frames[index].data, np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int32))


def _pending(index: search_index.SearchIndex, paths: Sequence[str],
             sampling: Sampling, report: Report
             ) -> Iterator[tuple[int, media.Frame]]:
  """(source id, frame) of every frame not yet indexed, source by source.

  (sid, None) says the source ended without error; the caller marks it
  done once its last frame is committed. A source that cannot be read is
  marked failed here (a rerun tries it again).
  """
  for path in paths:
    path = os.path.abspath(path)
    kind = media.kind_of(path)
    state = index.source_state(path)
    if state is not None and state[1] == "done":
      st = os.stat(path)
      if (st.st_size, st.st_mtime) != (state[2], state[3]):
        logging.warning("%s changed since it was indexed; its old entries "
                        "stay. Index it into a new --out to replace them.",
                        path)
      report.skipped_frames += len(index.indexed_frames(state[0]))
      continue
    sid = index.source_id(path, kind)
    done = index.indexed_frames(sid)
    report.skipped_frames += len(done)
    try:
      if kind == "image":
        if 0 not in done:
          yield sid, media.read_image(path)
      else:
        yield from ((sid, f) for f in media.video_frames(
            path, sampling.every_frames, sampling.every_seconds, skip=done))
    except media.MediaError as e:
      report.failed.append((path, str(e)))
      logging.error("skipped: %s", e)
      index.set_status(sid, "failed", str(e))
      continue
    yield sid, None


def _total_frames(paths, sampling) -> int:
  n = 0
  for p in paths:
    if media.kind_of(p) == "image":
      n += 1
    else:
      n += media.estimated_frames(p, sampling.every_frames,
                                  sampling.every_seconds)
  return n


def manifest_for(config: ml_collections.ConfigDict, workdir: str, step: int,
                 det_thresh: float, sampling: Sampling) -> dict[str, Any]:
  return {
      "embedding_dim": int(config.model.embedding_dim),
      "workdir": os.path.abspath(workdir),
      "checkpoint_step": int(step),
      "det_thresh": float(det_thresh),
      "sampling": sampling.as_dict(),
      "config": json.loads(config.to_json_best_effort()),
  }


def build(config: ml_collections.ConfigDict, params: Any, paths: Sequence[str],
          out: str, *, workdir: str, step: int,
          det_thresh: Optional[float] = None,
          sampling: Sampling = Sampling(),
          inference: Optional[eval_lib.Inference] = None,
          progress: Optional[bool] = None) -> Report:
  """Indexes the frames of `paths` (files or folders) into `out`.

  Args:
    config, params: the model (params as from eval_lib.restore_params).
    paths: gallery files and folders (media.list_sources).
    out: the index directory; created, or extended if it exists.
    workdir, step: where the parameters came from (stored in the manifest;
      search.py restores the query model from there).
    det_thresh: keep detections scoring at least this (default
      config.eval.det_thresh).
    sampling: video frame sampling.
    inference: a compiled Inference to reuse.
    progress: a tqdm bar (default: when stderr is a terminal; else a log
      line every 10 batches).

  Returns:
    a Report; report.failed lists the files that could not be read.
  """
  t0 = time.time()
  thresh = config.eval.det_thresh if det_thresh is None else float(det_thresh)
  files = media.list_sources(paths)
  report = Report()
  if inference is None:
    inference = eval_lib.Inference(config, params)
  manifest = manifest_for(config, workdir, step, thresh, sampling)
  with search_index.SearchIndex.create_or_open(out, manifest) as index:
    if progress is None:
      progress = sys.stderr.isatty()
    already = 0  # frames of these files indexed by earlier runs
    for f in files:
      state = index.source_state(os.path.abspath(f))
      if state is not None:
        already += len(index.indexed_frames(state[0]))
    bar = tqdm.tqdm(total=max(_total_frames(files, sampling), already),
                    initial=already, unit="frame", desc="index",
                    dynamic_ncols=True, disable=not progress)
    batch: list[tuple[int, media.Frame]] = []
    ended = []  # sources whose last frame is in `batch` or committed
    batches = 0

    def flush():
      nonlocal batches
      if batch:
        _index_batch(index, inference, batch, thresh, report)
        bar.update(len(batch))
        batches += 1
        if not progress and batches % 10 == 0:
          logging.info("index: %d frames, %d detections, %.1f frames/s",
                       report.frames, report.detections,
                       report.frames / max(time.time() - t0, 1e-9))
        batch.clear()
      for sid in ended:  # only now: a crash before leaves them "partial"
        index.set_status(sid, "done")
      ended.clear()

    for sid, frame in _pending(index, files, sampling, report):
      if frame is None:
        ended.append(sid)
        continue
      batch.append((sid, frame))
      if len(batch) == inference.batch_size:
        flush()
    flush()
    bar.close()
    if (index.num_rows >= search_index.APPROXIMATE_FROM
        and vector_search.have_faiss()):
      index.approximate()  # now, rather than at the first query
  report.seconds = time.time() - t0
  return report


def _index_batch(index, inference, batch, thresh, report):
  names = [f"{sid}:{f.index}" for sid, f in batch]
  frames = [f for _, f in batch]
  images = [ImageAnnotation(n, n, np.zeros((0, 4), np.float32),
                            np.zeros((0,), np.int32)) for n in names]
  dets = inference.detect(images, "index", _FrameSource(frames, names),
                          progress=False)
  rows, embs = [], []
  for name, (sid, f) in zip(names, batch):
    boxes, scores, emb = dets[name]
    keep = scores >= thresh
    for b, s, e in zip(boxes[keep], scores[keep], emb[keep]):
      rows.append((sid, f.index, b, float(s)))
      embs.append(e)
  index.add_batch([(sid, f.index, f.timestamp, f.height, f.width)
                   for sid, f in batch], rows,
                  np.asarray(embs, np.float32).reshape(-1, index.dim))
  report.frames += len(batch)
  report.detections += len(rows)
