"""Searches gallery images, or an index built by index.py, for the person in
a query box.

  python search.py --index=runs/demo/index --query=scene.jpg \
      --box=10,20,60,150 --top_k=10 --out=results.png
  python search.py --workdir=runs/demo --query=scene.jpg --box=10,20,60,150 \
      --gallery=photos/ --top_k=10 --out=results.png

With --index only the query is embedded (by the model the index was built
with: its workdir and checkpoint step are in the index) and the stored
detections are ranked; filters: --min_score, --source, --time,
--one_per_frame; approximate search: --method, --nprobe. With --gallery every gallery image is detected again. The
model's config comes from DIR/config.json unless --config is given.
"""

# First, before anything imports JAX: on a CPU host, re-executes this command
# with a faster malloc and sets an XLA:CPU flag (oim_jax/cpu_host/); on GPU
# and TPU hosts it changes nothing.
from oim_jax import cpu_host  # pylint: disable=g-bad-import-order
_CPU_HOST = cpu_host.set_up()

import time

from absl import app
from absl import flags
from ml_collections import config_flags

from oim_jax import cli
from oim_jax import config_defaults
from oim_jax import eval_lib
from oim_jax import search_index
from oim_jax import search_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None,
                    "Training workdir (checkpoints/); with --index, default: "
                    "the one the index was built from.")
flags.DEFINE_string("query", None, "Query scene image.")
flags.DEFINE_list("box", None, "Query box x1,y1,x2,y2 in query pixels.")
flags.DEFINE_string("gallery", None, "Folder of gallery images.")
flags.DEFINE_string("index", None, "Index directory written by index.py.")
flags.DEFINE_integer("top_k", 10, "Matches to show.")
flags.DEFINE_string("out", "search_results.png", "Output PNG.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default latest).")
flags.DEFINE_float("det_thresh", None, "Detection score threshold.")
flags.DEFINE_float("min_score", 0.0,
                   "--index: keep detections scoring at least this.")
flags.DEFINE_string("source", None,
                    "--index: keep files whose path matches this glob, e.g. "
                    "'*cam2*'.")
flags.DEFINE_list("time", None,
                  "--index: T0,T1 seconds: keep video frames in this range.")
flags.DEFINE_bool("one_per_frame", False,
                  "--index: at most one match per frame.")
flags.DEFINE_enum("method", "auto", ["auto", "exact", "approximate"],
                  "--index: exact matmul, or faiss (pip install faiss-cpu); "
                  "auto: approximate from 1M detections when faiss is "
                  "installed.")
flags.DEFINE_integer("nprobe", None,
                     "--index, approximate search: faiss clusters to scan "
                     "(default max(32, clusters/16); more: higher recall, "
                     "slower; docs/search_index.md has the trade-off).")
config_flags.DEFINE_config_file("config", None, "Config (default: DIR/config.json).")
flags.mark_flags_as_required(["query", "box"])


def _search_index(box):
  """Ranks the detections of --index; returns (matches, step)."""
  if FLAGS.gallery:
    raise app.UsageError("--index and --gallery: give one of them")
  if FLAGS.det_thresh is not None:
    raise app.UsageError("--det_thresh is fixed when the index is built; "
                         "filter with --min_score")
  time_range = None
  if FLAGS.time:
    if len(FLAGS.time) != 2:
      raise app.UsageError("--time takes two numbers: T0,T1 (seconds)")
    time_range = tuple(float(v) for v in FLAGS.time)
  with search_index.SearchIndex.open(FLAGS.index) as index:
    m = index.manifest
    step = m["checkpoint_step"]
    if FLAGS.checkpoint_step not in (None, step):
      raise ValueError(
          f"{FLAGS.index} was built with checkpoint step {step}; a query "
          f"embedded at step {FLAGS.checkpoint_step} would not be comparable.")
    config = FLAGS.config or search_lib.config_from_dict(m["config"])
    config_defaults.validate(config)
    params, _ = eval_lib.restore_params(config, FLAGS.workdir or m["workdir"],
                                        step)
    query = search_lib.embed_query(eval_lib.Inference(config, params),
                                   FLAGS.query, box)
    t0 = time.perf_counter()
    matches = index.search(query, FLAGS.top_k, min_score=FLAGS.min_score,
                           source_glob=FLAGS.source, time_range=time_range,
                           one_per_frame=FLAGS.one_per_frame,
                           method=FLAGS.method, nprobe=FLAGS.nprobe)
    print(f"ranked {index.num_rows} detections in "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms")
  return matches, step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if len(FLAGS.box) != 4:
    raise app.UsageError("--box takes four numbers: x1,y1,x2,y2")
  box = [float(v) for v in FLAGS.box]
  cpu_host.log(_CPU_HOST)
  if FLAGS.index:
    matches, step = _search_index(box)
  else:
    if not FLAGS.gallery or not FLAGS.workdir:
      raise app.UsageError("give --index, or --workdir and --gallery")
    config = FLAGS.config or search_lib.config_from_workdir(FLAGS.workdir)
    config_defaults.validate(config)
    params, step = eval_lib.restore_params(config, FLAGS.workdir,
                                           FLAGS.checkpoint_step)
    matches = search_lib.search(config, params, FLAGS.query, box,
                                search_lib.gallery_images(FLAGS.gallery),
                                FLAGS.top_k, FLAGS.det_thresh)
  print(f"checkpoint step {step}; top {len(matches)} matches:")
  print(f"{'rank':>4}  {'similarity':>10}  {'det':>5}  box  image")
  for m in matches:
    box_s = ",".join(f"{v:.0f}" for v in m.box)
    where = m.image
    if m.timestamp is not None:
      where += f"  frame {m.frame} at {m.timestamp:.2f} s"
    print(f"{m.rank:>4}  {m.similarity:>10.3f}  {m.score:>5.2f}  {box_s}  "
          f"{where}")
  search_lib.draw(FLAGS.query, box, matches, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
