"""ResNet backbone split for person search: stem (conv1..conv4) and res5 head.

NHWC throughout. The layout follows torchvision's ResNet (stride on the 3x3
conv of a bottleneck, "ResNet v1.5") so that ImageNet weights import directly
(see `oim_jax.pretrained`). Parameter names mirror torchvision's keys:
`conv1`, `bn1`, `layer{s}_{b}` (stage s, block b), and inside a block `conv{k}`,
`bn{k}`, `downsample_conv`, `downsample_bn`.

BatchNorm is frozen, as detection backbones do: `FrozenBatchNorm` is a
per-channel affine `y = x * scale + bias` whose parameters are the running
statistics folded into the affine (`scale = w / sqrt(var + eps)`,
`bias = b - mean * scale`, done at weight import). It has no batch statistics
and no state; by default it receives no gradient (`stop_gradient`) and the
optimizer mask from `trainable_mask` excludes it, so it never changes.
In the stem every conv -> frozen BN pair is computed as one convolution
with the scale folded into its kernel plus the bias (`conv_bn`): the same
function, but no separate per-channel multiply over the activations (and
their gradients) to read and write on an accelerator; GroupNorm
(data-dependent) is not folded, nor is the res5 head (`fold_bn`).

`freeze_at` (detectron convention): 0 = everything trainable, 1 = conv1/bn1
frozen, 2 = conv1 and stage 1 (res2) frozen (default), 3 = also res3,
4 = also res4 (the whole stem). Frozen stages are cut off from the gradient
with `stop_gradient` on their output (no backward pass through them at all)
and excluded in the optimizer mask (so weight decay does not touch them).

The convolution implementations are module arguments, as flax's ResNet
example takes `conv`: `stem_conv` (conv1) and `conv3x3` (every 3x3 conv) are
a module class or a `functools.partial` of one, `max_pool` a function. The
defaults are the plain XLA ops; `person_search.create_model` passes the
CPU-only forms (`StemConv` with space-to-depth, `Conv3x3` with an im2col
weight gradient, the sliced `max_pool_3x3_s2`) when it builds a model for
CPU, so no layer sees a platform option.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oim_jax import ops

# Blocks per stage (res2, res3, res4, res5) for each supported depth.
STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
# torchvision's BatchNorm2d epsilon, used when folding statistics at import.
BN_EPSILON = 1e-5

# jax.named_scope of the CPU-only code paths (StemConv's space-to-depth form,
# Conv3x3's im2col weight gradient, the sliced max pool): they appear in the
# locations of lowered modules, which is how tests/test_export.py checks that
# an accelerator export contains none of them.
SPACE_TO_DEPTH_SCOPE = "cpu_space_to_depth_stem"
IM2COL_WGRAD_SCOPE = "cpu_im2col_wgrad"
SLICED_MAX_POOL_SCOPE = "cpu_sliced_max_pool"

# A module class or a functools.partial of one (flax examples' ModuleDef).
ModuleDef = Any

# He-normal on fan-out, as torchvision initialises ResNet convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def is_bottleneck(depth: int) -> bool:
  """ResNet-50/101 use bottleneck blocks, ResNet-18/34 basic blocks."""
  _check_depth(depth)
  return depth >= 50


def _check_depth(depth: int):
  if depth not in STAGE_BLOCKS:
    raise ValueError(f"model.depth={depth} is not supported; use one of "
                     f"{sorted(STAGE_BLOCKS)}.")


def stage_channels(depth: int, width: int, stage: int) -> int:
  """Output channels of stage `stage` (1 = res2 .. 4 = res5)."""
  expansion = 4 if is_bottleneck(depth) else 1
  return width * 2 ** (stage - 1) * expansion


def stem_channels(depth: int, width: int) -> int:
  """Channels of the stride-16 stem output C4 (1024 for ResNet-50)."""
  return stage_channels(depth, width, 3)


def head_channels(depth: int, width: int) -> int:
  """Channels of the pooled res5 output (2048 for ResNet-50)."""
  return stage_channels(depth, width, 4)


def _scaled(kernel, out_scale):
  """kernel [..., Cout] times out_scale [Cout] (None: unchanged), float32."""
  return kernel if out_scale is None else kernel * out_scale


class Conv1x1(nn.Module):
  """A 1x1 convolution written as a matmul over channels.

  Same parameter ("kernel" [1, 1, Cin, Cout]) and numbers as nn.Conv with a
  1x1 kernel. Why: XLA:CPU computes the weight gradient of a 1x1 conv about
  4x slower than the equivalent matmul; as an einsum the ResNet-50 train step
  on CPU went from 48 to 29 s (bench/results/suite_investigation.md). On
  GPU/TPU both lower to the same GEMM.
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, out_scale=None):
    """x: [N, H, W, Cin] -> [N, ceil(H/s), ceil(W/s), Cout].

    out_scale: optional [Cout] float32 multiplying the kernel's outputs
    (a folded BatchNorm scale; `conv_bn`).
    """
    kernel = _scaled(self.param("kernel", _conv_init,
                                (1, 1, x.shape[-1], self.features),
                                jnp.float32), out_scale)
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides]
    return jnp.einsum("nhwc,cd->nhwd", x.astype(self.dtype),
                      kernel[0, 0].astype(self.dtype))


