"""TFDS array_record build (no TensorFlow) + data_source read-back."""

import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from oim_jax.data import pipeline
from oim_jax.data import tfds_builders
from oim_jax.data.dataset import ImageAnnotation, Query, SearchDataset
from oim_jax.data.dataset import query_annotations


def _dataset(root):
  rng = np.random.default_rng(0)

  def image(name, h, w, n, labeled):
    path = os.path.join(root, name)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    boxes = np.sort(rng.uniform(0, min(h, w), (n, 2, 2)), axis=1).reshape(
        n, 4)[:, [0, 2, 1, 3]].astype(np.float32)
    pids = (np.arange(n) if labeled else -np.ones(n)).astype(np.int32)
    return ImageAnnotation(name, path, boxes, pids, cam_id=n)

  train = [image("s1.jpg", 40, 60, 2, True), image("s2.jpg", 70, 30, 0, False),
           image("s3.jpg", 50, 50, 3, False)]
  gallery = [image("s4.jpg", 30, 40, 1, True), image("s5.jpg", 45, 35, 2, True)]
  queries = [Query("s4.jpg", gallery[0].path, gallery[0].boxes[0], 0),
             Query("s5.jpg", gallery[1].path, gallery[1].boxes[1], 1)]
  return SearchDataset("cuhk_sysu", root, train, gallery, queries,
                       num_train_ids=2, train_id_names=("p1", "p2"))


def test_no_tensorflow():
  assert "tensorflow" not in sys.modules


