"""RoIAlign on NHWC feature maps with torchvision's numbers (and gradient).

Follows torchvision's CPU kernel (``roi_align_kernel.cpp``) exactly:
  * box coordinates are scaled by ``spatial_scale``; ``aligned=True`` shifts
    them by -0.5 pixel; ``aligned=False`` forces roi width/height >= 1;
  * each of the ``out_h x out_w`` bins averages ``sampling_ratio^2`` samples
    on a regular grid, at ``start + p * bin + (i + 0.5) * bin / sampling_ratio``;
  * a sample with y < -1 or y > H (or x < -1 or x > W) contributes 0;
    otherwise y is clamped to >= 0, and at the last row (y_low >= H - 1) it
    sticks to row H - 1; then bilinear interpolation of the 4 neighbours.
The bilinear weights and the "outside" test both factor into a y part and an
x part, which is what both formulations below use:

  * ``"gather"``: per (sample, corner) a gather of C-vectors from the
    flattened map, weighted and summed, over chunks of RoIs: memory
    O(K * out_h * out_w * C); gradient = scatter-adds.
  * ``"einsum"``: the interpolation weights as dense matrices Wy[K, out_h, H]
    and Wx[K, out_w, W] contracted with the map (two matmuls, no gathers),
    computed over chunks of RoIs to bound the [chunk, out, H or W, C]
    intermediate.

``roi_align_per_image`` takes K boxes per image ([N, K, 4], the RoI heads'
layout) and has a hand-written gradient: per image, sum_k Wy_k^T g_k Wx_k as
two matmuls (the "einsum" matrices) instead of the gather's scatter-adds:
the same numbers up to float rounding, ~3x faster than the scatter-adds on
CPU at the synthetic RoI head's shapes (3 % of its train step), and free of
scatter-add atomics (deterministic on GPU).

Boxes get no gradient (as torchvision, which returns none for the rois);
the gradient w.r.t. the features is that of torchvision (autodiff of the same
linear map). ``sampling_ratio`` must be > 0 (torchvision's adaptive mode, 0,
needs data-dependent shapes).
"""

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

# Default formulation per backend. CPU: measured by bench/bench_ops.py (see
# bench/results/ops.md). GPU/TPU: gathers are cheap on GPU; TPUs prefer
# matmuls over gathers (not measured here).
DEFAULT_METHOD = {"cpu": "gather", "gpu": "gather", "cuda": "gather",
                  "rocm": "gather", "tpu": "einsum"}
# RoIs per chunk (lax.map): bounds the einsum intermediate [chunk, out, H, C]
# and the gather backward's scatter updates [4 r^2 chunk, out_h, out_w, C].
CHUNK = 64


