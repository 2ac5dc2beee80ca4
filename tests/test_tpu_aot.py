"""bench/tpu_aot.py's pure helpers (no libtpu, nothing compiled)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import tpu_aot  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_roofline_takes_the_slower_of_compute_and_memory():
  # 100 GFLOP and 2 GB per image on 200 TFLOP/s, 1000 GB/s:
  # compute 0.5 ms, memory 2 ms -> memory bound, 500 images/s.
  assert tpu_aot.roofline_images_per_s(100e9, 2e9, 200e12, 1000e9) == (
      pytest.approx(500.0))
  # 1000 GFLOP, 1 GB: compute 5 ms, memory 1 ms -> 200 images/s.
  assert tpu_aot.roofline_images_per_s(1000e9, 1e9, 200e12, 1000e9) == (
      pytest.approx(200.0))
  assert math.isinf(tpu_aot.roofline_images_per_s(0, 0, 1.0, 1.0))


def test_summarize_per_image_numbers_and_fit():
  gib = 2 ** 30
  mem = {"argument_size_in_bytes": 2 * gib, "output_size_in_bytes": 2 * gib,
         "alias_size_in_bytes": 2 * gib, "temp_size_in_bytes": 10 * gib,
         "generated_code_size_in_bytes": 0}
  # v5e: 197 TFLOP/s, 819 GB/s, 16 GiB; batch 4.
  cost = {"flops": 4 * 197e12 / 100, "bytes accessed": 4 * 819e9 / 400}
  r = tpu_aot.summarize("v5e", "train", "bfloat16", 4, mem, cost, 12.0)
  assert r["peak_gib"] == pytest.approx(12.0)  # 2 + 2 - 2 + 10
  assert r["fits"] and not r["peak_reported"]
  assert r["gflop_per_image"] == pytest.approx(1970.0)
  assert r["gib_accessed_per_image"] == pytest.approx(819e9 / 400 / gib)
  assert r["flop_per_byte"] == pytest.approx(197e12 / 819e9 * 4)
  assert r["roofline_images_per_s"] == pytest.approx(100.0)  # compute bound
  assert r["bound"] == "compute"
  big = dict(mem, temp_size_in_bytes=15 * gib)
  assert not tpu_aot.summarize("v5e", "train", "bfloat16", 4, big, cost,
                               1.0)["fits"]
  # XLA's own peak wins where reported (32 GiB v6e: fits).
  reported = dict(big, peak_memory_in_bytes=20 * gib)
  r = tpu_aot.summarize("v6e", "train", "float32", 1, reported, cost, 1.0)
  assert r["peak_gib"] == pytest.approx(20.0) and r["fits"]
  assert r["hbm_gib_per_image"] is None  # no module text given


def test_summarize_hbm_roofline():
  # v5e: 4 images doing 1/100 s of FLOPs each; HBM traffic of 1/50 s each
  # (memory bound at 50 img/s) although XLA's bytes accessed say 1/25 s.
  cost = {"flops": 4 * 197e12 / 100, "bytes accessed": 4 * 819e9 / 25}
  r = tpu_aot.summarize("v5e", "train", "bfloat16", 4, {}, cost, 1.0,
                        hbm_bytes=4 * 819e9 / 50)
  assert r["roofline_images_per_s"] == pytest.approx(25.0)
  assert r["hbm_gib_per_image"] == pytest.approx(819e9 / 50 / 2 ** 30)
  assert r["hbm_roofline_images_per_s"] == pytest.approx(50.0)


def test_power_ladder():
  assert tpu_aot.power_ladder(1) == [1]
  assert tpu_aot.power_ladder(12) == [1, 2, 4, 8]


def _fake(limit_batch, fail_at=None):
  calls = []

  def compile_one(b):
    calls.append(b)
    if b == fail_at:
      return tpu_aot.failure("v5e", "train", "bfloat16", b,
                             "RESOURCE_EXHAUSTED: out of memory", 1.0)
    return {"batch": b, "fits": b <= limit_batch}
  return compile_one, calls


def test_ladder_stops_after_the_first_batch_that_does_not_fit():
  fn, calls = _fake(limit_batch=4)
  records = tpu_aot.run_ladder(fn, [1, 2, 4, 8, 16, 32])
  assert calls == [1, 2, 4, 8]
  assert [r["fits"] for r in records] == [True, True, True, False]


def test_ladder_stops_at_a_compile_failure_and_records_it():
  fn, calls = _fake(limit_batch=100, fail_at=2)
  records = tpu_aot.run_ladder(fn, [1, 2, 4])
  assert calls == [1, 2]
  assert records[-1]["error"].startswith("RESOURCE_EXHAUSTED")
  table = tpu_aot.markdown_table(records)
  assert "failed: RESOURCE_EXHAUSTED" in table


def test_ladder_runs_every_batch_that_fits():
  fn, calls = _fake(limit_batch=100)
  assert len(tpu_aot.run_ladder(fn, [1, 2, 4])) == 3 and calls == [1, 2, 4]


def test_overrides_and_batches_parse():
  assert tpu_aot.parse_override("model.dtype=bfloat16") == (
      "model.dtype", "bfloat16")
  assert tpu_aot.parse_override("model.rpn.post_nms_top_n_train=1000") == (
      "model.rpn.post_nms_top_n_train", 1000)
  with pytest.raises(ValueError):
    tpu_aot.parse_override("model.dtype")
  assert tpu_aot.parse_batches("1, 2,8") == [1, 2, 8]


def test_chip_table():
  assert tpu_aot.CHIPS["v5e"]["peak_tflops"] == 197.0
  assert tpu_aot.CHIPS["v5e"]["hbm_gib"] == 16.0
  assert tpu_aot.CHIPS["v4"]["hbm_gbps"] == 1200.0
  assert set(tpu_aot.CHIPS) == {"v4", "v5e", "v6e"}


def test_largest_batches_takes_the_newest_run_per_batch():
  rec = lambda run, chip, batch, fits, what="train": {
      "run": run, "chip": chip, "what": what, "dtype": "bfloat16",
      "batch": batch, "fits": fits, "peak_gib": float(batch),
      "meta": {"git_commit": run}}
  records = [rec("a", "v5e", 4, True), rec("a", "v5e", 8, True),
             rec("b", "v5e", 8, False),  # a newer run: 8 no longer fits
             rec("b", "v5e", 16, False), rec("b", "v4", 2, True),
             rec("b", "v4", 1, True, what="part:stem")]
  got = {(g["chip"], g["what"]): (g["best"]["batch"], g["first_over"],
                                  g["best"]["meta"]["git_commit"])
         for g in tpu_aot.largest_batches(records)}
  assert got == {("v5e", "train"): (4, 8, "a"), ("v4", "train"): (2, None,
                                                                  "b")}
  table = tpu_aot.largest_batch_table(records)
  assert "| v5e | train | bfloat16 | 4 | 4.00 | 8: does not fit |" in table
  assert "| v4 | train | bfloat16 | 2 | 2.00 | not compiled |" in table
