"""Tests for oim_jax.ops.roi_align against a NumPy loop port of torchvision."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax import ops

_OUT = (3, 4)
_SCALE = 0.5
_RATIO = 2


def _bilinear(h, w, y, x):
  """torchvision CPU kernel's per-sample rule: list of ((yi, xi), weight)."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return []
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return [((y_low, x_low), hy * hx), ((y_low, x_high), hy * lx),
          ((y_high, x_low), ly * hx), ((y_high, x_high), ly * lx)]


def _np_roi_align(feat, boxes, idx, out_hw, scale, ratio, aligned,
                  grad_out=None):
  """Forward (or, with grad_out, the backward scatter) in NCHW-free loops."""
  n, h, w, c = feat.shape
  oh, ow = out_hw
  out = np.zeros((len(boxes), oh, ow, c))
  grad = np.zeros(feat.shape)
  off = 0.5 if aligned else 0.0
  for k, (b, img) in enumerate(zip(boxes, idx)):
    x1, y1, x2, y2 = [float(v) * scale - off for v in b]
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / oh, rw / ow
    for ph in range(oh):
      for pw in range(ow):
        for iy in range(ratio):
          y = y1 + ph * bh + (iy + 0.5) * bh / ratio
          for ix in range(ratio):
            x = x1 + pw * bw + (ix + 0.5) * bw / ratio
            for (yi, xi), wt in _bilinear(h, w, y, x):
              out[k, ph, pw] += wt * feat[img, yi, xi] / ratio**2
              if grad_out is not None:
                grad[img, yi, xi] += wt * grad_out[k, ph, pw] / ratio**2
  return grad if grad_out is not None else out


def _case(seed=0):
  rng = np.random.default_rng(seed)
  feat = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
  boxes = np.array([
      [2.0, 3.0, 12.0, 10.0],     # inside
      [-6.0, -4.0, 5.0, 7.0],     # partly outside top-left
      [10.0, 8.0, 25.0, 19.0],    # past bottom-right (samples > H, W)
      [3.3, 4.1, 3.6, 4.2],       # tiny (non-aligned forces size 1)
      [-9.0, 1.0, 1.0, 30.0],     # mostly outside (x < -1, y > H)
      [0.0, 0.0, 18.0, 14.0],     # the whole map
  ], np.float32)
  idx = np.array([0, 1, 1, 0, 1, 0], np.int32)
  return feat, boxes, idx


@functools.partial(jax.jit, static_argnums=(3, 4))
def _ra(feat, boxes, idx, aligned, method):
  return ops.roi_align(feat, boxes, idx, _OUT, _SCALE, _RATIO, aligned,
                       method=method, chunk=4)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("method", ["gather", "einsum"])
def test_matches_torchvision_loop_port(aligned, method):
  feat, boxes, idx = _case()
  out = np.asarray(_ra(feat, boxes, idx, aligned, method))
  assert out.shape == (6,) + _OUT + (3,) and out.dtype == np.float32
  ref = _np_roi_align(feat, boxes, idx, _OUT, _SCALE, _RATIO, aligned)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(ref[2]).sum() > 0 and np.abs(ref[4]).sum() > 0


@pytest.mark.parametrize("method", ["gather", "einsum"])
def test_gradient_matches_loop_and_finite_differences(method):
  feat, boxes, idx = _case(1)
  g = np.random.default_rng(2).normal(size=(6,) + _OUT + (3,))
  loss = lambda f: jnp.sum(_ra(f, boxes, idx, False, method) * g)
  grad = np.asarray(jax.grad(loss)(feat))
  ref = _np_roi_align(feat, boxes, idx, _OUT, _SCALE, _RATIO, False,
                      grad_out=g)
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5)
  # Central differences on a few entries (the op is linear in the features,
  # so a large step is exact up to rounding).
  for pos in [(0, 2, 3, 1), (1, 0, 0, 0), (1, 6, 8, 2)]:
    e = np.zeros_like(feat)
    e[pos] = 1.0
    fd = (float(loss(feat + e)) - float(loss(feat - e))) / 2.0
    np.testing.assert_allclose(grad[pos], fd, rtol=1e-3, atol=1e-3)
  assert np.abs(grad).sum() > 0


@pytest.mark.parametrize("method", ["gather", "einsum"])
def test_constant_map_gives_constant(method):
  feat = np.full((2, 7, 9, 3), 2.5, np.float32)
  boxes = np.array([[0, 0, 18, 14], [-1, -1, 4, 3], [5.5, 2.2, 9.1, 13.0]],
                   np.float32)
  out = np.asarray(_ra(feat, boxes, np.array([0, 1, 1], np.int32), True,
                       method))
  np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_vmap_over_images():
  feat, boxes, idx = _case(3)
  fn = jax.jit(jax.vmap(
      lambda f, b: ops.roi_align(f[None], b, jnp.zeros(6, jnp.int32), _OUT,
                                 _SCALE, _RATIO, False)))
  out = np.asarray(fn(feat, np.stack([boxes, boxes[::-1]])))
  for i, b in enumerate([boxes, boxes[::-1]]):
    ref = _np_roi_align(feat[i:i + 1], b, np.zeros(6, int), _OUT, _SCALE,
                        _RATIO, False)
    np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-5)


