"""Times cuhk_sysu.load / prw.load on full-size annotation files (no images).

Writes CUHK-SYSU-sized annotation files (18,184 images, ~96k boxes, 5,532
train identities, TestG50 with 2,900 queries) and, with --prw, PRW-sized ones
(11,816 frames, one .mat each) into a temporary directory in the original
layouts, then times the loaders.

  python3 bench/dataset_loaders.py [--prw]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import scipy.io

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oim_jax.data import cuhk_sysu, prw  # noqa: E402


def _struct(rows, fields):
  arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
  for i, row in enumerate(rows):
    arr[0, i] = tuple(row[f] for f in fields)
  return arr


def _cell(items, shape):
  arr = np.empty(shape, dtype=object)
  for i, item in enumerate(items):
    arr.reshape(-1)[i] = item
  return arr


def write_cuhk(root, rng, num_images=18184, num_pool=6978, num_ids=5532,
               num_queries=2900, gallery=50):
  os.makedirs(os.path.join(root, "Image", "SSM"))
  proto = os.path.join(root, "annotation", "test", "train_test")
  os.makedirs(proto)
  names = [f"s{i}.jpg" for i in range(num_images)]
  boxes = {}
  img_rows = []
  for n in names:
    k = int(rng.integers(1, 11))
    b = np.concatenate([rng.integers(0, 500, (k, 2)),
                        rng.integers(1, 200, (k, 2))], 1).astype(float)
    boxes[n] = b
    img_rows.append(dict(imname=n, nAppear=np.array([[k]], float), box=_struct(
        [dict(idlocate=x[None], ishard=np.zeros((1, 1))) for x in b],
        ["idlocate", "ishard"])))
  scipy.io.savemat(os.path.join(root, "annotation", "Images.mat"),
                   {"Img": _struct(img_rows, ["imname", "nAppear", "box"])})
  pool, train = names[:num_pool], names[num_pool:]
  scipy.io.savemat(os.path.join(root, "annotation", "pool.mat"),
                   {"pool": _cell(pool, (len(pool), 1))})
  cells = []
  for i in range(num_ids):
    scenes = [dict(imname=n, idlocate=boxes[n][0][None], ishard=np.zeros((1, 1)))
              for n in rng.choice(train, 3, replace=False)]
    cells.append(_struct([dict(idname=f"p{i}", nAppear=np.array([[3.]]),
                               scene=_struct(scenes, ["imname", "idlocate",
                                                      "ishard"]))],
                         ["idname", "nAppear", "scene"]))
  scipy.io.savemat(os.path.join(proto, "Train.mat"),
                   {"Train": _cell(cells, (1, len(cells)))})
  items = []
  for q in range(num_queries):
    g = rng.choice(pool, gallery + 1, replace=False)
    query = _struct([dict(imname=g[0], idlocate=boxes[g[0]][0][None],
                          ishard=np.zeros((1, 1)), idname=f"q{q}")],
                    ["imname", "idlocate", "ishard", "idname"])
    rows = [dict(imname=n, idlocate=boxes[n][0][None] if j < 2 else
                 np.zeros((1, 0)), ishard=np.zeros((1, 1)))
            for j, n in enumerate(g[1:])]
    items.append(dict(Query=query, Gallery=_struct(rows, ["imname", "idlocate",
                                                          "ishard"])))
  scipy.io.savemat(os.path.join(proto, f"TestG{gallery}.mat"),
                   {f"TestG{gallery}": _struct(items, ["Query", "Gallery"])})


def write_prw(root, rng, num_train=5704, num_test=6112):
  os.makedirs(os.path.join(root, "frames"))
  os.makedirs(os.path.join(root, "annotations"))
  names = [f"c{1 + i % 6}s1_{i:06d}" for i in range(num_train + num_test)]
  for n in names:
    k = int(rng.integers(1, 6))
    rows = np.concatenate([rng.integers(1, 480, (k, 1)),
                           rng.uniform(0, 500, (k, 4))], 1)
    scipy.io.savemat(os.path.join(root, "annotations", n + ".jpg.mat"),
                     {"box_new": rows})
  for var, part in (("train", names[:num_train]), ("test", names[num_train:])):
    scipy.io.savemat(os.path.join(root, f"frame_{var}.mat"),
                     {f"img_index_{var}": _cell(part, (len(part), 1))})
  with open(os.path.join(root, "query_info.txt"), "w") as f:
    for i in range(2057):
      f.write(f"{i % 450 + 500} 1.5 2.5 30.2 80.1 {names[num_train + i]}\r\n")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--prw", action="store_true")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    write_cuhk(os.path.join(tmp, "cuhk"), rng)
    print(f"cuhk fixture written in {time.perf_counter() - t:.1f}s")
    for _ in range(2):
      t = time.perf_counter()
      ds = cuhk_sysu.load(os.path.join(tmp, "cuhk"), check_counts=False,
                          check_images=0)
      print(f"cuhk_sysu.load: {time.perf_counter() - t:.2f}s "
            f"({len(ds.train)} train, {len(ds.gallery)} gallery, "
            f"{sum(len(a.boxes) for a in ds.train + ds.gallery)} boxes, "
            f"{len(ds.queries)} queries)")
    if args.prw:
      t = time.perf_counter()
      write_prw(os.path.join(tmp, "prw"), rng)
      print(f"prw fixture written in {time.perf_counter() - t:.1f}s")
      t = time.perf_counter()
      ds = prw.load(os.path.join(tmp, "prw"), check_counts=False,
                    check_images=0)
      print(f"prw.load: {time.perf_counter() - t:.2f}s ({len(ds.train)} train, "
            f"{len(ds.gallery)} test frames, {len(ds.queries)} queries)")


if __name__ == "__main__":
  main()