def _axis_samples(start, bin_size, out: int, ratio: int, size: int):
  """Per-axis sample indices and bilinear weights (torchvision rules).

  Args:
    start: ``[K]`` roi start on this axis (feature-map pixels).
    bin_size: ``[K]`` bin size on this axis.
    out: number of bins.
    ratio: samples per bin.
    size: map extent on this axis (H or W).

  Returns:
    ``(low, high, w_low, w_high)``, each ``[K, out, ratio]``: neighbour indices
    (int32) and their weights (0 for samples outside the map).
  """
  p = jnp.arange(out, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(ratio, dtype=jnp.float32)[None, None, :]
  start = start[:, None, None]
  bin_size = bin_size[:, None, None]
  # Same float32 evaluation order as the C++ kernel.
  coord = start + p * bin_size + (i + 0.5) * bin_size / jnp.float32(ratio)
  inside = (coord >= -1.0) & (coord <= size)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_end = low >= size - 1
  low = jnp.where(at_end, size - 1, low)
  high = jnp.where(at_end, size - 1, low + 1)
  coord = jnp.where(at_end, low.astype(jnp.float32), coord)
  frac = coord - low.astype(jnp.float32)
  w_low = jnp.where(inside, 1.0 - frac, 0.0)
  w_high = jnp.where(inside, frac, 0.0)
  return low, high, w_low, w_high


def _roi_geometry(boxes, spatial_scale, out_hw, aligned):
  boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  offset = 0.5 if aligned else 0.0
  scaled = boxes * jnp.float32(spatial_scale) - offset
  x1, y1, x2, y2 = (scaled[:, j] for j in range(4))
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  return x1, y1, roi_h / out_hw[0], roi_w / out_hw[1]


def _gather_chunk(features, box_indices, ys, xs, ratio):
  """One row gather per (sample, corner) from the flattened map, summed."""
  n, h, w, c = features.shape
  ylo, yhi, wylo, wyhi = ys  # [k, oh, r]
  xlo, xhi, wxlo, wxhi = xs  # [k, ow, r]
  flat = features.reshape(n * h * w, c)
  # Every index is in bounds by construction (clamped samples, clipped image
  # index), which lets XLA skip per-element bounds handling.
  img = jnp.clip(box_indices.astype(jnp.int32), 0, n - 1)
  base = img[:, None, None] * (h * w)
  out = None
  for iy in range(ratio):
    for yi, wy in ((ylo[..., iy], wylo[..., iy]), (yhi[..., iy], wyhi[..., iy])):
      for ix in range(ratio):
        for xi, wx in ((xlo[..., ix], wxlo[..., ix]),
                       (xhi[..., ix], wxhi[..., ix])):
          idx = base + yi[:, :, None] * w + xi[:, None, :]  # [k, oh, ow]
          wgt = wy[:, :, None] * wx[:, None, :]
          term = flat.at[idx].get(mode="promise_in_bounds") * wgt[..., None]
          out = term if out is None else out + term
  return out / jnp.float32(ratio * ratio)


def _roi_align_gather(features, box_indices, ys, xs, ratio, chunk):
  # Chunks of RoIs bound the memory, forward and backward (XLA merges the
  # per-term scatter-adds into one with 4 * ratio^2 times the updates).
  return _map_chunks(
      lambda a: _gather_chunk(features, a[0], a[1], a[2], ratio),
      (box_indices, ys, xs), chunk)


def _map_chunks(fn, args, chunk):
  """lax.map of ``fn`` over chunks of the leading (RoI) axis of ``args``."""
  k = jax.tree.leaves(args)[0].shape[0]
  chunk = max(1, min(int(chunk), k))
  if chunk == k:
    return fn(args)
  pad = -k % chunk
  steps = (k + pad) // chunk

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((steps, chunk) + a.shape[1:])

  out = lax.map(fn, jax.tree.map(split, args))
  return out.reshape((k + pad,) + out.shape[2:])[:k]


def _axis_matrix(low, high, w_low, w_high, size, ratio):
  """[K, out, r] samples -> [K, out, size] averaged interpolation weights."""
  grid = jnp.arange(size, dtype=jnp.int32)
  m = (jnp.where(low[..., None] == grid, w_low[..., None], 0.0) +
       jnp.where(high[..., None] == grid, w_high[..., None], 0.0))
  return jnp.sum(m, axis=2) / jnp.float32(ratio)


def _einsum_one_image(fmap, wy, wx, chunk):
  """fmap [H, W, C], wy [K, oh, H], wx [K, ow, W] -> [K, oh, ow, C].

  The weights go to the map's dtype (bfloat16 models read bfloat16, not a
  float32 copy of the map; TPU matmuls round float32 operands to bfloat16
  at default precision anyway); products accumulate in float32.
  """
  h, w, _ = fmap.shape
  wy, wx = wy.astype(fmap.dtype), wx.astype(fmap.dtype)
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def one_chunk(args):
    wy_c, wx_c = args
    if w >= h:  # contract the longer axis first: smaller intermediate
      t = mm("kjw,hwc->kjhc", wx_c, fmap).astype(fmap.dtype)
      return mm("kih,kjhc->kijc", wy_c, t)
    t = mm("kih,hwc->kiwc", wy_c, fmap).astype(fmap.dtype)
    return mm("kjw,kiwc->kijc", wx_c, t)

  return _map_chunks(one_chunk, (wy, wx), chunk)


def _roi_align_einsum(features, box_indices, ys, xs, ratio, chunk):
  n, h, w, c = features.shape
  wy = _axis_matrix(*ys, h, ratio)  # [K, oh, H]
  wx = _axis_matrix(*xs, w, ratio)  # [K, ow, W]
  if n == 1:
    return _einsum_one_image(features[0], wy, wx, chunk)
  # Boxes of any image: the image one-hot joins the first contraction
  # (roi_align_per_image avoids it when the boxes are grouped by image).
  img = jax.nn.one_hot(box_indices, n, dtype=features.dtype)  # [K, N]
  x_first = w >= h

  def one_chunk(args):
    wy_c, wx_c, img_c = args
    if x_first:
      t = jnp.einsum("kjw,kn,nhwc->kjhc", wx_c, img_c, features)
      return jnp.einsum("kih,kjhc->kijc", wy_c, t)
    t = jnp.einsum("kih,kn,nhwc->kiwc", wy_c, img_c, features)
    return jnp.einsum("kjw,kiwc->kijc", wx_c, t)

  return _map_chunks(one_chunk, (wy, wx, img), chunk)


def _check_ratio(sampling_ratio) -> int:
  ratio = int(sampling_ratio)
  if ratio <= 0:
    raise ValueError(
        f"roi_align: sampling_ratio must be > 0 (got {sampling_ratio}); the "
        "adaptive mode (<= 0) needs data-dependent shapes: pass e.g. 2")
  return ratio


def _pair(output_size) -> tuple[int, int]:
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  return tuple(int(v) for v in output_size)


# Elements of the backward's [chunk, H, out_w, C] intermediate per chunk of
# RoIs (32 MiB in float32; ResNet-50's C4 at 928x1504 with 14x14 RoIs takes
# chunks of 10).
_BACKWARD_ELEMENTS = 8 * 1024 * 1024


def roi_align_per_image(features, boxes,
                        output_size: Union[int, Sequence[int]] = (14, 14),
                        spatial_scale: float = 1.0 / 16,
                        sampling_ratio: int = 2,
                        aligned: bool = False,
                        method: Optional[str] = None,
                        chunk: int = CHUNK):
  """RoIAlign of K boxes per image, with a matmul gradient.

  The forward is ``roi_align`` of the flattened boxes (same numbers); the
  gradient w.r.t. the features is computed per image as
  sum_k Wy_k^T g_k Wx_k (module docstring).

  Args:
    features: ``[N, H, W, C]`` feature maps.
    boxes: ``[N, K, 4]``, K boxes (x1, y1, x2, y2, image pixels) of each
      image (no gradient).
    output_size, spatial_scale, sampling_ratio, aligned, method, chunk: as
      ``roi_align`` (method and chunk concern the forward).

  Returns:
    ``[N, K, out_h, out_w, C]`` in the dtype of ``features``.
  """
  features = jnp.asarray(features)
  boxes = jnp.asarray(boxes)
  if (features.ndim != 4 or boxes.ndim != 3 or boxes.shape[2] != 4
      or boxes.shape[0] != features.shape[0]):
    raise ValueError(
        f"roi_align_per_image: expected features [N, H, W, C] and boxes "
        f"[N, K, 4], got {features.shape} and {boxes.shape}")
  if method is None:
    method = DEFAULT_METHOD.get(jax.default_backend(), "gather")
  n, h, w, c = features.shape
  static = (_pair(output_size), float(spatial_scale),
            _check_ratio(sampling_ratio), bool(aligned), method, int(chunk),
            (n, h, w, c), jnp.dtype(features.dtype).name)
  return _per_image(features, lax.stop_gradient(boxes.astype(jnp.float32)),
                    static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _per_image(features, boxes, static):
  out_hw, scale, ratio, aligned, method, chunk = static[:6]
  n, k = boxes.shape[:2]
  if method == "einsum":
    # Each image's boxes against its own map: no [K, N] image one-hot.
    wy, wx = _weight_matrices(boxes, out_hw, scale, ratio, aligned,
                              features.shape[1:3])
    out = jax.vmap(functools.partial(_einsum_one_image, chunk=chunk))(
        features, wy, wx)
    return out.astype(features.dtype)
  idx = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
  out = roi_align(features, boxes.reshape(n * k, 4), idx, out_hw, scale,
                  ratio, aligned, method, chunk)
  return out.reshape((n, k) + out.shape[1:])


def _weight_matrices(boxes, out_hw, scale, ratio, aligned, hw):
  """boxes [N, K, 4] -> Wy [N, K, oh, H], Wx [N, K, ow, W] (float32)."""
  (n, k), (oh, ow), (h, w) = boxes.shape[:2], out_hw, hw
  x1, y1, bin_h, bin_w = _roi_geometry(boxes.reshape(n * k, 4), scale,
                                       out_hw, aligned)
  wy = _axis_matrix(*_axis_samples(y1, bin_h, oh, ratio, h), h, ratio)
  wx = _axis_matrix(*_axis_samples(x1, bin_w, ow, ratio, w), w, ratio)
  return wy.reshape(n, k, oh, h), wx.reshape(n, k, ow, w)


def _per_image_fwd(features, boxes, static):
  return _per_image(features, boxes, static), boxes


def _per_image_bwd(static, boxes, g):
  """g [N, K, oh, ow, C] -> (d features [N, H, W, C], zero d boxes)."""
  (oh, ow), scale, ratio, aligned, _, _, (n, h, w, c), dtype = static
  k = boxes.shape[1]
  wy, wx = _weight_matrices(boxes, (oh, ow), scale, ratio, aligned, (h, w))
  g = g.astype(jnp.float32)  # accumulate in float32 (bfloat16 models too)
  # The y contraction first: [chunk, H, ow, C] per image is the largest
  # intermediate; chunks of RoIs bound it and accumulate.
  step = max(1, min(k, _BACKWARD_ELEMENTS // max(1, h * ow * c)))
  pad = -k % step
  if pad:  # zero weights: padded RoIs add nothing
    wy = jnp.pad(wy, ((0, 0), (0, pad), (0, 0), (0, 0)))
    wx = jnp.pad(wx, ((0, 0), (0, pad), (0, 0), (0, 0)))
    g = jnp.pad(g, ((0, 0), (0, pad)) + ((0, 0),) * 3)
  parts = (k + pad) // step

  def chunk_grad(acc, args):
    wy_c, wx_c, g_c = args  # [n, step, ...]
    t = jnp.einsum("nkph,nkpqc->nkhqc", wy_c, g_c)
    return acc + jnp.einsum("nkhqc,nkqw->nhwc", t, wx_c), None

  split = lambda a: jnp.moveaxis(
      a.reshape((n, parts, step) + a.shape[2:]), 1, 0)
  acc = jnp.zeros((n, h, w, c), jnp.float32)
  if parts == 1:
    grad, _ = chunk_grad(acc, (wy, wx, g))
  else:
    grad, _ = lax.scan(chunk_grad, acc, (split(wy), split(wx), split(g)))
  return grad.astype(dtype), jnp.zeros_like(boxes)


_per_image.defvjp(_per_image_fwd, _per_image_bwd)


def roi_align(features, boxes, box_indices,
              output_size: Union[int, Sequence[int]] = (14, 14),
              spatial_scale: float = 1.0 / 16,
              sampling_ratio: int = 2,
              aligned: bool = False,
              method: Optional[str] = None,
              chunk: int = CHUNK):
  """RoIAlign (average), = torchvision.ops.roi_align with NHWC layout.

  Args:
    features: ``[N, H, W, C]`` feature maps.
    boxes: ``[K, 4]`` (x1, y1, x2, y2) in image pixels (no gradient).
    box_indices: ``int[K]``, image of each box in ``features`` (0..N-1;
      out-of-range values are clipped).
    output_size: static (out_h, out_w) or an int.
    spatial_scale: feature-map pixels per image pixel (1/16 for C4).
    sampling_ratio: static samples per bin along each axis; must be > 0.
    aligned: torchvision's ``aligned`` (half-pixel shift, no minimum size).
    method: "gather" or "einsum"; None picks ``DEFAULT_METHOD`` for the
      default backend. Both give the same numbers.
    chunk: static number of RoIs processed at a time (memory bound).

  Returns:
    ``[K, out_h, out_w, C]`` in the dtype of ``features``.
  """
  features = jnp.asarray(features)
  if features.ndim != 4:
    raise ValueError(
        f"roi_align: features must be [N, H, W, C] (NHWC), got shape "
        f"{features.shape}")
  boxes = jnp.asarray(boxes)
  box_indices = jnp.asarray(box_indices)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or box_indices.shape != boxes.shape[:1]:
    raise ValueError(
        f"roi_align: expected boxes [K, 4] and box_indices [K], got "
        f"{boxes.shape} and {box_indices.shape}")
  out_h, out_w = _pair(output_size)
  ratio = _check_ratio(sampling_ratio)
  if method is None:
    method = DEFAULT_METHOD.get(jax.default_backend(), "gather")
  if method not in ("gather", "einsum"):
    raise ValueError(f"roi_align: method must be 'gather' or 'einsum', got "
                     f"{method!r}")
  _, h, w, _ = features.shape
  x1, y1, bin_h, bin_w = _roi_geometry(boxes, spatial_scale, (out_h, out_w),
                                       aligned)
  ys = _axis_samples(y1, bin_h, out_h, ratio, h)
  xs = _axis_samples(x1, bin_w, out_w, ratio, w)
  if method == "gather":
    out = _roi_align_gather(features, box_indices, ys, xs, ratio, chunk)
  else:
    out = _roi_align_einsum(features, box_indices, ys, xs, ratio, chunk)
  return out.astype(features.dtype)
