"""Evaluates a trained checkpoint with the dataset's standard protocol.

  python eval.py --config=configs/cuhk.py --workdir=runs/cuhk
  python eval.py --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.eval.gallery_size=-1 --checkpoint_step=20000
  python eval.py ... --from_saved   # re-score saved detections, no model run
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
from oim_jax import eval_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
flags.DEFINE_integer("checkpoint_step", None,
                     "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_bool("from_saved", False,
                  "Re-evaluate from DIR/eval/ raw outputs, without the model.")
config_flags.DEFINE_config_file(
    "config", None, "Configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  cli.start(FLAGS.config, _CPU_HOST)
  eval_lib.evaluate(FLAGS.config, FLAGS.workdir, step=FLAGS.checkpoint_step,
                    from_saved=FLAGS.from_saved)


if __name__ == "__main__":
  cli.run(main)
