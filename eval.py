"""Evaluates a trained checkpoint with the dataset's standard protocol.

  python eval.py --config=configs/cuhk.py --workdir=runs/cuhk
  python eval.py --config=configs/cuhk.py --workdir=runs/cuhk \
      --config.eval.gallery_size=-1 --checkpoint_step=20000
  python eval.py ... --from_saved   # re-score saved detections, no model run
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
  launch.start(FLAGS.config)  # first: before anything starts JAX's devices
  logging.info(_HOST_MEMORY)
  logging.info(_XLA_FLAGS)
  logging.info(host_info.cpu_summary())
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  eval_lib.evaluate(FLAGS.config, FLAGS.workdir, step=FLAGS.checkpoint_step,
                    from_saved=FLAGS.from_saved)


if __name__ == "__main__":
  cli.run(main)
