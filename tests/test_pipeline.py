"""Tests of oim_jax.data.pipeline against hand-computed numbers and properties."""

import os

import numpy as np
from PIL import Image
import pytest

from oim_jax.data import pipeline
from oim_jax.data import sources
from oim_jax.data.dataset import ImageAnnotation, Query, SearchDataset

SMALL = dict(min_size=64, max_size=96, max_gt=4)


def _write(path, h, w, seed, fmt="JPEG"):
  rng = np.random.default_rng(seed)
  # Smooth blocks (JPEG-friendly): left half one colour, right half another.
  img = np.zeros((h, w, 3), np.uint8)
  img[:, : w // 2] = rng.integers(0, 256, 3)
  img[:, w // 2:] = rng.integers(0, 256, 3)
  Image.fromarray(img).save(path, fmt)
  return img


# (h, w, number of boxes, labeled?) of the fixture images.
_SPECS = [(50, 100, 2, True), (60, 80, 1, False), (80, 40, 3, True),
          (40, 60, 0, False), (70, 70, 1, True), (90, 45, 2, True),
          (45, 90, 4, True), (30, 50, 1, True), (100, 60, 1, False),
          (55, 75, 2, True), (64, 96, 1, True)]


def _annotations(tmp_path):
  anns = []
  for i, (h, w, n, labeled) in enumerate(_SPECS):
    path = os.path.join(tmp_path, f"s{i}.jpg")
    _write(path, h, w, i)
    rng = np.random.default_rng(100 + i)
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, n),
                      y1 + rng.uniform(2, h / 2, n)], 1).astype(np.float32)
    pids = (np.arange(n) + i if labeled else -np.ones(n)).astype(np.int32)
    anns.append(ImageAnnotation(f"s{i}.jpg", path, boxes.reshape(-1, 4), pids))
  return anns


@pytest.fixture(name="anns")
def _anns_fixture(tmp_path):
  return _annotations(str(tmp_path))