class StemConv(nn.Module):
  """conv1: 7x7, stride 2, padding 3 (parameter "kernel" [7, 7, Cin, Cout]).

  With `space_to_depth` the same convolution is computed as a 4x4 stride-1
  convolution over 2x2 pixel blocks (the kernel zero-padded to 8x8 and
  regrouped): identical numbers and parameters, no change to the model.
  Why: XLA:CPU computes the weight gradient of a stride-2 convolution over
  3 channels poorly; for the 16-channel synthetic stem this form is ~2.5x
  faster in the backward and ~1.3x in the forward. At 64 channels
  (ResNet-50, whose conv1 is frozen) the direct form's forward is faster,
  so it stays off there (docs/cpu_performance.md).
  """
  features: int
  dtype: Any = jnp.float32
  space_to_depth: bool = False

  @nn.compact
  def __call__(self, x, out_scale=None):
    """x: [N, H, W, Cin] -> [N, ceil(H/2), ceil(W/2), Cout]; out_scale: as
    Conv1x1's."""
    cin = x.shape[-1]
    kernel = _scaled(self.param("kernel", _conv_init,
                                (7, 7, cin, self.features), jnp.float32),
                     out_scale).astype(self.dtype)
    x = x.astype(self.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    if not self.space_to_depth:
      return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                          dimension_numbers=dn)
    with jax.named_scope(SPACE_TO_DEPTH_SCOPE):
      return _space_to_depth_conv(x, kernel, dn)


def _space_to_depth_conv(x, kernel, dn):
  """StemConv's 7x7 stride-2 conv as a 4x4 conv over 2x2 pixel blocks.

  x: [N, H, W, Cin], kernel: [7, 7, Cin, Cout] -> [N, ceil(H/2), ceil(W/2), Cout].
  """
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  oh, ow = (h + 1) // 2, (w + 1) // 2
  # Output (i, j) reads padded rows 2i .. 2i+6 = blocks i .. i+3.
  xp = jnp.pad(x, ((0, 0), (3, 2 * (oh + 3) - h - 3),
                   (3, 2 * (ow + 3) - w - 3), (0, 0)))
  blocks = xp.reshape(n, oh + 3, 2, ow + 3, 2, cin).transpose(
      0, 1, 3, 2, 4, 5).reshape(n, oh + 3, ow + 3, 4 * cin)
  k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # [8, 8, Cin, C]
  k = k.reshape(4, 2, 4, 2, cin, cout).transpose(
      0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * cin, cout)
  return jax.lax.conv_general_dilated(blocks, k, (1, 1), "VALID",
                                      dimension_numbers=dn)


