"""Tests of the synthetic dataset generator (oim_jax.data.synthetic).

The .mat files are read back here with scipy.io.loadmat and indexed the way
the published PyTorch loaders index the real CUHK-SYSU files (person_search
psdb.py, SeqNet cuhk_sysu.py), independently of the generator's writer.
"""

import dataclasses
import json
import os

import numpy as np
from PIL import Image
import pytest
import scipy.io

from oim_jax.data import cuhk_sysu
from oim_jax.data import synthetic

# Tiny: 12 train + 104 test scenes at 0.4x size (TestG100 needs > 100 test
# scenes), about a second to generate.
TINY = dict(num_train_ids=6, num_test_ids=6, num_train_scenes=12,
            num_test_scenes=104, max_test_appearances=3, max_persons=4,
            image_scale=0.4, min_person_height=24, max_person_height=80)
PROTO = os.path.join("annotation", "test", "train_test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn") / "a")
  records = synthetic.generate(root, synthetic.SyntheticConfig(**TINY))
  return root, records


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _mat(root, rel, var):
  return scipy.io.loadmat(os.path.join(root, rel))[var]


def _read_like_reference(root):
  """Reads the files the way the published loaders do (positional fields)."""
  img = _mat(root, "annotation/Images.mat", "Img").squeeze()
  boxes = {}
  for im_name, _, box in img:
    boxes[str(im_name[0])] = np.asarray(
        [b[0] for b in box[0]]).reshape(-1, 4).astype(np.int64)
  pool = [str(a[0]) for a in _mat(root, "annotation/pool.mat",
                                    "pool").squeeze()]
  train = []
  for item in _mat(root, f"{PROTO}/Train.mat", "Train").squeeze():
    scenes = item[0, 0][2].squeeze()
    train.append((str(item[0, 0][0][0]),
                  [(str(n[0]), b.squeeze().astype(np.int64))
                   for n, b, _ in scenes]))
  protocols = {}
  for g in (50, 100):
    path = os.path.join(root, PROTO, f"TestG{g}.mat")
    if not os.path.exists(path):
      continue
    protoc = scipy.io.loadmat(path)[f"TestG{g}"].squeeze()
    entries = []
    for i in range(len(protoc)):
      q = (str(protoc["Query"][i]["imname"][0, 0][0]),
           protoc["Query"][i]["idlocate"][0, 0][0].astype(np.int64),
           str(protoc["Query"][i]["idname"][0, 0][0]))
      gal = [(str(it[0][0]), it[1][0].astype(np.int64))
             for it in protoc["Gallery"][i].squeeze()]
      entries.append((q, gal))
    protocols[g] = entries
  return boxes, pool, train, protocols


def test_same_seed_gives_identical_bytes(tiny, tmp_path):
  root, _ = tiny
  again = str(tmp_path / "b")
  synthetic.generate(again, synthetic.SyntheticConfig(**TINY))
  a, b = _files(root), _files(again)
  assert sorted(a) == sorted(b)
  assert len([k for k in a if k.endswith(".jpg")]) == 116
  for k in a:
    assert a[k] == b[k], k


def test_other_seed_differs(tiny, tmp_path):
  root, records = tiny
  other = str(tmp_path / "c")
  records2 = synthetic.generate(other,
                                synthetic.SyntheticConfig(seed=1, **TINY))
  a, b = _files(root), _files(other)
  assert a["annotation/Images.mat"] != b["annotation/Images.mat"]
  common = [k for k in a if k.endswith(".jpg") and k in b]
  assert sum(a[k] != b[k] for k in common) == len(common)
  assert [len(r.boxes) for r in records] != [len(r.boxes) for r in records2]


