"""Input pipeline: decode, resize, flip, pad to canvas buckets, batch.

Produces the training batch of the interface contract (a dict of NumPy arrays
with static shapes, one canvas bucket per batch):

  image      uint8   [B, Hc, Wc, 3]  RGB, top-left aligned, zero padded
  image_size int32   [B, 2]          (h, w) of the resized image on the canvas
  boxes      float32 [B, G, 4]       GT boxes in resized pixels (flipped too)
  pids       int32   [B, G]          0..L-1, -1 unlabeled, -2 padding
  box_mask   bool    [B, G]          True for real boxes
  scale      float32 [B]             resized = original * scale
  index      int32   [B]             image index in its split, -1 padding
  flipped    bool    [B]

Design choices:
* Determinism: the order of an epoch is a pure function of (seed, epoch), the
  flip of an image a pure function of (seed, epoch, image index). A position
  (epoch, step-in-epoch) therefore identifies the next batch exactly;
  `TrainIterator.get_state()` returns it for the checkpoint and
  `set_state()` / `batches_from()` resume from it.
* Bucketing: images go to a landscape (w >= h) or a portrait canvas, each a
  multiple of 32, so the jitted step sees two shapes only. An epoch shuffles
  the image indices, cuts each bucket's shuffled list into global batches
  (dropping the incomplete remainder), then shuffles the batch order.
* Multi-host: every host computes the same global plan and decodes only its
  rows [p * B_local, (p + 1) * B_local) of each global batch, so all hosts are
  on the same bucket at the same step (per-host independent sharding would
  not guarantee equal shapes across hosts).
* Background decoding uses grain: a `grain.MapDataset` over flat batch slots
  whose element function decodes one image, turned into an iterator with
  `grain.ReadOptions(num_threads=num_workers)`. Threads are enough because
  PIL releases the GIL while decoding and resizing; the prefetch buffer is
  bounded. num_workers=0 decodes synchronously in the consumer thread.
  grain's own iterator state is not used: our position (epoch, step) is the
  whole state, which keeps checkpoints tiny and readable.
* Images travel as uint8 (4x less host->device traffic than float32);
  oim_jax.ops.normalize applies the ImageNet mean/std on device.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import threading
from typing import Any, Iterator, Mapping, Optional

import grain
import jax
import numpy as np
from PIL import Image

from oim_jax.pids import IGNORE
from oim_jax.data.dataset import split_annotations
from oim_jax.data.sources import AnnotationSource, ImageSource

LANDSCAPE, PORTRAIT = 0, 1


def ceil32(x: int) -> int:
  return int(math.ceil(x / 32.0) * 32)


def canvas_sizes(min_size: int, max_size: int) -> tuple[tuple[int, int], ...]:
  """(Hc, Wc) of the landscape and portrait canvases, multiples of 32."""
  short, long = ceil32(min_size), ceil32(max_size)
  return ((short, long), (long, short))


def bucket_of(height: int, width: int) -> int:
  """LANDSCAPE (0) when width >= height, else PORTRAIT (1)."""
  return LANDSCAPE if width >= height else PORTRAIT


def resized_shape(height: int, width: int, min_size: int,
                  max_size: int) -> tuple[float, int, int]:
  """Scale so the shorter side is min_size and the longer <= max_size.

  Returns:
    (scale, new_height, new_width), new sizes = round(size * scale).
  """
  scale = min(min_size / min(height, width), max_size / max(height, width))
  # round(): the sides land exactly on min_size / <= max_size despite
  # floating point error in scale.
  new_h = max(int(round(height * scale)), 1)
  new_w = max(int(round(width * scale)), 1)
  return float(scale), new_h, new_w


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Pipeline settings (mirrors config.data fields of the same names).

  Attributes:
    min_size: shorter side after resizing.
    max_size: upper bound of the longer side after resizing.
    max_gt: G, GT boxes per image after padding.
    too_many_gt: "error" (default) fails at construction when an image has
      more than max_gt boxes; "truncate" keeps labeled boxes first, then
      unlabeled ones, each in annotation order, and logs a warning.
    flip: random horizontal flip (training only).
    skip_unlabeled_only: training drops images whose boxes are all unlabeled.
    skip_empty: training drops images with no box at all.
    num_workers: decoding threads, 0 = synchronous.
    prefetch_batches: bounded read-ahead, in batches.
  """
  min_size: int = 900
  max_size: int = 1500
  max_gt: int = 32
  too_many_gt: str = "error"
  flip: bool = True
  skip_unlabeled_only: bool = False
  skip_empty: bool = False
  num_workers: int = 2
  prefetch_batches: int = 2

  @classmethod
  def from_config(cls, config: Any) -> "PipelineOptions":
    """Reads the fields present in `config` (a ConfigDict or a mapping)."""
    get = (config.get if hasattr(config, "get") else
           lambda k, d: getattr(config, k, d))
    kwargs = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
    return cls(**kwargs)

  def __post_init__(self):
    if self.too_many_gt not in ("error", "truncate"):
      raise ValueError(f"too_many_gt must be 'error' or 'truncate', got "
                       f"{self.too_many_gt!r}")
    if self.min_size <= 0 or self.max_size < self.min_size:
      raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, "
                       f"{self.max_size}")


