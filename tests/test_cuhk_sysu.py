"""CUHK-SYSU loader on a tiny fixture written in the original MATLAB layout."""

import logging
import os
import pickle

import numpy as np
from PIL import Image
import pytest
import scipy.io

from oim_jax.data import cuhk_sysu
from oim_jax.data._matio import DatasetFormatError, DatasetNotFoundError


def _struct(rows, fields):
  """A 1xN MATLAB struct array (numpy structured array of object fields)."""
  arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
  for i, row in enumerate(rows):
    arr[0, i] = tuple(row[f] for f in fields)
  return arr


def _cell(items, shape):
  arr = np.empty(shape, dtype=object)
  for i, item in enumerate(items):
    arr.reshape(-1)[i] = item
  return arr


def _d(*values):
  """A MATLAB double row vector [1, n]."""
  return np.array([values], dtype=np.float64)


# Raw annotation: image -> list of [x, y, w, h] (Images.mat order: unsorted).
IMAGES = {
    "s3.jpg": [[100, 100, 50, 80]],
    "s10.jpg": [[10, 20, 30, 40], [50.7, 60.2, 20.9, 30.5], [5, 5, 0, 10]],
    "s4.jpg": [[20, 20, 10, 10], [40, 40, 10, 10]],
    "s2.jpg": [[0, 0, 10, 10], [-3, 4, 10, 12]],
    "s1.jpg": [[1, 2, 3, 4], [11, 12, 13, 14], [5, 5, 10, -1]],
    "s5.jpg": [[7, 7, 7, 7]],
    "s6.jpg": [[8, 8, 8, 8], [30, 30, 5, 5]],
}
POOL = ["s4.jpg", "s1.jpg", "s5.jpg", "s6.jpg"]
TRAIN_IDS = [
    ("p1", [("s10.jpg", [50.7, 60.2, 20.9, 30.5]), ("s3.jpg", [100, 100, 50, 80])]),
    ("p2", [("s2.jpg", [0, 0, 10, 10]), ("s2.jpg", [99, 99, 1, 1])]),  # 2nd: no box.
]
QUERIES = [("s1.jpg", [1, 2, 3, 4]), ("s4.jpg", [40, 40, 10, 10])]
GALLERIES = {
    50: [[("s4.jpg", [20, 20, 10, 10]), ("s5.jpg", None), ("s6.jpg", None)],
         [("s6.jpg", [30, 30, 5, 5]), ("s1.jpg", None), ("s5.jpg", None)]],
    100: [[("s4.jpg", [20, 20, 10, 10]), ("s6.jpg", None), ("s5.jpg", None)],
          [("s6.jpg", [30, 30, 5, 5]), ("s5.jpg", None), ("s1.jpg", None)]],
}


def _write_protocol(path, size, queries, galleries, cells=False):
  items = []
  for k, ((qname, qbox), gallery) in enumerate(zip(queries, galleries)):
    query = _struct([dict(imname=qname, idlocate=_d(*qbox), ishard=_d(0),
                          idname=f"q{k}")],
                    ["imname", "idlocate", "ishard", "idname"])
    rows = []
    for j, (name, box) in enumerate(gallery):
      # MATLAB writes [] (0x0); some copies hold (1, 0): cover both.
      empty = np.zeros((0, 0)) if j % 2 else np.zeros((1, 0))
      rows.append(dict(imname=name, idlocate=empty if box is None else _d(*box),
                       ishard=_d(0)))
    fields = ["imname", "idlocate", "ishard"]
    gal = (_cell([_struct([r], fields) for r in rows], (1, len(rows)))
           if cells else _struct(rows, fields))
    items.append(dict(Query=query, Gallery=gal))
  scipy.io.savemat(path, {f"TestG{size}": _struct(items, ["Query", "Gallery"])})


