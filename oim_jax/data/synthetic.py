"""Synthetic person-search dataset written in the CUHK-SYSU on-disk format.

A seeded generator draws street-like scenes (textured background, clutter,
articulated stick-figure people) and writes them exactly like CUHK-SYSU
(DESIGN.md §6), so the real loader `oim_jax.data.cuhk_sysu.load(root)` is the
one exercised:

  root/Image/SSM/s{k}.jpg
  root/annotation/Images.mat              Img: 1xN struct (imname, nAppear, box)
  root/annotation/pool.mat                pool: Nx1 cell of gallery image names
  root/annotation/test/train_test/Train.mat     Train: Lx1 cell of 1x1 structs
  root/annotation/test/train_test/TestG{G}.mat  TestG{G}: 1xQ struct (Query,
                                                Gallery)
  root/synthetic_manifest.json            generator version + parameters

Identities are combinations of a few shared colours and patterns (stripes,
checks, solid, two-tone; hat, bag; leg colour; shorts; sleeves; hair; body
proportions), so two people often share their main colours and differ in a
detail. Scenes have per-camera colour cast, brightness, blur and noise;
people vary in scale (ground-plane perspective), pose and occlusion; every
scene also holds unlabeled distractor people. Train and test identities are
disjoint and never appear in the other split, not even unlabeled.

Usage:
  python -m oim_jax.data.synthetic --out=/tmp/synthetic [--seed=0 ...]
  root = ensure_synthetic("/tmp/synthetic")   # generates only if absent
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
import scipy.io

GENERATOR_VERSION = 2  # 2: test split independent of the train sizes
MANIFEST_NAME = "synthetic_manifest.json"
# Fixed .mat header text: scipy writes a creation date there, which would
# make two generations of the same seed differ byte-wise.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by oim_jax.data.synthetic"

# Shared clothing palette: few colours, so identities collide on colour and
# must be told apart by pattern, accessory, legs and build.
PALETTE = np.array([
    (200, 40, 40),    # red
    (40, 75, 190),    # blue
    (40, 145, 65),    # green
    (230, 200, 45),   # yellow
    (30, 30, 34),     # black
    (232, 232, 228),  # white
    (128, 128, 132),  # grey
    (125, 80, 45),    # brown
    (130, 60, 160),   # purple
], np.float32)
SKIN = np.array([(238, 200, 170), (205, 160, 120), (160, 110, 75),
                 (100, 68, 45)], np.float32)
HAIR = np.array([(25, 20, 18), (95, 60, 30), (215, 185, 110),
                 (170, 170, 170)], np.float32)
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "twotone")
ACCESSORIES = ("none", "hat", "bag", "hat_bag")

# Label values of the figure's part map (0 = transparent).
_SKIN, _HAIR, _TORSO, _SLEEVE, _LEGS, _SHOES, _ACC, _STRAP = range(1, 9)


class StaleDatasetError(ValueError):
  """The root holds a synthetic dataset generated with other parameters."""


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and seed of a synthetic dataset (all recorded in the manifest).

  The default is sized for a 2-core CPU: 960 scenes of 240x320 to 320x480
  pixels, people 40-160 px tall.
  """
  seed: int = 0
  num_train_ids: int = 675
  num_test_ids: int = 80
  num_train_scenes: int = 720
  num_test_scenes: int = 240
  min_persons: int = 2  # people per scene, labeled + unlabeled
  max_persons: int = 6
  min_train_appearances: int = 3  # scenes per train identity
  max_train_appearances: int = 5
  min_test_appearances: int = 2  # scenes per test identity (query included)
  max_test_appearances: int = 4
  num_cameras: int = 6
  min_person_height: int = 40
  max_person_height: int = 160
  image_scale: float = 1.0  # multiplies every camera's image size
  gallery_sizes: tuple[int, ...] = (50, 100)
  jpeg_quality: int = 90

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["gallery_sizes"] = list(self.gallery_sizes)
    return d

  def validate(self):
    """Raises ValueError naming the parameter to change."""
    if 50 not in self.gallery_sizes:
      raise ValueError("gallery_sizes must contain 50: CUHK-SYSU loaders read "
                       "TestG50.mat for the queries and test identities.")
    if self.min_train_appearances < 2 or self.min_test_appearances < 2:
      raise ValueError("min_train_appearances and min_test_appearances must "
                       "be >= 2 (an identity needs a query and a match; "
                       "1-row scene lists also break the reference loaders).")
    if not (1 <= self.min_persons <= self.max_persons):
      raise ValueError("need 1 <= min_persons <= max_persons")
    if self.max_train_appearances > self.num_train_scenes or (
        self.max_test_appearances > self.num_test_scenes):
      raise ValueError("max_*_appearances exceeds the number of scenes")
    if not 16 <= self.min_person_height <= self.max_person_height:
      raise ValueError("need 16 <= min_person_height <= max_person_height")
    for g in self.gallery_sizes:
      # Worst case: an identity with max appearances (its positives plus the
      # query image are not negatives).
      if self.num_test_scenes - self.max_test_appearances < g - 1:
        raise ValueError(
            f"gallery size {g} needs num_test_scenes >= "
            f"{g - 1 + self.max_test_appearances}, got {self.num_test_scenes}")


@dataclasses.dataclass(frozen=True)
class Appearance:
  """What a person looks like; labeled identities keep it across scenes."""
  top: int
  top2: int
  pattern: int
  legs: int
  shorts: bool
  long_sleeves: bool
  shoes: int
  accessory: int
  acc: int
  skin: int
  hair: int
  build: float  # shoulder width / height
  leg_frac: float  # leg length / height

  def key(self) -> tuple:
    """The identity signature: two identities never share it."""
    return (self.top, self.top2 if self.pattern else -1, self.pattern,
            self.legs, self.shorts, self.accessory,
            self.acc if self.accessory else -1, self.hair)


@dataclasses.dataclass
class SceneRecord:
  """Annotation of one generated scene (xywh integer boxes, as on disk)."""
  name: str
  split: str  # "train" or "test"
  camera: int
  height: int
  width: int
  boxes: np.ndarray  # [n, 4] int64 x, y, w, h
  identity: np.ndarray  # [n] int64 index into train/test ids, -1 unlabeled
  ishard: np.ndarray  # [n] int64 1 when a third or more of the box is hidden
  keys: list = dataclasses.field(default_factory=list)  # Appearance.key()s


