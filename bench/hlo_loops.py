"""Serial loops and sorts in the train step and detect, by where they come from.

  python bench/hlo_loops.py [--config configs/cuhk.py] [--platforms tpu,cuda]

Each loop trip on a GPU is a kernel launch plus a predicate read back; on a
TPU a serial step of the core. This counts, in the step as traced for the
target platform (person_search.create_model(config, platform=...), nothing
compiled), the while loops (lax.while_loop: data-dependent trip counts),
scans / lax.map (fixed trip counts), sorts and top-k, each attributed to
the package function that wrote it; and the totals in the lowered StableHLO
(`stablehlo.while`, `stablehlo.sort`, `chlo.top_k`), where
XLA sees them. Writes one JSON line per (platform, program) to stdout.
"""

import argparse
import collections
import functools
import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.extend  # noqa: E402  pylint: disable=g-import-not-at-top
from jax import export  # noqa: E402  pylint: disable=g-import-not-at-top

import tpu_aot  # noqa: E402  pylint: disable=g-import-not-at-top

SERIAL = {"while": "while", "scan": "scan", "sort": "sort", "top_k": "top_k"}


def _origin(eqn) -> str:
  """oim_jax/...py:function of the innermost package frame of an equation."""
  tb = eqn.source_info.traceback
  for frame in (tb.frames if tb is not None else []):
    if "oim_jax" in frame.file_name:
      return (f"{os.path.relpath(frame.file_name, REPO)}:"
              f"{frame.function_name}")
  return f"(no package frame; scope {eqn.source_info.name_stack or '-'})"


def serial_ops(closed_jaxpr) -> dict:
  """{kind: {origin: count}} over a jaxpr and its sub-jaxprs."""
  out = collections.defaultdict(collections.Counter)

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      kind = SERIAL.get(eqn.primitive.name)
      if kind:
        out[kind][_origin(eqn)] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return {k: dict(v) for k, v in out.items()}


def hlo_counts(text: str) -> dict:
  """Op totals; `sort_outside_top_k` leaves out the sort-based reference
  decomposition (`func @chlo.top_k.impl*`) that exporting for TPU/CUDA emits
  beside each chlo.top_k, which XLA does not run as a sort."""
  funcs = re.split(r"(?m)^\s*func\.func ", text)
  outside = sum(len(re.findall(r"stablehlo\.sort\b", f)) for f in funcs
                if not re.match(r"(?:private |public )?@chlo\.top_k\.impl", f))
  return {"stablehlo.while": len(re.findall(r"stablehlo\.while\b", text)),
          "stablehlo.sort": len(re.findall(r"stablehlo\.sort\b", text)),
          "stablehlo.sort_outside_top_k": outside,
          "chlo.top_k": len(re.findall(r"chlo\.top_k\b", text))}


def programs(config, platform):
  """(name, fn, abstract args) of the train step (one device) and detect."""
  from oim_jax import parallel, train_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  canvas = pipeline.canvas_sizes(config.data.min_size,
                                 config.data.max_size)[pipeline.LANDSCAPE]
  model = person_search.create_model(config, axis_name=parallel.AXIS,
                                     platform=platform)
  variables = jax.eval_shape(lambda: person_search.init_variables(
      model, config, jax.random.key(0), pretrained=False))
  tx, state = tpu_aot.abstract_train_state(config, variables)
  step = train_lib.make_train_step(model, config, tx,
                                   parallel.make_mesh(jax.devices()[:1]),
                                   "shard_map")
  batch = tpu_aot.batch_spec(2, canvas, config.data.max_gt)
  key = jax.eval_shape(lambda: jax.random.key(0))
  yield "train", step, (state, batch, key)
  infer = person_search.create_model(config, platform=platform)
  detect = jax.jit(functools.partial(person_search.detect, infer))
  yield "detect", detect, (variables, batch["image"], batch["image_size"])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "cuhk.py"))
  p.add_argument("--platforms", default="tpu,cuda")
  a = p.parse_args()
  for platform in a.platforms.split(","):
    config = tpu_aot.load_config(a.config)
    config.model.pretrained = ""
    for name, fn, args in programs(config, platform):
      traced = fn.trace(*args)
      text = export.export(fn, platforms=(platform,))(*args).mlir_module()
      print(json.dumps({"platform": platform, "program": name,
                        "jaxpr": serial_ops(traced.jaxpr),
                        "stablehlo": hlo_counts(text)}), flush=True)


if __name__ == "__main__":
  main()