def _test_split_by_content(root):
  """Test images, queries and galleries, named by image bytes, not file name."""
  files = _files(root)
  ds = cuhk_sysu.load(root, name="synthetic", check_counts=False)
  key = {a.name: files[os.path.join("Image", "SSM", a.name)]
         for a in ds.gallery}
  gallery = sorted((key[a.name], a.boxes.tobytes(), a.pids.tobytes())
                   for a in ds.gallery)
  protocols = []
  for g in (50, 100):
    for k, q in enumerate(ds.queries):
      protocols.append((g, key[q.name], q.box.tobytes(), q.pid,
                        [key[n] for n, _ in ds.gallery_for(k, g)]))
  return gallery, protocols


def test_test_split_independent_of_train_sizes(tiny, tmp_path):
  # Runs on bigger or smaller train sets are scored on the same test split.
  root, _ = tiny
  other = str(tmp_path / "d")
  synthetic.generate(other, synthetic.SyntheticConfig(
      **dict(TINY, num_train_ids=9, num_train_scenes=20)))
  assert _test_split_by_content(root) == _test_split_by_content(other)
  ds = cuhk_sysu.load(other, name="synthetic", check_counts=False)
  assert ds.num_train_ids == 9 and len(ds.train) == 20


def test_mat_layout_as_matlab_writes_it(tiny):
  root, records = tiny
  img = _mat(root, "annotation/Images.mat", "Img")
  assert img.shape == (1, 116)
  assert img.dtype.names == ("imname", "nAppear", "box")
  first = img[0, 0]
  assert first["imname"].shape == (1,) and first["imname"].dtype.kind == "U"
  assert first["nAppear"].shape == (1, 1)
  assert first["box"].dtype.names == ("idlocate", "ishard")
  n = int(first["nAppear"][0, 0])
  assert first["box"].shape == (1, n)
  assert first["box"][0, 0]["idlocate"].shape == (1, 4)
  assert first["box"][0, 0]["idlocate"].dtype == np.float64

  pool = _mat(root, "annotation/pool.mat", "pool")
  assert pool.shape == (104, 1) and pool.dtype == object

  train = _mat(root, f"{PROTO}/Train.mat", "Train")
  assert train.shape == (6, 1) and train.dtype == object
  ident = train[0, 0]
  assert ident.shape == (1, 1)
  assert ident.dtype.names == ("idname", "nAppear", "scene")
  scene = ident[0, 0]["scene"]
  assert scene.dtype.names == ("imname", "idlocate", "ishard")
  assert scene.shape == (1, int(ident[0, 0]["nAppear"][0, 0]))

  protoc = _mat(root, f"{PROTO}/TestG50.mat", "TestG50")
  assert protoc.shape == (1, 6)
  assert protoc.dtype.names == ("Query", "Gallery")
  query = protoc[0, 0]["Query"]
  assert query.shape == (1, 1)
  assert query.dtype.names == ("imname", "idlocate", "ishard", "idname")
  gallery = protoc[0, 0]["Gallery"]
  assert gallery.shape == (1, 50)
  assert gallery.dtype.names == ("imname", "idlocate", "ishard")
  empty = [e for e in gallery[0] if e["idlocate"].size == 0]
  assert empty and all(e["idlocate"].shape == (1, 0) for e in empty)
  with open(os.path.join(root, "annotation", "pool.mat"), "rb") as f:
    assert f.read(19) == b"MATLAB 5.0 MAT-file"

  # Counts read the reference way agree with what was generated.
  boxes, pool_names, train_list, _ = _read_like_reference(root)
  assert sum(len(b) for b in boxes.values()) == sum(len(r.boxes)
                                                    for r in records)
  assert sorted(pool_names) == sorted(r.name for r in records
                                      if r.split == "test")
  for i, (_, scenes) in enumerate(train_list):
    expect = sum(int((r.identity == i).sum()) for r in records
                 if r.split == "train")
    assert len(scenes) == expect >= 2