class Conv3x3(nn.Module):
  """A 3x3 convolution, padding 1: the same parameters and numbers as nn.Conv.

  Parameters "kernel" [3, 3, Cin, Cout] (and "bias" [Cout] with use_bias).
  With `wgrad_im2col_min_channels` > 0 and Cin at least that, the weight
  gradient is one im2col matmul (`ops.conv3x3_im2col_wgrad`; forward and
  input gradient unchanged): XLA:CPU computes large 3x3 weight gradients
  about 2x slower than the matmul (ResNet-50's RPN and res5 convs).
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Any = _conv_init
  wgrad_im2col_min_channels: int = 0

  @nn.compact
  def __call__(self, x, out_scale=None):
    """x: [N, H, W, Cin] -> [N, ceil(H/s), ceil(W/s), Cout]; out_scale: as
    Conv1x1's."""
    cin = x.shape[-1]
    kernel = _scaled(self.param("kernel", self.kernel_init,
                                (3, 3, cin, self.features), jnp.float32),
                     out_scale)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if 0 < self.wgrad_im2col_min_channels <= cin:
      # The scope covers the backward too (as "transpose(jvp(...))").
      with jax.named_scope(IM2COL_WGRAD_SCOPE):
        y = ops.conv3x3_im2col_wgrad(x, kernel, self.strides)
    else:
      y = ops.conv3x3(x, kernel, self.strides)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _conv(features, kernel, strides, dtype, name, conv3x3):
  if kernel == 1:
    return Conv1x1(features, strides, dtype, name=name)
  if kernel == 3:
    return conv3x3(features, strides, dtype, name=name)
  raise ValueError(f"no {kernel}x{kernel} convolution in these blocks")


