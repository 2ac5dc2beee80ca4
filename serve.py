"""A web page over an index built by index.py: pick or upload a query image,
draw the box, browse the ranked crops and their frames.

  python serve.py --index=runs/demo/index [--port=8000] [--host=127.0.0.1]

then open http://127.0.0.1:8000/. The query model is the one the index was
built with (its workdir and checkpoint step are in the index; --workdir
overrides the directory).
"""

# First, before anything imports JAX: on a CPU host, re-executes this command
# with a faster malloc and sets an XLA:CPU flag (oim_jax/cpu_host/); on GPU
# and TPU hosts it changes nothing.
from oim_jax import cpu_host  # pylint: disable=g-bad-import-order
_CPU_HOST = cpu_host.set_up()

from absl import app
from absl import flags
from absl import logging

from oim_jax import cli
from oim_jax import config_defaults
from oim_jax import eval_lib
from oim_jax import search_index
from oim_jax import search_lib
from oim_jax import serve_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("index", None, "Index directory written by index.py.")
flags.DEFINE_string("workdir", None,
                    "Training workdir (default: the index's).")
flags.DEFINE_string("host", "127.0.0.1",
                    "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port (0: any free one).")
flags.mark_flags_as_required(["index"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  cpu_host.log(_CPU_HOST)
  with search_index.SearchIndex.open(FLAGS.index) as index:
    manifest, rows = index.manifest, index.num_rows
  config = search_lib.config_from_dict(manifest["config"])
  config_defaults.validate(config)
  params, step = eval_lib.restore_params(
      config, FLAGS.workdir or manifest["workdir"],
      manifest["checkpoint_step"])
  inference = eval_lib.Inference(config, params)
  embed = lambda path, box: search_lib.embed_query(inference, path, box)
  server = serve_lib.make_server(serve_lib.SearchApp(FLAGS.index, embed),
                                 FLAGS.host, FLAGS.port)
  host, port = server.server_address[:2]
  logging.info("index %s: %d detections, checkpoint step %d", FLAGS.index,
               rows, step)
  print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  cli.run(main)
