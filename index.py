"""Indexes a photo collection and/or videos once, for search.py --index.

  python index.py --workdir=runs/demo --gallery=photos/,cam1.mp4 \
      --out=runs/demo/index --every_seconds=1

Detects and embeds every person in every image (folders are walked
recursively) and in the sampled frames of every video, and stores boxes,
scores, embeddings and where each came from (oim_jax/search_index.py).
Rerunning with the same --out skips what is indexed and adds new files; an
unreadable file is reported, recorded as failed and tried again next time;
the exit status is then 2.
"""

# First, before anything imports JAX: on a CPU host, re-executes this command
# with a faster malloc and sets an XLA:CPU flag (oim_jax/cpu_host/); on GPU
# and TPU hosts it changes nothing.
from oim_jax import cpu_host  # pylint: disable=g-bad-import-order
_CPU_HOST = cpu_host.set_up()

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from oim_jax import cli
from oim_jax import config_defaults
from oim_jax import eval_lib
from oim_jax import indexing
from oim_jax import search_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/).")
flags.DEFINE_list("gallery", None,
                  "Image/video files and folders to index (comma-separated).")
flags.DEFINE_string("out", None, "Index directory (created or extended).")
flags.DEFINE_integer("every_frames", 0,
                     "Videos: index every N-th frame (0: use --every_seconds).")
flags.DEFINE_float("every_seconds", 1.0,
                   "Videos: index a frame every S seconds (0 with "
                   "--every_frames=0: every frame).")
flags.DEFINE_float("det_thresh", None,
                   "Keep detections scoring >= this (default "
                   "config.eval.det_thresh).")
flags.DEFINE_integer("checkpoint_step", None,
                     "Checkpoint step (default latest).")
config_flags.DEFINE_config_file("config", None,
                                "Config (default: DIR/config.json).")
flags.mark_flags_as_required(["workdir", "gallery", "out"])

# Exit status when the index was built but some files could not be read.
EXIT_SOME_FAILED = 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.every_frames < 0 or FLAGS.every_seconds < 0:
    raise app.UsageError("--every_frames and --every_seconds must be >= 0")
  cpu_host.log(_CPU_HOST)
  config = FLAGS.config or search_lib.config_from_workdir(FLAGS.workdir)
  config_defaults.validate(config)
  params, step = eval_lib.restore_params(config, FLAGS.workdir,
                                         FLAGS.checkpoint_step)
  report = indexing.build(
      config, params, FLAGS.gallery, FLAGS.out, workdir=FLAGS.workdir,
      step=step, det_thresh=FLAGS.det_thresh,
      sampling=indexing.Sampling(FLAGS.every_frames, FLAGS.every_seconds))
  print(f"checkpoint step {step}: indexed {report.frames} frames with "
        f"{report.detections} detections in {report.seconds:.1f} s "
        f"({report.skipped_frames} frames were already indexed) -> {FLAGS.out}")
  if report.failed:
    print(f"{len(report.failed)} file(s) could not be read and were skipped "
          "(a rerun tries them again):")
    for path, error in report.failed:
      print(f"  {path}: {error}")
    sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
  cli.run(main)