# ---------------------------------------------------------------------------
# One example.


def decode_resize(data: bytes, new_hw: tuple[int, int], name: str,
                  flip: bool) -> np.ndarray:
  """Decodes an image to RGB and resizes it (bilinear) to new_hw, flipped.

  Returns:
    uint8 [new_h, new_w, 3].
  """
  new_h, new_w = new_hw
  try:
    im = Image.open(io.BytesIO(data))
    # JPEG DCT-domain downscaling when the target is <= 1/2 the size: free
    # speed for large frames, no effect otherwise.
    im.draft("RGB", (new_w, new_h))
    im = im.convert("RGB")
  except Exception as e:  # PIL raises several types for corrupt files.
    raise ValueError(f"cannot decode image {name}: {e}") from e
  im = im.resize((new_w, new_h), Image.BILINEAR)
  if flip:
    im = im.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(im, np.uint8)


def _select_boxes(boxes, pids, max_gt):
  """First max_gt boxes, labeled ones first (stable), for truncation."""
  if len(pids) <= max_gt:
    return boxes, pids
  order = np.argsort(pids < 0, kind="stable")[:max_gt]
  order = np.sort(order)  # Keep annotation order among the kept boxes.
  return boxes[order], pids[order]


def load_example(source: ImageSource, index: int, canvas: tuple[int, int],
                 flip: bool, options: PipelineOptions) -> dict[str, np.ndarray]:
  """Decoded, resized, (flipped), padded example; batch dict without [B]."""
  h, w = (int(v) for v in source.sizes[index])
  scale, new_h, new_w = resized_shape(h, w, options.min_size, options.max_size)
  data, boxes, pids = source.read(index)
  name = source.names[index]
  pixels = decode_resize(data, (new_h, new_w), name, flip)
  if pixels.shape[:2] != (new_h, new_w):
    raise ValueError(f"image {name}: decoded size differs from the header")
  image = np.zeros(canvas + (3,), np.uint8)
  image[:new_h, :new_w] = pixels
  boxes, pids = _select_boxes(boxes, pids, options.max_gt)
  boxes = boxes * np.float32(scale)
  if flip:
    boxes = np.stack([new_w - boxes[:, 2], boxes[:, 1],
                      new_w - boxes[:, 0], boxes[:, 3]], axis=1)
  n = len(pids)
  out_boxes = np.zeros((options.max_gt, 4), np.float32)
  out_boxes[:n] = boxes
  out_pids = np.full((options.max_gt,), IGNORE, np.int32)
  out_pids[:n] = pids
  return {
      "image": image,
      "image_size": np.array([new_h, new_w], np.int32),
      "boxes": out_boxes,
      "pids": out_pids,
      "box_mask": np.arange(options.max_gt) < n,
      "scale": np.float32(scale),
      "index": np.int32(index),
      "flipped": np.bool_(flip),
  }


def padding_example(canvas: tuple[int, int],
                    max_gt: int) -> dict[str, np.ndarray]:
  """A blank example (index -1, no boxes) filling an incomplete batch.

  Its image_size is the whole canvas so that no model op sees a 0 size.
  """
  return {
      "image": np.zeros(canvas + (3,), np.uint8),
      "image_size": np.array(canvas, np.int32),
      "boxes": np.zeros((max_gt, 4), np.float32),
      "pids": np.full((max_gt,), IGNORE, np.int32),
      "box_mask": np.zeros((max_gt,), bool),
      "scale": np.float32(1.0),
      "index": np.int32(-1),
      "flipped": np.bool_(False),
  }


