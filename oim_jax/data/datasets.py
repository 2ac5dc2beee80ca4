"""Dataset selection from `config.data`: the one place names map to loaders."""

from __future__ import annotations

import os

import ml_collections

from oim_jax import config_defaults
from oim_jax.data import cuhk_sysu
from oim_jax.data import prw
from oim_jax.data import synthetic
from oim_jax.data.dataset import SearchDataset

DATASETS = config_defaults.CHOICES["data.dataset"]


def load_dataset(data_config: ml_collections.ConfigDict) -> SearchDataset:
  """Loads `data_config.dataset` from `data_config.root`.

  The synthetic dataset is generated into its root first if absent (written
  in the CUHK-SYSU on-disk format and read by the CUHK-SYSU loader).
  """
  name = data_config.dataset
  root = os.path.expanduser(data_config.root)
  if name == "synthetic":
    try:
      synthetic.ensure_synthetic(root, **dict(data_config.synthetic))
    except synthetic.StaleDatasetError as e:
      raise ValueError(
          f"{e}\nFrom train.py / eval.py: delete {root} (it is regenerated "
          "in about 20 s) or pass --config.data.root=<another directory>."
      ) from e
    return cuhk_sysu.load(root, name="synthetic", check_counts=False)
  if name == "cuhk_sysu":
    return cuhk_sysu.load(root)
  if name == "prw":
    return prw.load(root)
  raise ValueError(config_defaults.choice_error("data.dataset", name))