def write_cuhk(root, images=IMAGES, galleries=GALLERIES, cells=False):
  """Writes the fixture; cells=True stores person lists as cells of structs."""
  ssm = root / "Image" / "SSM"
  ssm.mkdir(parents=True)
  for name in images:
    Image.new("RGB", (8, 6), (10, 20, 30)).save(ssm / name, "JPEG")
  ann = root / "annotation"
  proto = ann / "test" / "train_test"
  proto.mkdir(parents=True)
  img_rows = []
  for name, boxes in images.items():
    rows = [dict(idlocate=_d(*b), ishard=_d(0)) for b in boxes]
    box = (_cell([_struct([r], ["idlocate", "ishard"]) for r in rows],
                 (1, len(rows))) if cells else
           _struct(rows, ["idlocate", "ishard"]))
    img_rows.append(dict(imname=name, nAppear=_d(len(boxes)), box=box))
  scipy.io.savemat(ann / "Images.mat",
                   {"Img": _struct(img_rows, ["imname", "nAppear", "box"])})
  scipy.io.savemat(ann / "pool.mat", {"pool": _cell(POOL, (len(POOL), 1))})
  cells = []
  for idname, scenes in TRAIN_IDS:
    scene = _struct([dict(imname=n, idlocate=_d(*b), ishard=_d(0))
                     for n, b in scenes], ["imname", "idlocate", "ishard"])
    cells.append(_struct([dict(idname=idname, nAppear=_d(len(scenes)),
                               scene=scene)], ["idname", "nAppear", "scene"]))
  scipy.io.savemat(proto / "Train.mat",
                   {"Train": _cell(cells, (1, len(cells)))})
  for size, gal in galleries.items():
    _write_protocol(proto / f"TestG{size}.mat", size, QUERIES, gal, cells)
  return root


def _f32(*rows):
  return np.array(rows, dtype=np.float32).reshape(-1, 4)


@pytest.fixture
def root(tmp_path):
  return write_cuhk(tmp_path / "cuhk")


def test_fixture_reads_back_like_matlab(root):
  # The nesting the loader relies on, as in the reference loaders.
  img = scipy.io.loadmat(root / "annotation" / "Images.mat")["Img"].squeeze()
  name, _, boxes = img[0]
  assert str(name[0]) == "s3.jpg"
  assert boxes[0][0][0].shape == (1, 4)
  train = scipy.io.loadmat(root / "annotation/test/train_test/Train.mat")
  scenes = train["Train"].squeeze()[0][0, 0][2].squeeze()
  assert str(scenes[0][0][0]) == "s10.jpg"


def test_train_split(root, caplog):
  with caplog.at_level(logging.INFO):
    ds = cuhk_sysu.load(root)
  assert ds.name == "cuhk_sysu" and ds.root == str(root)
  # All images minus pool, sorted as strings ("s10" < "s2").
  assert [a.name for a in ds.train] == ["s10.jpg", "s2.jpg", "s3.jpg"]
  s10, s2, s3 = ds.train
  assert s10.path == str(root / "Image" / "SSM" / "s10.jpg")
  # x2 = trunc(x) + trunc(w); the w = 0 box is dropped.
  np.testing.assert_array_equal(s10.boxes, _f32([10, 20, 40, 60],
                                                [50, 60, 70, 90]))
  assert s10.boxes.dtype == np.float32 and s10.pids.dtype == np.int32
  np.testing.assert_array_equal(s10.pids, [-1, 0])  # p1 matched by trunc box.
  # Negative x clipped to 0 after conversion: (-3, 4, 10, 12) -> (0, 4, 7, 16).
  np.testing.assert_array_equal(s2.boxes, _f32([0, 0, 10, 10], [0, 4, 7, 16]))
  np.testing.assert_array_equal(s2.pids, [1, -1])
  np.testing.assert_array_equal(s3.boxes, _f32([100, 100, 150, 180]))
  np.testing.assert_array_equal(s3.pids, [0])
  assert ds.num_train_ids == 2 and tuple(ds.train_id_names) == ("p1", "p2")
  assert all(a.cam_id == -1 for a in ds.train)
  log = caplog.text
  assert "dropped 2 boxes" in log  # s10 (w = 0) and s1 (h < 0).
  assert "1 persons have no matching box" in log  # p2's (99, 99, 1, 1).
  assert "counts differ" in log and "train_ids=2 (expected 5532)" in log


def test_gallery_and_queries(root):
  ds = cuhk_sysu.load(root)
  assert [a.name for a in ds.gallery] == POOL  # Pool order.
  by = {a.name: a for a in ds.gallery}
  np.testing.assert_array_equal(by["s4.jpg"].boxes,
                                _f32([20, 20, 30, 30], [40, 40, 50, 50]))
  np.testing.assert_array_equal(by["s4.jpg"].pids, [0, 1])  # Gallery, query.
  np.testing.assert_array_equal(by["s1.jpg"].boxes,
                                _f32([1, 2, 4, 6], [11, 12, 24, 26]))
  np.testing.assert_array_equal(by["s1.jpg"].pids, [0, -1])  # Query 0's box.
  np.testing.assert_array_equal(by["s5.jpg"].pids, [-1])
  np.testing.assert_array_equal(by["s6.jpg"].pids, [-1, 1])
  assert [(q.name, q.pid) for q in ds.queries] == [("s1.jpg", 0), ("s4.jpg", 1)]
  np.testing.assert_array_equal(ds.queries[0].box, [1, 2, 4, 6])
  np.testing.assert_array_equal(ds.queries[1].box, [40, 40, 50, 50])
  assert ds.queries[0].box.dtype == np.float32
  assert ds.queries[1].path == str(root / "Image" / "SSM" / "s4.jpg")


