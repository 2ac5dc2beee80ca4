"""Trains a person-search network (and evaluates it at the end).

  python train.py --config=configs/synthetic.py --workdir=runs/demo
  python train.py --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.data.root=/data/cuhk_sysu --config.train.batch_size=4

Rerunning the same command resumes from the latest checkpoint in workdir.
"""

# First: re-executes this command with jemalloc or mimalloc preloaded where
# installed (faster CPU steps, oim_jax/host_memory.py); OIM_JAX_MALLOC=system
# turns it off.
from oim_jax import host_memory  # pylint: disable=g-bad-import-order
_HOST_MEMORY = host_memory.use_fast_malloc()
# Then, before JAX starts: XLA's own CPU convolutions instead of YNNPACK's
# (faster for these layers, oim_jax/xla_flags.py); OIM_JAX_YNN_CONV=1 keeps
# YNNPACK's.
from oim_jax import xla_flags  # pylint: disable=g-bad-import-order,g-import-not-at-top
_XLA_FLAGS = xla_flags.use_fast_cpu_flags()

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from oim_jax import cli
from oim_jax import host_info
from oim_jax import launch
from oim_jax import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  launch.start(FLAGS.config)  # first: before anything starts JAX's devices
  logging.info(_HOST_MEMORY)
  logging.info(_XLA_FLAGS)
  logging.info(host_info.cpu_summary())
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
