"""index.py / search.py --index on the tiny trained model: the index holds
what the evaluation's detector computes, ranks like the folder search, and
survives bad files, extension and a kill."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from oim_jax import eval_lib
from oim_jax import indexing
from oim_jax import search_index
from oim_jax import search_lib
from oim_jax import vector_search
from oim_jax.data import datasets
from oim_jax.data.dataset import ImageAnnotation

from conftest import tiny_cli_flags, write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(tiny_trained_workdir):
  workdir, config, _ = tiny_trained_workdir
  # A 2-step model is not confident: keep every detection slot.
  config = config.copy_and_resolve_references()
  config.model.roi.score_thresh = 0.0
  params, step = eval_lib.restore_params(config, workdir)
  return workdir, config, params, step


def _detect_files(inference, paths):
  return inference.detect([ImageAnnotation(p, p, np.zeros((0, 4), np.float32),
                                           np.zeros((0,), np.int32))
                           for p in paths], "reference")


def _assert_frame_equals(index, source, frame, reference):
  ids, boxes, scores = index.detections_of(source, frame)
  ref_boxes, ref_scores, ref_emb = reference
  assert len(ids) == len(ref_scores) > 0
  np.testing.assert_allclose(boxes, ref_boxes, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(index.embeddings()[ids], ref_emb, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.slow
def test_index_equals_detector_and_folder_search(tiny_trained_workdir,
                                                 tmp_path):
  workdir, config, params, step = _model(tiny_trained_workdir)
  dataset = datasets.load_dataset(config.data)
  folder = tmp_path / "gallery"
  (folder / "sub").mkdir(parents=True)
  images = []
  for i, a in enumerate(dataset.gallery[:5]):
    dst = folder / ("sub" if i % 2 else "") / a.name
    shutil.copy(a.path, dst)
    images.append(str(dst))
  images.sort()  # list_sources' order: full paths, sorted
  data = (folder / os.path.basename(images[0])).read_bytes()
  (folder / "corrupt.jpg").write_bytes(data[:len(data) // 3])
  inference = eval_lib.Inference(config, params)
  out = str(tmp_path / "index")

  report = indexing.build(config, params, [str(folder)], out,
                          workdir=workdir, step=step, det_thresh=0.0,
                          inference=inference, progress=False)
  assert report.frames == 5 and report.detections > 0
  assert [os.path.basename(p) for p, _ in report.failed] == ["corrupt.jpg"]

  reference = _detect_files(inference, images)
  query = dataset.queries[0]
  with search_index.SearchIndex.open(out) as index:
    assert index.num_rows == report.detections
    for p in images:
      _assert_frame_equals(index, p, 0, reference[p])
    status = {os.path.basename(s["path"]): s["status"]
              for s in index.sources()}
    assert status["corrupt.jpg"] == "failed"
    # The ranking of search.py over the folder: same detections, same order.
    q = search_lib.embed_query(inference, query.path, query.box)
    hits = index.search(q, top_k=12)
  matches = search_lib.search(config, params, query.path, query.box, images,
                              top_k=12, det_thresh=0.0)
  assert [(m.image, tuple(np.round(m.box, 2))) for m in matches] == [
      (h.image, tuple(np.round(h.box, 2))) for h in hits]
  np.testing.assert_allclose([m.similarity for m in matches],
                             [h.similarity for h in hits], atol=1e-5)

  # Extend: a lossless video of three gallery scenes (cropped to one size)
  # and the corrupt file, now repaired.
  scenes = [np.asarray(Image.open(a.path).convert("RGB"))
            for a in dataset.gallery[5:8]]
  h = min(s.shape[0] for s in scenes)
  w = min(s.shape[1] for s in scenes)
  scenes = [s[:h, :w] for s in scenes]
  video = str(tmp_path / "cam.mkv")
  write_video(video, scenes, fps=1)  # every_seconds=1 (default): all 3
  shutil.copy(images[0], folder / "corrupt.jpg")
  report2 = indexing.build(config, params, [str(folder), video], out,
                           workdir=workdir, step=step, det_thresh=0.0,
                           inference=inference, progress=False)
  assert report2.frames == 1 + 3 and report2.skipped_frames == 5
  assert not report2.failed
  pngs = []
  for i, s in enumerate(scenes):
    pngs.append(str(tmp_path / f"frame{i}.png"))
    Image.fromarray(s).save(pngs[-1])
  frame_ref = _detect_files(inference, pngs)
  with search_index.SearchIndex.open(out) as index:
    assert index.num_rows == report.detections + report2.detections
    for i, p in enumerate(pngs):
      _assert_frame_equals(index, video, i, frame_ref[p])
    # The repaired file is the copy of images[0]: the same detections.
    _assert_frame_equals(index, str(folder / "corrupt.jpg"), 0,
                         reference[images[0]])
    assert all(s["status"] == "done" for s in index.sources())
    t = index.search(q, top_k=50, time_range=(0.9, 1.1))
    assert t and {(m.image, m.frame, m.timestamp) for m in t} == {
        (video, 1, 1.0)}
  # Another checkpoint step or threshold would mix embeddings: refused.
  with pytest.raises(ValueError, match="det_thresh"):
    indexing.build(config, params, [str(folder)], out, workdir=workdir,
                   step=step, det_thresh=0.5, inference=inference,
                   progress=False)


def _rows(out):
  """Committed frames of an index being written (0 while it has none)."""
  db = os.path.join(out, search_index.DATABASE)
  if not os.path.exists(db):
    return 0
  try:
    with sqlite3.connect(db, timeout=1) as con:
      return con.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
  except sqlite3.OperationalError:  # tables not created yet, or locked
    return 0


@pytest.mark.slow
def test_index_py_resumes_after_kill_and_search_py_reads_it(
    tiny_trained_workdir, tiny_synthetic_root, tmp_path):
  workdir, _, _, _ = _model(tiny_trained_workdir)
  from conftest import tiny_train_config
  dataset = datasets.load_dataset(tiny_train_config(tiny_synthetic_root).data)
  folder = tmp_path / "gallery"
  folder.mkdir()
  for a in dataset.gallery[:20]:
    shutil.copy(a.path, folder / a.name)
  frame = np.asarray(Image.open(dataset.gallery[20].path).convert("RGB"))
  frame = frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2]
  write_video(str(folder / "cam.mp4"), [frame] * 6, fps=2, codec="mpeg4")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  flags = [f"--workdir={workdir}", f"--gallery={folder}", "--det_thresh=0",
           "--every_frames=2", *tiny_cli_flags(tiny_synthetic_root),
           "--config.model.roi.score_thresh=0.0"]

  def index_py(out, **kw):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "index.py"), f"--out={out}",
         *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw)

  full = str(tmp_path / "full")
  proc = index_py(full)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "indexed 23 frames" in stdout, stdout

  killed = str(tmp_path / "killed")
  proc = index_py(killed)
  deadline = time.time() + 600
  while _rows(killed) == 0 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  committed = _rows(killed)
  assert 0 < committed < 23, committed
  proc = index_py(killed)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert f"({committed} frames were already indexed)" in stdout, stdout

  with search_index.SearchIndex.open(full) as a, \
      search_index.SearchIndex.open(killed) as b:
    assert a.num_rows == b.num_rows > 0
    np.testing.assert_allclose(a.embeddings(), b.embeddings(), atol=1e-6)
    q = "SELECT s.path, d.frame, x1, y1, x2, y2, score FROM detections d " \
        "JOIN sources s ON s.id = d.source_id ORDER BY d.id"
    assert a.db.execute(q).fetchall() == b.db.execute(q).fetchall()
    assert [f for (f,) in a.db.execute(
        "SELECT frame FROM frames f JOIN sources s ON s.id = f.source_id "
        "WHERE s.kind = 'video' ORDER BY frame")] == [0, 2, 4]

  query = dataset.queries[0]
  box = ",".join(str(float(v)) for v in query.box)
  png = tmp_path / "r.png"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "search.py"), f"--index={full}",
       f"--query={query.path}", f"--box={box}", "--top_k=4", f"--out={png}",
       "--source=*.mp4",
       # The flags reach faiss (the filter then searches exactly).
       *(["--method=approximate", "--nprobe=2"]
         if vector_search.have_faiss() else [])],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if "cam.mp4" in l]
  assert len(lines) == 4 and all(" at " in l for l in lines), proc.stdout
  assert png.exists()
  bad = subprocess.run(
      [sys.executable, os.path.join(REPO, "search.py"), f"--index={full}",
       f"--query={query.path}", f"--box={box}", "--checkpoint_step=999"],
      env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "checkpoint step" in bad.stderr


@pytest.mark.slow
def test_index_holds_the_evaluation_gallery_outputs(tiny_trained_workdir,
                                                    tmp_path):
  # The evaluation's own driver (eval_lib.run_inference: dataset source,
  # protocol order) against index.py's path over the same image files.
  workdir, config, params, step = _model(tiny_trained_workdir)
  dataset = datasets.load_dataset(config.data)
  inference = eval_lib.Inference(config, params)
  detections, _ = eval_lib.run_inference(config, params, dataset, inference)
  out = str(tmp_path / "index")
  indexing.build(config, params, [a.path for a in dataset.gallery], out,
                 workdir=workdir, step=step, det_thresh=0.0,
                 inference=inference, progress=False)
  with search_index.SearchIndex.open(out) as index:
    assert index.num_rows == sum(len(d[1]) for d in detections.values())
    for a in dataset.gallery:
      _assert_frame_equals(index, os.path.abspath(a.path), 0,
                           detections[a.name])
