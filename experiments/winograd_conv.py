"""3x3 stride-1 convolution (padding 1, NHWC / HWIO) by Winograd's minimal filtering.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR
2016): F(m x m, 3 x 3) computes an m x m output tile from a (m+2) x (m+2)
input tile d as

  Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise)

so a layer becomes (m+2)^2 independent [tiles, Cin] @ [Cin, Cout] matmuls,
one per position in the transformed tile, instead of 9 m^2 taps per tile:
F(4x4, 3x3) needs 36 multiplies per 16 outputs (144 for the direct form,
4x fewer), F(2x2, 3x3) 16 per 4 (2.25x fewer). The transforms are
additions with small constants, fused by XLA into loops over the data.
The parameters are the ordinary 3x3 kernel (the weight transform is part
of the function), so gradients are those of `conv3x3` up to float
rounding, which F(4x4) amplifies by its constants (up to 8 and 1/24):
~1e-6 relative in float32 (tests/test_bench_winograd.py).

A benchmark alternative, not used by the model (experiments/tiny_convs.py
measures it against XLA's convolution; BENCHMARKS.md has the numbers).
Why it was tried: the synthetic model's res5 3x3 convs (128 -> 128 over
128 RoIs of 7x7) are a third of the train step and already run at the
matmul peak, so only fewer multiplies could make them faster. 7x7 outputs
pad to 8x8 (64 / 49 of the work).
"""

import jax.numpy as jnp

# (B^T, G, A^T) per output tile size m; Lavin & Gray's interpolation points
# 0, +-1, (+-2,) infinity.
_MATRICES = {
    2: (((1, 0, -1, 0),
         (0, 1, 1, 0),
         (0, -1, 1, 0),
         (0, 1, 0, -1)),
        ((1, 0, 0),
         (1 / 2, 1 / 2, 1 / 2),
         (1 / 2, -1 / 2, 1 / 2),
         (0, 0, 1)),
        ((1, 1, 1, 0),
         (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0),
         (0, -4, -4, 1, 1, 0),
         (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0),
         (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0),
         (-1 / 6, -1 / 6, -1 / 6),
         (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6),
         (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0),
         (0, 1, -1, 2, -2, 0),
         (0, 1, 1, 4, 4, 0),
         (0, 1, -1, 8, -8, 1))),
}
TILE_SIZES = tuple(_MATRICES)


def _combine(coeffs, terms):
  """sum_k coeffs[k] * terms[k], skipping zero coefficients."""
  out = None
  for c, t in zip(coeffs, terms):
    if c == 0:
      continue
    t = t if c == 1 else (-t if c == -1 else t * c)
    out = t if out is None else out + t
  return out


def input_transform(x, m: int):
  """x: [N, H, W, C] -> V: [(m+2)^2, N * ceil(H/m) * ceil(W/m), C].

  B^T d B for every (m+2) x (m+2) input tile d (stride m, padding 1 on the
  top/left, zeros past the bottom/right), computed from strided slices of
  the padded map so that it fuses into one pass.
  """
  bt = _MATRICES[m][0]
  t = m + 2
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
  rows = [xp[:, r:r + m * (th - 1) + 1:m] for r in range(t)]
  rows = [_combine(bt[a], rows) for a in range(t)]  # [N, th, Wp, C] each
  out = []
  for ra in rows:
    cols = [ra[:, :, s:s + m * (tw - 1) + 1:m] for s in range(t)]
    out += [_combine(bt[b], cols) for b in range(t)]  # [N, th, tw, C]
  return jnp.stack(out).reshape(t * t, n * th * tw, c)


def weight_transform(kernel, m: int):
  """kernel: [3, 3, Cin, Cout] -> U = G g G^T: [(m+2)^2, Cin, Cout]."""
  g = _MATRICES[m][1]
  t = m + 2
  rows = [_combine(g[a], [kernel[i] for i in range(3)]) for a in range(t)]
  return jnp.stack([_combine(g[b], [r[j] for j in range(3)])
                    for r in rows for b in range(t)])


def output_transform(mt, m: int, n: int, h: int, w: int):
  """M: [(m+2)^2, N * th * tw, D] -> Y = A^T M A tiled: [N, H, W, D]."""
  at = _MATRICES[m][2]
  t = m + 2
  th, tw = -(-h // m), -(-w // m)
  d = mt.shape[-1]
  mt = mt.reshape(t, t, n, th, tw, d)
  rows = [_combine(at[p], [mt[a] for a in range(t)]) for p in range(m)]
  y = jnp.stack([jnp.stack([_combine(at[q], [r[b] for b in range(t)])
                            for q in range(m)], axis=3) for r in rows],
                axis=2)  # [N, th, m, tw, m, D]
  return y.reshape(n, th * m, tw * m, d)[:, :h, :w]


def conv3x3_winograd(x, kernel, m: int = 4):
  """x: [N, H, W, Cin], kernel: [3, 3, Cin, Cout] -> [N, H, W, Cout].

  The same function as `ops.conv3x3(x, kernel, 1)` (stride 1, padding 1),
  by Winograd F(m x m, 3 x 3), m in TILE_SIZES. Differentiable (plain
  autodiff through the transforms and the batched matmul).
  """
  if m not in _MATRICES:
    raise ValueError(f"Winograd tile size {m}: use one of {TILE_SIZES}")
  n, h, w, _ = x.shape
  v = input_transform(x, m)
  u = weight_transform(kernel, m)
  mt = jnp.einsum("ktc,kcd->ktd", v, u)
  return output_transform(mt, m, n, h, w)