# ----------------------------------------------------------------- people ---


def _sample_appearance(rng: np.random.Generator) -> Appearance:
  n = len(PALETTE)
  top = int(rng.integers(n))
  pattern = int(rng.choice(len(PATTERNS), p=[0.3, 0.2, 0.15, 0.15, 0.2]))
  top2 = int((top + rng.integers(1, n)) % n)  # differs from top
  return Appearance(
      top=top, top2=top2, pattern=pattern, legs=int(rng.integers(n)),
      shorts=bool(rng.random() < 0.25), long_sleeves=bool(rng.random() < 0.6),
      shoes=int(rng.choice([4, 5, 7, 6])),
      accessory=int(rng.choice(4, p=[0.4, 0.2, 0.25, 0.15])),
      acc=int(rng.integers(n)), skin=int(rng.integers(len(SKIN))),
      hair=int(rng.integers(len(HAIR))),
      build=float(np.round(rng.uniform(0.21, 0.31), 3)),
      leg_frac=float(np.round(rng.uniform(0.44, 0.52), 3)))


def _sample_identities(rng, count: int, taken: set) -> list[Appearance]:
  out = []
  while len(out) < count:
    a = _sample_appearance(rng)
    if a.key() not in taken:
      taken.add(a.key())
      out.append(a)
  return out


def _limb(draw, start, angle, length, width, label):
  """Draws a segment from start at angle (rad from straight down)."""
  end = (start[0] + length * math.sin(angle),
         start[1] + length * math.cos(angle))
  draw.line([start, end], fill=label, width=max(1, int(round(width))))
  r = width / 2
  draw.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r], fill=label)
  return end


