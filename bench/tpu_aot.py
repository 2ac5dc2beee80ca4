"""Deviceless TPU ahead-of-time compiles: memory and roofline of the model.

What it measures. With no TPU attached, libtpu still describes a TPU slice
(`jax.experimental.topologies.get_topology_desc`) whose compile-only devices
XLA:TPU compiles for. For each chip (v4, v5e, v6e; one chip = one device,
v4 as a megacore) this script compiles, for configs/cuhk.py (ResNet-50) on
its landscape canvas:

  * train: the trainer's own step (train_lib.make_train_step: train_lib.
    train_step under parallel.data_parallel's shard_map, state donated) over
    a one-device mesh, per-chip batch 1, 2, 4, ... until XLA's memory
    analysis says the program no longer fits in the chip's HBM (or the
    compile fails, e.g. RESOURCE_EXHAUSTED), or the batches of --batches;
  * detect: person_search.detect at batch 1 and 8 (--detect_batches);

each in bfloat16 and float32 (config.model.dtype; parameters stay float32),
and reports per compile: argument / temp / output / peak bytes, whether it
fits, XLA's cost analysis (GFLOP and GiB accessed per image, FLOP per byte),
the roofline bound images/s = 1 / max(flop/image / peak FLOP/s, bytes/image /
HBM B/s) from the chip table below, and the compile time. Nothing runs: the
numbers are the compiler's (cost analysis counts HLO FLOPs and bytes at the
fusion boundaries, so the roofline is an upper bound of the throughput).
Each record also has the compiled module's HBM bytes by bench/hlo_bytes.py
(on-chip operands left out, loop bodies times their trips) and the roofline
from those (`hbm_gib_per_image`, `hbm_roofline_images_per_s`); --hlo_dir
keeps each module's text for a per-layer breakdown.
`--parts` compiles the pieces of the step separately instead (backbone
stem forward+backward, RPN + proposals, RoIAlign forward+backward, res5 head
+ predictor over the sampled RoIs, the OIM loss and update), from the
model's public modules, to see where the memory and the FLOPs go.

Install (a separate venv, outside the repo: libtpu in the project's own
environment would make JAX look for a TPU on every start):

  python -m venv /work/tpuvenv
  /work/tpuvenv/bin/pip install -r requirements.txt "jax==$(python -c \
      'import jax; print(jax.__version__)')"
  /work/tpuvenv/bin/pip install "libtpu==0.0.42.*"   # what jax[tpu] 0.10.2 pins

Environment: the script sets JAX_PLATFORMS=cpu (the host's own backend;
the TPU devices come from the topology only) and, if unset,
TPU_SKIP_MDS_QUERY=1, TPU_WORKER_ID=0, TPU_WORKER_HOSTNAMES=localhost and
TPU_ACCELERATOR_TYPE (the chip's, e.g. v5litepod-4) so that libtpu does not
query a GCE metadata server (with libtpu 0.0.42.1 the topology call works
without them too), and ALLOW_MULTIPLE_LIBTPU_LOAD=1 so that two runs at once
do not fail on libtpu's /tmp/libtpu_lockfile. Topologies: v4 "v4:2x2x1" with
chip_config_name="megacore" (4 chips; without it 8 single-core devices),
v5e "v5e:2x2", v6e "v6e:2x2" (1x1 is refused: "not divisible by the
chips_per_host_bounds 2x2x1"); the first device is compiled for.

  nice -n 19 /work/tpuvenv/bin/python bench/tpu_aot.py --chips v5e \\
      --what train --dtypes bfloat16 --batches 1        # one compile, 2-5 min
  nice -n 19 /work/tpuvenv/bin/python bench/tpu_aot.py  # the whole grid
  nice -n 19 /work/tpuvenv/bin/python bench/tpu_aot.py --tiny \\
      --chips v5e --batches 1,2 --detect_batches 1      # tiny model, seconds
  nice -n 19 /work/tpuvenv/bin/python bench/tpu_aot.py --parts --chips v5e

Options: --config (default configs/cuhk.py), --set key=value (config
overrides, repeatable), --canvas HxW, --tiny, --max_batch, --out (JSON
lines, appended; default bench/results/tpu_aot.jsonl) and --md (the Markdown
tables of every run in --out, rewritten; default: --out with .md). Progress
(each compile's start and end) goes to stderr. A compile takes minutes on a
2-core host for ResNet-50 at 928x1504 (2-5 min for the train step on a
2-core Intel Xeon, 2026-12-04).
"""

