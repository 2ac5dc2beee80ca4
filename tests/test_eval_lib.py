"""End to end: train the tiny model briefly, evaluate with eval.py from its
checkpoint, re-score from the saved raw outputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from oim_jax import eval_lib
from oim_jax import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_cmd(root, workdir, *extra):
  """eval.py on a workdir trained with conftest.tiny_train_config."""
  from conftest import tiny_cli_flags
  return [sys.executable, os.path.join(REPO, "eval.py"),
          f"--workdir={workdir}", *tiny_cli_flags(root), *extra]


@pytest.mark.slow
def test_train_then_eval_py_from_checkpoint(tiny_synthetic_root,
                                            tiny_trained_workdir):
  workdir, _, out = tiny_trained_workdir
  for key in ("mAP", "top1", "top5", "top10", "det_ap", "det_recall"):
    assert 0.0 <= out[key] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
  with open(os.path.join(workdir, "history.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "eval_mAP" in r] == [1, 2]
  assert os.path.exists(os.path.join(workdir, "curves.png"))

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  os.remove(os.path.join(workdir, "eval", "metrics.json"))
  proc = subprocess.run(_eval_cmd(tiny_synthetic_root, workdir), env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mAP" in proc.stdout
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 2 and metrics["gallery_size"] == 50
  # Same parameters, same numbers as the evaluation at the end of training.
  for key in ("mAP", "top1", "det_ap", "det_recall"):
    np.testing.assert_allclose(metrics[key], out[key], atol=1e-6)

  # Raw outputs: every gallery image has an entry; re-scoring needs no model.
  detections, query_emb = evaluation.load_results(
      os.path.join(workdir, "eval", "raw_outputs.npz"))
  assert len(detections) == 56 and query_emb.shape[1] == 16
  proc = subprocess.run(_eval_cmd(tiny_synthetic_root, workdir,
                                  "--from_saved"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    again = json.load(f)
  for key in ("mAP", "top1", "det_ap"):
    np.testing.assert_allclose(again[key], metrics[key], atol=1e-9)


def test_progress_bar_and_log_lines(capsys):
  batches = [{"index": np.arange(4)} for _ in range(12)]
  # On a terminal: a tqdm bar on stderr, every batch passed through.
  out = list(eval_lib._progress(iter(batches), 12, "gallery",  # pylint: disable=protected-access
                                interactive=True))
  assert len(out) == 12
  err = capsys.readouterr().err
  assert "gallery" in err and "12/12" in err
  # Otherwise (log files): the same batches, no bar.
  out = list(eval_lib._progress(iter(batches), 12, "gallery",  # pylint: disable=protected-access
                                interactive=False))
  assert len(out) == 12 and "12/12" not in capsys.readouterr().err
