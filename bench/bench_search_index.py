"""Search index: query latency vs index size (exact and faiss), recall of
the approximate search, memory, and indexing throughput of index.py's path.

  python bench/bench_search_index.py [--sizes=10000,100000,1000000]
      [--queries=50] [--model_frames=48] [--out=bench/results/search_index.md]

Index rows are synthetic D = 256 unit embeddings with identity structure
(rows of one identity: a shared centre plus noise, 8 detections per identity
on average), 5 detections per frame, 1,000 frames per source file; queries
are noisy copies of random rows. Exact = the chunked matmul + partial sort;
approximate = faiss IndexIVFFlat (nlist 2 sqrt(n), nprobe max(32, nlist/16),
then a sweep of nprobe); recall@10 = the fraction of the exact top 10 that
the approximate top 10 holds. The one-source filter keeps that file's 5,000
rows: under 1/16 of the rows from 80,000 on, where either method searches
exactly over the kept rows.
Indexing throughput: oim_jax.indexing.build over synthetic test scenes with
the model of configs/synthetic.py and of the tests' tiny config (random
weights: the cost of a frame does not depend on them).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from oim_jax import search_index  # pylint: disable=g-import-not-at-top
from oim_jax import vector_search  # pylint: disable=g-import-not-at-top

DIM = 256
PER_FRAME = 5
FRAMES_PER_SOURCE = 1000


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _rss_gib():
  """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not
  inherited from the parent across exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = [l.split(":", 1)[1].strip() for l in out.splitlines()
            if l.startswith("Model name")][0]
  except Exception:  # pylint: disable=broad-except
    name = platform.processor() or platform.machine()
  flags = open("/proc/cpuinfo").read()
  isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags
                                              else "SSE")
  return f"{name}, {os.cpu_count()} cores, {isa}"


