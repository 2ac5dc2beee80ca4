"""Test set-up: CPU only, and a persistent compilation cache so reruns are fast."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU flags train.py runs with (oim_jax/cpu_host/xla_flags.py), set before JAX
# starts: the tests check the code paths users run, and run faster.
from oim_jax.cpu_host import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top
xla_flags.use_fast_cpu_flags()

import jax  # noqa: E402

_CACHE = os.environ.get(
    "OIM_JAX_TEST_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "oim_jax_test_xla"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# NumPy references shared by the box, NMS and detection tests.

def np_decode(d, ref, w, clip=math.log(1000.0 / 16)):
  """torchvision box decoding, one box at a time (weights w, dw/dh clamp)."""
  out = np.zeros_like(d, np.float64)
  for i in range(len(d)):
    rw, rh = ref[i, 2] - ref[i, 0], ref[i, 3] - ref[i, 1]
    rx, ry = ref[i, 0] + 0.5 * rw, ref[i, 1] + 0.5 * rh
    cx = d[i, 0] / w[0] * rw + rx
    cy = d[i, 1] / w[1] * rh + ry
    pw = math.exp(min(d[i, 2] / w[2], clip)) * rw
    ph = math.exp(min(d[i, 3] / w[3], clip)) * rh
    out[i] = [cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2]
  return out


def np_greedy_nms(boxes, scores, thr, valid=None):
  """torchvision.ops.nms semantics: stable descending sort, suppress if IoU > thr."""
  boxes = boxes.astype(np.float32)
  ok = np.isfinite(scores) | (scores == np.inf)
  if valid is not None:
    ok &= valid
  cand = [i for i in np.argsort(-scores, kind="stable") if ok[i]]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in cand:
    if suppressed[i]:
      continue
    keep.append(i)
    # IoU of box i with every box, in float32 like the C++ kernel.
    w = np.maximum(np.float32(0), np.minimum(boxes[i, 2], boxes[:, 2]) -
                   np.maximum(boxes[i, 0], boxes[:, 0]))
    h = np.maximum(np.float32(0), np.minimum(boxes[i, 3], boxes[:, 3]) -
                   np.maximum(boxes[i, 1], boxes[:, 1]))
    inter = w * h
    union = area[i] + area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
      over = (union > 0) & (inter / union > thr)
    over[i] = False
    suppressed |= over
  return np.array(keep, np.int64)


# NumPy references for the 3x3 convolutions (test_conv, test_bench_winograd).

def conv3x3_out_size(n, stride):
  return (n - 1) // stride + 1  # padding 1, kernel 3


def np_conv3x3(x, k, stride):
  """Direct definition: y[n,y,x,d] = sum_{i,j,c} xpad[n,sy+i,sx+j,c] k[i,j,c,d]."""
  n, h, w, _ = x.shape
  ho, wo = conv3x3_out_size(h, stride), conv3x3_out_size(w, stride)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  y = np.zeros((n, ho, wo, k.shape[-1]))
  for i in range(3):
    for j in range(3):
      tap = xp[:, i:i + stride * (ho - 1) + 1:stride,
               j:j + stride * (wo - 1) + 1:stride]
      y += np.einsum("nhwc,cd->nhwd", tap, k[i, j].astype(np.float64))
  return y


def np_conv3x3_grads(x, k, g, stride):
  """Weight and input gradients of sum(conv3x3(x, k) * g), tap by tap."""
  n, h, w, _ = x.shape
  ho, wo = g.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  g = g.astype(np.float64)
  dk = np.zeros(k.shape)
  dxp = np.zeros(xp.shape)
  for i in range(3):
    for j in range(3):
      rows = slice(i, i + stride * (ho - 1) + 1, stride)
      cols = slice(j, j + stride * (wo - 1) + 1, stride)
      dk[i, j] = np.einsum("nhwc,nhwd->cd", xp[:, rows, cols], g)
      dxp[:, rows, cols] += np.einsum("nhwd,cd->nhwc", g, k[i, j])
  return dk, dxp[:, 1:h + 1, 1:w + 1]


# A synthetic dataset small enough for end-to-end tests: half-size scenes,
# 16 train scenes (8 identities), the 56 test scenes a 50-image gallery needs.
TINY_SYNTHETIC = dict(
    seed=0, num_train_ids=8, num_test_ids=10, num_train_scenes=16,
    num_test_scenes=56, image_scale=0.5, min_person_height=24,
    max_person_height=80, min_train_appearances=2, max_train_appearances=3,
    min_test_appearances=2, max_test_appearances=3, max_persons=4,
    gallery_sizes=(50,))


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
  from oim_jax.data import synthetic
  root = str(tmp_path_factory.mktemp("synthetic") / "data")
  return synthetic.ensure_synthetic(root, **TINY_SYNTHETIC)


def synthetic_config_module():
  """configs/synthetic.py as a module (configs/ is not a package)."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs",
                      "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_train_config(root: str, **train):
  """configs/synthetic.py shrunk for tests: tiny images, few steps."""
  c = synthetic_config_module().get_config()
  c.data.root = root
  c.data.synthetic.update(TINY_SYNTHETIC)
  c.data.min_size, c.data.max_size = 128, 192
  c.data.num_workers = 0
  c.oim.num_labeled = TINY_SYNTHETIC["num_train_ids"]
  c.oim.queue_size = 16
  c.model.rpn.pre_nms_top_n_train, c.model.rpn.post_nms_top_n_train = 200, 50
  c.model.rpn.pre_nms_top_n_test, c.model.rpn.post_nms_top_n_test = 100, 30
  c.model.roi.batch_size = 16
  c.model.roi.detections_per_image = 8
  c.model.embedding_dim = 16
  c.train.batch_size = 2
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.async_checkpoints = False
  c.eval.at_end = False
  c.eval.batch_size = 4
  c.update_from_flattened_dict({f"train.{k}": v for k, v in train.items()})
  return c