def test_boxes_inside_images_and_match_records(tiny):
  root, records = tiny
  boxes, _, _, _ = _read_like_reference(root)
  for r in records:
    with Image.open(os.path.join(root, "Image", "SSM", r.name)) as im:
      w_img, h_img = im.size
    assert (h_img, w_img) == (r.height, r.width)
    b = boxes[r.name]
    assert len(b) >= 1
    np.testing.assert_array_equal(b, r.boxes)
    assert (b[:, :2] >= 0).all() and (b[:, 2:] > 0).all()
    assert (b[:, 0] + b[:, 2] <= w_img).all()
    assert (b[:, 1] + b[:, 3] <= h_img).all()
    # Unique boxes: the loaders match persons between files by box value.
    assert len({tuple(x) for x in b}) == len(b)


def test_train_test_identities_disjoint(tiny):
  root, records = tiny
  boxes, pool, train, protocols = _read_like_reference(root)
  train_images = set(boxes) - set(pool)
  assert len(train_images) == 12
  train_names = {n for n, _ in train}
  test_names = {q[2] for q, _ in protocols[50]}
  assert len(train_names) == 6 and len(test_names) == 6
  assert not train_names & test_names
  for _, scenes in train:
    assert {n for n, _ in scenes} <= train_images
  for q, gal in protocols[50]:
    assert q[0] in pool and all(n in pool for n, _ in gal)
  # Appearance level: no test identity drawn in a train scene, even
  # unlabeled, and vice versa; distractors never copy an identity.
  labeled = {s: {k for r in records if r.split == s
                 for k, i in zip(r.keys, r.identity) if i >= 0}
             for s in ("train", "test")}
  assert len(labeled["train"]) == 6 and len(labeled["test"]) == 6
  for r in records:
    other = labeled["test" if r.split == "train" else "train"]
    for k, i in zip(r.keys, r.identity):
      assert k not in other
      if i < 0:
        assert k not in labeled[r.split]


def test_protocol_rules(tiny):
  root, records = tiny
  boxes, pool, _, protocols = _read_like_reference(root)
  assert sorted(protocols) == [50, 100]
  by_name = {r.name: r for r in records}
  for g, entries in protocols.items():
    for q, ((qname, qbox, _), gal) in enumerate(entries):
      assert len(gal) == g
      names = [n for n, _ in gal]
      assert len(set(names)) == g
      assert qname not in names
      # The query box is a box of its image, and holds test identity q.
      row = np.flatnonzero((boxes[qname] == qbox).all(1))
      assert row.size == 1 and by_name[qname].identity[row[0]] == q
      present = [b.size > 0 for _, b in gal]
      k = sum(present)
      assert present == [True] * k + [False] * (g - k)  # positives first
      holding = {r.name for r in records
                 if r.split == "test" and (r.identity == q).any()}
      assert {n for n, b in gal if b.size} == holding - {qname}
      assert not {n for n, b in gal if not b.size} & holding
      for n, b in gal[:k]:
        row = np.flatnonzero((boxes[n] == b).all(1))
        assert row.size == 1 and by_name[n].identity[row[0]] == q
  # TestG100 extends TestG50: same queries, same first 50 entries.
  for e50, e100 in zip(protocols[50], protocols[100]):
    assert e50[0][0] == e100[0][0]
    np.testing.assert_array_equal(e50[0][1], e100[0][1])
    assert [n for n, _ in e50[1]] == [n for n, _ in e100[1][:50]]


def test_cuhk_sysu_loader_reads_it(tiny):
  root, records = tiny
  ds = cuhk_sysu.load(root, name="synthetic", check_counts=False)
  train = sorted((r for r in records if r.split == "train"),
                 key=lambda r: r.name)  # loaders sort train names as strings
  test = {r.name: r for r in records if r.split == "test"}
  assert ds.num_train_ids == 6
  assert len(ds.queries) == 6
  assert [a.name for a in ds.train] == [r.name for r in train]
  assert sorted(a.name for a in ds.gallery) == sorted(test)
  assert sorted(ds.protocols) == [50, 100]

  def xyxy(b):
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)

  for a, r in zip(ds.train, train):
    np.testing.assert_array_equal(a.boxes, xyxy(r.boxes))
    np.testing.assert_array_equal(a.pids, r.identity)
  for a in ds.gallery:
    r = test[a.name]
    np.testing.assert_array_equal(a.boxes, xyxy(r.boxes))
    np.testing.assert_array_equal(a.pids, r.identity)
  for k, q in enumerate(ds.queries):
    assert q.pid == k
    assert (test[q.name].identity == k).any()
  for g in (50, 100):
    gal = ds.gallery_for(0, g)
    assert len(gal) == g and gal[0][1] is not None