import argparse
import ast
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform as platform_lib
import subprocess
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hlo_bytes  # noqa: E402  pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

GIB = 2 ** 30

# Published per-chip peaks (Cloud TPU system architecture pages): bf16 dense
# matmul TFLOP/s, HBM bandwidth (GB/s, 1e9 B/s) and capacity (GiB). v4's
# page gives 1200 GBps (1228 GB/s is 1.2 x 1024); v5e's "16 GB" is 16 GiB.
# float32 compiles use the bf16 peak too: at JAX's default matmul precision
# XLA:TPU runs float32 dots as bf16 MXU passes.
# topology: what get_topology_desc takes; one device of it is one chip (v4:
# chip_config_name="megacore", both TensorCores as one device, as Cloud TPU
# v4 runs by default; without it v4 has a device per core).
CHIPS = {
    "v4": dict(peak_tflops=275.0, hbm_gbps=1200.0, hbm_gib=32.0,
               topology="v4:2x2x1", accelerator_type="v4-8",
               topology_kwargs={"chip_config_name": "megacore"}),
    "v5e": dict(peak_tflops=197.0, hbm_gbps=819.0, hbm_gib=16.0,
                topology="v5e:2x2", accelerator_type="v5litepod-4",
                topology_kwargs={}),
    "v6e": dict(peak_tflops=918.0, hbm_gbps=1640.0, hbm_gib=32.0,
                topology="v6e:2x2", accelerator_type="v6e-4",
                topology_kwargs={}),
}

PARTS = ("stem", "rpn", "roi_align", "res5_head", "oim")


# -- pure helpers (tests/test_tpu_aot.py) -----------------------------------

def roofline_images_per_s(flops_per_image: float, bytes_per_image: float,
                          peak_flops: float, hbm_bytes_per_s: float) -> float:
  """1 / max(compute time, memory time) of one image; inf if both are 0."""
  t = max(flops_per_image / peak_flops, bytes_per_image / hbm_bytes_per_s)
  return math.inf if t <= 0 else 1.0 / t


def peak_bytes(mem: dict) -> int:
  """The program's HBM peak: XLA's peak_memory_in_bytes where it reports one,
  else arguments + outputs - aliased (donated) + temporaries + code."""
  if mem.get("peak_memory_in_bytes"):
    return int(mem["peak_memory_in_bytes"])
  return int(mem.get("argument_size_in_bytes", 0)
             + mem.get("output_size_in_bytes", 0)
             - mem.get("alias_size_in_bytes", 0)
             + mem.get("temp_size_in_bytes", 0)
             + mem.get("generated_code_size_in_bytes", 0))


def power_ladder(max_batch: int) -> list[int]:
  """1, 2, 4, ... <= max_batch."""
  out, b = [], 1
  while b <= max_batch:
    out.append(b)
    b *= 2
  return out


def run_ladder(compile_one, batches):
  """compile_one(batch) -> record for each batch in order, stopping after the
  first record that failed to compile or does not fit (larger batches would
  not either). Returns the records."""
  records = []
  for b in batches:
    rec = compile_one(b)
    records.append(rec)
    if rec.get("error") or not rec.get("fits", False):
      break
  return records


