"""PRW loader on a tiny fixture written in the original layout."""

import logging
import os

import numpy as np
from PIL import Image
import pytest
import scipy.io

from oim_jax.data import prw
from oim_jax.data._matio import DatasetFormatError, DatasetNotFoundError

# frame -> (annotation variable name, rows [pid, x, y, w, h]).
TRAIN = {
    "c1s1_000151": ("box_new", [[1, 10.7, 20.2, 30.9, 40.5],
                                [932, -2.5, 5, 10.4, 20],
                                [-2, 0, 0, 5, 5]]),
    "c2s1_000200": ("anno_file", [[483, 1, 1, 10, 10],
                                  [5, 3, 3, 0, 10],  # w = 0: dropped.
                                  [480, 2, 2, 4, 4]]),
    "c6s2_000010": ("anno_previous", [[5, 100, 100, 20, 30]]),
}
TEST = {
    "c1s2_000100": ("box_new", [[600, 5, 5, 10, 20], [-2, 1, 1, 2, 2]]),
    "c3s2_044587": ("box_new", [[605, 0, 295.5756, 74.6436, 338.2289],
                                [600, 50, 50, 10, 10],
                                [1, 7, 7, 7, -3]]),  # h < 0: dropped.
    "c4s3_000001": ("box_new", [[700, 10, 10, 10, 10], [1, 7, 7, 7, 7]]),
    "c5s1_000777": ("box_new", [[605, 1, 2, 3, 4]]),
}
QUERY_LINES = [
    "605 -1.7030 295.5756 74.6436 338.2289 c3s2_044587",
    "600 5 5 10 20 c1s2_000100",
    "",
    "605 1 2 3 4 c5s1_000777",
]


def _names_cell(names):
  cell = np.empty((len(names), 1), dtype=object)
  for i, n in enumerate(names):
    cell[i, 0] = n
  return cell


def write_prw(root, train=TRAIN, test=TEST, id_train=(1, 5, 480, 483, 932)):
  (root / "frames").mkdir(parents=True)
  (root / "annotations").mkdir()
  for frames in (train, test):
    for name, (key, rows) in frames.items():
      Image.new("RGB", (8, 6), (1, 2, 3)).save(root / "frames" / f"{name}.jpg")
      scipy.io.savemat(root / "annotations" / f"{name}.jpg.mat",
                       {key: np.array(rows, np.float64)})
  scipy.io.savemat(root / "frame_train.mat",
                   {"img_index_train": _names_cell(list(train))})
  scipy.io.savemat(root / "frame_test.mat",
                   {"img_index_test": _names_cell(list(test))})
  if id_train is not None:
    scipy.io.savemat(root / "ID_train.mat",
                     {"ID_train": np.array([id_train], np.float64)})
  (root / "query_info.txt").write_bytes(
      "".join(line + "\r\n" for line in QUERY_LINES).encode())
  return root


@pytest.fixture
def root(tmp_path):
  return write_prw(tmp_path / "prw")


def _f32(*rows):
  return np.array(rows, dtype=np.float32).reshape(-1, 4)


def test_train(root, caplog):
  with caplog.at_level(logging.INFO):
    ds = prw.load(root)
  assert ds.name == "prw" and ds.protocols == {}
  assert [a.name for a in ds.train] == [f"{n}.jpg" for n in TRAIN]
  a, b, c = ds.train
  assert a.path == str(root / "frames" / "c1s1_000151.jpg")
  # Clip x, y, w, h at 0, add, truncate: 10.7 + 30.9 = 41.6 -> 41 (not 40).
  np.testing.assert_array_equal(
      a.boxes, _f32([10, 20, 41, 60], [0, 5, 10, 25], [0, 0, 5, 5]))
  assert a.boxes.dtype == np.float32 and a.pids.dtype == np.int32
  # Train ids {1, 5, 480, 483, 932} -> 0..4 increasing; -2 -> -1.
  np.testing.assert_array_equal(a.pids, [0, 4, -1])
  np.testing.assert_array_equal(b.boxes, _f32([1, 1, 11, 11], [2, 2, 6, 6]))
  np.testing.assert_array_equal(b.pids, [3, 2])
  np.testing.assert_array_equal(c.pids, [1])
  assert [x.cam_id for x in ds.train] == [1, 2, 6]
  assert ds.num_train_ids == 5
  assert ds.train_id_names == (1, 5, 480, 483, 932)
  assert "dropped 2 boxes" in caplog.text
  assert "counts differ" in caplog.text
  assert "ID_train.mat lists" not in caplog.text  # Consistent with the ids.