def test_ensure_synthetic_lifecycle(tmp_path, monkeypatch):
  small = dict(TINY, num_train_scenes=10, num_test_scenes=53,
               gallery_sizes=(50,))
  root = str(tmp_path / "ds")
  assert synthetic.ensure_synthetic(root, **small) == os.path.abspath(root)
  manifest = json.load(open(os.path.join(root, synthetic.MANIFEST_NAME)))
  assert manifest["version"] == synthetic.GENERATOR_VERSION
  assert manifest["config"]["num_test_scenes"] == 53
  stamp = os.stat(os.path.join(root, "annotation", "Images.mat")).st_mtime_ns

  # Present with the same parameters: nothing is regenerated.
  def boom(*a, **k):
    raise AssertionError("should not regenerate")
  monkeypatch.setattr(synthetic, "generate", boom)
  synthetic.ensure_synthetic(root, **small)
  assert os.stat(os.path.join(root, "annotation",
                              "Images.mat")).st_mtime_ns == stamp
  monkeypatch.undo()

  # Other parameters: a clear error, or a replacement on request.
  with pytest.raises(ValueError, match="regenerate"):
    synthetic.ensure_synthetic(root, **dict(small, seed=3))
  synthetic.ensure_synthetic(root, regenerate=True, **dict(small, seed=3))
  manifest = json.load(open(os.path.join(root, synthetic.MANIFEST_NAME)))
  assert manifest["config"]["seed"] == 3
  assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temp dirs left behind

  # A crash mid-generation leaves neither the root nor a temp dir.
  real = synthetic.generate

  def crash(out, config, verbose=False):
    real(out, dataclasses.replace(config, num_test_ids=1))  # writes files
    raise RuntimeError("simulated crash")
  monkeypatch.setattr(synthetic, "generate", crash)
  with pytest.raises(RuntimeError, match="simulated"):
    synthetic.ensure_synthetic(str(tmp_path / "crashed"), **small)
  assert sorted(os.listdir(tmp_path)) == ["ds"]
  monkeypatch.undo()

  # A foreign non-empty directory is never written over.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "x.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    synthetic.ensure_synthetic(str(foreign), **small)
  with pytest.raises(TypeError, match="valid parameters"):
    synthetic.ensure_synthetic(str(tmp_path / "z"), num_ids=3)


def test_cli_finds_existing_dataset(tiny, capsys):
  root, _ = tiny
  args = [f"--out={root}"] + [f"--{k}={v}" for k, v in TINY.items()]
  synthetic.main(args)
  assert "found existing" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, match", [
    (dict(gallery_sizes=(100,)), "must contain 50"),
    (dict(num_test_scenes=40), "needs num_test_scenes"),
    (dict(min_train_appearances=1), ">= 2"),
])
def test_invalid_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.SyntheticConfig(**kwargs).validate()


def test_load_dataset_explains_a_stale_synthetic_root(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from oim_jax.data import datasets  # pylint: disable=g-import-not-at-top
  small = dict(TINY, num_train_scenes=10, num_test_scenes=53,
               gallery_sizes=(50,))
  root = str(tmp_path / "ds")
  synthetic.ensure_synthetic(root, **small)
  config = ml_collections.ConfigDict(dict(
      dataset="synthetic", root=root,
      synthetic=dict(small, num_train_ids=small["num_train_ids"] + 1)))
  with pytest.raises(ValueError, match="--config.data.root="):
    datasets.load_dataset(config)
