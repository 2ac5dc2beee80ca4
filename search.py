"""Searches a folder of scene images for the person in a query box.

  python search.py --workdir=runs/demo --query=scene.jpg --box=10,20,60,150 \
      --gallery=photos/ --top_k=10 --out=results.png

The model's config comes from DIR/config.json (written by train.py) unless
--config is given; parameters from the latest checkpoint (or
--checkpoint_step).
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
from oim_jax import config_defaults
from oim_jax import eval_lib
from oim_jax import search_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/).")
flags.DEFINE_string("query", None, "Query scene image.")
flags.DEFINE_list("box", None, "Query box x1,y1,x2,y2 in query pixels.")
flags.DEFINE_string("gallery", None, "Folder of gallery images.")
flags.DEFINE_integer("top_k", 10, "Matches to show.")
flags.DEFINE_string("out", "search_results.png", "Output PNG.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default latest).")
flags.DEFINE_float("det_thresh", None, "Detection score threshold.")
config_flags.DEFINE_config_file("config", None, "Config (default: DIR/config.json).")
flags.mark_flags_as_required(["workdir", "query", "box", "gallery"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if len(FLAGS.box) != 4:
    raise app.UsageError("--box takes four numbers: x1,y1,x2,y2")
  cpu_host.log(_CPU_HOST)
  config = FLAGS.config or search_lib.config_from_workdir(FLAGS.workdir)
  config_defaults.validate(config)
  params, step = eval_lib.restore_params(config, FLAGS.workdir,
                                         FLAGS.checkpoint_step)
  box = [float(v) for v in FLAGS.box]
  matches = search_lib.search(config, params, FLAGS.query, box,
                              search_lib.gallery_images(FLAGS.gallery),
                              FLAGS.top_k, FLAGS.det_thresh)
  print(f"checkpoint step {step}; top {len(matches)} matches:")
  print(f"{'rank':>4}  {'similarity':>10}  {'det':>5}  box  image")
  for m in matches:
    box_s = ",".join(f"{v:.0f}" for v in m.box)
    print(f"{m.rank:>4}  {m.similarity:>10.3f}  {m.score:>5.2f}  {box_s}  "
          f"{m.image}")
  search_lib.draw(FLAGS.query, box, matches, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