def test_bad_sampling_ratio_is_rejected():
  feat, boxes, idx = _case()
  with pytest.raises(ValueError, match="sampling_ratio"):
    ops.roi_align(feat, boxes, idx, _OUT, _SCALE, 0)


@pytest.mark.parametrize("method", ["gather", "einsum"])
@pytest.mark.parametrize("aligned", [False, True])
def test_per_image_matches_loop_forward_and_gradient(aligned, method):
  feat, boxes, _ = _case(4)
  per_image = np.stack([boxes, boxes[::-1]])  # [2, 6, 4]: 6 boxes per image
  idx = np.repeat([0, 1], 6)
  g = np.random.default_rng(5).normal(size=(2, 6) + _OUT + (3,))

  def fn(f):
    return ops.roi_align_per_image(f, per_image, _OUT, _SCALE, _RATIO, aligned,
                                   method=method, chunk=4)  # 2 chunks + pad
  out = np.asarray(jax.jit(fn)(feat))
  flat = per_image.reshape(12, 4)
  np.testing.assert_allclose(
      out.reshape((12,) + _OUT + (3,)),
      _np_roi_align(feat, flat, idx, _OUT, _SCALE, _RATIO, aligned),
      rtol=1e-5, atol=1e-5)
  grad = np.asarray(jax.jit(jax.grad(
      lambda f: jnp.sum(fn(f) * g)))(feat))
  ref = _np_roi_align(feat, flat, idx, _OUT, _SCALE, _RATIO, aligned,
                      grad_out=g.reshape((12,) + _OUT + (3,)))
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(ref[0]).sum() > 0 and np.abs(ref[1]).sum() > 0


def test_per_image_einsum_keeps_bfloat16_maps_and_no_image_one_hot():
  feat, boxes, _ = _case(8)
  per_image = np.stack([boxes, boxes[::-1]])  # [2, 6, 4]
  feat16 = jnp.asarray(feat, jnp.bfloat16)
  fn = lambda f: ops.roi_align_per_image(f, per_image, _OUT, _SCALE, _RATIO,
                                         method="einsum")
  out = np.asarray(jax.jit(fn)(feat16), np.float32)
  # Against the reference on the bfloat16-rounded map: only the weights'
  # and the intermediate's bfloat16 rounding differ.
  ref = _np_roi_align(np.asarray(feat16, np.float32), per_image.reshape(12, 4),
                      np.repeat([0, 1], 6), _OUT, _SCALE, _RATIO, False)
  np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=3e-2,
                             atol=3e-2)
  # Nothing of the map's size in float32, and no [K, N] image one-hot.
  def check(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        assert not (v.aval.shape[-3:] == feat.shape[1:]
                    and v.aval.dtype == jnp.float32), eqn
        assert v.aval.shape != (12, 2), eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        check(sub)
      checked.append(eqn.primitive.name)
  checked = []
  check(jax.make_jaxpr(fn)(feat16).jaxpr)
  assert "dot_general" in checked  # the sub-jaxprs were visited


def test_per_image_gradient_in_chunks(monkeypatch):
  # A tiny chunk budget forces several accumulated chunks plus padding
  # (6 boxes in chunks of 4); the gradient must not change.
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module("oim_jax.ops.roi_align")
  feat, boxes, _ = _case(6)
  per_image = np.stack([boxes, boxes[::-1]])
  g = np.random.default_rng(7).normal(size=(2, 6) + _OUT + (3,))
  loss = lambda f: jnp.sum(ops.roi_align_per_image(
      f, per_image, _OUT, _SCALE, _RATIO) * g)
  whole = np.asarray(jax.grad(loss)(feat))
  monkeypatch.setattr(module, "_BACKWARD_ELEMENTS", 4 * 7 * _OUT[1] * 3)
  chunked = np.asarray(jax.grad(loss)(feat))
  ref = _np_roi_align(feat, per_image.reshape(12, 4), np.repeat([0, 1], 6),
                      _OUT, _SCALE, _RATIO, False,
                      grad_out=g.reshape((12,) + _OUT + (3,)))
  np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chunked, ref, rtol=1e-5, atol=1e-5)


def test_per_image_rejects_flat_boxes():
  feat, boxes, _ = _case()
  with pytest.raises(ValueError, match=r"\[N, K, 4\]"):
    ops.roi_align_per_image(feat, boxes)