def summarize(chip: str, what: str, dtype: str, batch: int, mem: dict,
              cost: dict, compile_s: float, lower_s: float = 0.0,
              hbm_bytes: float | None = None) -> dict:
  """One compile's record from its memory / cost analyses (dicts).

  hbm_bytes: the compiled module's device-memory (HBM) traffic by
  bench/hlo_bytes.py, if known. XLA's "bytes accessed" also counts the
  operands that memory-space assignment put in on-chip memory; the HBM
  roofline uses this instead.
  """
  spec = CHIPS[chip]
  peak = peak_bytes(mem)
  flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  fpi, bpi = flops / batch, accessed / batch
  return {
      "chip": chip, "what": what, "dtype": dtype, "batch": batch,
      "argument_gib": mem.get("argument_size_in_bytes", 0) / GIB,
      "temp_gib": mem.get("temp_size_in_bytes", 0) / GIB,
      "output_gib": mem.get("output_size_in_bytes", 0) / GIB,
      "alias_gib": mem.get("alias_size_in_bytes", 0) / GIB,
      "peak_gib": peak / GIB,
      "peak_reported": bool(mem.get("peak_memory_in_bytes")),
      "hbm_gib": spec["hbm_gib"],
      "fits": peak <= spec["hbm_gib"] * GIB,
      "gflop_per_image": fpi / 1e9,
      "gib_accessed_per_image": bpi / GIB,
      "flop_per_byte": flops / accessed if accessed else None,
      "roofline_images_per_s": roofline_images_per_s(
          fpi, bpi, spec["peak_tflops"] * 1e12, spec["hbm_gbps"] * 1e9),
      "bound": ("compute" if fpi / (spec["peak_tflops"] * 1e12)
                >= bpi / (spec["hbm_gbps"] * 1e9) else "memory"),
      "hbm_gib_per_image": (None if hbm_bytes is None
                            else hbm_bytes / batch / GIB),
      "hbm_roofline_images_per_s": (None if hbm_bytes is None
                                    else roofline_images_per_s(
                                        fpi, hbm_bytes / batch,
                                        spec["peak_tflops"] * 1e12,
                                        spec["hbm_gbps"] * 1e9)),
      "lower_s": lower_s, "compile_s": compile_s,
  }


def failure(chip, what, dtype, batch, error: str, seconds: float) -> dict:
  return {"chip": chip, "what": what, "dtype": dtype, "batch": batch,
          "fits": False, "error": error, "compile_s": seconds}


def _fmt(x, digits=2):
  if x is None:
    return "-"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, float):
    if math.isinf(x):
      return "inf"
    return f"{x:.{digits}f}"
  return str(x)


COLUMNS = (("chip", "chip", 0), ("what", "what", 0), ("dtype", "dtype", 0),
           ("batch", "batch", 0), ("argument_gib", "arg GiB", 2),
           ("temp_gib", "temp GiB", 2), ("output_gib", "out GiB", 2),
           ("peak_gib", "peak GiB", 2), ("fits", "fits", 0),
           ("gflop_per_image", "GFLOP/img", 1),
           ("gib_accessed_per_image", "GiB acc/img", 2),
           ("flop_per_byte", "FLOP/B", 1),
           ("roofline_images_per_s", "roofline img/s", 1),
           ("hbm_gib_per_image", "HBM GiB/img", 2),
           ("hbm_roofline_images_per_s", "HBM roofline img/s", 1),
           ("compile_s", "compile s", 0))


