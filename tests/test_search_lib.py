"""The search demo: ranking against a folder, the PNG, and search.py."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from oim_jax import eval_lib
from oim_jax import search_lib
from oim_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_search_ranks_by_similarity_and_draws(tiny_trained_workdir, tmp_path):
  workdir, config, _ = tiny_trained_workdir
  dataset = datasets.load_dataset(config.data)
  query = dataset.queries[0]
  folder = tmp_path / "gallery"
  folder.mkdir()
  for a in dataset.gallery[:4]:
    shutil.copy(a.path, folder / a.name)
  (folder / "notes.txt").write_text("not an image")
  gallery = search_lib.gallery_images(str(folder))
  assert len(gallery) == 4

  params, _ = eval_lib.restore_params(config, workdir)
  # A 2-step model is not confident: keep every detection slot.
  config = config.copy_and_resolve_references()
  config.model.roi.score_thresh = 0.0
  matches = search_lib.search(config, params, query.path, query.box, gallery,
                              top_k=5, det_thresh=0.0)
  assert len(matches) == 5
  sims = [m.similarity for m in matches]
  assert sims == sorted(sims, reverse=True)
  assert [m.rank for m in matches] == [1, 2, 3, 4, 5]
  # Similarity = dot product of the query and detection embeddings.
  inference = eval_lib.Inference(config, params)
  dets = inference.detect([a for a in dataset.gallery
                           if a.name in {os.path.basename(g)
                                         for g in gallery}])
  from oim_jax.data.dataset import ImageAnnotation
  q = inference.embed([ImageAnnotation(query.name, query.path,
                                       query.box[None],
                                       np.zeros(1, np.int32))])[0]
  best = max(float(e @ q) for _, _, emb in dets.values() for e in emb)
  np.testing.assert_allclose(matches[0].similarity, best, rtol=1e-5)

  out = str(tmp_path / "results.png")
  search_lib.draw(query.path, query.box, matches, out, columns=3)
  with Image.open(out) as im:
    w, h = im.size
  # 6 panels in 3 columns x 2 rows at 3.2 x 3.0 inches, 90 dpi.
  assert (w, h) == (round(3 * 3.2 * 90), round(2 * 3.0 * 90))


@pytest.mark.slow
def test_search_py_command(tiny_trained_workdir, tmp_path):
  workdir, config, _ = tiny_trained_workdir
  dataset = datasets.load_dataset(config.data)
  query = dataset.queries[0]
  folder = tmp_path / "gallery"
  folder.mkdir()
  for a in dataset.gallery[:3]:
    shutil.copy(a.path, folder / a.name)
  out = tmp_path / "r.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  box = ",".join(str(float(v)) for v in query.box)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "search.py"), f"--workdir={workdir}",
       f"--query={query.path}", f"--box={box}", f"--gallery={folder}",
       "--top_k=3", f"--out={out}"], env=env, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "matches" in proc.stdout and out.exists()

  bad = subprocess.run(
      [sys.executable, os.path.join(REPO, "search.py"), f"--workdir={workdir}",
       f"--query={query.path}", "--box=5,5,1,1", f"--gallery={folder}",
       f"--out={out}"], env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "query box" in bad.stderr


def test_config_from_older_workdir(tmp_path):
  # A config.json written before a field existed: the field takes its
  # default, the stored values win everywhere else.
  stored = {"model": {"width": 16, "roi": {"pool_size": 8}},
            "eval": {"gallery_size": 50}}
  (tmp_path / "config.json").write_text(json.dumps(stored))
  config = search_lib.config_from_workdir(str(tmp_path))
  assert config.model.width == 16 and config.model.roi.pool_size == 8
  assert config.eval.gallery_size == 50
  assert config.model.stride == 16  # not stored: the default
  assert config.model.roi.det_features == "pooled"
  with pytest.raises(FileNotFoundError, match="config.json"):
    search_lib.config_from_workdir(str(tmp_path / "nowhere"))