def flip_for(seed: int, epoch: int, index: int) -> bool:
  """The flip decision of one image in one epoch, independent of order."""
  return bool(np.random.default_rng([seed, epoch, index, 0x0F11]).random()
              < 0.5)


# ---------------------------------------------------------------------------
# Plans: which image indices form each global batch.


def _check_max_gt(source: ImageSource, indices: np.ndarray,
                  options: PipelineOptions):
  too_many = indices[source.num_boxes[indices] > options.max_gt]
  if not too_many.size:
    return
  worst = too_many[np.argmax(source.num_boxes[too_many])]
  msg = (f"{too_many.size} images have more than max_gt={options.max_gt} GT "
         f"boxes (most: {source.names[worst]} with "
         f"{source.num_boxes[worst]})")
  if options.too_many_gt == "error":
    raise ValueError(msg + "; raise config.data.max_gt or set "
                     "config.data.too_many_gt='truncate'.")
  logging.warning("%s; truncating them to max_gt (labeled boxes first).", msg)


def train_indices(source: ImageSource, options: PipelineOptions) -> np.ndarray:
  """Indices of the split used for training, after the configured skips."""
  keep = np.ones(len(source), bool)
  if options.skip_empty:
    keep &= source.num_boxes > 0
  if options.skip_unlabeled_only:
    keep &= ~((source.num_boxes > 0) & (source.num_labeled == 0))
  return np.flatnonzero(keep)


def _buckets(source: ImageSource) -> np.ndarray:
  return np.array([bucket_of(h, w) for h, w in source.sizes], np.int64)


