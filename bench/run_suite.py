"""The benchmark suite: one command, JSON + markdown.

  python bench/run_suite.py [--quick] [--out bench/results/suite]
      [--skip torch,breakdown,eval,pipeline,...]
      [--label "date, commit, machine"]

Every measurement runs in its own subprocess with the same environment
(allocator: what train.py preloads, jemalloc when installed, else mimalloc,
with purging off (oim_jax/cpu_host/allocator.py), for the JAX and the torch
processes alike; XLA_FLAGS as train.py sets them (oim_jax/cpu_host/xla_flags.py);
OMP/MKL threads = the core count; torch.set_num_threads the same), and
records the load average before and after it. Rows:

  * matmul peak: best-of-3 n^3 jnp.dot, float32 (and bfloat16 on GPU):
    the physical limit the model's FLOP/s are measured against;
  * train step (bench/suite_jax.py train): the tiny config (configs/
    synthetic.py model, canvas 288x480, batch 4) and ResNet-50 at 900x1500
    (batch 1 on CPU; batch 5 float32 and bfloat16 on a GPU): images/s,
    s/step, compile time, compilations, FLOPs (XLA cost analysis), peak
    host / device memory;
  * inference (suite_jax.py infer): detect + embed images/s, query
    embeddings/s;
  * torchvision Faster R-CNN C4 (bench/torch_reference.py), same sizes,
    same run: JAX/torch time ratios for inference and a train step;
  * where the train step's time goes (bench/train_breakdown.py, and
    torch_reference.py --parts);
  * evaluation protocol time at CUHK-SYSU scale (bench/suite_eval.py);
  * input pipeline images/s (bench/bench_pipeline.py).

--quick: tiny config only, small sizes (a smoke test of a few minutes).
Targets (the issue's): H100 bfloat16 train >= 150 images/s, inference >=
200 images/s; CPU inference time <= 0.6x and train-step time <= 1.0x
torchvision's in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from oim_jax.cpu_host import cpu_info  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.cpu_host import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from oim_jax.cpu_host import allocator  # pylint: disable=g-import-not-at-top,wrong-import-position

# Issue targets and the nominal model cost (ResNet-50 C4 at 900x1500).
TARGET_GPU_TRAIN_IPS = 150.0
TARGET_GPU_INFER_IPS = 200.0
TARGET_CPU_INFER_RATIO = 0.6
TARGET_CPU_TRAIN_RATIO = 1.0
NOMINAL_TRAIN_TFLOP = 1.15
NOMINAL_INFER_TFLOP = 0.66


def load_avg() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def bench_env() -> dict[str, str]:
  env = dict(os.environ)
  n = str(os.cpu_count())
  env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  # The allocator train.py would preload (jemalloc, else mimalloc; no purge)
  # for JAX and torch alike.
  env.update(allocator.preload_env())
  # And the XLA:CPU flags it sets (XLA's own convolutions, xla_flags.py).
  import jaxlib  # pylint: disable=g-import-not-at-top
  env["XLA_FLAGS"] = xla_flags.cpu_flags(env.get("XLA_FLAGS", ""),
                                         jaxlib.__version__)[0]
  return env


class Runner:
  """Runs one measurement per subprocess, keeps every record."""

  def __init__(self, timeout: int):
    self.env = bench_env()
    self.timeout = timeout
    self.records = []

  def run(self, name: str, argv: list[str], parse_json: bool = True):
    cmd = [sys.executable] + argv
    text = " ".join(shlex.quote(a) for a in cmd[1:])
    print(f"[suite] {name}: python {text}", flush=True)
    rec = {"name": name, "command": "python " + text,
           "load_before": load_avg()}
    t = time.perf_counter()
    try:
      p = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True,
                         text=True, timeout=self.timeout)
      rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
      rc, out, err = "timeout", e.stdout or "", e.stderr or ""
      out = out.decode() if isinstance(out, bytes) else out
      err = err.decode() if isinstance(err, bytes) else err
    rec.update(wall_s=round(time.perf_counter() - t, 1),
               load_after=load_avg(), returncode=rc)
    result = None
    if rc == 0 and parse_json:
      lines = [l for l in out.strip().splitlines() if l.startswith("{")]
      if lines:
        result = json.loads(lines[-1])
    elif rc == 0:
      result = out
    if result is None:
      rec["error"] = (err or out)[-2000:]
      print(f"[suite]   FAILED ({rc}): {rec['error'][-500:]}", flush=True)
    else:
      print(f"[suite]   done in {rec['wall_s']} s, load "
            f"{rec['load_after']}", flush=True)
    rec["result"] = result
    self.records.append(rec)
    return rec


def probe_backend(runner: Runner) -> dict:
  rec = runner.run("backend", ["-c", (
      "import json, jax; d = jax.devices()[0]; print(json.dumps({"
      "'backend': jax.default_backend(), 'device_kind': d.device_kind, "
      "'device_count': jax.device_count(), 'jax': jax.__version__}))")])
  return rec["result"] or {"backend": "cpu", "device_kind": "?",
                           "device_count": 1, "jax": "?"}


def machine() -> dict:
  cpu, flags = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as f:
      model, flags = cpu_info.parse_cpuinfo(f.read())
    cpu = model or cpu
  except OSError:
    pass
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = int(f.readline().split()[1]) / 1024 ** 2
  except (OSError, ValueError, IndexError):
    pass
  try:
    import numpy  # pylint: disable=g-import-not-at-top
    np_version = numpy.__version__
  except ImportError:
    np_version = "?"
  # The ISA decides XLA:CPU's speed (cpu_info.py): same model name, 2.4x
  # apart in matmul peak between a 2-core AMD EPYC with AVX-512 and a Zen 3
  # one with AVX2 only.
  return {"cpu": cpu, "isa": flags, "cores": os.cpu_count(),
          "memory_gib": round(mem, 1) if mem else None,
          "python": platform.python_version(), "numpy": np_version,
          "platform": platform.platform()}


def _r(rec):
  return rec["result"] if rec and rec.get("result") else None


def run_all(args) -> dict:
  runner = Runner(args.timeout)
  skip = set(filter(None, args.skip.split(",")))
  quick = args.quick
  backend = probe_backend(runner)
  gpu = backend["backend"] in ("gpu", "cuda", "rocm")
  suite = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "quick": quick, "machine": machine(), "backend": backend,
           "env": {k: runner.env.get(k, "") for k in
                   ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY",
                    "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "XLA_FLAGS", "JAX_PLATFORMS")},
           "load_start": load_avg()}
  res = {}
  n = 2048 if quick else 4096
  res["matmul_f32"] = runner.run("matmul float32", [
      "bench/suite_jax.py", "matmul", "--dtype", "float32", "--n", str(n)])
  if gpu:
    res["matmul_bf16"] = runner.run("matmul bfloat16", [
        "bench/suite_jax.py", "matmul", "--dtype", "bfloat16", "--n",
        "8192"])

  res["train_tiny"] = runner.run("train tiny 288x480 b4 float32", [
      "bench/suite_jax.py", "train", "--preset", "tiny", "--height", "288",
      "--width", "480", "--batch", "4", "--dtype", "float32", "--steps",
      "3" if quick else "10"])
  res["infer_tiny"] = runner.run("infer tiny 288x480 b4 float32", [
      "bench/suite_jax.py", "infer", "--preset", "tiny", "--height", "288",
      "--width", "480", "--batch", "4", "--dtype", "float32", "--iters",
      "3" if quick else "10"])

  if not quick:
    r50 = ["--preset", "resnet50", "--height", "900", "--width", "1500"]
    res["train_r50_b1_f32"] = runner.run("train resnet50 900x1500 b1 f32", [
        "bench/suite_jax.py", "train", *r50, "--batch", "1", "--dtype",
        "float32", "--steps", "3" if gpu else "5"])
    res["infer_r50_b1_f32"] = runner.run("infer resnet50 900x1500 b1 f32", [
        "bench/suite_jax.py", "infer", *r50, "--batch", "1", "--dtype",
        "float32", "--iters", "5" if gpu else "2"])
    if gpu:
      for dt in ("float32", "bfloat16"):
        res[f"train_r50_b5_{dt}"] = runner.run(
            f"train resnet50 900x1500 b5 {dt}", [
                "bench/suite_jax.py", "train", *r50, "--batch", "5",
                "--dtype", dt, "--steps", "10"])
        res[f"infer_r50_b5_{dt}"] = runner.run(
            f"infer resnet50 900x1500 b5 {dt}", [
                "bench/suite_jax.py", "infer", *r50, "--batch", "5",
                "--dtype", dt, "--iters", "10"])
    if "torch" not in skip:
      targs = ["bench/torch_reference.py", "--height", "900", "--width",
               "1500", "--batch", "1", "--iters", "2",
               "--threads", str(os.cpu_count())]
      if "breakdown" not in skip:
        targs.append("--parts")
      res["torch_cpu_b1"] = runner.run("torchvision 900x1500 b1 cpu", targs)
      if gpu:
        for dt in ("float32", "bfloat16"):
          res[f"torch_cuda_b5_{dt}"] = runner.run(
              f"torchvision 900x1500 b5 cuda {dt}", [
                  "bench/torch_reference.py", "--height", "900", "--width",
                  "1500", "--batch", "5", "--iters", "5", "--device",
                  "cuda", "--dtype", dt])
    if "breakdown" not in skip:
      res["breakdown"] = runner.run("train-step breakdown (jax)", [
          "bench/train_breakdown.py", "--iters", "2",
          "--parts", "stem_fwd,stem_fwd_bwd,rpn_fwd_bwd,proposals,"
          "roi_align_fwd_bwd,res5_fwd_bwd,conv"])
    if "experiment" not in skip and not gpu:
      # A/B of the library's CPU choice (model.wgrad_im2col_min_channels:
      # auto = 512 on CPU) against XLA's own 3x3 weight gradients.
      res["exp_xla_wgrad_train"] = runner.run(
          "experiment: train resnet50 b1 f32, XLA 3x3 weight gradients", [
              "bench/suite_jax.py", "train", *r50, "--batch", "1",
              "--dtype", "float32", "--steps", "5", "--set",
              "wgrad_im2col_min_channels=0"])
  if "eval" not in skip and not quick:
    res["eval"] = runner.run("evaluation CUHK-SYSU scale",
                             ["bench/suite_eval.py"])
  if "pipeline" not in skip:
    pargs = (["--num_images", "8", "--workers", "1", "--step_ms", "50"]
             if quick else ["--num_images", "24", "--workers", "0,1,2"])
    res["pipeline"] = runner.run("input pipeline 900x1500",
                                 ["bench/bench_pipeline.py", *pargs],
                                 parse_json=False)
  for key, rec in res.items():
    rec["key"] = key
  suite["load_end"] = load_avg()
  suite["records"] = runner.records
  try:
    suite["summary"] = summarize(res, gpu)
  except Exception as e:  # pylint: disable=broad-except
    suite["summary"] = {"error": repr(e)}  # keep the raw records
  return suite


def _ratio(a, b):
  return a / b if a and b else None


def summarize(res, gpu) -> dict:
  """Derived numbers: targets, FLOP fractions, JAX/torch ratios."""
  s = {}
  peak32 = (_r(res.get("matmul_f32")) or {}).get("tflops")
  peak16 = (_r(res.get("matmul_bf16")) or {}).get("tflops")
  s["peak_tflops_f32"], s["peak_tflops_bf16"] = peak32, peak16
  for key in res:
    r = _r(res[key])
    if not isinstance(r, dict) or r.get("what") not in ("train", "infer"):
      continue
    peak = peak16 if r["dtype"] == "bfloat16" and peak16 else peak32
    s[key] = {"images_per_s": r["images_per_s"],
              "tflops_achieved": r.get("tflops_achieved"),
              "fraction_of_peak": _ratio(r.get("tflops_achieved"), peak)}
  tr = _r(res.get("torch_cpu_b1"))
  jt, ji = _r(res.get("train_r50_b1_f32")), _r(res.get("infer_r50_b1_f32"))
  if tr and jt and "train_s" in tr:
    s["cpu_train_jax_over_torch_best"] = (min(jt["step_times"])
                                          / min(tr["train_times"]))
    ratio = jt["step_s"] / tr["train_s"]
    s["cpu_train_jax_over_torch"] = ratio
    s["cpu_train_ratio_to_target"] = ratio / TARGET_CPU_TRAIN_RATIO
  if tr and ji and "infer_s" in tr:
    s["cpu_infer_jax_over_torch_best"] = (min(ji["detect_times"])
                                          / min(tr["infer_times"]))
    ratio = ji["detect_s"] / tr["infer_s"]
    s["cpu_infer_jax_over_torch"] = ratio
    s["cpu_infer_ratio_to_target"] = ratio / TARGET_CPU_INFER_RATIO
  if gpu:
    t16, i16 = (_r(res.get("train_r50_b5_bfloat16")),
                _r(res.get("infer_r50_b5_bfloat16")))
    if t16:
      s["gpu_train_ratio_to_target"] = (t16["images_per_s"]
                                        / TARGET_GPU_TRAIN_IPS)
    if i16:
      s["gpu_infer_ratio_to_target"] = (i16["images_per_s"]
                                        / TARGET_GPU_INFER_IPS)
  return s


# ---------------------------------------------------------------------------
# Markdown.


def _f(v, fmt="{:.2f}", none="–"):
  return none if v is None else fmt.format(v)


def _gib(v):
  return _f(v, "{:.2f}")


def markdown(suite: dict) -> str:
  recs = {r["name"]: r for r in suite["records"]}
  m, b, s = suite["machine"], suite["backend"], suite["summary"]
  gpu = b["backend"] in ("gpu", "cuda", "rocm")
  title = "## Benchmark suite" + (f": {suite['label']}" if suite.get("label")
                                  else "")
  lines = [f"{title}{' (--quick)' if suite['quick'] else ''}", ""]
  isa = m.get("isa")
  isa = (f" ({' '.join(isa)}{'' if 'avx512f' in isa else '; no avx512f'})"
         if isa is not None else "")
  lines += [
      f"Date {suite['date']}. Machine: {m['cpu']}{isa}, {m['cores']} cores, "
      f"{m['memory_gib']} GiB RAM; JAX backend `{b['backend']}` "
      f"({b['device_count']} x {b['device_kind']}), jax {b['jax']}, "
      f"Python {m['python']}, NumPy {m['numpy']}.",
      f"Environment of every measurement process: LD_PRELOAD="
      f"`{suite['env']['LD_PRELOAD'] or '(none)'}`, MALLOC_CONF="
      f"`{suite['env'].get('MALLOC_CONF') or '(none)'}`"
      + (f", MIMALLOC_PURGE_DELAY=`{suite['env']['MIMALLOC_PURGE_DELAY']}`"
         if suite["env"].get("MIMALLOC_PURGE_DELAY") else "")
      + ", OMP/MKL threads "
      f"{suite['env']['OMP_NUM_THREADS']}, XLA_FLAGS="
      f"`{suite['env']['XLA_FLAGS'] or '(none)'}`.",
      f"Load average (1/5/15 min) at start {suite['load_start']}, at end "
      f"{suite['load_end']}; each row lists the 1-min load before/after.",
      "", "Command: `python bench/run_suite.py"
      f"{' --quick' if suite['quick'] else ''}` (each row's own command in "
      "the JSON and the last table).", ""]

  peak32, peak16 = s.get("peak_tflops_f32"), s.get("peak_tflops_bf16")
  lines += ["### Peak (measured matmul)", "",
            "| dtype | n | TFLOP/s (best of 3) |", "|---|---|---|"]
  for name in ("matmul float32", "matmul bfloat16"):
    r = recs.get(name)
    if r and r.get("result"):
      lines.append(f"| {r['result']['dtype']} | {r['result']['n']} | "
                   f"{r['result']['tflops']:.3f} |")
  if not gpu:
    lines.append("| bfloat16 (GPU) | – | not measured (no GPU in this "
                 "run) |")
  lines.append("")

  lines += ["### Train step (train_lib.train_step under shard_map)", "",
            "| config | batch | dtype | s/step | images/s | compile s | "
            "traces / XLA compiles (1st call; timed steps) | 1st call s |  GFLOP/image "
            "(XLA) | achieved TFLOP/s | fraction of peak | peak RSS GiB | "
            "device peak GiB | load before/after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  train_rows = [r for r in suite["records"]
                if r["name"].startswith("train ")]
  for r in train_rows:
    x = r.get("result")
    if not x:
      lines.append(f"| {r['name']} | failed: see JSON |" + " |" * 11)
      continue
    frac = (s.get(_key_for(suite, r)) or {}).get("fraction_of_peak")
    lines.append(
        f"| {x['preset']} {x['height']}x{x['width']} | {x['batch']} | "
        f"{x['dtype']} | {x['step_s']:.3f} | {x['images_per_s']:.2f} | "
        f"{x['compile_s']:.1f} | {x['step_traces_warmup']} / "
        f"{x['backend_compiles_step']}; {x['step_traces_timed']} / "
        f"{x['backend_compiles_timed']} | {x['first_call_s']:.1f} | "
        f"{_f(x['flops_per_image'] and x['flops_per_image'] / 1e9, '{:.1f}')}"
        f" | {_f(x['tflops_achieved'], '{:.4f}')} | {_f(frac, '{:.1%}')} | "
        f"{_gib(x['peak_rss_gib'])} | {_gib(x['device_peak_gib'])} | "
        f"{r['load_before'][0]}/{r['load_after'][0]} |")
  if not gpu:
    lines.append("| resnet50 900x1500 (GPU) | 5 | float32, bfloat16 | "
                 "not measured (no GPU in this run) |" + " |" * 10)
  lines.append("")

  lines += ["### Inference (detect + embed; query embeddings)", "",
            "| config | batch | dtype | detect s/call | images/s | "
            "GFLOP/image (XLA) | achieved TFLOP/s | fraction of peak | "
            "embed_boxes s (1 query image) | query embeddings/s | "
            "peak RSS GiB | load before/after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in suite["records"]:
    if not r["name"].startswith("infer "):
      continue
    x = r.get("result")
    if not x:
      lines.append(f"| {r['name']} | failed: see JSON |" + " |" * 10)
      continue
    frac = (s.get(_key_for(suite, r)) or {}).get("fraction_of_peak")
    lines.append(
        f"| {x['preset']} {x['height']}x{x['width']} | {x['batch']} | "
        f"{x['dtype']} | {x['detect_s']:.3f} | {x['images_per_s']:.2f} | "
        f"{_f(x['flops_per_image'] and x['flops_per_image'] / 1e9, '{:.1f}')}"
        f" | {_f(x['tflops_achieved'], '{:.4f}')} | {_f(frac, '{:.1%}')} | "
        f"{x['embed_s']:.3f} | {x['query_images_per_s']:.2f} | "
        f"{_gib(x['peak_rss_gib'])} | "
        f"{r['load_before'][0]}/{r['load_after'][0]} |")
  if not gpu:
    lines.append("| resnet50 900x1500 (GPU) | 5 | float32, bfloat16 | "
                 "not measured (no GPU in this run) |" + " |" * 8)
  lines.append("")

  lines += ["### Side by side with torchvision (same machine, same run)", ""]
  t = (recs.get("torchvision 900x1500 b1 cpu") or {}).get("result")
  jt = (recs.get("train resnet50 900x1500 b1 f32") or {}).get("result")
  ji = (recs.get("infer resnet50 900x1500 b1 f32") or {}).get("result")
  if t and jt and ji:
    lines += [
        f"torch {t['torch_version']}, torchvision "
        f"{t['torchvision_version']}, {t['threads']} threads, LD_PRELOAD="
        f"`{t['ld_preload'] or '(none)'}`; ResNet-50 C4 at 900x1500, batch "
        "1, float32, 128 RoIs, 12000/2000 (train) and 6000/300 (test) "
        "proposals.", "",
        "| | JAX s (median) | torch s (median) | JAX / torch | JAX / torch "
        "(best runs) | target | ratio to target (<= 1 meets) |",
        "|---|---|---|---|---|---|---|",
        f"| inference (detect + embed 100 boxes) | {ji['detect_s']:.2f} | "
        f"{t['infer_s']:.2f} | {s['cpu_infer_jax_over_torch']:.2f} | "
        f"{s['cpu_infer_jax_over_torch_best']:.2f} | "
        f"<= {TARGET_CPU_INFER_RATIO} | "
        f"{s['cpu_infer_ratio_to_target']:.2f} |",
        f"| train step | {jt['step_s']:.2f} | {t['train_s']:.2f} | "
        f"{s['cpu_train_jax_over_torch']:.2f} | "
        f"{s['cpu_train_jax_over_torch_best']:.2f} | "
        f"<= {TARGET_CPU_TRAIN_RATIO} "
        f"| {s['cpu_train_ratio_to_target']:.2f} |", ""]
  else:
    lines += ["Not measured in this run"
              f"{' (--quick)' if suite['quick'] else ' (see JSON)'}.", ""]

  lines += ["### Targets", "", "| target | measured | ratio to target |",
            "|---|---|---|"]
  if gpu and "gpu_train_ratio_to_target" in s:
    lines.append(f"| GPU bf16 train >= {TARGET_GPU_TRAIN_IPS:.0f} images/s "
                 f"| {s['train_r50_b5_bfloat16']['images_per_s']:.1f} | "
                 f"{s['gpu_train_ratio_to_target']:.2f} (>= 1 meets) |")
    lines.append(f"| GPU bf16 inference >= {TARGET_GPU_INFER_IPS:.0f} "
                 f"images/s | {s['infer_r50_b5_bfloat16']['images_per_s']:.1f}"
                 f" | {s['gpu_infer_ratio_to_target']:.2f} (>= 1 meets) |")
  else:
    lines.append(f"| GPU (H100) bf16 train >= {TARGET_GPU_TRAIN_IPS:.0f} "
                 "images/s, inference >= "
                 f"{TARGET_GPU_INFER_IPS:.0f} images/s | not measured (no "
                 "GPU in this run) | – |")
  if "cpu_infer_ratio_to_target" in s:
    lines.append(f"| CPU inference time <= {TARGET_CPU_INFER_RATIO}x "
                 f"torchvision | {s['cpu_infer_jax_over_torch']:.2f}x | "
                 f"{s['cpu_infer_ratio_to_target']:.2f} (<= 1 meets) |")
    lines.append(f"| CPU train-step time <= {TARGET_CPU_TRAIN_RATIO}x "
                 f"torchvision | {s['cpu_train_jax_over_torch']:.2f}x | "
                 f"{s['cpu_train_ratio_to_target']:.2f} (<= 1 meets) |")
  lines += ["", f"Nominal cost (issue): train {NOMINAL_TRAIN_TFLOP} TFLOP "
            f"/ image, inference {NOMINAL_INFER_TFLOP} TFLOP / image; the "
            "tables use XLA's own cost-analysis count of the compiled "
            "executable.", ""]

  bd = (recs.get("train-step breakdown (jax)") or {}).get("result")
  tp = (t or {}).get("parts") if t else None
  if bd:
    lines += ["### Where the ResNet-50 train step's time goes (900x1500, "
              "batch 1, float32)", "",
              "| part | JAX s | torch s | JAX / torch | JAX GFLOP (XLA) |",
              "|---|---|---|---|---|"]
    for part in ("stem_fwd", "stem_fwd_bwd", "rpn_fwd_bwd", "proposals",
                 "roi_align_fwd_bwd", "res5_fwd_bwd"):
      if part not in bd:
        continue
      ts = (tp or {}).get(part)
      lines.append(f"| {part} | {bd[part]['s']:.3f} | {_f(ts, '{:.3f}')} | "
                   f"{_f(_ratio(bd[part]['s'], ts), '{:.2f}')} | "
                   f"{bd[part]['gflops']:.1f} |")
    lines += ["", "One conv layer (XLA:CPU), forward / weight gradient / "
              "input gradient, and the same layer written as matmuls:", "",
              "| conv | fwd s | wgrad s | dgrad s | wgrad as dot(s) s | "
              "GFLOP (fwd) |", "|---|---|---|---|---|---|"]
    for key in sorted(k[:-4] for k in bd if k.endswith("_fwd")
                      and k.startswith("conv_") and "_as_dots" not in k):
      dots = bd.get(key + "_as_dot_wgrad") or bd.get(key + "_as_dots_wgrad")
      lines.append(f"| {key[5:]} | {bd[key + '_fwd']['s']:.3f} | "
                   f"{bd[key + '_wgrad']['s']:.3f} | "
                   f"{bd[key + '_dgrad']['s']:.3f} | "
                   f"{_f(dots and dots['s'], '{:.3f}')} | "
                   f"{bd[key + '_fwd']['gflops']:.1f} |")
    lines.append("")

  ex = (recs.get("experiment: train resnet50 b1 f32, XLA 3x3 weight "
                 "gradients") or {}).get("result")
  if ex and jt:
    lines += ["### Experiment: 3x3 weight gradients as im2col matmuls "
              "(`model.wgrad_im2col_min_channels`)", "",
              "The train step above uses the library's CPU default (auto: "
              "3x3 convs with >= 512 input channels, i.e. the RPN conv and "
              "res5, compute their weight gradient as one im2col matmul); "
              "this row runs the same step with XLA's own convolution "
              "gradients (`--set wgrad_im2col_min_channels=0`). Per-layer "
              "times: `python experiments/conv3x3.py` (experiments/results/conv3x3.md).",
              "",
              "| train step, ResNet-50 900x1500 b1 | s/step | peak RSS GiB |",
              "|---|---|---|",
              f"| im2col weight gradients (default on CPU) | "
              f"{jt['step_s']:.2f} | {_f(jt.get('peak_rss_gib'))} |",
              f"| XLA weight gradients | {ex['step_s']:.2f} | "
              f"{_f(ex.get('peak_rss_gib'))} |",
              f"| torchvision (same run) | {_f((t or {}).get('train_s'))} "
              f"| |", ""]

  ev = (recs.get("evaluation CUHK-SYSU scale") or {}).get("result")
  lines += ["### Evaluation protocol (CUHK-SYSU scale)", ""]
  if ev:
    lines.append(f"{ev['gallery_images']} gallery images, {ev['queries']} "
                 f"queries, {ev['detections']} detections "
                 "(bench/bench_evaluation.py's synthetic inputs):")
    lines += ["", "| protocol | seconds | mAP |", "|---|---|---|"]
    for g, v in ev["search"].items():
      lines.append(f"| search, gallery {g} | {v['seconds']:.2f} | "
                   f"{v['mAP']:.4f} |")
    lines.append(f"| detection AP/recall | {ev['detection']['seconds']:.2f}"
                 f" | – |")
  else:
    lines.append("Skipped in --quick; see bench/results/evaluation.md "
                 "(CUHK-SYSU G=100: 0.57 s for 2,900 queries).")
  lines.append("")

  pl = recs.get("input pipeline 900x1500")
  lines += ["### Input pipeline (bench/bench_pipeline.py)", ""]
  if pl and pl.get("result"):
    for line in pl["result"].splitlines():
      mt = re.match(r"num_workers=(\d+): ([\d.]+) images/s", line)
      if mt:
        lines.append(f"- num_workers={mt.group(1)}: {mt.group(2)} images/s "
                     "(decode + resize to 900x1200 + pad, batch 4)")
  else:
    lines.append("Not measured (see JSON).")
  lines += ["", "### Commands and wall times", "",
            "| row | command | wall s | load 1-min before/after |",
            "|---|---|---|---|"]
  for r in suite["records"]:
    if r["name"] == "backend":
      continue
    lines.append(f"| {r['name']} | `{r['command']}` | {r['wall_s']} | "
                 f"{r['load_before'][0]}/{r['load_after'][0]} |")
  return "\n".join(lines) + "\n"


def _key_for(suite, rec) -> str | None:
  del suite
  return rec.get("key")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny config only, small sizes (a few minutes)")
  p.add_argument("--out", default=os.path.join("bench", "results", "suite"),
                 help="writes OUT.json and OUT.md")
  p.add_argument("--skip", default="",
                 help="comma list of torch, breakdown, experiment, eval, "
                 "pipeline")
  p.add_argument("--label", default="",
                 help="heading suffix, e.g. date, commit and machine")
  p.add_argument("--timeout", type=int, default=900,
                 help="seconds per measurement process")
  p.add_argument("--from_json", default="",
                 help="re-render the markdown of a saved JSON (no runs)")
  args = p.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      suite = json.load(f)
  else:
    suite = run_all(args)
  if args.label:
    suite["label"] = args.label
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  if not args.from_json:
    with open(args.out + ".json", "w") as f:
      json.dump(suite, f, indent=1)
  md = markdown(suite)
  with open(args.out + ".md", "w") as f:
    f.write(md)
  print(md)
  print(f"[suite] wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
  main()
