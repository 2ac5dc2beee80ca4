"""TFDS builders for CUHK-SYSU, PRW and the synthetic dataset (no TensorFlow).

Each builder turns the SearchDataset of its loader into three splits, train,
gallery and queries, written once as array_record files into `data_dir` and
read back with random access (`builder.as_data_source()` or
`tfds.data_source(...)`). Only the TensorFlow-free path of tfds 4.9.10 is
used: `download_and_prepare(file_format="array_record")` and data sources;
`tfds.load` and the `tfds build` CLI need TensorFlow and are not used.

Features of a record:
  image   tfds.features.Image: the original encoded file bytes, stored as
          they are (tfds only re-encodes NumPy arrays, so no TF is needed to
          write it); read them undecoded with
          decoders={"image": tfds.decode.SkipDecoding()}, or decoded (PIL).
  boxes   Tensor [n, 4] float32 (x1, y1, x2, y2) as the loader gives them.
  pids    Tensor [n] int32 (train 0..L-1, test = query index, -1 unlabeled).
  name    Text, the image file name.
  cam_id  int32 (PRW camera, -1 otherwise).
The queries split holds one record per query (its box and pid, n = 1).

Records keep the loader's order (disable_shuffling=True), so record i of a
split is image i of the SearchDataset split. The builder metadata
(metadata.json) holds num_train_ids and, per split, names, original (h, w)
sizes and box counts: what the input pipeline needs to plan batches without
reading every record. CUHK-SYSU's TestG gallery protocols are not stored:
evaluation reads them with the loader (small .mat files).
"""

from __future__ import annotations

import os
from typing import Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from oim_jax.data import cuhk_sysu
from oim_jax.data import dataset as data_lib
from oim_jax.data import prw
from oim_jax.data import sources
from oim_jax.data.dataset import ImageAnnotation, SearchDataset

SPLITS = ("train", "gallery", "queries")


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      "pids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "name": tfds.features.Text(),
      "cam_id": tfds.features.Scalar(dtype=np.int32),
  })


def split_annotations(dataset: SearchDataset) -> dict[str, list]:
  """{split: [ImageAnnotation]} for the three splits of a SearchDataset."""
  return {split: data_lib.split_annotations(dataset, split)
          for split in SPLITS}


class _SearchBuilder(tfds.core.GeneratorBasedBuilder,
                     skip_registration=True):
  """Shared builder: a SearchDataset -> train / gallery / queries splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = ""
  DESCRIPTION = ""
  # tfds computes this through importlib_resources (not installed here, and
  # only used to locate checksum files, which these builders do not have).
  code_path = epath.Path(__file__)

  def __init__(self, *, dataset: Optional[SearchDataset] = None, **kwargs):
    """Args: dataset: use this SearchDataset instead of calling the loader
    on the manual directory (tests, or a dataset already in memory)."""
    self._search_dataset = dataset
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=_features(),
        homepage=self.HOMEPAGE, disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _load(self, manual_dir: str) -> SearchDataset:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    dataset = self._search_dataset
    if dataset is None:
      dataset = self._load(os.fspath(dl_manager.manual_dir))
    splits = split_annotations(dataset)
    meta = {"dataset": dataset.name, "num_train_ids": int(dataset.num_train_ids),
            "train_id_names": [str(n) for n in dataset.train_id_names],
            "splits": {}}
    for split, anns in splits.items():
      # Reads every image header now: a missing or unreadable file fails here,
      # naming it, before anything is written.
      src = sources.AnnotationSource(anns)
      meta["splits"][split] = {
          "names": src.names, "sizes": src.sizes.tolist(),
          "num_boxes": src.num_boxes.tolist(),
          "num_labeled": src.num_labeled.tolist()}
    self.info.metadata.update(meta)
    return {split: self._generate_examples(anns)
            for split, anns in splits.items()}

  def _generate_examples(self, annotations: list[ImageAnnotation]):
    for i, a in enumerate(annotations):
      try:
        with open(a.path, "rb") as f:
          data = f.read()
      except OSError as e:
        raise FileNotFoundError(f"cannot read image {a.path}: {e}") from e
      yield i, {
          "image": data,
          "boxes": np.asarray(a.boxes, np.float32).reshape(-1, 4),
          "pids": np.asarray(a.pids, np.int32).reshape(-1),
          "name": a.name,
          "cam_id": np.int32(a.cam_id),
      }


class CuhkSysu(_SearchBuilder):
  """CUHK-SYSU person search (Xiao et al. 2017): 18184 images, 8432 ids."""

  HOMEPAGE = "https://github.com/ShuangLI59/person_search"
  DESCRIPTION = "CUHK-SYSU person search dataset (train/gallery/queries)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CUHK-SYSU from the authors (links in the README of
  https://github.com/ShuangLI59/person_search) and extract it so that the
  manual directory holds Image/SSM/*.jpg and annotation/ (Images.mat,
  pool.mat, test/train_test/Train.mat, TestG50.mat, ...). Then run
  python -m oim_jax.data.prepare --dataset=cuhk_sysu --manual_dir=<that dir>
  --data_dir=<output dir>.
  """

  def _load(self, manual_dir):
    return cuhk_sysu.load(manual_dir)


