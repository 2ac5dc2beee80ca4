"""gs:// workdirs through etils.epath, with a local stand-in for the bucket.

Without TensorFlow, epath opens gs:// URIs with fsspec (gcsfs on a real
bucket). The fixture registers, for the "gs" protocol, an fsspec local
filesystem that maps gs://BUCKET/KEY to TMP/BUCKET/KEY, so the project's own
workdir I/O (config.json, history.jsonl, metrics and raw outputs, curves)
runs unchanged against it. Orbax writes checkpoint arrays with TensorStore's
own GCS driver, which this stand-in does not reach: there the tests check
only that the checkpoint manager is given the URI itself, not a local path
(the bug was a local "./gs:/bucket/..." directory).
"""

import json

from etils import epath
import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pytest

from oim_jax import checkpointing
from oim_jax import evaluation
from oim_jax import train_lib


class _FakeGCS(LocalFileSystem):
  """gs://BUCKET/KEY -> ROOT/BUCKET/KEY (ROOT: the running test's folder).

  One class for the whole module: fsspec and epath cache the instance.
  """
  protocol = ("gcs", "gs")
  root_marker = ""
  ROOT = None

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return str(cls.ROOT / path[len(prefix):])
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path):
  """The local folder that stands in for gs:// (TMP/BUCKET/KEY)."""
  root = tmp_path / "gcs"
  root.mkdir()
  saved = {p: fsspec.registry.get(p) for p in ("gcs", "gs")}
  for protocol in ("gcs", "gs"):
    fsspec.register_implementation(protocol, _FakeGCS, clobber=True)
  _FakeGCS.ROOT = root
  yield root
  _FakeGCS.ROOT = None
  for protocol, cls in saved.items():
    if cls is not None:
      fsspec.register_implementation(protocol, cls, clobber=True)


def test_stand_in_maps_uris_into_the_folder(bucket):
  epath.Path("gs://b/run/x.txt").parent.mkdir(parents=True, exist_ok=True)
  epath.Path("gs://b/run/x.txt").write_text("hi")
  assert (bucket / "b" / "run" / "x.txt").read_text() == "hi"


def test_workdir_uri_stays_a_uri(bucket, tmp_path, monkeypatch):
  path = checkpointing.workdir_path("gs://b/run")
  assert str(path) == "gs://b/run"
  monkeypatch.chdir(tmp_path)
  assert str(checkpointing.workdir_path("run")) == str(tmp_path / "run")
  # What Orbax is given: the URI (its TensorStore GCS driver writes there).
  assert str(checkpointing.workdir_path("gs://b/run") / "checkpoints") == (
      "gs://b/run/checkpoints")
  assert not (tmp_path / "gs:").exists()


def test_history_on_a_bucket_is_rewritten_not_appended(bucket):
  history = train_lib._History("gs://b/run")  # pylint: disable=protected-access
  epath.Path("gs://b/run").mkdir(parents=True, exist_ok=True)
  for step in (1, 2, 3):
    history.append({"step": step, "loss": 1.0 / step})
  history.truncate_after(2)
  history.append({"step": 3, "loss": 0.25})
  lines = (bucket / "b" / "run" / "history.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
      {"step": 3, "loss": 0.25}]


def test_eval_results_round_trip_through_a_bucket(bucket):
  epath.Path("gs://b/run/eval").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  dets = {"a.jpg": (rng.random((2, 4), dtype=np.float32),
                    np.asarray([0.9, 0.6], np.float32),
                    rng.random((2, 8), dtype=np.float32)),
          "b.jpg": (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                    np.zeros((0, 8), np.float32))}
  qemb = rng.random((3, 8), dtype=np.float32)
  evaluation.save_results("gs://b/run/eval/raw_outputs.npz", dets, qemb)
  assert (bucket / "b" / "run" / "eval" / "raw_outputs.npz").exists()
  got, got_q = evaluation.load_results("gs://b/run/eval/raw_outputs.npz")
  np.testing.assert_array_equal(got_q, qemb)
  assert sorted(got) == ["a.jpg", "b.jpg"]
  for name, (boxes, scores, emb) in dets.items():
    np.testing.assert_array_equal(got[name][0], boxes)
    np.testing.assert_array_equal(got[name][1], scores)
    np.testing.assert_array_equal(got[name][2], emb)


def test_curves_written_to_a_bucket(bucket):
  epath.Path("gs://b/run").mkdir(parents=True, exist_ok=True)
  rows = [{"step": s, "loss": 2.0 / s, "rpn_cls": 0.5, "rpn_reg": 0.1,
           "det_cls": 0.4, "det_reg": 0.2, "reid": 1.0 / s}
          for s in range(1, 6)]
  train_lib.plot_curves(rows, epath.Path("gs://b/run") / "curves.png")
  png = (bucket / "b" / "run" / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