def _opts(**kw):
  return pipeline.PipelineOptions(**{**SMALL, "num_workers": 0, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_sizes_and_buckets_hand_computed():
  assert pipeline.canvas_sizes(900, 1500) == ((928, 1504), (1504, 928))
  assert pipeline.resized_shape(600, 800, 900, 1500) == (1.5, 900, 1200)
  # 1080x1920: the long side binds, 1920 * 0.78125 = 1500, 1080 * .78125 =
  # 843.75 -> 844.
  assert pipeline.resized_shape(1080, 1920, 900, 1500) == (0.78125, 844, 1500)
  s, h, w = pipeline.resized_shape(800, 600, 900, 1500)
  assert (h, w) == (1200, 900) and s == pytest.approx(1.5)
  assert pipeline.bucket_of(600, 800) == pipeline.LANDSCAPE
  assert pipeline.bucket_of(800, 600) == pipeline.PORTRAIT
  assert pipeline.bucket_of(70, 70) == pipeline.LANDSCAPE


def test_example_resize_flip_pad_hand_computed(tmp_path):
  path = os.path.join(tmp_path, "a.png")
  img = _write(path, 50, 100, 0, fmt="PNG")
  boxes = np.array([[10, 5, 30, 45], [0, 0, 100, 50]], np.float32)
  ann = ImageAnnotation("a.png", path, boxes, np.array([3, -1], np.int32))
  src = sources.AnnotationSource([ann])
  np.testing.assert_array_equal(src.sizes, [[50, 100]])
  canvas = (64, 96)
  # scale = min(64 / 50, 96 / 100) = 0.96 -> 48 x 96.
  for flip in (False, True):
    ex = pipeline.load_example(src, 0, canvas, flip, _opts())
    assert ex["image"].shape == (64, 96, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image_size"], [48, 96])
    assert ex["scale"] == np.float32(0.96)
    if flip:
      expect = [[96 - 28.8, 4.8, 96 - 9.6, 43.2], [0, 0, 96, 48]]
    else:
      expect = [[9.6, 4.8, 28.8, 43.2], [0, 0, 96, 48]]
    np.testing.assert_allclose(ex["boxes"][:2], expect, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(ex["boxes"][2:], 0)
    np.testing.assert_array_equal(ex["pids"], [3, -1, -2, -2])
    np.testing.assert_array_equal(ex["box_mask"], [True, True, False, False])
    assert bool(ex["flipped"]) == flip and ex["index"] == 0
    # Pixels: padding rows are zero; the left/right colours swap on flip.
    assert not ex["image"][48:].any()
    left, right = img[0, 0], img[0, -1]
    got_left, got_right = ex["image"][20, 10], ex["image"][20, 85]
    np.testing.assert_array_equal(got_left, right if flip else left)
    np.testing.assert_array_equal(got_right, left if flip else right)


def _check_batch(batch, src, opts, b):
  canvases = pipeline.canvas_sizes(opts.min_size, opts.max_size)
  g = opts.max_gt
  dtypes = {"image": np.uint8, "image_size": np.int32, "boxes": np.float32,
            "pids": np.int32, "box_mask": np.bool_, "scale": np.float32,
            "index": np.int32, "flipped": np.bool_}
  assert set(batch) == set(dtypes)
  for k, dt in dtypes.items():
    assert batch[k].dtype == dt, k
  hc, wc = batch["image"].shape[1:3]
  assert (hc, wc) in canvases and hc % 32 == 0 and wc % 32 == 0
  assert batch["image"].shape == (b, hc, wc, 3)
  assert batch["boxes"].shape == (b, g, 4) and batch["pids"].shape == (b, g)
  for r in range(b):
    i = batch["index"][r]
    if i < 0:
      continue
    h, w = src.sizes[i]
    assert canvases[pipeline.bucket_of(h, w)] == (hc, wc)
    nh, nw = batch["image_size"][r]
    assert not batch["image"][r, nh:].any() and not batch["image"][r, :, nw:].any()
    n = src.num_boxes[i]
    np.testing.assert_array_equal(batch["box_mask"][r], np.arange(g) < n)
    assert (batch["pids"][r, n:] == -2).all()
    # Boxes = annotation * scale (flipped in x if flipped), hand formula.
    _, ref_boxes, ref_pids = src.read(i)
    s = ref_boxes.astype(np.float64) * (min(64 / min(h, w), 96 / max(h, w)))
    if batch["flipped"][r]:
      s = np.stack([nw - s[:, 2], s[:, 1], nw - s[:, 0], s[:, 3]], 1)
    np.testing.assert_allclose(batch["boxes"][r, :n], s, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(batch["pids"][r, :n], ref_pids)


def test_train_epoch_shapes_buckets_and_coverage(anns):
  opts = _opts()
  it = pipeline.TrainIterator(anns, batch_size=2, seed=3, options=opts,
                              num_epochs=1, process_index=0, process_count=1)
  # 8 landscape (w >= h), 3 portrait -> 4 + 1 full batches of 2.
  assert it.steps_per_epoch == 5
  batches = list(it)
  assert len(batches) == 5
  seen = np.concatenate([b["index"] for b in batches])
  assert len(set(seen.tolist())) == 10 and (seen >= 0).all()
  for b in batches:
    _check_batch(b, it.source, opts, 2)


def test_determinism_and_epochs(anns):
  kw = dict(batch_size=2, options=_opts(), process_index=0, process_count=1)
  a = _take(pipeline.TrainIterator(anns, seed=7, **kw), 10)
  b = _take(pipeline.TrainIterator(anns, seed=7, **kw), 10)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  order0 = np.concatenate([x["index"] for x in a[:5]])
  order1 = np.concatenate([x["index"] for x in a[5:]])
  assert not np.array_equal(order0, order1)
  # The flip of an image in an epoch does not depend on where it lands.
  other = _take(pipeline.TrainIterator(anns, seed=8, **kw), 5)
  assert not np.array_equal(order0, np.concatenate([x["index"] for x in other]))
  flips = {}
  for x in a[:5]:
    for i, f in zip(x["index"], x["flipped"]):
      flips[int(i)] = bool(f)
  assert {i: pipeline.flip_for(7, 0, i) for i in flips} == flips
  assert 0 < sum(flips.values()) < len(flips)  # Some flipped, some not.


def test_resume_equals_uninterrupted(anns):
  kw = dict(batch_size=2, seed=11, options=_opts(num_workers=2),
            process_index=0, process_count=1)
  # The uninterrupted reference decodes synchronously: worker threads must
  # not change the batches either.
  full = _take(pipeline.TrainIterator(
      anns, **{**kw, "options": _opts(num_workers=0)}), 12)
  it = pipeline.TrainIterator(anns, **kw)
  _take(it, 4)
  state = it.get_state()
  assert state == {"epoch": 0, "step": 4}
  resumed = pipeline.batches_from(anns, state, **kw)
  rest = _take(resumed, 8)  # Crosses into epochs 1 and 2.
  assert resumed.get_state() == {"epoch": 2, "step": 2}
  for x, y in zip(full[4:], rest):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  it.set_state({"epoch": 1, "step": 3})
  np.testing.assert_array_equal(next(it)["image"], full[8]["image"])
  with pytest.raises(ValueError, match="bad position"):
    it.set_state({"epoch": 0, "step": 5})


def test_hosts_split_each_global_batch(anns):
  kw = dict(batch_size=4, seed=5, options=_opts(max_gt=4))
  one = _take(pipeline.TrainIterator(anns, process_index=0, process_count=1,
                                     **kw), 2)
  h0 = _take(pipeline.TrainIterator(anns, process_index=0, process_count=2,
                                    **kw), 2)
  h1 = _take(pipeline.TrainIterator(anns, process_index=1, process_count=2,
                                    **kw), 2)
  for g, a, b in zip(one, h0, h1):
    assert a["image"].shape[0] == 2
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))


def test_skip_options(anns):
  src = sources.AnnotationSource(anns)
  all_idx = pipeline.train_indices(src, _opts())
  np.testing.assert_array_equal(all_idx, np.arange(11))
  # s3 has no box; s1 and s8 only unlabeled boxes.
  np.testing.assert_array_equal(
      pipeline.train_indices(src, _opts(skip_empty=True)),
      [0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
  np.testing.assert_array_equal(
      pipeline.train_indices(src, _opts(skip_unlabeled_only=True)),
      [0, 2, 3, 4, 5, 6, 7, 9, 10])


def test_max_gt_error_and_truncation(anns, tmp_path):
  with pytest.raises(ValueError, match=r"s6\.jpg with 4.*max_gt"):
    pipeline.TrainIterator(anns, batch_size=2, options=_opts(max_gt=3),
                           process_index=0, process_count=1)
  path = os.path.join(tmp_path, "t.jpg")
  _write(path, 50, 100, 1)
  boxes = np.arange(16, dtype=np.float32).reshape(4, 4)
  ann = ImageAnnotation("t.jpg", path, boxes, np.array([-1, 5, -1, 6],
                                                       np.int32))
  src = sources.AnnotationSource([ann])
  ex = pipeline.load_example(src, 0, (64, 96), False,
                             _opts(max_gt=3, too_many_gt="truncate"))
  # Labeled boxes kept first (rows 1, 3), then the first unlabeled (row 0),
  # in annotation order.
  np.testing.assert_array_equal(ex["pids"], [-1, 5, 6])
  np.testing.assert_allclose(ex["boxes"], boxes[[0, 1, 3]] * 0.96, rtol=1e-6)


def test_eval_iterator_covers_every_image_once(anns):
  opts = _opts(num_workers=2)
  ev = pipeline.EvalIterator(anns, batch_size=3, options=opts,
                             process_index=0, process_count=1)
  assert ev.names == [a.name for a in anns]
  batches = list(ev)
  # 8 landscape -> 3 batches (last padded with 1), 3 portrait -> 1.
  assert len(batches) == len(ev) == 4
  idx = np.concatenate([b["index"] for b in batches])
  real = idx[idx >= 0]
  np.testing.assert_array_equal(np.sort(real), np.arange(11))
  assert (idx == -1).sum() == 1
  landscape = [i for i in real if pipeline.bucket_of(*ev.source.sizes[i]) == 0]
  assert landscape == sorted(landscape)
  for b in batches:
    assert not b["flipped"].any()
    _check_batch(b, ev.source, opts, 3)
    pad = b["index"] < 0
    assert not b["box_mask"][pad].any() and not b["image"][pad].any()
    assert (b["pids"][pad] == -2).all()


def test_queries_through_eval_iterator(anns):
  q = [Query(a.name, a.path, a.boxes[0], int(a.pids[0])) for a in anns
       if len(a.pids)][:3]
  ds = SearchDataset("x", "/", train=anns, gallery=anns[:2], queries=q,
                     num_train_ids=20)
  src = pipeline.source_for(ds, "queries")
  ev = pipeline.EvalIterator(src, batch_size=4, options=_opts(),
                             process_index=0, process_count=1)
  batches = list(ev)
  got = {int(i): b for b in batches for i in b["index"] if i >= 0}
  assert sorted(got) == [0, 1, 2]
  for b in batches:
    for r, i in enumerate(b["index"]):
      if i >= 0:
        np.testing.assert_array_equal(b["box_mask"][r], [1, 0, 0, 0])
        np.testing.assert_allclose(b["boxes"][r, 0] / b["scale"][r],
                                   q[i].box, rtol=1e-5)


def test_errors_name_the_file(anns, tmp_path):
  missing = ImageAnnotation("gone.jpg", os.path.join(tmp_path, "gone.jpg"),
                            np.zeros((0, 4), np.float32),
                            np.zeros((0,), np.int32))
  with pytest.raises(FileNotFoundError, match="gone.jpg"):
    sources.AnnotationSource([missing])
  bad = os.path.join(tmp_path, "bad.jpg")
  with open(bad, "wb") as f:
    f.write(b"not an image at all")
  with pytest.raises(ValueError, match="bad.jpg"):
    sources.AnnotationSource([ImageAnnotation("bad.jpg", bad, missing.boxes,
                                               missing.pids)])
  # Valid header, truncated data: fails while decoding, inside a worker.
  trunc = os.path.join(tmp_path, "trunc.jpg")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(trunc)
  data = open(trunc, "rb").read()
  with open(trunc, "wb") as f:
    f.write(data[: len(data) // 3])
  ann = ImageAnnotation("trunc.jpg", trunc, missing.boxes, missing.pids)
  ev = pipeline.EvalIterator([ann], batch_size=1, options=_opts(num_workers=1),
                             process_index=0, process_count=1)
  with pytest.raises(Exception, match="trunc.jpg"):
    list(ev)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.TrainIterator(anns, batch_size=3, options=_opts(),
                           process_index=0, process_count=2)


def test_options_from_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"min_size": 600, "max_size": 1000,
                                   "num_workers": 0, "root": "/x"})
  opts = pipeline.PipelineOptions.from_config(cfg)
  assert (opts.min_size, opts.max_size, opts.num_workers) == (600, 1000, 0)
  assert opts.max_gt == pipeline.PipelineOptions().max_gt
  with pytest.raises(ValueError, match="too_many_gt"):
    pipeline.PipelineOptions(too_many_gt="drop")
  assert pipeline.global_batch_size(2, num_devices=8) == 16


def test_every_pipeline_option_is_a_config_field():
  # Messages tell users to set config.data.<option>; the locked config must
  # have each one, and the value must reach PipelineOptions.
  import dataclasses
  from oim_jax import config_defaults
  data = config_defaults.base_config().data
  for field in dataclasses.fields(pipeline.PipelineOptions):
    assert field.name in data, field.name
  data.too_many_gt, data.prefetch_batches, data.skip_empty = "truncate", 5, True
  opts = pipeline.PipelineOptions.from_config(data)
  assert (opts.too_many_gt, opts.prefetch_batches, opts.skip_empty) == (
      "truncate", 5, True)