class Prw(_SearchBuilder):
  """PRW, Person Re-identification in the Wild (Zheng et al. 2017)."""

  HOMEPAGE = "https://github.com/liangzheng06/PRW-baseline"
  DESCRIPTION = "PRW person search dataset (train/gallery/queries)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download PRW-v16.04.20 (links in https://github.com/liangzheng06/PRW-baseline)
  and extract it so that the manual directory holds frames/*.jpg,
  annotations/*.jpg.mat, frame_train.mat, frame_test.mat, query_info.txt,
  ID_train.mat and ID_test.mat. Then run
  python -m oim_jax.data.prepare --dataset=prw --manual_dir=<that dir>
  --data_dir=<output dir>.
  """

  def _load(self, manual_dir):
    return prw.load(manual_dir)


class Synthetic(_SearchBuilder):
  """The generated dataset (oim_jax.data.synthetic), CUHK-SYSU on-disk format."""

  DESCRIPTION = "Synthetic person search scenes written by oim_jax."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  The manual directory is the root the synthetic generator wrote (CUHK-SYSU
  format). `python -m oim_jax.data.prepare --dataset=synthetic` generates it
  there first when it is empty.
  """

  def _load(self, manual_dir):
    return cuhk_sysu.load(manual_dir, name="synthetic", check_counts=False)


# Registered under the snake_case class names, as tfds does by default.
BUILDERS = {"cuhk_sysu": CuhkSysu, "prw": Prw, "synthetic": Synthetic}


def get_builder(name: str, data_dir: str,
                dataset: Optional[SearchDataset] = None) -> _SearchBuilder:
  """The builder of `name` ("cuhk_sysu", "prw", "synthetic") in data_dir."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of "
                     f"{sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=os.fspath(data_dir), dataset=dataset)


def prepare(name: str, data_dir: str, manual_dir: Optional[str] = None,
            dataset: Optional[SearchDataset] = None) -> _SearchBuilder:
  """Builds `name` into data_dir (array_record) unless already there.

  Args:
    name: "cuhk_sysu", "prw" or "synthetic".
    data_dir: output directory (tfds layout data_dir/<name>/<version>/).
    manual_dir: the raw dataset root, read by the loader.
    dataset: a SearchDataset to write instead of loading manual_dir.

  Returns:
    The prepared builder (builder.as_data_source() reads it).
  """
  builder = get_builder(name, data_dir, dataset=dataset)
  if builder.is_prepared():
    return builder
  if dataset is None and not manual_dir:
    raise ValueError(f"{name}: manual_dir (the raw dataset root) is needed to "
                     f"prepare it.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=config,
                               file_format="array_record")
  return builder


class TfdsSource(sources.ImageSource):
  """Reads a split of a dataset prepared by `prepare` (or oim_jax.data.prepare).

  Random access through `builder.as_data_source` (array_record, no
  TensorFlow). Image bytes are read undecoded (SkipDecoding) and go through
  the same decoder as AnnotationSource, so both give identical batches.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    builder = get_builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {data_dir}: run "
          f"python -m oim_jax.data.prepare --dataset={name} "
          f"--manual_dir=<raw dataset root> --data_dir={data_dir}")
    meta = builder.info.metadata["splits"][split]
    self.names = list(meta["names"])
    self.sizes = np.asarray(meta["sizes"], np.int64).reshape(-1, 2)
    self.num_boxes = np.asarray(meta["num_boxes"], np.int64)
    self.num_labeled = np.asarray(meta["num_labeled"], np.int64)
    self._source = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    if len(self._source) != len(self.names):
      raise ValueError(f"{name}/{split}: {len(self._source)} records but "
                       f"metadata lists {len(self.names)} images; rebuild it.")

  def read(self, index):
    rec = self._source[index]
    return (rec["image"], np.asarray(rec["boxes"], np.float32).reshape(-1, 4),
            np.asarray(rec["pids"], np.int32).reshape(-1))
