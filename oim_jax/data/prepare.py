r"""Prepares a dataset as TFDS array_record files (once; reused afterwards).

  python -m oim_jax.data.prepare --dataset=cuhk_sysu \
      --manual_dir=/data/cuhk_sysu --data_dir=/data/tfds

Reads the raw dataset with its loader (oim_jax.data.cuhk_sysu / prw), writes
data_dir/<dataset>/1.0.0/ with train, gallery and queries splits (progress
bars from tfds), then prints the split sizes. For --dataset=synthetic an
empty or missing --manual_dir is first filled by the synthetic generator.
train.py / eval.py then read the images from there with
`--config.data.tfds_dir=<data_dir>` (annotations and evaluation protocols
still from --config.data.root).
"""

import os
import time

from absl import app
from absl import flags
from absl import logging

from oim_jax.data import synthetic
from oim_jax.data import tfds_builders

_DATASET = flags.DEFINE_enum("dataset", None, sorted(tfds_builders.BUILDERS),
                             "Dataset to prepare.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Raw dataset root (as downloaded and extracted).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", os.path.expanduser("~/tensorflow_datasets"),
    "Output directory of the prepared TFDS dataset.")
flags.mark_flags_as_required(["dataset"])


def _generate_synthetic(root: str):
  if os.path.isdir(root) and os.listdir(root):
    return
  logging.info("Generating the synthetic dataset into %s", root)
  if hasattr(synthetic, "ensure_synthetic"):
    synthetic.ensure_synthetic(root)
  else:
    synthetic.generate(root)


def main(argv):
  del argv
  name, data_dir = _DATASET.value, _DATA_DIR.value
  manual_dir = _MANUAL_DIR.value
  if manual_dir:
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  builder = tfds_builders.get_builder(name, data_dir)
  if builder.is_prepared():
    print(f"{name}: already prepared in {builder.data_dir}")
  else:
    if not manual_dir:
      raise app.UsageError(
          f"--manual_dir is required to prepare {name}:\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if name == "synthetic":
      _generate_synthetic(manual_dir)
    elif not os.path.isdir(manual_dir):
      raise app.UsageError(
          f"--manual_dir={manual_dir} does not exist.\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    start = time.time()
    print(f"{name}: loading annotations from {manual_dir} ...", flush=True)
    builder = tfds_builders.prepare(name, data_dir, manual_dir=manual_dir)
    print(f"{name}: prepared in {time.time() - start:.0f} s -> "
          f"{builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} images")
  print(f"  num_train_ids: {builder.info.metadata['num_train_ids']}")


if __name__ == "__main__":
  app.run(main)