def render_person(a: Appearance, height: int, rng: np.random.Generator,
                  supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Draws one articulated figure (head, torso, two-segment arms and legs).

  Args:
    a: the appearance.
    height: figure height in pixels (head top to soles, hat excluded).
    rng: pose, colour jitter and shading noise.
    supersample: drawing scale before the box-filter downsampling.
  Returns:
    rgb [h, w, 3] float32 and alpha [h, w] float32 in [0, 1], cropped to the
    figure's tight bounding box.
  """
  s = supersample
  h = float(height * s)
  size_w, size_h = int(h * 0.9), int(h * 1.1)
  cx, top = size_w / 2, h * 0.06
  lab = Image.new("L", (size_w, size_h), 0)
  d = ImageDraw.Draw(lab)
  mirror = 1 if rng.random() < 0.5 else -1
  swing = rng.uniform(-1, 1)  # walking phase
  r = 0.068 * h
  head_c = (cx + mirror * 0.01 * h, top + r)
  shoulder_y = top + 2 * r + 0.03 * h
  hip_y = top + h * (1 - a.leg_frac)
  sw = a.build * h / 2
  hw = sw * 0.82
  # Legs: thigh + shin, trousers or shorts.
  leg_len = (h - (hip_y - top) - 0.03 * h) / 2
  lw = 0.095 * h
  for side in (-1, 1):
    thigh = side * 0.05 + side * swing * 0.32 * mirror
    knee = _limb(d, (cx + side * hw * 0.5, hip_y), thigh, leg_len, lw, _LEGS)
    shin = thigh * 0.6 + mirror * 0.18 * abs(swing)
    foot = _limb(d, knee, shin, leg_len, lw * 0.9,
                 _SKIN if a.shorts else _LEGS)
    fx = foot[0] + mirror * 0.03 * h
    d.ellipse([fx - 0.055 * h, foot[1] - 0.02 * h, fx + 0.055 * h,
               foot[1] + 0.025 * h], fill=_SHOES)
  if a.shorts:  # shorts cover the upper thigh only
    for side in (-1, 1):
      thigh = side * 0.05 + side * swing * 0.32 * mirror
      _limb(d, (cx + side * hw * 0.5, hip_y), thigh, leg_len * 0.55, lw * 1.05,
            _LEGS)
  # Bag hanging at the hip on the mirror side, strap across the torso.
  bag = ACCESSORIES[a.accessory] in ("bag", "hat_bag")
  if bag:
    bx = cx + mirror * (hw + 0.005 * h)
    bw, bh = 0.13 * h, 0.15 * h
    x0, x1 = sorted((bx, bx + mirror * bw))
    d.rectangle([x0, hip_y - 0.12 * h, x1, hip_y - 0.12 * h + bh], fill=_ACC)
  # Neck and torso.
  d.rectangle([cx - 0.3 * r, top + 1.6 * r, cx + 0.3 * r, shoulder_y + 1],
              fill=_SKIN)
  d.polygon([(cx - sw, shoulder_y), (cx + sw, shoulder_y),
             (cx + hw, hip_y + 0.01 * h), (cx - hw, hip_y + 0.01 * h)],
            fill=_TORSO)
  if bag:
    d.line([(cx - mirror * sw * 0.8, shoulder_y + 0.01 * h),
            (cx + mirror * (hw + 0.04 * h), hip_y - 0.11 * h)],
           fill=_STRAP, width=max(1, int(0.022 * h)))
  # Arms: upper arm in the sleeve colour, forearm sleeve or skin.
  raised = rng.random() < 0.08
  upper, fore, aw = 0.17 * h, 0.16 * h, 0.065 * h
  for side in (-1, 1):
    ang = side * 0.14 - side * swing * 0.4 * mirror
    if raised and side == mirror:
      ang = side * 2.3  # waving / phoning
    elbow = _limb(d, (cx + side * (sw - 0.03 * h), shoulder_y + 0.025 * h),
                  ang, upper, aw, _SLEEVE)
    hand = _limb(d, elbow, ang * 0.7 + mirror * 0.25 * (1 - raised), fore,
                 aw * 0.9, _SLEEVE if a.long_sleeves else _SKIN)
    d.ellipse([hand[0] - aw * 0.55, hand[1] - aw * 0.55,
               hand[0] + aw * 0.55, hand[1] + aw * 0.55], fill=_SKIN)
  # Head, hair on top, hat.
  hb = [head_c[0] - r * 0.9, head_c[1] - r, head_c[0] + r * 0.9, head_c[1] + r]
  d.ellipse(hb, fill=_SKIN)
  d.pieslice([hb[0] - 0.02 * h, hb[1] - 0.01 * h, hb[2] + 0.02 * h,
              hb[3] + 0.2 * r], 180, 360, fill=_HAIR)
  if ACCESSORIES[a.accessory] in ("hat", "hat_bag"):
    d.rectangle([hb[0] + 0.1 * r, hb[1] - 0.35 * r, hb[2] - 0.1 * r,
                 head_c[1] - 0.25 * r], fill=_ACC)
    bx0, bx1 = sorted((head_c[0] - mirror * 0.9 * r,
                       head_c[0] + mirror * 1.6 * r))
    d.rectangle([bx0, head_c[1] - 0.4 * r, bx1, head_c[1] - 0.15 * r],
                fill=_ACC)

  # Colour only the figure's bounding box, aligned to the supersampling grid.
  bx0, by0, bx1, by1 = lab.getbbox()
  bx0, by0 = bx0 // s * s, by0 // s * s
  bx1, by1 = -(-bx1 // s) * s, -(-by1 // s) * s
  labels = np.asarray(lab.crop((bx0, by0, bx1, by1)))
  jitter = lambda c: np.clip(c + rng.normal(0, 9, 3), 0, 255)
  lut = np.zeros((9, 3), np.float32)
  lut[_SKIN] = jitter(SKIN[a.skin])
  lut[_HAIR] = jitter(HAIR[a.hair])
  lut[_TORSO] = lut[_SLEEVE] = jitter(PALETTE[a.top])
  lut[_LEGS] = jitter(PALETTE[a.legs])
  lut[_SHOES] = jitter(PALETTE[a.shoes])
  lut[_ACC] = jitter(PALETTE[a.acc])
  lut[_STRAP] = lut[_ACC] * 0.45
  rgb = lut[labels]
  # Torso pattern in the second colour.
  yy = np.arange(by0, by1, dtype=np.float32)[:, None]
  xx = np.arange(bx0, bx1, dtype=np.float32)[None, :]
  period = max(2 * s, int(round(0.045 * h)))
  pattern = PATTERNS[a.pattern]
  if pattern == "hstripes":
    second = (yy // period) % 2 == 1
  elif pattern == "vstripes":
    second = ((xx - int(cx)) // period) % 2 == 1
  elif pattern == "checks":
    second = ((yy // period) + ((xx - int(cx)) // period)) % 2 == 1
  elif pattern == "twotone":
    second = yy > (shoulder_y + hip_y) / 2
  else:
    second = np.zeros((1, 1), bool)
  rgb[(labels == _TORSO) & second] = jitter(PALETTE[a.top2])
  # Cylinder-like shading left to right, and light from above.
  half_w = max(sw * 1.4, 1.0)
  shade = (1.0 - 0.28 * np.clip(((xx - cx) / half_w) ** 2, 0, 1)) * (
      1.05 - 0.1 * (yy / size_h))
  rgb *= shade[..., None]
  # Supersampled, then box-filtered: anti-aliased edges. rgb is 0 off the
  # figure, so the box filter gives premultiplied colour.
  alpha = _downsample((labels > 0).astype(np.float32), s)
  rgb = _downsample(rgb, s) / np.maximum(alpha, 1e-6)[..., None]
  return _crop(rgb, alpha)


def _downsample(x: np.ndarray, s: int) -> np.ndarray:
  """Box filter by an integer factor s on the first two axes."""
  if s == 1:
    return x
  out = x[0::s, 0::s].astype(np.float32)
  for i in range(s):
    for j in range(s):
      if i or j:
        out += x[i::s, j::s]
  return out * (1.0 / (s * s))


def _crop(rgb, alpha):
  rows = np.flatnonzero(alpha.any(1))
  cols = np.flatnonzero(alpha.any(0))
  sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  return rgb[sl], alpha[sl]


# ----------------------------------------------------------------- scenes ---

# (height, width) per camera, cycled; one portrait camera.
_CAMERA_SIZES = ((240, 320), (288, 384), (320, 480), (270, 360), (320, 240),
                 (300, 400))
_WALL_STYLES = ("brick", "windows", "sky", "panels")
_GROUND_STYLES = ("tiles", "asphalt", "grass", "paving")


@dataclasses.dataclass(frozen=True)
class _Camera:
  height: int
  width: int
  horizon: float  # fraction of the height where the ground starts
  wall: int
  ground: int
  wall_colour: tuple
  ground_colour: tuple
  gains: tuple  # per-channel colour cast
  brightness: float
  blur: float
  noise: float


def _make_cameras(config: SyntheticConfig) -> list[_Camera]:
  rng = np.random.default_rng((config.seed, 1))
  cams = []
  for c in range(config.num_cameras):
    h, w = _CAMERA_SIZES[c % len(_CAMERA_SIZES)]
    cams.append(_Camera(
        height=max(32, int(round(h * config.image_scale))),
        width=max(32, int(round(w * config.image_scale))),
        horizon=float(rng.uniform(0.28, 0.42)),
        wall=int(rng.integers(len(_WALL_STYLES))),
        ground=int(rng.integers(len(_GROUND_STYLES))),
        wall_colour=tuple(float(v) for v in rng.uniform(70, 200, 3)),
        ground_colour=tuple(float(v) for v in rng.uniform(80, 170, 3)),
        gains=tuple(float(v) for v in rng.uniform(0.82, 1.18, 3)),
        brightness=float(rng.uniform(0.75, 1.2)),
        blur=float(rng.choice([0.0, 0.0, 0.5, 0.8])),
        noise=float(rng.uniform(2.0, 7.0))))
  return cams


def _lowfreq(rng, h: int, w: int, cell: int) -> np.ndarray:
  """Smooth noise in [0, 1], [h, w] float32 (bilinear upsampled grid)."""
  grid = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
  return np.asarray(Image.fromarray(grid, mode="F").resize(
      (w, h), Image.BILINEAR), np.float32)


def _background(cam: _Camera, rng) -> tuple[np.ndarray, int]:
  """Textured wall/sky above the horizon, ground below: [H, W, 3], horizon y."""
  hh, ww = cam.height, cam.width
  hy = int(hh * (cam.horizon + rng.uniform(-0.03, 0.03)))
  yy = np.arange(hh, dtype=np.float32)[:, None]
  xx = np.arange(ww, dtype=np.float32)[None, :]
  wall = (np.array(cam.wall_colour) + rng.normal(0, 12, 3)).astype(np.float32)
  img = np.broadcast_to(wall, (hh, ww, 3)).copy()
  style = _WALL_STYLES[cam.wall]
  if style == "brick":
    bh = float(rng.integers(6, 11))
    bw = bh * 2.5
    row = yy // bh
    col = (xx + (row % 2) * bw / 2) // bw
    tone = 1 + 0.12 * np.sin(row * 12.9898 + col * 78.233 + rng.random() * 9)
    img *= tone[..., None]
    mortar = (yy % bh < 1.5) | ((xx + (row % 2) * bw / 2) % bw < 1.5)
    img[mortar] = wall * 0.55 + 90
  elif style == "windows":
    cw, ch = rng.uniform(22, 40), rng.uniform(26, 44)
    inx, iny = (xx % cw) / cw, (yy % ch) / ch
    win = (inx > 0.2) & (inx < 0.8) & (iny > 0.2) & (iny < 0.75)
    glass = (np.array([60, 80, 110]) + rng.normal(0, 15, 3)).astype(np.float32)
    lit = _lowfreq(rng, hh, ww, 24)[..., None]
    img[win] = (glass * (0.7 + 0.8 * lit))[win]
  elif style == "sky":
    sky = (np.array([150, 185, 225]) + rng.normal(0, 12, 3)).astype(np.float32)
    t = (yy / max(hy, 1))[..., None]
    img = sky * (1 - 0.3 * t) + 40 * t
    canopy = _lowfreq(rng, hh, ww, 18) + 0.6 * (yy / max(hy, 1) - 0.5)
    leaves = np.array([50, 110, 50], np.float32) * (
        0.7 + 0.6 * _lowfreq(rng, hh, ww, 4))[..., None]
    img = np.where((canopy > 0.75)[..., None], leaves, img)
  else:  # shop-front panels in palette colours: clothing-like confusers
    edges = np.sort(rng.uniform(0, ww, int(rng.integers(3, 8))))
    idx = np.searchsorted(edges, xx)
    colours = PALETTE[rng.integers(len(PALETTE), size=len(edges) + 1)]
    img = 0.5 * img + 0.5 * colours[idx]
  ground = (np.array(cam.ground_colour) + rng.normal(0, 10, 3)).astype(
      np.float32)
  gstyle = _GROUND_STYLES[cam.ground]
  gy, gx = yy[hy:] - hy, xx
  gshape = (hh - hy, ww)
  depth = 1.0 + gy / 25.0  # tiles grow towards the camera
  if gstyle == "tiles":
    lines = ((np.log(depth) * 6) % 1 < 0.12) | (
        ((gx - ww / 2) / depth) % 14 < 1.2)
    g = np.broadcast_to(ground, gshape + (3,)).copy()
    g[lines] *= 0.7
  elif gstyle == "asphalt":
    g = np.full(gshape + (3,), 95, np.float32) + 0.25 * (ground - 95)
    g *= (0.85 + 0.3 * rng.random(gshape, np.float32))[..., None]
  elif gstyle == "grass":
    g = np.array([70, 125, 55], np.float32) * (
        0.75 + 0.5 * _lowfreq(rng, hh - hy, ww, 3))[..., None]
  else:
    chk = ((gx // (10 * depth ** 0.5)) + (np.log(depth) * 5 // 1)) % 2
    g = ground * (0.9 + 0.15 * chk)[..., None]
  img[hy:] = g
  light = 0.82 + 0.36 * _lowfreq(rng, hh, ww, 64)
  return (img * light[..., None]).astype(np.float32, copy=False), hy


def _random_colour(rng):
  return tuple(int(v) for v in np.clip(
      PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.6, 1.0), 0, 255))


def _clutter(rng, kind: str, x: float, base: float, ph: float):
  """A clutter object standing at (x, base) sized by the local person height.

  Returns (box (x0, y0, x1, y1), draw function taking an ImageDraw).
  """
  if kind == "pole":
    w, h = max(2.0, 0.06 * ph), ph * rng.uniform(1.6, 2.4)
    colour = tuple(int(v) for v in rng.uniform(30, 110, 3))
    lamp = _random_colour(rng)

    def draw(d):
      d.rectangle([x - w / 2, base - h, x + w / 2, base], fill=colour)
      d.ellipse([x - 2 * w, base - h - 2 * w, x + 2 * w, base - h + w],
                fill=lamp)
    return (x - 2 * w, base - h - 2 * w, x + 2 * w, base), draw
  if kind == "tree":
    tw, th, cr = 0.12 * ph, 0.9 * ph, ph * rng.uniform(0.45, 0.7)
    leaf = tuple(int(v) for v in (rng.uniform(30, 80), rng.uniform(90, 150),
                                  rng.uniform(30, 70)))
    blobs = [(x + rng.normal(0, cr * 0.3), base - th - rng.uniform(0, cr * 0.6),
              cr * rng.uniform(0.5, 0.8)) for _ in range(4)]

    def draw(d):
      d.rectangle([x - tw / 2, base - th, x + tw / 2, base], fill=(90, 60, 35))
      for bx, by, br in blobs:
        d.ellipse([bx - br, by - br, bx + br, by + br], fill=leaf)
    return (x - 1.5 * cr, base - th - 1.6 * cr, x + 1.5 * cr, base), draw
  if kind == "bin":
    w, h = 0.35 * ph, 0.5 * ph
    colour, band = _random_colour(rng), _random_colour(rng)

    def draw(d):
      d.rectangle([x - w / 2, base - h, x + w / 2, base], fill=colour)
      d.rectangle([x - w / 2, base - h * 0.7, x + w / 2, base - h * 0.55],
                  fill=band)
    return (x - w / 2, base - h, x + w / 2, base), draw
  if kind == "sign":  # striped panel on a pole: looks like a patterned shirt
    pw, ph_ = 0.45 * ph, 0.35 * ph
    top = base - 1.3 * ph
    cols = [_random_colour(rng), _random_colour(rng)]
    n = int(rng.integers(2, 6))
    vertical = rng.random() < 0.5

    def draw(d):
      d.rectangle([x - 0.03 * ph, top, x + 0.03 * ph, base], fill=(70, 70, 70))
      for i in range(n):
        if vertical:
          x0 = x - pw / 2 + i * pw / n
          d.rectangle([x0, top, x0 + pw / n, top + ph_], fill=cols[i % 2])
        else:
          y0 = top + i * ph_ / n
          d.rectangle([x - pw / 2, y0, x + pw / 2, y0 + ph_ / n],
                      fill=cols[i % 2])
    return (x - pw / 2, top, x + pw / 2, base), draw
  if kind == "bench":
    w, h = ph * rng.uniform(0.8, 1.3), 0.45 * ph
    colour = tuple(int(v) for v in rng.uniform(60, 150, 3))

    def draw(d):
      d.rectangle([x - w / 2, base - h, x + w / 2, base - h * 0.8], fill=colour)
      d.rectangle([x - w / 2, base - h * 0.55, x + w / 2, base - h * 0.42],
                  fill=colour)
      for lx in (x - w * 0.42, x + w * 0.42):
        d.rectangle([lx - 0.02 * ph, base - h * 0.45, lx + 0.02 * ph, base],
                    fill=(40, 40, 40))
    return (x - w / 2, base - h, x + w / 2, base), draw
  if kind == "car":
    w, h = ph * rng.uniform(1.8, 2.4), ph * 0.55
    body, glass = _random_colour(rng), (70, 90, 110)

    def draw(d):
      d.rounded_rectangle(
          [x - w / 2, base - h * 0.7, x + w / 2, base - h * 0.15],
          radius=h * 0.12, fill=body)
      d.polygon([(x - w * 0.3, base - h * 0.7), (x - w * 0.18, base - h),
                 (x + w * 0.2, base - h), (x + w * 0.32, base - h * 0.7)],
                fill=body)
      d.polygon([(x - w * 0.24, base - h * 0.72),
                 (x - w * 0.15, base - h * 0.94),
                 (x + w * 0.17, base - h * 0.94),
                 (x + w * 0.26, base - h * 0.72)], fill=glass)
      for wx in (x - w * 0.3, x + w * 0.3):
        d.ellipse([wx - h * 0.17, base - h * 0.34, wx + h * 0.17, base],
                  fill=(20, 20, 20))
    return (x - w / 2, base - h, x + w / 2, base), draw
  # bush: low, typically in front of someone's legs.
  w, h = ph * rng.uniform(0.6, 1.1), ph * rng.uniform(0.25, 0.4)
  leaf = tuple(int(v) for v in (rng.uniform(30, 70), rng.uniform(90, 140),
                                rng.uniform(30, 60)))
  blobs = [(x + rng.uniform(-0.35, 0.35) * w, rng.uniform(0.45, 0.6) * h,
            rng.uniform(0.3, 0.45) * w) for _ in range(4)]

  def draw(d):
    for bx, bh_, br in blobs:
      d.ellipse([bx - br, base - 2 * bh_, bx + br, base], fill=leaf)
  x0 = min(bx - br for bx, _, br in blobs)
  x1 = max(bx + br for bx, _, br in blobs)
  return (x0, base - 2 * max(b[1] for b in blobs), x1, base), draw


_CLUTTER_KINDS = ("pole", "tree", "bin", "sign", "bench", "car", "bush")


def _overlap(a, b) -> float:
  """Intersection area of two (x0, y0, x1, y1) boxes."""
  return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
      0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(a) -> float:
  return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def render_scene(config: SyntheticConfig, cam: _Camera,
                 people: Sequence[tuple[Appearance, bool]],
                 rng: np.random.Generator):
  """Draws one scene.

  Args:
    people: (appearance, required) per person; required people (labeled
      identities and the first person) are always placed, others are dropped
      when no placement with limited overlap is found.
  Returns:
    image uint8 [H, W, 3], boxes [n, 4] int64 (x, y, w, h), placed [n] int64
    index into `people`, ishard [n] int64.
  """
  hh, ww = cam.height, cam.width
  bg, hy = _background(cam, rng)
  canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
  hmax = min(float(config.max_person_height), 0.72 * hh)
  hmin = min(float(config.min_person_height), 0.5 * hmax)
  ground = hh - hy

  def person_height(foot):
    return hmin + (hmax - hmin) * (foot - hy) / ground

  placed = []  # (foot y, box x0y0x1y1, rgb, alpha, person index)
  for idx, (app, required) in enumerate(people):
    tries = 80 if required else 25
    for k in range(tries):
      if k % 8 == 0:  # new depth/size every few tries
        foot = hy + ground * rng.uniform(0.08, 1.0)
        ph = max(12.0, person_height(foot) * rng.uniform(0.9, 1.1))
        rgb, alpha = render_person(app, int(round(ph)), rng)
        ah, aw = alpha.shape
        foot = min(max(foot, float(ah)), float(hh))
      if aw >= ww:
        continue
      x0 = float(rng.integers(0, ww - aw + 1))
      y0 = float(int(foot) - ah)
      box = (x0, y0, x0 + aw, y0 + ah)
      limit = 0.3 + (0.5 * k / tries if required else 0.0)
      if all(_overlap(box, p[1]) <= limit * min(_area(box), _area(p[1]))
             and box != p[1] for p in placed):
        placed.append((float(int(foot)), box, rgb, alpha, idx))
        break
    else:
      if required:
        raise RuntimeError(
            f"could not place a labeled person in a {hh}x{ww} scene; lower "
            "max_persons or max_person_height, or raise image_scale")

  # Clutter: some anywhere, some right in front of a person (occluders).
  objects = []  # (base y, box, draw)
  for _ in range(int(rng.integers(2, 7))):
    for _ in range(10):
      if placed and rng.random() < 0.35:
        target = placed[int(rng.integers(len(placed)))]
        kind = str(rng.choice(["bush", "bench", "bin"]))
        base = min(target[0] + rng.uniform(1, 0.06 * ground), hh - 1.0)
        x = rng.uniform(target[1][0], target[1][2])
      else:
        kind = str(rng.choice(_CLUTTER_KINDS))
        base = hy + ground * rng.uniform(0.0, 1.0)
        x = rng.uniform(0, ww)
      box, draw = _clutter(rng, kind, x, base,
                           max(8.0, person_height(base)))
      # Keep at least ~65% of every person behind it visible.
      if all(p[0] >= base or
             _overlap(box, p[1]) <= 0.35 * _area(p[1]) for p in placed):
        objects.append((base, box, draw))
        break

  # Draw back to front: persons and objects sorted by their ground contact.
  items = [(p[0], 1, i) for i, p in enumerate(placed)]
  items += [(o[0], 0, i) for i, o in enumerate(objects)]
  d = ImageDraw.Draw(canvas)
  for _, is_person, i in sorted(items):
    if is_person:
      _, box, rgb, alpha, _ = placed[i]
      patch = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
      mask = Image.fromarray(
          np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8))
      canvas.paste(patch, (int(box[0]), int(box[1])), mask)
    else:
      objects[i][2](d)

  # Camera: colour cast, brightness, optional defocus, sensor noise.
  if cam.blur > 0:
    canvas = canvas.filter(ImageFilter.GaussianBlur(cam.blur))
  img = np.asarray(canvas, np.float32)
  img = img * (np.array(cam.gains, np.float32) * np.float32(cam.brightness))
  img += rng.standard_normal(img.shape, np.float32) * np.float32(cam.noise)
  image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

  # ishard: a third or more of the box hidden by things drawn in front.
  boxes, index, ishard = [], [], []
  front = [(p[0], p[1]) for p in placed] + [(o[0], o[1]) for o in objects]
  for foot, box, _, _, idx in placed:
    x0, y0, x1, y1 = (int(v) for v in box)
    cover = np.zeros((y1 - y0, x1 - x0), bool)
    for depth, fb in front:
      if depth > foot:
        cx0, cy0 = max(int(fb[0]), x0) - x0, max(int(fb[1]), y0) - y0
        cx1, cy1 = min(int(math.ceil(fb[2])), x1) - x0, min(int(fb[3]), y1) - y0
        if cx1 > cx0 and cy1 > cy0:
          cover[cy0:cy1, cx0:cx1] = True
    boxes.append((x0, y0, x1 - x0, y1 - y0))
    index.append(idx)
    ishard.append(int(cover.mean() >= 1 / 3))
  order = np.argsort(index, kind="stable")
  return (image, np.asarray(boxes, np.int64).reshape(-1, 4)[order],
          np.asarray(index, np.int64)[order],
          np.asarray(ishard, np.int64)[order])


# ------------------------------------------------------------- assignment ---


def _assign(rng, num_ids: int, num_scenes: int, kmin: int, kmax: int,
            pmin: int, pmax: int, split: str):
  """Puts each identity in k distinct scenes, respecting scene capacities.

  Returns:
    capacity [num_scenes] people per scene, members: per scene the list of
    identities in it.
  """
  capacity = rng.integers(pmin, pmax + 1, num_scenes)
  k = rng.integers(kmin, kmax + 1, num_ids)
  free = capacity.copy()
  members = [[] for _ in range(num_scenes)]
  for i in np.argsort(-k, kind="stable"):
    avail = np.flatnonzero(free > 0)
    if avail.size < k[i]:
      raise ValueError(
          f"{split}: not enough room for {num_ids} identities in {num_scenes} "
          f"scenes of {pmin}-{pmax} people; raise num_{split}_scenes or "
          "max_persons, or lower the identity counts.")
    chosen = rng.choice(avail, size=k[i], replace=False,
                        p=free[avail] / free[avail].sum())
    for s in chosen:
      members[s].append(int(i))
      free[s] -= 1
  return capacity, members


# ---------------------------------------------------------------- writing ---


def _double(v) -> np.ndarray:
  return np.asarray(v, np.float64).reshape(1, -1)


def _struct(fields: Sequence[str], rows: Sequence[Sequence],
            shape: Optional[tuple] = None) -> np.ndarray:
  """A MATLAB struct array as loadmat returns it: object fields, 2-D shape."""
  arr = np.empty(shape or (1, len(rows)), dtype=[(f, object) for f in fields])
  flat = arr.reshape(-1)
  for j, row in enumerate(rows):
    for f, v in zip(fields, row):
      flat[f][j] = v
  return arr


def _cell(items: Sequence, column: bool = True) -> np.ndarray:
  arr = np.empty((len(items), 1) if column else (1, len(items)), dtype=object)
  for j, v in enumerate(items):
    arr.reshape(-1)[j] = v
  return arr


def _write_mat(path: str, mdict: dict):
  """savemat with a fixed header (scipy's holds the date) for byte-identity."""
  buf = io.BytesIO()
  scipy.io.savemat(buf, mdict, format="5")
  raw = bytearray(buf.getvalue())
  raw[:116] = _MAT_HEADER.ljust(116, b" ")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(bytes(raw))


def generate(out_dir: str, config: SyntheticConfig = SyntheticConfig(),
             verbose: bool = False) -> list[SceneRecord]:
  """Writes a dataset into out_dir (created; must not hold files).

  Returns the scene annotations (train scenes first, then test scenes), with
  `identity` indexing train identities (train scenes) or test identities in
  query order (test scenes), -1 unlabeled.
  """
  config.validate()
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty")
  t0 = time.time()
  cams = _make_cameras(config)
  # Every random stream of the test split is its own (split code 1), and test
  # identities are drawn before train ones: the test split (identities,
  # scenes, protocols) stays the same when only the train sizes change, so
  # runs on differently sized train sets are scored on the same test. (Only
  # a test passer-by drawn identical to a newly added train identity would
  # be re-drawn; with ~6e5 possible looks, a few people at most.)
  rng = np.random.default_rng((config.seed, 2))
  taken = set()
  test_ids = _sample_identities(rng, config.num_test_ids, taken)
  train_ids = _sample_identities(rng, config.num_train_ids, taken)
  # Global identity names: shuffled numbers, like CUHK-SYSU's "p1234".
  id_names = [f"p{n}" for n in rng.permutation(
      config.num_train_ids + config.num_test_ids) + 1]
  splits = {}
  for code, (split, ids, n_scenes, kmin, kmax) in enumerate((
      ("train", train_ids, config.num_train_scenes,
       config.min_train_appearances, config.max_train_appearances),
      ("test", test_ids, config.num_test_scenes,
       config.min_test_appearances, config.max_test_appearances))):
    srng = np.random.default_rng((config.seed, 5, code))
    splits[split] = _assign(srng, len(ids), n_scenes, kmin, kmax,
                            config.min_persons, config.max_persons, split)
    splits[split] += (srng.integers(config.num_cameras, size=n_scenes),)
  n_total = config.num_train_scenes + config.num_test_scenes
  # s{k}.jpg numbers, splits interleaved; test scenes keep their relative
  # order (the protocols index test scenes in number order).
  numbers = np.random.default_rng((config.seed, 6)).permutation(n_total) + 1
  numbers[config.num_train_scenes:] = np.sort(
      numbers[config.num_train_scenes:])[np.random.default_rng(
          (config.seed, 6, 1)).permutation(config.num_test_scenes)]

  img_dir = os.path.join(out_dir, "Image", "SSM")
  os.makedirs(img_dir, exist_ok=True)
  records = []
  for j in range(n_total):
    split = "train" if j < config.num_train_scenes else "test"
    local = j if split == "train" else j - config.num_train_scenes
    ids = train_ids if split == "train" else test_ids
    capacity, members, camera_of = splits[split]
    srng = np.random.default_rng((config.seed, 3, int(split == "test"),
                                  local))
    ident = list(members[local])
    srng.shuffle(ident)
    people = [(ids[i], True) for i in ident]
    while len(people) < capacity[local]:
      a = _sample_appearance(srng)
      if a.key() not in taken:  # distractors never look like an identity
        people.append((a, not people))
    cam = cams[int(camera_of[local])]
    image, boxes, index, ishard = render_scene(config, cam, people, srng)
    identity = np.array([ident[i] if i < len(ident) else -1 for i in index],
                        np.int64)
    name = f"s{numbers[j]}.jpg"
    Image.fromarray(image).save(os.path.join(img_dir, name), "JPEG",
                                quality=config.jpeg_quality)
    records.append(SceneRecord(name, split, int(camera_of[local]),
                               cam.height, cam.width, boxes, identity,
                               ishard,
                               [people[i][0].key() for i in index]))
    if verbose and (j + 1) % 100 == 0:
      print(f"  {j + 1}/{n_total} scenes, {time.time() - t0:.1f}s",
            flush=True)

  # Queries: one per test identity, in a random order that numbers them.
  qrng = np.random.default_rng((config.seed, 4))
  query_order = qrng.permutation(config.num_test_ids)
  renumber = np.empty_like(query_order)
  renumber[query_order] = np.arange(config.num_test_ids)
  test_records = [r for r in records if r.split == "test"]
  for r in test_records:
    r.identity = np.where(r.identity >= 0, renumber[np.maximum(r.identity, 0)],
                          -1)
  _write_annotations(out_dir, config, records, train_ids, id_names, qrng)
  manifest = {
      "generator": "oim_jax.data.synthetic",
      "version": GENERATOR_VERSION,
      "config": config.to_json(),
      "counts": _counts(records),
  }
  with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return records


def _counts(records: Sequence[SceneRecord]) -> dict:
  out = {}
  for split in ("train", "test"):
    rs = [r for r in records if r.split == split]
    out[f"{split}_scenes"] = len(rs)
    out[f"{split}_boxes"] = int(sum(len(r.boxes) for r in rs))
    out[f"{split}_labeled_boxes"] = int(sum((r.identity >= 0).sum()
                                            for r in rs))
    out[f"{split}_hard_boxes"] = int(sum(r.ishard.sum() for r in rs))
  return out


def _write_annotations(root, config, records, train_ids, id_names, qrng):
  """Images.mat, pool.mat, Train.mat and TestG{G}.mat (DESIGN.md §6)."""
  ann = os.path.join(root, "annotation")
  proto_dir = os.path.join(ann, "test", "train_test")
  by_number = sorted(records, key=lambda r: int(r.name[1:-4]))
  img = _struct(("imname", "nAppear", "box"), [
      (r.name, _double(len(r.boxes)),
       _struct(("idlocate", "ishard"),
               [(_double(b), _double(h)) for b, h in zip(r.boxes, r.ishard)]))
      for r in by_number])
  _write_mat(os.path.join(ann, "Images.mat"), {"Img": img})
  pool = [r.name for r in by_number if r.split == "test"]
  _write_mat(os.path.join(ann, "pool.mat"), {"pool": _cell(pool)})

  # Train: one cell per identity, its scenes in scene-number order.
  scenes = [[] for _ in train_ids]
  for r in by_number:
    if r.split == "train":
      for b, i, h in zip(r.boxes, r.identity, r.ishard):
        if i >= 0:
          scenes[i].append((r.name, _double(b), _double(h)))
  train = _cell([
      _struct(("idname", "nAppear", "scene"),
              [(id_names[i], _double(len(sc)),
                _struct(("imname", "idlocate", "ishard"), sc))])
      for i, sc in enumerate(scenes)])
  _write_mat(os.path.join(proto_dir, "Train.mat"), {"Train": train})

  # Test protocols: positives first (query image excluded), then negatives
  # from a per-query permutation, so TestG100 extends TestG50.
  num_q = config.num_test_ids
  where = [[] for _ in range(num_q)]  # (record, box, ishard) per test id
  for r in by_number:
    if r.split == "test":
      for b, i, h in zip(r.boxes, r.identity, r.ishard):
        if i >= 0:
          where[i].append((r, b, h))
  test_names = [r.name for r in by_number if r.split == "test"]
  protocols = {g: [] for g in config.gallery_sizes}
  queries = []
  for q in range(num_q):
    apps = where[q]
    qi = int(qrng.integers(len(apps)))
    qrec, qbox, qhard = apps[qi]
    queries.append(_struct(("imname", "idlocate", "ishard", "idname"), [(
        qrec.name, _double(qbox), _double(qhard),
        id_names[config.num_train_ids + q])]))
    positives = [apps[i] for i in qrng.permutation(len(apps)) if i != qi]
    holding = {r.name for r, _, _ in apps}
    negatives = [test_names[i] for i in qrng.permutation(len(test_names))
                 if test_names[i] not in holding]
    for g in config.gallery_sizes:
      rows = [(r.name, _double(b), _double(h)) for r, b, h in positives]
      rows += [(n, np.zeros((1, 0)), _double(0))
               for n in negatives[:g - len(rows)]]
      protocols[g].append(_struct(("imname", "idlocate", "ishard"), rows))
  for g in config.gallery_sizes:
    var = f"TestG{g}"
    _write_mat(os.path.join(proto_dir, var + ".mat"), {var: _struct(
        ("Query", "Gallery"), list(zip(queries, protocols[g])))})


# ----------------------------------------------------------------- ensure ---


def _read_manifest(root: str) -> Optional[dict]:
  path = os.path.join(root, MANIFEST_NAME)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _matches(manifest: Optional[dict], config: SyntheticConfig) -> bool:
  return bool(manifest) and manifest.get("version") == GENERATOR_VERSION and (
      manifest.get("config") == config.to_json())


def ensure_synthetic(root: str, regenerate: bool = False,
                     verbose: bool = False, **size_kwargs) -> str:
  """Returns root, generating the dataset there first if it is absent.

  Generation happens in a temporary sibling directory renamed into place, so
  a crash never leaves a half dataset at root. An existing dataset whose
  manifest records other parameters (or another generator version) is an
  error unless regenerate=True, which replaces it.

  Args:
    root: dataset directory.
    regenerate: replace a synthetic dataset generated with other parameters.
    verbose: print progress.
    **size_kwargs: SyntheticConfig fields (seed, num_train_ids, ...).
  """
  try:
    config = SyntheticConfig(**size_kwargs)
  except TypeError as e:
    fields = [f.name for f in dataclasses.fields(SyntheticConfig)]
    raise TypeError(f"ensure_synthetic: {e}; valid parameters: {fields}") from e
  if isinstance(config.gallery_sizes, list):
    config = dataclasses.replace(config,
                                 gallery_sizes=tuple(config.gallery_sizes))
  config.validate()
  root = os.path.abspath(root)
  manifest = _read_manifest(root)
  if _matches(manifest, config):
    return root
  if manifest is not None and not regenerate:
    raise StaleDatasetError(
        f"{root} holds a synthetic dataset generated with other parameters "
        f"(version {manifest.get('version')}, config {manifest.get('config')})"
        f"; wanted version {GENERATOR_VERSION}, config {config.to_json()}. "
        "Pass regenerate=True (CLI: --regenerate) or choose another root.")
  if manifest is None and os.path.isdir(root) and os.listdir(root):
    raise FileExistsError(
        f"{root} exists, is not empty and holds no {MANIFEST_NAME}: refusing "
        "to write a synthetic dataset over it; choose an empty or new path.")
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    generate(tmp, config, verbose=verbose)
    if manifest is not None:  # regenerate: swap the old one out first
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-",
                             dir=parent)
      os.rename(root, os.path.join(old, "data"))
      os.rename(tmp, root)
      shutil.rmtree(old, ignore_errors=True)
    else:
      try:
        os.rename(tmp, root)  # also replaces an empty directory
      except OSError:
        # Another process finished first: fine if it made the same data.
        if not _matches(_read_manifest(root), config):
          raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


# ---------------------------------------------------------------- preview ---


def save_preview(root: str, records: Sequence[SceneRecord], path: str,
                 num_scenes: int = 6, columns: int = 3, tile_hw=(330, 480)):
  """Saves a grid of scenes with their boxes: green = labeled (train id t#,
  test id q#), orange = unlabeled. Picks the busiest scenes of each split."""
  chosen = []
  for split in ("train", "test"):
    rs = [r for r in records if r.split == split]
    rs = sorted(rs, key=lambda r: (-len(r.boxes), r.name))
    seen, picks = set(), []
    for r in rs:  # prefer distinct cameras
      if r.camera not in seen:
        picks.append(r)
        seen.add(r.camera)
      if len(picks) == num_scenes // 2:
        break
    chosen += picks
  rows = math.ceil(len(chosen) / columns)
  th, tw = tile_hw
  grid = Image.new("RGB", (columns * tw, rows * th + 16), (255, 255, 255))
  ImageDraw.Draw(grid).text(
      (5, rows * th + 2), "green: labeled person (t# = train identity, q# = "
      "test identity / query number); orange: unlabeled person",
      fill=(0, 0, 0))
  for k, r in enumerate(chosen):
    im = Image.open(os.path.join(root, "Image", "SSM", r.name)).convert("RGB")
    d = ImageDraw.Draw(im)
    for (x, y, w, h), i in zip(r.boxes, r.identity):
      colour = (0, 230, 0) if i >= 0 else (255, 150, 0)
      d.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
      if i >= 0:
        text = f"{'t' if r.split == 'train' else 'q'}{i}"
        d.rectangle([x, y, x + 6 * len(text) + 3, y + 11], fill=(0, 0, 0))
        d.text((x + 2, y), text, fill=colour)
    scale = min((tw - 10) / im.width, (th - 24) / im.height)
    im = im.resize((int(im.width * scale), int(im.height * scale)),
                   Image.BILINEAR)
    ox, oy = (k % columns) * tw + 5, (k // columns) * th + 18
    grid.paste(im, (ox, oy))
    ImageDraw.Draw(grid).text(
        (ox, oy - 14), f"{r.split} {r.name}  camera {r.camera}  "
        f"{r.width}x{r.height}", fill=(0, 0, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid.quantize(256).save(path, optimize=True)  # 256 colours: ~3x smaller


# -------------------------------------------------------------------- CLI ---


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(
      prog="python -m oim_jax.data.synthetic",
      description="Write a synthetic person-search dataset in the CUHK-SYSU "
      "on-disk format.")
  parser.add_argument("--out", required=True, help="dataset root to create")
  parser.add_argument("--regenerate", action="store_true",
                      help="replace a dataset made with other parameters")
  parser.add_argument("--preview", default="",
                      help="also save a PNG grid of scenes with boxes here")
  for f in dataclasses.fields(SyntheticConfig):
    default = f.default
    if isinstance(default, tuple):
      parser.add_argument(f"--{f.name}", default=default,
                          type=lambda s: tuple(int(v) for v in s.split(",")),
                          help=f"comma-separated (default {default})")
    else:
      parser.add_argument(f"--{f.name}", type=type(default), default=default,
                          help=f"(default {default})")
  args = parser.parse_args(argv)
  kwargs = {f.name: getattr(args, f.name)
            for f in dataclasses.fields(SyntheticConfig)}
  config = SyntheticConfig(**kwargs)
  root = os.path.abspath(args.out)
  t0 = time.time()
  existed = _matches(_read_manifest(root), config)
  if args.preview and not existed:
    # Generate here (not through ensure) to keep the records for the picture.
    if args.regenerate and os.path.isdir(root):
      shutil.rmtree(root)
    records = generate(root, config, verbose=True)
    save_preview(root, records, args.preview)
  else:
    ensure_synthetic(root, regenerate=args.regenerate, verbose=True, **kwargs)
  manifest = _read_manifest(root)
  print(("found existing" if existed else "generated") +
        f" {root} in {time.time() - t0:.1f}s: {manifest['counts']}")


if __name__ == "__main__":
  main(sys.argv[1:])
