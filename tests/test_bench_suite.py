"""Smoke test of the benchmark suite's measurement functions (bench/suite_jax.py).

Small sizes and one or two calls: the point is that the suite still runs
with today's configs (e.g. the synthetic config's flip test needs image
sizes for the query embeddings), not the timings.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments"))  # host_allocator
import suite_jax  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_suite_infer_and_train_run_on_the_tiny_config():
  infer = suite_jax.run_infer("tiny", 96, 160, 2, "float32", iters=1,
                              queries=2)
  assert infer["detect_s"] > 0 and infer["embed_s"] > 0
  assert infer["flops_per_image"] > 0
  train = suite_jax.run_train("tiny", 96, 160, 2, "float32", steps=1,
                              num_gt=2)
  assert np.isfinite(train["loss"]) and train["step_s"] > 0
  assert train["backend_compiles_timed"] == 0  # no recompilation


def test_host_allocator_reads_train_logs(tmp_path):
  import host_allocator  # pylint: disable=g-import-not-at-top
  log = tmp_path / "x.log"
  log.write_text(
      "I1202 05:00:43.238368 1 train_lib.py:387] step 220/3580 (epoch 1.23)"
      " loss 7.1\n"
      "I1202 05:00:43.300000 1 eval_lib.py:103] gallery: 240 images\n"
      "I1202 05:00:45.738368 1 train_lib.py:387] step 230/3580 (epoch 1.28)"
      " loss 7.0\n")
  (t0, s0), (t1, s1) = host_allocator._log_points(str(log))
  assert (s0, s1) == (220, 230)
  assert abs((t1 - t0) - 2.5) < 1e-6


def test_suite_markdown_renders_the_committed_results():
  # Re-rendering each committed JSON (what --from_json does) must reproduce
  # its committed markdown exactly, im2col A/B row included.
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import run_suite  # pylint: disable=g-import-not-at-top
  results = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "bench", "results")
  paths = sorted(glob.glob(os.path.join(results, "suite*.json")))
  assert len(paths) >= 2, paths  # the two CPU kinds
  for path in paths:
    with open(path) as f:
      suite = json.load(f)
    md = run_suite.markdown(suite)
    # The im2col A/B row whenever that run measured it (--skip experiment
    # leaves it out: the 26d8a82 run, suite_avx2_dots).
    measured = any(r["name"].startswith("experiment:") and r.get("result")
                   for r in suite["records"])
    assert ("| XLA weight gradients |" in md) == measured, path
    assert "| train step |" in md and "### Targets" in md
    with open(path[:-len(".json")] + ".md") as f:
      assert md == f.read(), path


def test_suite_markdown_names_the_label_isa_and_allocator():
  import json  # pylint: disable=g-import-not-at-top
  import run_suite  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "bench", "results", "suite.json")
  with open(path) as f:
    suite = json.load(f)
  suite["label"] = "kind B"
  suite["machine"]["isa"] = ["avx2", "fma"]
  suite["env"].update(LD_PRELOAD="/x/libmimalloc.so.3", MALLOC_CONF="",
                      MIMALLOC_PURGE_DELAY="-1")
  head = run_suite.markdown(suite).splitlines()
  assert head[0] == "## Benchmark suite: kind B"
  assert "(avx2 fma; no avx512f), 2 cores" in head[2]
  assert "MIMALLOC_PURGE_DELAY=`-1`" in head[3]
  suite["machine"]["isa"] = ["avx2", "fma", "avx512f"]
  assert "(avx2 fma avx512f), 2 cores" in run_suite.markdown(suite)