def markdown_table(records) -> str:
  lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |",
           "|" + "|".join("---" for _ in COLUMNS) + "|"]
  for r in records:
    if r.get("error"):
      cells = [_fmt(r.get(k), d) for k, _, d in COLUMNS[:4]]
      cells += ["failed: " + r["error"].splitlines()[0][:120]]
      cells += [""] * (len(COLUMNS) - 6) + [_fmt(r.get("compile_s"), 0)]
    else:
      cells = [_fmt(r.get(k), d) for k, _, d in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def largest_batches(records) -> list[dict]:
  """Per (chip, what, dtype) of the whole-program compiles (not parts): the
  largest batch that fits, the smallest compiled batch that does not, and
  the largest batch's record. A later run's record of a batch replaces an
  earlier one's."""
  latest = {}
  for r in sorted(records, key=lambda r: r.get("run", "")):
    if r.get("what") in ("train", "detect"):
      latest[(r["chip"], r["what"], r["dtype"], r["batch"])] = r
  groups = {}
  for (chip, what, dtype, _), r in sorted(latest.items()):
    groups.setdefault((chip, what, dtype), []).append(r)
  out = []
  for (chip, what, dtype), rs in groups.items():
    fit = [r for r in rs if r.get("fits")]
    over = [r["batch"] for r in rs if not r.get("fits")]
    if fit:
      best = max(fit, key=lambda r: r["batch"])
      out.append({"chip": chip, "what": what, "dtype": dtype, "best": best,
                  "first_over": min([b for b in over if b > best["batch"]],
                                    default=None)})
  return out


def largest_batch_table(records) -> str:
  lines = ["| chip | what | dtype | largest batch compiled that fits | peak "
           "GiB | next batch | FLOP/B | roofline img/s | HBM roofline img/s "
           "| commit |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for g in largest_batches(records):
    b = g["best"]
    nxt = ("not compiled" if g["first_over"] is None
           else f"{g['first_over']}: does not fit")
    lines.append(
        f"| {g['chip']} | {g['what']} | {g['dtype']} | {b['batch']} | "
        f"{_fmt(b.get('peak_gib'))} | {nxt} | {_fmt(b.get('flop_per_byte'), 1)}"
        f" | {_fmt(b.get('roofline_images_per_s'), 1)} | "
        f"{_fmt(b.get('hbm_roofline_images_per_s'), 1)} | "
        f"{b.get('meta', {}).get('git_commit', '-')} |")
  return "\n".join(lines)


def markdown_report(records) -> str:
  """A largest-batch summary, then every run in `records` (JSON lines of
  --out), newest first."""
  runs = {}
  for r in records:
    runs.setdefault(r.get("run", "?"), []).append(r)
  out = ["## TPU ahead-of-time compiles (bench/tpu_aot.py)", "",
         "Deviceless XLA:TPU compiles from a CPU host: memory and cost "
         "analyses of the compiled programs, no step is run. peak = XLA's "
         "peak where reported, else arguments + outputs - aliased + temp + "
         "code; roofline img/s = 1 / max(FLOP/img / peak bf16 FLOP/s, "
         "bytes/img / HBM B/s) with XLA's bytes accessed (which include operands "
         "in on-chip memory); HBM roofline: the same with the HBM bytes of "
         "the compiled module (bench/hlo_bytes.py). Chip peaks: " + ", ".join(
             f"{k} {v['peak_tflops']:g} TFLOP/s, {v['hbm_gbps']:g} GB/s, "
             f"{v['hbm_gib']:g} GiB" for k, v in CHIPS.items()) + ".", ""]
  if largest_batches(records):
    out += ["Largest batch per chip (over the runs below; \"fits\": peak <= "
            "the chip's HBM):", "", largest_batch_table(records), ""]
  for run in sorted(runs, reverse=True):
    rs = runs[run]
    m = rs[0].get("meta", {})
    out += [f"### {run}", "",
            "; ".join(f"{k}: {m[k]}" for k in (
                "date", "git_commit", "jax", "libtpu", "host_cpu", "config",
                "canvas", "tiny", "overrides") if k in m), "",
            markdown_table(rs), ""]
  return "\n".join(out)


def parse_batches(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_override(text: str):
  """'model.dtype=bfloat16' -> ('model.dtype', 'bfloat16'); values are
  Python literals where they parse as one, else strings."""
  key, sep, value = text.partition("=")
  if not sep:
    raise ValueError(f"--set {text!r}: use key=value")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  return key.strip(), value


# -- the run's facts --------------------------------------------------------

def run_meta(config_path, canvas, tiny, overrides) -> dict:
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  try:
    commit = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, timeout=30).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=30).stdout.strip()
    commit += "+dirty" if dirty else ""
  except (OSError, subprocess.SubprocessError):
    commit = None
  cpu = platform_lib.processor() or platform_lib.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "git_commit": commit, "jax": jax.__version__,
          "jaxlib": version("jaxlib"), "libtpu": version("libtpu"),
          "host_cpu": f"{cpu} x{os.cpu_count()}",
          "config": os.path.relpath(config_path, REPO),
          "canvas": "x".join(map(str, canvas)), "tiny": tiny,
          "overrides": overrides}


# -- config, topology, abstract inputs --------------------------------------