def _entries(entries):
  return [(n, None if b is None else b.tolist()) for n, b in entries]


def test_protocols_and_gallery_for(root):
  ds = cuhk_sysu.load(root)
  assert sorted(ds.protocols) == [50, 100]
  assert dict.__getitem__(ds.protocols, 100) is None  # Not parsed yet.
  for size in (50, 100):
    for k in range(2):
      expected = [(n, None if b is None else [b[0], b[1], b[0] + b[2],
                                              b[1] + b[3]])
                  for n, b in GALLERIES[size][k]]
      assert _entries(ds.gallery_for(k, size)) == expected
  assert dict.__getitem__(ds.protocols, 100) is not None
  # -1: positives, then every other gallery image but the query's own.
  assert _entries(ds.gallery_for(0, -1)) == [
      ("s4.jpg", [20, 20, 30, 30]), ("s5.jpg", None), ("s6.jpg", None)]
  assert _entries(ds.gallery_for(1, -1)) == [
      ("s6.jpg", [30, 30, 35, 35]), ("s1.jpg", None), ("s5.jpg", None)]
  with pytest.raises(ValueError, match="gallery_size=500"):
    ds.gallery_for(0, 500)
  # Pickles without parsing protocols it has not read.
  ds2 = cuhk_sysu.load(root)
  clone = pickle.loads(pickle.dumps(ds2))
  assert dict.__getitem__(clone.protocols, 100) is None
  assert _entries(clone.gallery_for(1, 100)) == _entries(ds.gallery_for(1, 100))


def test_eager_protocols_and_query_mismatch(tmp_path):
  root = write_cuhk(tmp_path / "a")
  ds = cuhk_sysu.load(root, eager_protocols=True, check_counts=False)
  assert dict.__getitem__(ds.protocols, 100) is not None
  # A TestG file listing other queries is rejected when read.
  proto = root / "annotation" / "test" / "train_test"
  _write_protocol(proto / "TestG500.mat", 500, QUERIES[::-1],
                  GALLERIES[50][::-1])
  ds = cuhk_sysu.load(root)
  with pytest.raises(DatasetFormatError, match="TestG500.mat"):
    ds.gallery_for(0, 500)


def test_cell_of_structs_layout(tmp_path):
  # Person lists stored as cell arrays of 1x1 structs read the same.
  ref = cuhk_sysu.load(write_cuhk(tmp_path / "a"))
  ds = cuhk_sysu.load(write_cuhk(tmp_path / "b", cells=True))
  for x, y in zip(ref.train + ref.gallery, ds.train + ds.gallery):
    assert x.name == y.name
    np.testing.assert_array_equal(x.boxes, y.boxes)
    np.testing.assert_array_equal(x.pids, y.pids)
  for k in range(2):
    assert _entries(ds.gallery_for(k, 100)) == _entries(ref.gallery_for(k, 100))


def test_counts_silent_when_disabled(root, caplog):
  with caplog.at_level(logging.WARNING):
    cuhk_sysu.load(root, check_counts=False, name="synthetic")
  assert "counts differ" not in caplog.text
  assert "image files are missing" not in caplog.text


def test_missing_images_warned(root, caplog):
  os.remove(root / "Image" / "SSM" / "s5.jpg")
  with caplog.at_level(logging.WARNING):
    ds = cuhk_sysu.load(root, check_images=100)
  assert "1 of 7 sampled image files are missing" in caplog.text
  assert len(ds.gallery) == 4  # Images are not needed to load annotations.