def train_plan(indices: np.ndarray, buckets: np.ndarray, batch_size: int,
               seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batches of one epoch.

  Args:
    indices: [n] image indices taking part.
    buckets: [N] bucket of every image of the split.
    batch_size: global batch size.
    seed, epoch: the plan is a pure function of these.

  Returns:
    (plan int [steps, batch_size] image indices, plan_buckets int [steps]).
    steps = sum over buckets of floor(count / batch_size), the same for
    every epoch.
  """
  rng = np.random.default_rng([seed, epoch, 0xBA7C])
  order = rng.permutation(indices)
  batches, batch_buckets = [], []
  for b in (LANDSCAPE, PORTRAIT):
    members = order[buckets[order] == b]
    full = len(members) // batch_size
    batches.extend(members[:full * batch_size].reshape(full, batch_size))
    batch_buckets.extend([b] * full)
  perm = rng.permutation(len(batches))
  plan = np.asarray(batches, np.int64).reshape(-1, batch_size)[perm]
  return plan, np.asarray(batch_buckets, np.int64)[perm]


def eval_plan(num_images: int, buckets: np.ndarray,
              batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every image once; per bucket in index order, last batch padded with -1.

  Batches are ordered by their first image index.
  """
  batches, batch_buckets = [], []
  for b in (LANDSCAPE, PORTRAIT):
    members = np.flatnonzero(buckets[:num_images] == b)
    n = -(-len(members) // batch_size)
    padded = np.full((n * batch_size,), -1, np.int64)
    padded[:len(members)] = members
    batches.extend(padded.reshape(n, batch_size))
    batch_buckets.extend([b] * n)
  plan = np.asarray(batches, np.int64).reshape(-1, batch_size)
  order = np.argsort(plan[:, 0], kind="stable") if len(plan) else []
  return plan[order], np.asarray(batch_buckets, np.int64)[order]


# ---------------------------------------------------------------------------
# Iterators.


def _process(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def _as_source(source) -> ImageSource:
  if isinstance(source, ImageSource):
    return source
  return AnnotationSource(source)


class _BatchReader:
  """Shared machinery: flat slots -> decoded examples -> local batches."""

  def __init__(self, source: ImageSource, batch_size: int,
               options: PipelineOptions, process_index: Optional[int],
               process_count: Optional[int]):
    self.source = source
    self.options = options
    self.batch_size = batch_size
    self.process_index, self.process_count = _process(process_index,
                                                      process_count)
    if batch_size % self.process_count:
      raise ValueError(f"global batch size {batch_size} is not divisible by "
                       f"the process count {self.process_count}")
    self.local_batch_size = batch_size // self.process_count
    self.canvases = canvas_sizes(options.min_size, options.max_size)
    self.buckets = _buckets(source)

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _flip(self, epoch: int, index: int) -> bool:
    raise NotImplementedError

  def _steps_per_epoch(self) -> int:
    raise NotImplementedError

  def _load_slot(self, slot: int) -> dict[str, np.ndarray]:
    global_step, row = divmod(slot, self.local_batch_size)
    epoch, step = divmod(global_step, self._steps_per_epoch())
    plan, plan_buckets = self._plan(epoch)
    canvas = self.canvases[plan_buckets[step]]
    index = int(plan[step, self.process_index * self.local_batch_size + row])
    if index < 0:
      return padding_example(canvas, self.options.max_gt)
    return load_example(self.source, index, canvas, self._flip(epoch, index),
                        self.options)

  def _batches(self, start_step: int, stop_step: int) -> Iterator[dict]:
    """Local batches for global steps [start_step, stop_step)."""
    b = self.local_batch_size
    slots = grain.MapDataset.range(start_step * b, stop_step * b)
    slots = slots.map(self._load_slot)
    workers = self.options.num_workers
    read = grain.ReadOptions(
        num_threads=workers,
        prefetch_buffer_size=(max(1, self.options.prefetch_batches) * b
                              if workers else 0))
    return iter(slots.to_iter_dataset(read_options=read).batch(
        b, drop_remainder=True))


class TrainIterator(_BatchReader):
  """Endless (or num_epochs) training batches, resumable at (epoch, step).

  Yields the batch dict with B = batch_size // process_count rows: this
  host's share of each global batch.
  """

  def __init__(self, source, *, batch_size: int, seed: int = 0,
               options: PipelineOptions = PipelineOptions(),
               num_epochs: Optional[int] = None,
               position: Optional[Mapping[str, int]] = None,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    """Args:
      source: an ImageSource or a list of ImageAnnotation (a split).
      batch_size: global batch size = num_devices * per_device_batch.
      seed: shuffling and flip seed.
      options: PipelineOptions.
      num_epochs: stop after this many epochs; None = endless.
      position: {"epoch", "step"} to start from (default the beginning).
      process_index, process_count: this host's shard (default from jax).
    """
    super().__init__(_as_source(source), batch_size, options, process_index,
                     process_count)
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self.indices = train_indices(self.source, options)
    _check_max_gt(self.source, self.indices, options)
    counts = np.bincount(self.buckets[self.indices], minlength=2)
    self.steps_per_epoch = int(sum(c // batch_size for c in counts))
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"no full batch of {batch_size} same-bucket images: "
          f"{counts[0]} landscape, {counts[1]} portrait training images.")
    self._lock = threading.Lock()
    self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._iter = None
    self.set_state(position or {"epoch": 0, "step": 0})

  def _steps_per_epoch(self):
    return self.steps_per_epoch

  def _plan(self, epoch):
    with self._lock:  # Called from the decoding threads.
      if epoch not in self._plans:
        if len(self._plans) > 4:
          self._plans.pop(min(self._plans))
        self._plans[epoch] = train_plan(self.indices, self.buckets,
                                        self.batch_size, self.seed, epoch)
      return self._plans[epoch]

  def _flip(self, epoch, index):
    return self.options.flip and flip_for(self.seed, epoch, index)

  def get_state(self) -> dict[str, int]:
    """Position of the next batch: {"epoch": e, "step": step-in-epoch}."""
    epoch, step = divmod(self._next, self.steps_per_epoch)
    return {"epoch": int(epoch), "step": int(step)}

  def set_state(self, state: Mapping[str, int]):
    """Continue from a position returned by get_state()."""
    epoch, step = int(state["epoch"]), int(state["step"])
    if not 0 <= step < self.steps_per_epoch or epoch < 0:
      raise ValueError(f"bad position {dict(state)}: step must be in "
                       f"[0, {self.steps_per_epoch})")
    self._next = epoch * self.steps_per_epoch + step
    self.close()  # Restart lazily, dropping any read-ahead.

  def close(self):
    """Stops the read-ahead threads (the iterator restarts on next())."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()
    self._iter = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    stop = (self.num_epochs * self.steps_per_epoch
            if self.num_epochs is not None else 2**40)
    if self._next >= stop:
      raise StopIteration
    if self._iter is None:
      self._iter = self._batches(self._next, stop)
    batch = next(self._iter)
    self._next += 1
    return batch


def batches_from(source, position: Mapping[str, int], **kwargs):
  """A TrainIterator starting at position {"epoch", "step"}."""
  return TrainIterator(source, position=position, **kwargs)


class EvalIterator(_BatchReader):
  """Every image of a split once, no flip; last batch of a bucket padded.

  Attributes:
    names: image names of the split; batch["index"] indexes it (-1 = pad).
    num_batches: number of batches per pass.
  """

  def __init__(self, source, *, batch_size: int,
               options: PipelineOptions = PipelineOptions(),
               process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    super().__init__(_as_source(source), batch_size, options, process_index,
                     process_count)
    _check_max_gt(self.source, np.arange(len(self.source)), options)
    self.names = list(self.source.names)
    self.plan, self.plan_buckets = eval_plan(len(self.source), self.buckets,
                                             batch_size)
    self.num_batches = len(self.plan)

  def _steps_per_epoch(self):
    return max(self.num_batches, 1)

  def _plan(self, epoch):
    return self.plan, self.plan_buckets

  def _flip(self, epoch, index):
    return False

  def __len__(self):
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._batches(0, self.num_batches)


def global_batch_size(per_device_batch: int,
                      num_devices: Optional[int] = None) -> int:
  """num_devices (default jax.device_count()) * per_device_batch."""
  return (jax.device_count() if num_devices is None else num_devices) * \
      per_device_batch


def _check_same_images(source: ImageSource, annotations, where: str):
  """A prepared TFDS split must hold the loader's images, in its order."""
  names = [a.name for a in annotations]
  counts = np.array([len(a.pids) for a in annotations], np.int64)
  if len(source.names) != len(names):
    raise ValueError(
        f"{where} holds {len(source.names)} images, the dataset's split "
        f"{len(names)}: it was prepared from other data. Rebuild it "
        "(python -m oim_jax.data.prepare) or unset config.data.tfds_dir.")
  for i, (a, b) in enumerate(zip(source.names, names)):
    if a != b or source.num_boxes[i] != counts[i]:
      raise ValueError(
          f"{where}: image {i} is {a!r} with {source.num_boxes[i]} boxes, the "
          f"dataset's is {b!r} with {counts[i]}: it was prepared from other "
          "data. Rebuild it (python -m oim_jax.data.prepare) or unset "
          "config.data.tfds_dir.")


def source_for(dataset, split: str, tfds_name: Optional[str] = None,
               data_dir: Optional[str] = None) -> ImageSource:
  """The split of a SearchDataset (default) or of a prepared TFDS dataset.

  Args:
    dataset: a SearchDataset. With tfds_name it may be None; else the TFDS
      split is checked to hold the same images (names, box counts, order).
    split: "train", "gallery" or "queries".
    tfds_name, data_dir: read tfds_builders' array_record data instead.
  """
  if tfds_name:
    # Imported here: tensorflow_datasets takes seconds to import.
    from oim_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    source = tfds_builders.TfdsSource(tfds_name, split, os.fspath(data_dir))
    if dataset is not None:
      _check_same_images(source, split_annotations(dataset, split),
                         f"TFDS {tfds_name}/{split} in {data_dir}")
    return source
  return AnnotationSource(split_annotations(dataset, split))


def dataset_source(dataset, split: str, data_config: Any) -> ImageSource:
  """Where `config.data` says a split's images come from.

  config.data.tfds_dir empty: the image files under config.data.root;
  else the array_record files `python -m oim_jax.data.prepare` wrote there
  (one sequential file per shard instead of thousands of JPEGs, which pays
  on network filesystems and gs://). Annotations and evaluation protocols
  always come from the loader.
  """
  tfds_dir = data_config.get("tfds_dir", "") if hasattr(
      data_config, "get") else getattr(data_config, "tfds_dir", "")
  if not tfds_dir:
    return source_for(dataset, split)
  if "://" not in tfds_dir:
    tfds_dir = os.path.expanduser(tfds_dir)
  return source_for(dataset, split, tfds_name=dataset.name, data_dir=tfds_dir)