@pytest.fixture(scope="session")
def tiny_trained_workdir(tiny_synthetic_root, tmp_path_factory):
  """A workdir where the tiny model trained 2 steps and was evaluated."""
  from oim_jax import train_lib
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  config = tiny_train_config(tiny_synthetic_root, num_steps=2)
  config.eval.at_end = True
  config.eval.every_steps = 1  # also mid-training: a 2-point mAP curve
  result = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, result


def tiny_cli_flags(root: str) -> list[str]:
  """`tiny_train_config`'s settings as train.py / eval.py flags."""
  synthetic = [f"--config.data.synthetic.{k}=" +
               (f"({','.join(map(str, v))},)" if isinstance(v, tuple)
                else str(v)) for k, v in TINY_SYNTHETIC.items()]
  return [
      "--config=" + os.path.join(os.path.dirname(__file__), "..", "configs",
                                 "synthetic.py"),
      f"--config.data.root={root}", "--config.data.min_size=128",
      "--config.data.max_size=192", "--config.data.num_workers=0",
      f"--config.oim.num_labeled={TINY_SYNTHETIC['num_train_ids']}",
      "--config.oim.queue_size=16",
      "--config.model.rpn.pre_nms_top_n_train=200",
      "--config.model.rpn.post_nms_top_n_train=50",
      "--config.model.rpn.pre_nms_top_n_test=100",
      "--config.model.rpn.post_nms_top_n_test=30",
      "--config.model.roi.batch_size=16",
      "--config.model.roi.detections_per_image=8",
      "--config.model.embedding_dim=16", "--config.train.log_every=1",
      "--config.train.async_checkpoints=False", "--config.eval.batch_size=4",
      # The test process's compilation cache, shared with the subprocesses.
      f"--jax_compilation_cache_dir={_CACHE}",
      "--jax_persistent_cache_min_compile_time_secs=0.5",
      *synthetic]


def write_video(path: str, frames, fps: int = 4, codec: str = "ffv1"):
  """Writes uint8 [H, W, 3] frames (even H, W) as a video with PyAV.

  codec "ffv1" (in .mkv) is lossless: decoded frames equal the input;
  "mpeg4" / "libx264" (in .mp4) are lossy, as camera footage is.
  """
  import av
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
    for i, rgb in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), "rgb24")
      frame = frame.reformat(format=stream.pix_fmt)  # drops pts: set after
      frame.pts = i  # in 1/fps: the stream's rate
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