def test_missing_root(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    cuhk_sysu.load(tmp_path / "nope")
  assert str(tmp_path / "nope") in str(e.value)
  assert "github.com/ShuangLI59/person_search" in str(e.value)
  assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("rel", [
    "annotation/pool.mat", "annotation/Images.mat",
    "annotation/test/train_test/Train.mat"])
def test_missing_file(root, rel):
  os.remove(root / rel)
  with pytest.raises(DatasetNotFoundError, match="ShuangLI59") as e:
    cuhk_sysu.load(root)
  assert str(root / rel) in str(e.value)


def test_missing_image_dir_and_protocols(root):
  for size in (50, 100):
    os.remove(root / f"annotation/test/train_test/TestG{size}.mat")
  with pytest.raises(DatasetNotFoundError, match="TestG50.mat"):
    cuhk_sysu.load(root)
  os.rename(root / "Image" / "SSM", root / "Image" / "other")
  with pytest.raises(DatasetNotFoundError, match="Image/SSM"):
    cuhk_sysu.load(root)


def test_corrupt_mat(root):
  path = root / "annotation" / "Images.mat"
  path.write_bytes(b"this is not a MATLAB file" * 10)
  with pytest.raises(DatasetFormatError) as e:
    cuhk_sysu.load(root)
  assert str(path) in str(e.value)
  assert isinstance(e.value, ValueError)


def test_wrong_layout(root):
  path = root / "annotation" / "pool.mat"
  scipy.io.savemat(path, {"gallery": np.zeros((2, 2))})
  with pytest.raises(DatasetFormatError, match=r"pool.mat.*\['pool'\]"):
    cuhk_sysu.load(root)
  # A struct without the expected field names the field.
  path = root / "annotation" / "Images.mat"
  scipy.io.savemat(path, {"Img": _struct([dict(name="s1.jpg")], ["name"])})
  scipy.io.savemat(root / "annotation" / "pool.mat",
                   {"pool": _cell(POOL, (len(POOL), 1))})
  with pytest.raises(DatasetFormatError, match="Images.mat.*imname"):
    cuhk_sysu.load(root)


def _write_subset(root, file, var, queries, galleries):
  path = root / "annotation" / "test" / "train_test" / file
  _write_protocol(path, 0, queries, galleries)
  mat = scipy.io.loadmat(path)
  scipy.io.savemat(path, {var: mat["TestG0"]})  # The subset's own name.


def test_query_subsets(root):
  ds = cuhk_sysu.load(root)
  assert cuhk_sysu.load_query_subset(ds, "occlusion") is None  # No file.
  with pytest.raises(ValueError, match="occlusion"):
    cuhk_sysu.load_query_subset(ds, "blur")
  # Query 1 only, with a gallery that is not its TestG one (no s1.jpg).
  _write_subset(root, "Occlusion.mat", "Occlusion1", [QUERIES[1]],
                [[("s6.jpg", [30, 30, 5, 5]), ("s5.jpg", None)]])
  indices, view = cuhk_sysu.load_query_subset(ds, "occlusion")
  assert indices.tolist() == [1]
  assert view.queries[0] is ds.queries[1]
  assert _entries(view.gallery_for(0, 2)) == [("s6.jpg", [30, 30, 35, 35]),
                                              ("s5.jpg", None)]
  # Hand case: the true match (s6) ranks second behind a distractor in s5;
  # a better-scoring distractor in s1 is outside the subset's gallery.
  from oim_jax import eval_lib, evaluation  # pylint: disable=g-import-not-at-top
  det = lambda box, e: (_f32(box), np.array([0.9], np.float32),
                        np.array([e], np.float32))
  detections = {"s6.jpg": det([30, 30, 35, 35], [0.6, 0.8]),
                "s5.jpg": det([7, 7, 14, 14], [0.8, 0.6]),
                "s1.jpg": det([1, 2, 4, 6], [1.0, 0.0])}
  query_emb = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  r = evaluation.evaluate_search(view, detections, query_emb[indices],
                                 gallery_size=2)
  assert r["mAP"] == pytest.approx(0.5) and r["top1"] == 0.0
  assert r["top5"] == 1.0
  # eval.py's metrics: one entry per subset file present.
  _write_subset(root, "Resolution.mat", "Test_Size", QUERIES,
                [[("s4.jpg", [20, 20, 10, 10])],
                 [("s6.jpg", [30, 30, 5, 5])]])
  class Cfg:  # pylint: disable=too-few-public-methods
    det_thresh = 0.5
  m = eval_lib._subset_metrics(ds, detections, query_emb, Cfg)  # pylint: disable=protected-access
  assert m["occlusion_mAP"] == pytest.approx(0.5)
  # Resolution: query 0 has no detection at s4 (AP 0), query 1 finds s6.
  assert m["resolution_mAP"] == pytest.approx(0.5)
  assert m["resolution_top1"] == pytest.approx(0.5)
  # A query that is not one of the dataset's is rejected, naming the file.
  _write_subset(root, "Occlusion.mat", "Occlusion1", [("s5.jpg", [7, 7, 7, 7])],
                [[("s6.jpg", None)]])
  with pytest.raises(DatasetFormatError, match="Occlusion.mat: query 0"):
    cuhk_sysu.load_query_subset(ds, "occlusion")