def build_index(path, n, rng):
  """Writes an index of n synthetic rows.

  Returns (embeddings [n, D], identity [n], seconds to write the index).
  """
  centres = _unit(rng.standard_normal((max(1, n // 8), DIM), np.float32))
  ident = rng.integers(0, len(centres), n)
  # Noise of norm ~0.7 around unit centres: one identity's rows are closer
  # to each other than to other identities'.
  emb = _unit(centres[ident]
              + 0.7 / np.sqrt(DIM) * rng.standard_normal((n, DIM), np.float32))
  manifest = {"embedding_dim": DIM, "workdir": "-", "checkpoint_step": 0,
              "det_thresh": 0.5, "sampling": {}, "config": {}}
  t0 = time.perf_counter()
  with search_index.SearchIndex.create_or_open(path, manifest) as index:
    rows_per_source = FRAMES_PER_SOURCE * PER_FRAME
    for s0 in range(0, n, rows_per_source):
      src = os.path.join(path, f"cam{s0 // rows_per_source:04d}.mp4")
      open(src, "wb").close()
      sid = index.source_id(src, "video")
      rows = min(rows_per_source, n - s0)
      for b0 in range(0, rows, 10_000):  # one commit per 2,000 frames
        b1 = min(rows, b0 + 10_000)
        frames = sorted({r // PER_FRAME for r in range(b0, b1)})
        index.add_batch(
            [(sid, f, f / 25.0, 720, 1280) for f in frames],
            [(sid, r // PER_FRAME, (10, 20, 60, 150), 0.9)
             for r in range(b0, b1)], emb[s0 + b0:s0 + b1])
      index.set_status(sid, "done")
  return emb, ident, time.perf_counter() - t0


def _median_ms(fn, queries):
  times = []
  for q in queries:
    t0 = time.perf_counter()
    fn(q)
    times.append(1e3 * (time.perf_counter() - t0))
  return float(np.median(times)), float(np.percentile(times, 95))


def query_process(path):
  """Times the queries of an index in this fresh process: row as JSON."""
  data = np.load(os.path.join(path, "queries.npz"))
  queries, ident, qid = data["queries"], data["ident"], data["qid"]
  row = {"rss_open_gib": _rss_gib()}
  with search_index.SearchIndex.open(path) as index:
    index.search(queries[0], 10, method="exact")  # page the file in
    row["exact"] = _median_ms(
        lambda q: index.search(q, 10, method="exact"), queries)
    row["exact_source"] = _median_ms(
        lambda q: index.search(q, 10, method="exact",
                               source_glob="*cam0001.mp4"), queries[:10])
    row["exact_frame"] = _median_ms(
        lambda q: index.search(q, 10, method="exact", one_per_frame=True),
        queries)
    row["rss_exact_gib"] = _rss_gib()
    if vector_search.have_faiss():
      t0 = time.perf_counter()
      index.approximate()
      row["ann_build_s"] = time.perf_counter() - t0
      row["ann_mib"] = os.path.getsize(
          os.path.join(path, search_index.ANN)) / 2**20
      index._ann = None  # pylint: disable=protected-access
      t0 = time.perf_counter()
      index.approximate(build=False)
      row["ann_load_s"] = time.perf_counter() - t0
      row["approx"] = _median_ms(
          lambda q: index.search(q, 10, method="approximate"), queries)
      row["approx_source"] = _median_ms(
          lambda q: index.search(q, 10, method="approximate",
                                 source_glob="*cam0001.mp4"), queries[:10])
      wants = [[h.id for h in index.search(q, 10, method="exact")]
               for q in queries]

      def recalls(nprobe=None):
        recall, recall_id = [], []
        for q, p, want in zip(queries, qid, wants):
          got = {h.id for h in index.search(q, 10, method="approximate",
                                            nprobe=nprobe)}
          recall.append(len(got.intersection(want)) / len(want))
          same = [i for i in want if ident[i] == p]
          if same:
            recall_id.append(len(got.intersection(same)) / len(same))
        return float(np.mean(recall)), float(np.mean(recall_id))

      row["recall10"], row["recall10_id"] = recalls()
      ann = index.approximate()
      row["nlist"], row["default_nprobe"] = (ann.index.nlist,
                                             ann.default_nprobe())
      row["nprobe"] = []
      for nprobe in (4, 8, 16, 32, 64, 128, 256):
        if nprobe >= ann.index.nlist:
          break
        t = _median_ms(lambda q, n=nprobe: index.search(
            q, 10, method="approximate", nprobe=n), queries)
        row["nprobe"].append((nprobe, t, *recalls(nprobe)))
    row["rss_gib"] = _rss_gib()
  print(json.dumps(row))


def bench_size(n, num_queries, rng, tmp):
  path = os.path.join(tmp, f"idx{n}")
  emb, ident, write_s = build_index(path, n, rng)
  rows = rng.integers(0, n, num_queries)
  queries = _unit(emb[rows] + 0.3 / np.sqrt(DIM) * rng.standard_normal(
      (num_queries, DIM), np.float32))
  np.savez(os.path.join(path, "queries.npz"), queries=queries, ident=ident,
           qid=ident[rows])
  del emb
  proc = subprocess.run([sys.executable, __file__, f"--query_process={path}"],
                        capture_output=True, text=True, check=True)
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  row.update(n=n, write_s=write_s,
             emb_mib=os.path.getsize(os.path.join(path, "embeddings.f32"))
             / 2**20,
             db_mib=os.path.getsize(os.path.join(path, "meta.sqlite")) / 2**20)
  return row


def bench_indexing(frames, tmp):
  """frames/s of indexing.build for two model sizes (after compilation)."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from conftest import TINY_SYNTHETIC, tiny_train_config  # pylint: disable=g-import-not-at-top
  from oim_jax import eval_lib, indexing  # pylint: disable=g-import-not-at-top
  from oim_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "synthetic_config", os.path.join(REPO, "configs", "synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  rows = []
  # Full-size scenes (240x320 to 320x480 px, as configs/synthetic.py's).
  sizes = dict(TINY_SYNTHETIC, image_scale=1.0, min_person_height=40,
               max_person_height=160, num_test_scenes=max(56, frames))
  for name in ("configs/synthetic.py", "tests' tiny config"):
    if name.startswith("configs"):
      config = mod.get_config()
    else:
      config = tiny_train_config(os.path.join(tmp, "synthetic_full"))
    config.data.synthetic.update(sizes)
    config.data.root = os.path.join(tmp, "synthetic_full")
    root = synthetic.ensure_synthetic(config.data.root, **sizes)
    folder = os.path.join(root, "Image", "SSM")
    files = sorted(os.listdir(folder))[-frames:]
    model = person_search.create_model(config)
    params = person_search.init_variables(model, config, jax.random.key(0),
                                          pretrained=False)
    inference = eval_lib.Inference(config, params)
    paths = [os.path.join(folder, f) for f in files]
    warm = indexing.build(config, params, paths[:inference.batch_size],
                          os.path.join(tmp, "warm" + str(len(rows))),
                          workdir=tmp, step=0, det_thresh=0.0,
                          inference=inference, progress=False)
    out = os.path.join(tmp, "model_index" + str(len(rows)))
    report = indexing.build(config, params, paths, out, workdir=tmp, step=0,
                            det_thresh=0.0, inference=inference,
                            progress=False)
    rows.append({"model": name, "canvas": f"{config.data.min_size}x"
                 f"{config.data.max_size}", "batch": inference.batch_size,
                 "frames": report.frames, "seconds": report.seconds,
                 "warm_s": warm.seconds})
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="10000,100000,1000000")
  p.add_argument("--queries", type=int, default=50)
  p.add_argument("--model_frames", type=int, default=48,
                 help="frames per model row (0: skip the model rows)")
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results",
                                               "search_index.md"))
  p.add_argument("--query_process", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.query_process:
    return query_process(args.query_process)
  rng = np.random.default_rng(0)
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  lines = [
      f"## Search index: {datetime.date.today()}, {commit}, {_cpu()}", "",
      f"Command: `python bench/bench_search_index.py --sizes={args.sizes} "
      f"--queries={args.queries} --model_frames={args.model_frames}`. "
      f"NumPy {np.__version__}"
      + (f", faiss {__import__('faiss').__version__}"
         if vector_search.have_faiss() else ", faiss not installed") + ".",
      "D = 256 float32 embeddings with identity structure; latency = median "
      "(p95) of one query, top 10, metadata fetched from SQLite included.",
      "recall@10: the share of the exact top 10 in the approximate top 10; "
      "same identity: of its rows of the query's identity. Peak RSS: of a "
      "fresh process that opens the index and queries it (exact; then "
      "faiss, its build included).",
      "", "| detections | write s | embeddings MiB | SQLite MiB | exact ms | "
      "exact, one source (5,000 rows) ms | exact, one per frame ms | "
      "peak RSS exact GiB | faiss build s | faiss load s | faiss MiB | "
      "faiss ms | faiss, one source ms | recall@10 | recall@10 same identity | "
      "peak RSS GiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  sweep = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in [int(s) for s in args.sizes.split(",")]:
      r = bench_size(n, args.queries, rng, tmp)
      ms = lambda v: f"{v[0]:.2f} ({v[1]:.2f})"
      lines.append(
          f"| {n:,} | {r['write_s']:.1f} | {r['emb_mib']:.0f} | "
          f"{r['db_mib']:.0f} | {ms(r['exact'])} | {ms(r['exact_source'])} | "
          f"{ms(r['exact_frame'])} | {r['rss_exact_gib']:.2f} | "
          + (f"{r['ann_build_s']:.1f} | {r['ann_load_s']:.2f} | "
             f"{r['ann_mib']:.0f} | {ms(r['approx'])} | "
             f"{ms(r['approx_source'])} | {r['recall10']:.3f} | "
             f"{r['recall10_id']:.3f}"
             if "approx" in r else "– | – | – | – | – | – | –")
          + f" | {r['rss_gib']:.2f} |")
      print(lines[-1], flush=True)
      for nprobe, t, rec, rec_id in r.get("nprobe", []):
        sweep.append(
            f"| {n:,} | {r['nlist']} | {nprobe}"
            + (" (default)" if nprobe == r["default_nprobe"] else "")
            + f" | {ms(t)} | {rec:.3f} | {rec_id:.3f} |")
    if sweep:
      lines += ["", "faiss `--nprobe` (clusters scanned of nlist) against "
                "latency and recall@10, same queries:", "",
                "| detections | nlist | nprobe | faiss ms | recall@10 | "
                "recall@10 same identity |", "|---|---|---|---|---|---|"]
      lines += sweep
    if args.model_frames:
      lines += ["", "Indexing (index.py's path: decode, detect + embed, "
                "commit), CPU, float32, random weights, after compilation "
                "(the first-batch column includes it):", "",
                "| model | canvas | batch | frames | seconds | frames/s | "
                "first batch s |", "|---|---|---|---|---|---|---|"]
      for r in bench_indexing(args.model_frames, tmp):
        lines.append(
            f"| {r['model']} | {r['canvas']} | {r['batch']} | {r['frames']} |"
            f" {r['seconds']:.1f} | {r['frames'] / r['seconds']:.2f} | "
            f"{r['warm_s']:.1f} |")
        print(lines[-1], flush=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