def load_config(path: str):
  spec = importlib.util.spec_from_file_location("tpu_aot_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_tiny(config):
  """The tests' tiny model (tests/conftest.py tiny_train_config): ResNet-18
  layout, width 8, 128/192 canvas, few proposals and RoIs."""
  from oim_jax import config_defaults  # pylint: disable=g-import-not-at-top
  config.model = config_defaults.model_config("tiny")
  config.data.min_size, config.data.max_size = 128, 192
  config.data.max_gt = 8
  config.oim.num_labeled, config.oim.queue_size = 8, 16
  m = config.model
  m.rpn.pre_nms_top_n_train, m.rpn.post_nms_top_n_train = 200, 50
  m.rpn.pre_nms_top_n_test, m.rpn.post_nms_top_n_test = 100, 30
  m.roi.batch_size, m.roi.detections_per_image = 16, 8
  m.embedding_dim = 16
  config.model.pretrained = ""
  return config


def topology_device(chip: str):
  """The first compile-only device of the chip's topology (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  spec = CHIPS[chip]
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ["TPU_ACCELERATOR_TYPE"] = spec["accelerator_type"]
  # Without it a second process using libtpu at the same time (another
  # compile run) fails on /tmp/libtpu_lockfile; compile-only needs no lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topo = topologies.get_topology_desc(spec["topology"], "tpu",
                                      **spec["topology_kwargs"])
  return topo.devices[0]


def batch_spec(batch: int, canvas, max_gt: int, sharding=None) -> dict:
  """The keys and dtypes of pipeline.load_example that the step reads."""
  h, w = canvas
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                sharding=sharding)
  return {"image": s((batch, h, w, 3), jnp.uint8),
          "image_size": s((batch, 2), jnp.int32),
          "boxes": s((batch, max_gt, 4), jnp.float32),
          "pids": s((batch, max_gt), jnp.int32),
          "box_mask": s((batch, max_gt), jnp.bool_),
          "index": s((batch,), jnp.int32)}


def with_sharding(tree, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def abstract_model(config, axis_name=None):
  """(model, abstract variables) for TPU: no weights are read."""
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  model = person_search.create_model(config, axis_name=axis_name,
                                     platform="tpu")
  variables = jax.eval_shape(lambda: person_search.init_variables(
      model, config, jax.random.key(0), pretrained=False))
  return model, variables


def abstract_train_state(config, model_variables):
  """(tx, abstract TrainState) as the trainer builds them."""
  from oim_jax import optim, train_lib  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  params, model_state = person_search.split_variables(model_variables)
  tx, _ = optim.create_optimizer(
      config.train, 100, person_search.trainable_mask(params, config))
  state = jax.eval_shape(lambda p, ms: train_lib.create_train_state(
      p, tx, config, config.model.embedding_dim, ms), params, model_state)
  return tx, state


# -- what is compiled -------------------------------------------------------

def train_job(config, device, batch, canvas):
  """(jitted train step, abstract args) on a one-device mesh of `device`."""
  from oim_jax import parallel, train_lib  # pylint: disable=g-import-not-at-top
  model, variables = abstract_model(config, axis_name=parallel.AXIS)
  tx, state = abstract_train_state(config, variables)
  mesh = parallel.make_mesh([device])
  step = train_lib.make_train_step(model, config, tx, mesh, "shard_map")
  rep = NamedSharding(mesh, P())
  args = (with_sharding(state, rep),
          batch_spec(batch, canvas, config.data.max_gt,
                     NamedSharding(mesh, P(parallel.AXIS))),
          with_sharding(jax.eval_shape(lambda: jax.random.key(0)), rep))
  return step, args


def detect_job(config, device, batch, canvas):
  from oim_jax import parallel  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  model, variables = abstract_model(config)
  rep = NamedSharding(parallel.make_mesh([device]), P())
  flip = bool(config.eval.get("flip_test", False))
  fn = jax.jit(lambda v, im, sz: person_search.detect(model, v, im, sz,
                                                      flip_test=flip))
  b = batch_spec(batch, canvas, config.data.max_gt, rep)
  return fn, (with_sharding(variables, rep), b["image"], b["image_size"])


def part_job(part, config, device, batch, canvas):
  """One piece of the train step, forward + backward where it has one.

  Each part differentiates a scalar (the sum of its outputs weighted by an
  abstract cotangent, or its loss) with respect to its own parameters and
  its float input, so that it holds what the whole step holds for it:
    stem: images -> C4 (ops.normalize + the ResNet stem), grad of stem params;
    rpn: C4 -> RPN head, anchor targets, RPN losses (grad of head params and
      C4) and the training proposals (NMS; no gradient);
    roi_align: C4, roi.batch_size boxes per image -> pooled RoIs, grad of C4;
    res5_head: pooled RoIs -> res5 -> box predictor (cls, deltas, embeddings;
      BN-neck statistics as in training), grad of params and RoIs;
    oim: embeddings, pids -> OIM loss and its gradient, the LUT/queue update.
  """
  from oim_jax import oim, ops, parallel  # pylint: disable=g-import-not-at-top
  from oim_jax.models import rpn  # pylint: disable=g-import-not-at-top
  model, variables = abstract_model(config)
  rep = NamedSharding(parallel.make_mesh([device]), P())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  m, c = config.model, config
  dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  h, w = canvas
  c4_shape = jax.eval_shape(
      lambda v, im: model.apply(v, im, method=lambda mod, x: mod.features(x)),
      variables, jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8))
  c4 = s(c4_shape.shape, c4_shape.dtype)
  r = m.roi.batch_size
  pool = m.roi.pool_size
  key = with_sharding(jax.eval_shape(lambda: jax.random.key(0)), rep)

  def apply(sub, *args, method, mutable=False, state=None):
    # Only the part's own parameters (and collections) are arguments: the
    # modules bind lazily, so the others are never looked up.
    full = {"params": sub, **(state or {})}
    if mutable:
      return model.apply(full, *args, method=method, mutable=mutable)
    return model.apply(full, *args, method=method)

  def sub_params(*names):
    return {k: params[k] for k in names}

  if part == "stem":
    def fn(p, images, g):
      def f(p):
        out = apply(p, images, method=lambda mod, x: mod.features(x))
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))
      return jax.value_and_grad(f)(p)
    args = (sub_params("stem"), s((batch, h, w, 3), jnp.uint8), c4)
  elif part == "rpn":
    g_n = c.data.max_gt

    def fn(p, feats, image_size, gt_boxes, gt_valid, k):
      def f(p, feats):
        def body(mod, x):
          rpn_map = mod.rpn_input(x)
          logits, deltas = mod.rpn_head(rpn_map)
          anchors, valid = mod.anchors(rpn_map, image_size)
          keys = jax.random.split(k, batch)
          targets = jax.vmap(lambda v, gb, gv, kk: rpn.rpn_targets(
              anchors, v, gb, gv, kk, fg_iou=m.rpn.fg_iou,
              bg_iou=m.rpn.bg_iou, batch_size=m.rpn.batch_size,
              fg_fraction=m.rpn.fg_fraction))(valid, gt_boxes, gt_valid, keys)
          cls, reg = rpn.rpn_losses(logits, deltas, targets,
                                    m.rpn.smooth_l1_beta)
          props = mod.proposals(rpn_map, image_size, logits, deltas, True)
          return cls + reg, props
        return apply(p, feats, method=body)
      return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, feats)
    args = (sub_params("rpn_head"), c4, s((batch, 2), jnp.int32),
            s((batch, g_n, 4), jnp.float32), s((batch, g_n), jnp.bool_), key)
  elif part == "roi_align":
    def fn(feats, boxes, g):
      def f(feats):
        rois = ops.roi_align_per_image(
            feats, boxes, output_size=(pool, pool),
            spatial_scale=1.0 / m.stride, sampling_ratio=m.roi.sampling_ratio,
            aligned=m.roi.aligned, method=model.roi_align_method)
        return jnp.sum(rois.astype(jnp.float32) * g.astype(jnp.float32))
      return jax.value_and_grad(f)(feats)
    args = (c4, s((batch, r, 4), jnp.float32),
            s((batch, r, pool, pool, c4.shape[-1]), c4.dtype))
  elif part == "res5_head":
    def fn(p, ms, rois, g_cls, g_box, g_emb):
      def f(p, rois):
        body = lambda mod, x: mod.predictor(mod.res5(x), True)
        if ms:
          (cls, box, emb), new_state = apply(p, rois, method=body,
                                             mutable=list(ms), state=ms)
        else:
          (cls, box, emb), new_state = apply(p, rois,
                                             method=body), {}
        loss = (jnp.sum(cls.astype(jnp.float32) * g_cls)
                + jnp.sum(box.astype(jnp.float32) * g_box)
                + jnp.sum(emb.astype(jnp.float32) * g_emb))
        return loss, new_state
      return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, rois)
    k = batch * r
    emb_dim = m.embedding_dim
    args = (sub_params("res5", "predictor"), with_sharding(model_state, rep),
            s((k, pool, pool, c4.shape[-1]), dtype),
            s((k, 2), jnp.float32), s((k, 4), jnp.float32),
            s((k, emb_dim), jnp.float32))
  elif part == "oim":
    state = with_sharding(jax.eval_shape(lambda: oim.init_state(
        c.oim.num_labeled, c.oim.queue_size, m.embedding_dim)), rep)

    def fn(st, emb, pids):
      loss, g = jax.value_and_grad(
          lambda e: oim.oim_loss(st, e, pids, c.oim.scalar))(emb)
      new = oim.update_state(st, jax.lax.stop_gradient(emb), pids,
                             momentum=c.oim.momentum,
                             normalize=c.oim.normalize)
      return loss, g, new
    args = (state, s((batch * r, m.embedding_dim), jnp.float32),
            s((batch * r,), jnp.int32))
  else:
    raise ValueError(f"unknown part {part!r}: one of {PARTS}")
  return jax.jit(fn), args


# -- compiling --------------------------------------------------------------

def _as_dict(analysis) -> dict:
  if analysis is None:
    return {}
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  if isinstance(analysis, dict):
    return analysis
  return {k: getattr(analysis, k) for k in dir(analysis)
          if k.endswith("_in_bytes")}


def log(msg: str):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compile_one(chip, what, dtype, batch, build, extra=None, hlo_dir=""):
  """Lowers and compiles build() -> (fn, args); a failure becomes a record.

  hlo_dir: if set, the compiled module's text goes to
  hlo_dir/<chip>_<what>_<dtype>_b<batch>.hlo.txt (for bench/hlo_bytes.py).
  """
  label = f"{chip} {what} {dtype} batch {batch}"
  log(f"start {label}")
  t0 = time.perf_counter()
  try:
    fn, args = build()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  except Exception as e:  # pylint: disable=broad-except
    seconds = time.perf_counter() - t0
    error = f"{type(e).__name__}: {e}"
    log(f"FAILED {label} after {seconds:.0f} s: {error.splitlines()[0][:300]}")
    traceback.print_exc(file=sys.stderr)
    rec = failure(chip, what, dtype, batch, error[:4000], seconds)
    rec.update(extra or {})
    return rec
  mem = _as_dict(compiled.memory_analysis())
  cost = _as_dict(compiled.cost_analysis())
  text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    name = f"{chip}_{what.replace(':', '-')}_{dtype}_b{batch}.hlo.txt"
    with open(os.path.join(hlo_dir, name), "w") as f:
      f.write(text)
  hbm = sum(i["bytes"] for i in hlo_bytes.instructions(text))
  rec = summarize(chip, what, dtype, batch, mem, cost, t2 - t1, t1 - t0,
                  hbm_bytes=hbm)
  rec["memory_analysis"] = {k: int(v) for k, v in mem.items()
                            if isinstance(v, (int, float))}
  rec["cost_analysis"] = {k: float(v) for k, v in cost.items()
                          if k in ("flops", "bytes accessed",
                                   "transcendentals")}
  rec.update(extra or {})
  log(f"done  {label}: lower {t1 - t0:.0f} s, compile {t2 - t1:.0f} s, "
      f"peak {rec['peak_gib']:.2f} GiB (fits {rec['fits']}), "
      f"{rec['gflop_per_image']:.1f} GFLOP/img, "
      f"{rec['gib_accessed_per_image']:.2f} GiB/img, roofline "
      f"{rec['roofline_images_per_s']:.1f} img/s; HBM "
      f"{rec['hbm_gib_per_image']:.2f} GiB/img, "
      f"{rec['hbm_roofline_images_per_s']:.1f} img/s")
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=os.path.join(REPO, "configs",
                                                  "cuhk.py"))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.rpn.post_nms_top_n_train"
                 "=1000 (repeatable)")
  p.add_argument("--tiny", action="store_true",
                 help="the tests' tiny model and 128x192 canvas (seconds "
                 "per compile): checks the script, not the model")
  p.add_argument("--canvas", default="",
                 help="HxW; default the config's landscape canvas")
  p.add_argument("--chips", default="v4,v5e,v6e")
  p.add_argument("--what", default="train,detect",
                 help="comma list of train, detect")
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--batches", default="",
                 help="train batches per chip, e.g. 1,2; default 1, 2, 4, "
                 "... up to --max_batch, stopping at the first that does "
                 "not fit")
  p.add_argument("--max_batch", type=int, default=64)
  p.add_argument("--detect_batches", default="1,8")
  p.add_argument("--parts", action="store_true",
                 help="compile the parts of the train step instead: "
                 + ", ".join(PARTS))
  p.add_argument("--part_names", default=",".join(PARTS))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results",
                                               "tpu_aot.jsonl"))
  p.add_argument("--md", default="", help="default: --out with .md")
  p.add_argument("--hlo_dir", default="",
                 help="also write each compiled module's text here "
                 "(bench/hlo_bytes.py breaks its bytes down)")
  args = p.parse_args(argv)

  from oim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.abspath(args.config))
  if args.tiny:
    config = make_tiny(config)
  overrides = [parse_override(o) for o in args.set]
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  if args.canvas:
    canvas = tuple(int(x) for x in args.canvas.lower().split("x"))
  else:
    canvas = pipeline.canvas_sizes(config.data.min_size,
                                   config.data.max_size)[pipeline.LANDSCAPE]
  meta = run_meta(os.path.abspath(args.config), canvas, args.tiny, args.set)
  run_id = meta["date"] + (" parts" if args.parts else "") + (
      " tiny" if args.tiny else "")
  md_path = args.md or os.path.splitext(args.out)[0] + ".md"
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  log(f"config {meta['config']} canvas {meta['canvas']} tiny {args.tiny}; "
      f"jax {meta['jax']} libtpu {meta['libtpu']}; writing {args.out}")

  def record(rec):
    rec["run"] = run_id
    rec["meta"] = meta
    with open(args.out, "a") as f:
      f.write(json.dumps(rec) + "\n")
    return rec

  def compile_with(chip, device, what, dtype, batch, build, extra=None):
    config.model.dtype = dtype
    return record(compile_one(chip, what, dtype, batch, build, extra,
                              args.hlo_dir))

  train_batches = (parse_batches(args.batches) if args.batches
                   else power_ladder(args.max_batch))
  records = []
  for chip in args.chips.split(","):
    if chip not in CHIPS:
      raise SystemExit(f"--chips: {chip!r} is not one of {sorted(CHIPS)}")
    device = topology_device(chip)
    log(f"{chip}: compiling for {device} ({device.device_kind})")
    for dtype in args.dtypes.split(","):
      if args.parts:
        for part in args.part_names.split(","):
          build = lambda b, part=part: functools.partial(
              part_job, part, config, device, b, canvas)
          records += run_ladder(
              lambda b, part=part, build=build: compile_with(
                  chip, device, "part:" + part, dtype, b, build(b)),
              train_batches)
        continue
      for what in args.what.split(","):
        if what == "train":
          records += run_ladder(
              lambda b: compile_with(chip, device, "train", dtype, b,
                                     functools.partial(train_job, config,
                                                       device, b, canvas)),
              train_batches)
        elif what == "detect":
          records += run_ladder(
              lambda b: compile_with(chip, device, "detect", dtype, b,
                                     functools.partial(detect_job, config,
                                                       device, b, canvas)),
              parse_batches(args.detect_batches))
        else:
          raise SystemExit(f"--what: {what!r} is not train or detect")

  with open(args.out) as f:
    everything = [json.loads(line) for line in f if line.strip()]
  with open(md_path, "w") as f:
    f.write(markdown_report(everything))
  print(markdown_table(records))
  log(f"wrote {args.out} and {md_path}")


if __name__ == "__main__":
  main()