def test_build_and_read_back(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  ds = _dataset(str(raw))
  data_dir = str(tmp_path / "tfds")
  builder = tfds_builders.prepare("cuhk_sysu", data_dir, dataset=ds)
  assert builder.is_prepared()
  assert os.path.isdir(os.path.join(data_dir, "cuhk_sysu", "1.0.0"))
  meta = builder.info.metadata
  assert meta["num_train_ids"] == 2 and meta["train_id_names"] == ["p1", "p2"]
  assert meta["splits"]["train"]["sizes"] == [[40, 60], [70, 30], [50, 50]]
  assert meta["splits"]["gallery"]["num_labeled"] == [1, 2]

  # A fresh builder (no dataset injected) reads what was written, with
  # tfds.data_source, in the loader's order.
  sources = tfds.data_source("cuhk_sysu", data_dir=data_dir,
                             decoders={"image": tfds.decode.SkipDecoding()})
  expected = {"train": ds.train, "gallery": ds.gallery,
              "queries": query_annotations(ds.queries)}
  for split, anns in expected.items():
    src = sources[split]
    assert len(src) == len(anns)
    for i, a in enumerate(anns):
      rec = src[i]
      assert rec["name"].decode() == a.name
      with open(a.path, "rb") as f:
        assert rec["image"] == f.read()  # The file bytes, unchanged.
      assert rec["boxes"].dtype == np.float32 and rec["boxes"].shape == (
          len(a.pids), 4)
      np.testing.assert_array_equal(rec["boxes"], a.boxes)
      np.testing.assert_array_equal(rec["pids"], a.pids)
      assert rec["cam_id"] == a.cam_id
  # Decoded images equal PIL's decoding of the files.
  decoded = builder.as_data_source(split="gallery")[1]["image"]
  np.testing.assert_array_equal(decoded,
                                np.asarray(Image.open(ds.gallery[1].path)))

  # Prepared once: a second prepare() reuses it (no dataset, no manual_dir).
  again = tfds_builders.prepare("cuhk_sysu", data_dir)
  assert again.is_prepared()

  # The pipeline gives identical batches from files and from TFDS.
  opts = pipeline.PipelineOptions(min_size=64, max_size=96, max_gt=4,
                                  num_workers=0)
  for split in ("train", "gallery", "queries"):
    from_files = list(pipeline.EvalIterator(
        pipeline.source_for(ds, split), batch_size=2, options=opts,
        process_index=0, process_count=1))
    from_tfds = list(pipeline.EvalIterator(
        pipeline.source_for(None, split, tfds_name="cuhk_sysu",
                            data_dir=data_dir),
        batch_size=2, options=opts, process_index=0, process_count=1))
    assert len(from_files) == len(from_tfds) > 0
    for x, y in zip(from_files, from_tfds):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  train_a = pipeline.TrainIterator(
      pipeline.source_for(ds, "train"), batch_size=1, seed=1, options=opts,
      process_index=0, process_count=1)
  train_b = pipeline.TrainIterator(
      tfds_builders.TfdsSource("cuhk_sysu", "train", data_dir), batch_size=1,
      seed=1, options=opts, process_index=0, process_count=1)
  for _ in range(4):
    x, y = next(train_a), next(train_b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="manual_dir"):
    tfds_builders.prepare("prw", str(tmp_path / "d"))
  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_builders.get_builder("market", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_builders.TfdsSource("synthetic", "train", str(tmp_path / "empty"))
  raw = tmp_path / "raw"
  raw.mkdir()
  ds = _dataset(str(raw))
  os.remove(ds.gallery[1].path)
  with pytest.raises(FileNotFoundError, match="s5.jpg"):
    tfds_builders.prepare("synthetic", str(tmp_path / "d"), dataset=ds)


def test_train_and_evaluate_read_tfds_when_configured(tiny_synthetic_root,
                                                      tmp_path, monkeypatch):
  # config.data.tfds_dir: every image comes from the array_record files, and
  # training and evaluation see the same data as from the image files.
  from conftest import tiny_train_config
  from oim_jax import train_lib
  from oim_jax.data import sources

  data_dir = str(tmp_path / "tfds")
  tfds_builders.prepare("synthetic", data_dir, manual_dir=tiny_synthetic_root)
  config = tiny_train_config(tiny_synthetic_root, num_steps=2)
  config.eval.at_end = True
  from_files = train_lib.train_and_evaluate(config, str(tmp_path / "a"))

  def no_file_reads(self, index):
    raise AssertionError(f"read {self.annotations[index].path} from disk")
  monkeypatch.setattr(sources.AnnotationSource, "read", no_file_reads)
  config.data.tfds_dir = data_dir
  from_tfds = train_lib.train_and_evaluate(config, str(tmp_path / "b"))

  # Not data: timings and compile counts (the second run hits the cache).
  machine = ("per_s", "per_step", "step_s", "_time", "seconds", "compil")
  keys = [k for k in from_files if not any(t in k for t in machine)]
  assert "loss" in keys and "mAP" in keys and "det_ap" in keys
  for k in keys:
    np.testing.assert_allclose(from_tfds[k], from_files[k], rtol=1e-6,
                               err_msg=k)


def test_tfds_dir_prepared_from_other_data_is_refused(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  ds = _dataset(str(raw))
  data_dir = str(tmp_path / "tfds")
  tfds_builders.prepare("cuhk_sysu", data_dir, dataset=ds)
  config = type("DataConfig", (), {"tfds_dir": data_dir})()
  other = SearchDataset("cuhk_sysu", str(raw), ds.train[:2], ds.gallery,
                        ds.queries, num_train_ids=2)
  with pytest.raises(ValueError, match="holds 3 images.*other data"):
    pipeline.dataset_source(other, "train", config)
  renamed = [ImageAnnotation("x.jpg", a.path, a.boxes, a.pids, a.cam_id)
             for a in ds.gallery]
  other = SearchDataset("cuhk_sysu", str(raw), ds.train, renamed, ds.queries,
                        num_train_ids=2)
  with pytest.raises(ValueError, match="'s4.jpg'.*'x.jpg'"):
    pipeline.dataset_source(other, "gallery", config)
  # The matching dataset is read from the records.
  src = pipeline.dataset_source(ds, "gallery", config)
  assert isinstance(src, tfds_builders.TfdsSource) and len(src) == 2