class FrozenBatchNorm(nn.Module):
  """BatchNorm with folded, constant statistics: `x * scale + bias`.

  With `groups > 0` it is GroupNorm instead (Wu & He 2018): each sample's
  channels are normalised in `groups` groups over (H, W, C/groups) before
  the same affine. Stateless like the frozen BN, and what lets a small
  network train from scratch (the synthetic config) without batch
  statistics.

  Attributes:
    trainable: if False (default) the affine gets no gradient.
    zero_init: initialise `scale` to 0 (the last BN of a residual branch, so
      a randomly initialised block starts as the identity; irrelevant once
      ImageNet weights are loaded).
    dtype: compute dtype.
    groups: 0 = frozen BN (affine only); > 0 = GroupNorm with that many
      groups (capped at the channel count).
  """
  trainable: bool = False
  zero_init: bool = False
  dtype: Any = jnp.float32
  groups: int = 0

  @nn.compact
  def affine(self, c):
    """The parameters as applied: (scale, bias), each [C] float32."""
    scale = self.param("scale", nn.initializers.zeros if self.zero_init
                       else nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if not self.trainable:
      scale = jax.lax.stop_gradient(scale)
      bias = jax.lax.stop_gradient(bias)
    return scale, bias

  def __call__(self, x):
    """x: [..., H, W, C] -> same shape."""
    c = x.shape[-1]
    scale, bias = self.affine(c)
    if self.groups > 0:
      scale, bias = _group_norm_affine(x, min(self.groups, c), scale, bias)
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def conv_bn(conv, bn, x, features, fold=True):
  """bn(conv(x)) for a conv module and a FrozenBatchNorm over its output.

  A frozen BN (groups == 0) is folded: conv(x, kernel * scale) + bias, the
  same function as the affine after the conv (up to rounding), one fewer
  elementwise pass over the map forward and backward (XLA:TPU, v5e, batch
  4: the stem's own compile accesses 0.56 GiB/img less; figures in
  bench/results/accelerator.md). GroupNorm needs the conv's output first,
  so it is applied after.

  x: [N, H, W, Cin] -> [N, H', W', features]. fold=False: always the
  affine after the conv.
  """
  if bn.groups > 0 or not fold:
    return bn(conv(x))
  scale, bias = bn.affine(features)
  return conv(x, scale) + bias.astype(bn.dtype)


def _group_norm_affine(x, groups, scale, bias):
  """GroupNorm folded into a per-sample affine: y = x * a + b.

  x: [..., H, W, C]; scale, bias: [C] -> a, b: [..., 1, 1, C] float32.
  Statistics in one pass (E[x^2] - E[x]^2, float32, as flax's default
  `use_fast_variance`) from per-channel sums: on XLA:CPU the forward and
  backward of the tiny model's GroupNorms take 8 ms instead of 32 ms in the
  two-pass form over a [..., H, W, G, C/G] view (experiments/tiny_step.py). The
  price: precision degrades when |mean| >> std within a group (float32
  cancellation; tested to 2e-3 on gradients at mean/std = 12).
  """
  c = x.shape[-1]
  lead = x.shape[:-3]
  count = x.shape[-3] * x.shape[-2] * (c // groups)
  xf = x.astype(jnp.float32)
  s1 = jnp.sum(xf, axis=(-3, -2)).reshape(lead + (groups, c // groups))
  s2 = jnp.sum(jnp.square(xf), axis=(-3, -2)).reshape(s1.shape)
  mean = jnp.sum(s1, axis=-1, keepdims=True) / count  # [..., G, 1]
  var = jnp.maximum(jnp.sum(s2, axis=-1, keepdims=True) / count
                    - jnp.square(mean), 0.0)
  inv = jax.lax.rsqrt(var + BN_EPSILON)
  a = jnp.broadcast_to(inv, s1.shape).reshape(lead + (c,)) * scale
  b = bias - jnp.broadcast_to(mean, s1.shape).reshape(lead + (c,)) * a
  return a[..., None, None, :], b[..., None, None, :]


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  planes: int
  strides: int = 1
  downsample: bool = False
  train_bn: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 0
  conv3x3: ModuleDef = Conv3x3
  fold_bn: bool = True
  expansion = 1

  @nn.compact
  def __call__(self, x):
    """x: [N, H, W, Cin] -> [N, H/strides, W/strides, planes]."""
    bn = lambda name, zero=False: FrozenBatchNorm(
        self.train_bn, zero, self.dtype, self.norm_groups, name=name)
    conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, name,
                                       self.conv3x3)
    p, fold = self.planes, self.fold_bn
    y = nn.relu(conv_bn(conv(p, 3, self.strides, "conv1"), bn("bn1"), x, p,
                        fold))
    y = conv_bn(conv(p, 3, 1, "conv2"), bn("bn2", self.zero_init_residual),
                y, p, fold)
    if self.downsample:
      x = conv_bn(conv(p, 1, self.strides, "downsample_conv"),
                  bn("downsample_bn"), x, p, fold)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) (ResNet-50/101)."""
  planes: int
  strides: int = 1
  downsample: bool = False
  train_bn: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 0
  conv3x3: ModuleDef = Conv3x3
  fold_bn: bool = True
  expansion = 4

  @nn.compact
  def __call__(self, x):
    """x: [N, H, W, Cin] -> [N, H/strides, W/strides, 4 * planes]."""
    bn = lambda name, zero=False: FrozenBatchNorm(
        self.train_bn, zero, self.dtype, self.norm_groups, name=name)
    conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, name,
                                       self.conv3x3)
    p, fold = self.planes, self.fold_bn
    y = nn.relu(conv_bn(conv(p, 1, 1, "conv1"), bn("bn1"), x, p, fold))
    y = nn.relu(conv_bn(conv(p, 3, self.strides, "conv2"), bn("bn2"), y, p,
                        fold))
    y = conv_bn(conv(p * 4, 1, 1, "conv3"), bn("bn3", self.zero_init_residual),
                y, p * 4, fold)
    if self.downsample:
      x = conv_bn(conv(p * 4, 1, self.strides, "downsample_conv"),
                  bn("downsample_bn"), x, p * 4, fold)
    return nn.relu(y + x)


def _stage(x, depth, width, stage, first_stride, train_bn, zero_init_residual,
           dtype, norm_groups=0, conv3x3=Conv3x3, blocks=0, fold_bn=True):
  block_cls = Bottleneck if is_bottleneck(depth) else BasicBlock
  planes = width * 2 ** (stage - 1)
  for b in range(blocks or STAGE_BLOCKS[depth][stage - 1]):
    strides = first_stride if b == 0 else 1
    # torchvision adds a projection when the stride or channel count changes.
    downsample = b == 0 and (strides != 1 or
                             x.shape[-1] != planes * block_cls.expansion)
    x = block_cls(planes, strides, downsample, train_bn, zero_init_residual,
                  dtype, norm_groups, conv3x3, fold_bn,
                  name=f"layer{stage}_{b}")(x)
  return x


def max_pool_window(x):
  """3x3 max pool, stride 2, padding 1 as one XLA reduce_window:
  [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C].

  The accelerators' form: on a TPU it reads conv1's map once instead of
  the sliced form's pad + strided slices (v5e, batch 4, the stem's own
  compile: 7.75 -> 7.42 GiB/img accessed; bench/results/accelerator.md).
  """
  return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


def max_pool_3x3_s2(x):
  """3x3 max pool, stride 2, padding 1: [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C].

  The same numbers as nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))),
  computed as a max over 3 strided row slices, then 3 column slices. Why:
  XLA:CPU differentiates reduce_window max through an argmax window
  reduction plus a scatter; for the synthetic stem ([4, 144, 240, 16]) that
  backward took 44 ms of a 0.29 s train step, the sliced form's 3 ms (and
  its forward is 3x faster). The gradient is the same wherever the window
  maximum is unique; ties share it (jnp.maximum) instead of going to the
  first maximum, and post-ReLU zero ties get no gradient either way.
  """
  with jax.named_scope(SLICED_MAX_POOL_SCOPE):
    return _sliced_max_pool(x)


def _sliced_max_pool(x):
  n, h, w, c = x.shape
  oh, ow = (h + 1) // 2, (w + 1) // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)),
               constant_values=-jnp.inf)
  rows = None
  for i in range(3):
    r = jax.lax.slice(xp, (0, i, 0, 0), (n, i + 2 * oh - 1, w + 2, c),
                      (1, 2, 1, 1))
    rows = r if rows is None else jnp.maximum(rows, r)
  out = None
  for j in range(3):
    r = jax.lax.slice(rows, (0, 0, j, 0), (n, oh, j + 2 * ow - 1, c),
                      (1, 1, 2, 1))
    out = r if out is None else jnp.maximum(out, r)
  return out


class ResNetStem(nn.Module):
  """conv1 .. conv4 (res4): [N, H, W, 3] -> C4 [N, ceil(H/s), ceil(W/s), C].

  Attributes:
    depth: 18, 34, 50 or 101.
    width: channels of conv1 / planes of the first stage (64 in ImageNet
      ResNets; 8-16 for tiny test models).
    freeze_at: see the module docstring.
    train_bn: let the folded BN affine learn (for training from scratch).
    zero_init_residual: zero-init the last BN scale of each block.
    dtype: compute dtype (parameters stay float32).
    norm_groups: 0 = frozen BN; > 0 = GroupNorm (see FrozenBatchNorm).
    stride: output stride, 16 (standard) or 8 (res4 keeps res3's resolution:
      finer RoI features for small people at 4x the res4 cost; same
      parameters, so ImageNet weights still load).
    stem_conv: conv1's module (StemConv or a partial of it).
    conv3x3: the 3x3 convolutions' module (Conv3x3 or a partial of it).
    max_pool: the 3x3 stride-2 max pool after conv1, [N, H, W, C] ->
      [N, ceil(H/2), ceil(W/2), C]: `max_pool_window` (default) or the
      CPU's `max_pool_3x3_s2`.
  """
  depth: int = 50
  width: int = 64
  freeze_at: int = 2
  train_bn: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 0
  stride: int = 16
  stem_conv: ModuleDef = StemConv
  conv3x3: ModuleDef = Conv3x3
  max_pool: Any = max_pool_window

  @nn.compact
  def __call__(self, x):
    """x: [N, H, W, 3] normalised image -> [N, H/s, W/s, C4] (ceil), s = stride."""
    _check_depth(self.depth)
    if self.stride not in (8, 16):
      raise ValueError(f"model.stride={self.stride}: use 16 or 8")
    x = x.astype(self.dtype)
    x = nn.relu(conv_bn(
        self.stem_conv(self.width, self.dtype, name="conv1"),
        FrozenBatchNorm(self.train_bn, False, self.dtype, self.norm_groups,
                        name="bn1"), x, self.width))
    x = self.max_pool(x)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    res4_stride = 2 if self.stride == 16 else 1
    for stage, stride in ((1, 1), (2, 2), (3, res4_stride)):
      x = _stage(x, self.depth, self.width, stage, stride, self.train_bn,
                 self.zero_init_residual, self.dtype, self.norm_groups,
                 self.conv3x3)
      if self.freeze_at >= stage + 1:
        x = jax.lax.stop_gradient(x)
    return x


class ResNetHead(nn.Module):
  """conv5 (res5) per RoI + global average pooling.

  [K, h, w, C4] -> [K, C5] (C5 = 2048 for ResNet-50). The first block has
  stride 2 (14x14 RoI features -> 7x7), as in the paper.

  Attributes:
    pool: average-pool to [K, C5] (True) or return the map [K, h/2, w/2, C5]
      (the caller pools; the detection predictor may keep the layout).
    conv3x3: the 3x3 convolutions' module (Conv3x3 or a partial of it).
    blocks: residual blocks in res5; 0 = the depth's own (STAGE_BLOCKS).
    fold_bn: fold frozen BNs into the kernels (`conv_bn`). Off by default
      here: over 14x14 RoI maps the fold cost bytes instead of saving them
      (XLA:TPU, v5e, configs/cuhk.py: 12.71 GiB/img for the whole train step
      with the stem folded, 12.96 with res5 folded too).
  """
  depth: int = 50
  width: int = 64
  train_bn: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 0
  pool: bool = True
  conv3x3: ModuleDef = Conv3x3
  blocks: int = 0
  fold_bn: bool = False

  @nn.compact
  def __call__(self, x):
    """x: [K, h, w, C4] -> pooled [K, C5] (or [K, h/2, w/2, C5]) float32."""
    x = _stage(x.astype(self.dtype), self.depth, self.width, 4, 2,
               self.train_bn, self.zero_init_residual, self.dtype,
               self.norm_groups, self.conv3x3, self.blocks, self.fold_bn)
    x = x.astype(jnp.float32)
    return jnp.mean(x, axis=(1, 2)) if self.pool else x


def _is_bn(name: str) -> bool:
  return name.startswith("bn") or name == "downsample_bn"


def backbone_trainable(path: Sequence[str], freeze_at: int,
                       train_bn: bool) -> bool:
  """Whether a backbone parameter is trained.

  Args:
    path: the parameter path *inside* ResNetStem or ResNetHead, e.g.
      ("layer1_0", "conv1", "kernel") or ("bn1", "scale").
    freeze_at: see the module docstring.
    train_bn: whether FrozenBatchNorm affines are trained.
  Returns:
    True if the optimizer should update it.
  """
  if any(_is_bn(p) for p in path[:-1]) and not train_bn:
    return False
  top = path[0]
  if top in ("conv1", "bn1"):
    return freeze_at < 1
  if top.startswith("layer"):
    stage = int(top[len("layer"):].split("_")[0])
    return freeze_at < stage + 1
  raise ValueError(f"unknown backbone parameter path {'/'.join(path)}")


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def pretrained_shapes(depth: int, width: int) -> Tuple[dict, dict]:
  """Parameter shapes of the stem and head (abstract init, no compute).

  Returns:
    (stem_params, res5_params) as pytrees of jax.ShapeDtypeStruct.
  """
  stem = ResNetStem(depth, width)
  head = ResNetHead(depth, width)
  key = jax.random.PRNGKey(0)
  stem_vars = jax.eval_shape(stem.init, key, jnp.zeros((1, 32, 32, 3)))
  c4 = stem_channels(depth, width)
  head_vars = jax.eval_shape(head.init, key, jnp.zeros((1, 14, 14, c4)))
  return stem_vars["params"], head_vars["params"]