def test_gallery_and_queries(root):
  ds = prw.load(root)
  assert [a.name for a in ds.gallery] == [f"{n}.jpg" for n in TEST]
  assert [a.cam_id for a in ds.gallery] == [1, 3, 4, 5]
  # Query ids by first query: 605 -> 0, 600 -> 1; then other labeled test
  # ids by increasing id: 1 -> 2, 700 -> 3.
  g = ds.gallery
  np.testing.assert_array_equal(g[0].pids, [1, -1])
  np.testing.assert_array_equal(g[1].pids, [0, 1])  # h < 0 box dropped.
  np.testing.assert_array_equal(g[1].boxes,
                                _f32([0, 295, 74, 633], [50, 50, 60, 60]))
  np.testing.assert_array_equal(g[2].pids, [3, 2])
  np.testing.assert_array_equal(g[3].pids, [0])
  # Blank line skipped, CRLF stripped, ".jpg" added.
  assert [(q.name, q.pid, q.cam_id) for q in ds.queries] == [
      ("c3s2_044587.jpg", 0, 3), ("c1s2_000100.jpg", 1, 1),
      ("c5s1_000777.jpg", 0, 5)]
  # Truncate [x, y, x + w, y + h] then clip: x = -1.703 -> -1 -> 0;
  # x2 = 72.9406 -> 72; y2 = 633.8045 -> 633.
  np.testing.assert_array_equal(ds.queries[0].box, [0, 295, 72, 633])
  np.testing.assert_array_equal(ds.queries[1].box, [5, 5, 15, 25])
  assert ds.queries[0].box.dtype == np.float32
  assert ds.queries[2].path == str(root / "frames" / "c5s1_000777.jpg")


def _entries(entries):
  return [(n, None if b is None else b.tolist()) for n, b in entries]


def test_gallery_for(root):
  ds = prw.load(root)
  assert _entries(ds.gallery_for(0)) == [
      ("c1s2_000100.jpg", None), ("c4s3_000001.jpg", None),
      ("c5s1_000777.jpg", [1, 2, 4, 6])]
  assert _entries(ds.gallery_for(1, -1)) == [
      ("c3s2_044587.jpg", [50, 50, 60, 60]), ("c4s3_000001.jpg", None),
      ("c5s1_000777.jpg", None)]


def test_full_train_id_mapping(tmp_path):
  # The 483 PRW train ids, split over two frames, map to 0..482 in order.
  ids = list(range(1, 479)) + [480, 481, 482, 483, 932]
  rows = [[i, 1, 1, 5, 5] for i in ids]
  train = {"c1s1_000001": ("box_new", rows[::2]),
           "c2s1_000001": ("box_new", rows[1::2])}
  ds = prw.load(write_prw(tmp_path / "p", train=train, id_train=ids))
  assert ds.num_train_ids == 483
  mapping = {}
  for a, raw in zip(ds.train, (rows[::2], rows[1::2])):
    mapping.update(zip((r[0] for r in raw), a.pids.tolist()))
  assert mapping[932] == 482 and mapping[483] == 481
  assert mapping[480] == 478 and mapping[478] == 477 and mapping[1] == 0
  assert sorted(mapping.values()) == list(range(483))
  assert ds.train_id_names[482] == 932


def test_id_train_mismatch_warned(tmp_path, caplog):
  root = write_prw(tmp_path / "p", id_train=(1, 5, 480, 483))
  with caplog.at_level(logging.WARNING):
    ds = prw.load(root)
  assert "ID_train.mat lists 4 ids" in caplog.text
  assert ds.num_train_ids == 5


def test_camera_id():
  assert prw.camera_id("c3s2_044587.jpg") == 3
  assert prw.camera_id("/x/c12s1_000001.jpg") == 12
  with pytest.raises(DatasetFormatError, match="frame.jpg"):
    prw.camera_id("frame.jpg")


def test_missing_root(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    prw.load(tmp_path / "nope")
  assert str(tmp_path / "nope") in str(e.value)
  assert "github.com/liangzheng06/PRW-baseline" in str(e.value)


@pytest.mark.parametrize("rel", [
    "query_info.txt", "frame_train.mat", "frame_test.mat",
    "annotations/c4s3_000001.jpg.mat"])
def test_missing_file(root, rel):
  os.remove(root / rel)
  with pytest.raises(DatasetNotFoundError, match="PRW-baseline") as e:
    prw.load(root)
  assert str(root / rel) in str(e.value)


def test_corrupt_and_malformed(root):
  path = root / "annotations" / "c5s1_000777.jpg.mat"
  path.write_bytes(b"\x00garbage" * 40)
  with pytest.raises(DatasetFormatError) as e:
    prw.load(root)
  assert str(path) in str(e.value)
  scipy.io.savemat(path, {"boxes": np.zeros((1, 5))})
  with pytest.raises(DatasetFormatError, match="box_new"):
    prw.load(root)
  scipy.io.savemat(path, {"box_new": np.zeros((1, 4))})
  with pytest.raises(DatasetFormatError, match=r"\[n, 5\]"):
    prw.load(root)
  scipy.io.savemat(path, {"box_new": np.array([[605, 1, 2, 3, 4.0]])})
  (root / "query_info.txt").write_text("605 1 2 3 c5s1_000777\n")
  with pytest.raises(DatasetFormatError, match=r"query_info.txt:1"):
    prw.load(root)
