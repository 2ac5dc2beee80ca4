"""Trains a person-search network (and evaluates it at the end).

  python train.py --config=configs/synthetic.py --workdir=runs/demo
  python train.py --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.data.root=/data/cuhk_sysu --config.train.batch_size=4

Rerunning the same command resumes from the latest checkpoint in workdir.
"""

# First, before anything imports JAX: on a CPU host, re-executes this command
# with a faster malloc and sets an XLA:CPU flag (oim_jax/cpu_host/); on GPU
# and TPU hosts it changes nothing.
from oim_jax import cpu_host  # pylint: disable=g-bad-import-order
_CPU_HOST = cpu_host.set_up()

from absl import app
from absl import flags
from ml_collections import config_flags

from oim_jax import cli
from oim_jax import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  cli.start(FLAGS.config, _CPU_HOST)
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
