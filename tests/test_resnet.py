"""ResNet stem/head: parameter counts, shapes, dtypes, freezing."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax.models import person_search
from oim_jax.models import resnet
from oim_jax.models import rpn


def test_resnet50_trunk_matches_torchvision_count():
  # torchvision resnet50: 25,557,032 parameters, of which fc is 2048*1000+1000.
  # Frozen BN statistics are folded into the affine (scale, bias), so our
  # count equals torchvision's trainable-parameter count (running stats are
  # buffers there, not parameters).
  stem, head = resnet.pretrained_shapes(50, 64)
  total = resnet.count_params(stem) + resnet.count_params(head)
  assert total == 25_557_032 - 2_049_000 == 23_508_032
  # ResNet-18: 11,689,512 - (512*1000 + 1000).
  stem, head = resnet.pretrained_shapes(18, 64)
  assert resnet.count_params(stem) + resnet.count_params(head) == 11_176_512


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
  stem = resnet.ResNetStem(depth=18, width=8, dtype=dtype)
  head = resnet.ResNetHead(depth=18, width=8, dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 70, 100, 3))
  vs = stem.init(jax.random.PRNGKey(1), x)
  c4 = stem.apply(vs, x)
  # Stride 16 with torchvision padding: ceil(70/16)=5, ceil(100/16)=7.
  assert c4.shape == (2, 5, 7, resnet.stem_channels(18, 8)) == (2, 5, 7, 32)
  assert c4.dtype == dtype
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(vs))
  rois = jax.random.normal(jax.random.PRNGKey(2), (3, 14, 14, 32))
  hv = head.init(jax.random.PRNGKey(3), rois)
  pooled = head.apply(hv, rois)
  assert pooled.shape == (3, 64) and pooled.dtype == jnp.float32
  assert np.isfinite(np.asarray(c4, np.float32)).all()
  assert np.isfinite(np.asarray(pooled)).all()


def test_stride_8_keeps_res4_resolution_and_parameters():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 70, 100, 3))
  s16 = resnet.ResNetStem(depth=18, width=8)
  s8 = resnet.ResNetStem(depth=18, width=8, stride=8)
  v16 = s16.init(jax.random.PRNGKey(1), x)
  v8 = s8.init(jax.random.PRNGKey(1), x)
  # Same parameters (ImageNet weights load into either).
  assert (jax.tree_util.tree_map(jnp.shape, v16) ==
          jax.tree_util.tree_map(jnp.shape, v8))
  b = np.asarray(s8.apply(v16, x))
  assert b.shape == (1, 9, 13, 32) and np.isfinite(b).all()  # ceil(70/8) ...
  assert s16.apply(v16, x).shape == (1, 5, 7, 32)
  with pytest.raises(ValueError, match="model.stride"):
    resnet.ResNetStem(depth=18, width=8, stride=4).init(
        jax.random.PRNGKey(1), x)


def test_freeze_at_and_frozen_bn_get_zero_gradient():
  stem = resnet.ResNetStem(depth=18, width=4, freeze_at=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))
  params = stem.init(jax.random.PRNGKey(1), x)["params"]
  grads = jax.grad(lambda p: jnp.sum(stem.apply({"params": p}, x) ** 2))(
      params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in flat:
    names = tuple(k.key for k in path)
    trainable = resnet.backbone_trainable(names, freeze_at=2, train_bn=False)
    if trainable:
      assert np.abs(np.asarray(g)).sum() > 0, names
    else:
      assert not np.asarray(g).any(), names
  # Hand-checked mask decisions.
  assert not resnet.backbone_trainable(("conv1", "kernel"), 2, False)
  assert not resnet.backbone_trainable(("layer1_1", "conv2", "kernel"), 2,
                                       False)
  assert resnet.backbone_trainable(("layer2_0", "conv1", "kernel"), 2, False)
  assert not resnet.backbone_trainable(("layer2_0", "bn1", "scale"), 2, False)
  assert resnet.backbone_trainable(("layer2_0", "bn1", "scale"), 0, True)
  assert resnet.backbone_trainable(("conv1", "kernel"), 0, False)
  assert not resnet.backbone_trainable(("layer3_0", "conv1", "kernel"), 4,
                                       False)


def test_bad_depth_is_a_clear_error():
  with pytest.raises(ValueError, match="model.depth=42"):
    resnet.stem_channels(42, 64)


def test_group_norm_mode_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 8)).astype(np.float32) * 3 + 1
  module = resnet.FrozenBatchNorm(trainable=True, groups=4)
  params = module.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda p: p, params)
  scale = rng.normal(size=8).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32)
  params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  got = np.asarray(module.apply(params, jnp.asarray(x)))
  want = np.empty_like(x)
  for n in range(2):
    for g in range(4):
      block = x[n, :, :, 2 * g:2 * g + 2].astype(np.float64)
      want[n, :, :, 2 * g:2 * g + 2] = (block - block.mean()) / np.sqrt(
          block.var() + 1e-5)
  want = want * scale + bias
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [1, 2])
def test_conv1x1_matmul_equals_convolution(strides):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 9, 6)), jnp.float32)
  module = resnet.Conv1x1(5, strides)
  params = module.init(jax.random.PRNGKey(0), x)
  kernel = params["params"]["kernel"]
  assert kernel.shape == (1, 1, 6, 5)
  want = jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((0, 0), (0, 0)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(module.apply(params, x), want, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("strides,use_bias", [(1, False), (2, False),
                                              (1, True)])
def test_conv3x3_is_nn_conv_and_im2col_changes_only_rounding(strides,
                                                             use_bias):
  import flax.linen as nn
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 9, 6)), jnp.float32)
  ref = nn.Conv(5, (3, 3), strides=(strides, strides),
                padding=((1, 1), (1, 1)), use_bias=use_bias,
                kernel_init=resnet._conv_init)  # pylint: disable=protected-access
  plain = resnet.Conv3x3(5, strides, use_bias=use_bias)
  im2col = resnet.Conv3x3(5, strides, use_bias=use_bias,
                          wgrad_im2col_min_channels=6)
  params = ref.init(jax.random.PRNGKey(0), x)
  # Same parameter tree and initial values as nn.Conv (checkpoints and
  # ImageNet imports are unchanged).
  for module in (plain, im2col):
    mine = module.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(mine) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  g = jnp.asarray(rng.normal(size=ref.apply(params, x).shape), jnp.float32)
  grads = lambda m: jax.jit(jax.grad(
      lambda p, x: jnp.sum(m.apply(p, x) * g), (0, 1)))(params, x)
  want = grads(ref)
  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(grads(im2col)), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_array_equal(np.asarray(im2col.apply(params, x)),
                                np.asarray(ref.apply(params, x)))


def test_conv3x3_im2col_only_from_the_channel_count():
  x = jnp.ones((1, 5, 5, 4))
  jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(m.apply(p, x))))(m.init(jax.random.PRNGKey(0), x)))
  # The im2col weight gradient is a dot_general; XLA's is a convolution.
  assert "dot_general" in jaxpr(resnet.Conv3x3(3,
                                               wgrad_im2col_min_channels=4))
  assert "dot_general" not in jaxpr(resnet.Conv3x3(
      3, wgrad_im2col_min_channels=5))
  assert "dot_general" not in jaxpr(resnet.Conv3x3(3))


def _group_norm_reference(x, groups, scale, bias):
  """Two-pass GroupNorm over a [N, H, W, G, C/G] view (the textbook form)."""
  n, h, w, c = x.shape
  y = x.reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(y, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(y - mean), axis=(1, 2, 4), keepdims=True)
  y = ((y - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
  return y * scale + bias


def test_group_norm_gradients_match_two_pass_form():
  # Offset mean (the one-pass variance's weak spot) and per-sample scales.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 6, 5, 12)) * [[[[0.5]]], [[[2.0]]],
                                                   [[[4.0]]]] + 6.0,
                  jnp.float32)
  scale = jnp.asarray(rng.normal(size=12), jnp.float32)
  bias = jnp.asarray(rng.normal(size=12), jnp.float32)
  module = resnet.FrozenBatchNorm(trainable=True, groups=3)
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def ours(x, s, b):
    return jnp.sum(cot * module.apply({"params": {"scale": s, "bias": b}}, x))

  def ref(x, s, b):
    return jnp.sum(cot * _group_norm_reference(x, 3, s, b))

  np.testing.assert_allclose(
      module.apply({"params": {"scale": scale, "bias": bias}}, x),
      _group_norm_reference(x, 3, scale, bias), rtol=1e-4, atol=1e-4)
  for got, want in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias),
                       jax.grad(ref, (0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_group_norm_on_roi_batches_normalises_each_roi():
  # [K, h, w, C] RoI maps (res5): each RoI is its own sample.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 7, 7, 8)).astype(np.float32) * 3 - 2
  module = resnet.FrozenBatchNorm(trainable=True, groups=1)
  params = {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
  got = np.asarray(module.apply(params, jnp.asarray(x)))
  for k in range(5):
    block = x[k].astype(np.float64)
    np.testing.assert_allclose(got[k], (block - block.mean()) / np.sqrt(
        block.var() + 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(32, 48), (33, 47), (7, 6)])
def test_space_to_depth_stem_conv_equals_strided_conv(hw):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2,) + hw + (3,)), jnp.float32)
  direct = resnet.StemConv(8)
  s2d = resnet.StemConv(8, space_to_depth=True)
  params = direct.init(jax.random.PRNGKey(0), x)
  assert params["params"]["kernel"].shape == (7, 7, 3, 8)
  want = jax.lax.conv_general_dilated(
      x, params["params"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = s2d.apply(params, x)
  assert got.shape == want.shape == (2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, 8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # And its weight gradient (what the from-scratch stem trains with).
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  g_direct = jax.grad(lambda p: jnp.sum(cot * direct.apply(p, x)))(params)
  g_s2d = jax.grad(lambda p: jnp.sum(cot * s2d.apply(p, x)))(params)
  np.testing.assert_allclose(g_s2d["params"]["kernel"],
                             g_direct["params"]["kernel"], rtol=1e-4,
                             atol=1e-3)


def _numpy_max_pool_3x3_s2(x):
  """Loops over output cells: the pooled values and each cell's argmax."""
  n, h, w, c = x.shape
  oh, ow = (h + 1) // 2, (w + 1) // 2
  out = np.zeros((n, oh, ow, c), x.dtype)
  arg = np.zeros((n, oh, ow, c, 2), int)
  for i in range(oh):
    for j in range(ow):
      r0, c0 = max(2 * i - 1, 0), max(2 * j - 1, 0)
      win = x[:, r0:2 * i + 2, c0:2 * j + 2]  # [n, <=3, <=3, c]
      flat = win.reshape(n, -1, c)
      k = flat.argmax(axis=1)
      out[:, i, j] = flat.max(axis=1)
      arg[:, i, j, :, 0] = r0 + k // win.shape[2]
      arg[:, i, j, :, 1] = c0 + k % win.shape[2]
  return out, arg


@pytest.mark.parametrize("hw", [(8, 10), (9, 7), (1, 2)])
def test_max_pool_3x3_s2_matches_numpy_values_and_gradient(hw):
  rng = np.random.default_rng(7)
  n, c = 2, 3
  # Distinct values: every window has one maximum, so the gradient is exact.
  x = rng.permutation(n * hw[0] * hw[1] * c).reshape((n,) + hw + (c,))
  x = (x.astype(np.float32) - 20.0) / 7.0
  want, arg = _numpy_max_pool_3x3_s2(x)
  got = resnet.max_pool_3x3_s2(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), want)
  cot = rng.normal(size=want.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(cot * resnet.max_pool_3x3_s2(v)))(
      jnp.asarray(x))
  want_grad = np.zeros_like(x)
  for b, i, j, ch in np.ndindex(*want.shape):
    r, col = arg[b, i, j, ch]
    want_grad[b, r, col, ch] += cot[b, i, j, ch]
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("hw", [(8, 10), (9, 7), (1, 2)])
def test_max_pool_window_matches_numpy(hw):
  """The accelerators' reduce_window pool: the same values as the loops."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(2,) + hw + (3,)).astype(np.float32)
  want, _ = _numpy_max_pool_3x3_s2(x)
  np.testing.assert_array_equal(
      np.asarray(resnet.max_pool_window(jnp.asarray(x))), want)


def test_stem_max_pool_per_platform():
  assert person_search.stem_max_pool("cpu") is resnet.max_pool_3x3_s2
  for platform in ("tpu", "gpu", "cuda"):
    assert person_search.stem_max_pool(platform) is resnet.max_pool_window
  assert resnet.ResNetStem().max_pool is resnet.max_pool_window


def _reference_conv(x, kernel, strides):
  """SAME-as-torch conv (padding k // 2) written directly with lax."""
  k = kernel.shape[0]
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("conv_cls,kernel,strides", [
    (resnet.Conv1x1, 1, 1), (resnet.Conv1x1, 1, 2), (resnet.Conv3x3, 3, 1),
    (resnet.Conv3x3, 3, 2), (resnet.StemConv, 7, 2)])
@pytest.mark.parametrize("trainable", [False, True])
def test_conv_bn_folds_the_frozen_scale_into_the_kernel(conv_cls, kernel,
                                                        strides, trainable):
  """conv_bn == conv followed by x * scale + bias, in value and in the
  gradients of the input, the kernel and (when trainable) the affine;
  without training the affine gets no gradient."""
  rng = np.random.default_rng(kernel * 10 + strides)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)).astype(np.float32))
  cout = 6

  class Pair(nn.Module):
    @nn.compact
    def __call__(self, v):
      conv = (conv_cls(cout, dtype=jnp.float32, name="conv")
              if conv_cls is resnet.StemConv
              else conv_cls(cout, strides, jnp.float32, name="conv"))
      bn = resnet.FrozenBatchNorm(trainable=trainable, name="bn")
      return resnet.conv_bn(conv, bn, v, cout)

  pair = Pair()
  params = pair.init(jax.random.PRNGKey(0), x)["params"]
  params["bn"] = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, cout),
                                       jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=cout), jnp.float32)}
  def ours(p, v):
    return pair.apply({"params": p}, v)

  def reference(p, v):
    y = _reference_conv(v, p["conv"]["kernel"], strides)
    scale, bias = p["bn"]["scale"], p["bn"]["bias"]
    if not trainable:
      scale, bias = (jax.lax.stop_gradient(scale),
                     jax.lax.stop_gradient(bias))
    return y * scale + bias

  want = reference(params, x)
  got = ours(params, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  cot = jnp.asarray(rng.normal(size=want.shape).astype(np.float32))
  g_ours = jax.grad(lambda p, v: jnp.sum(cot * ours(p, v)), (0, 1))(params, x)
  g_ref = jax.grad(lambda p, v: jnp.sum(cot * reference(p, v)), (0, 1))(
      params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4)
  if not trainable:
    assert not np.any(np.asarray(g_ours[0]["bn"]["scale"]))


@pytest.mark.parametrize("what", ["stem", "head"])
def test_folding_does_not_change_the_function(what):
  """fold_bn on or off: the same outputs (random BN affines, ResNet-50
  blocks at width 4); the stem folds by default, the res5 head does not."""
  rng = np.random.default_rng(5)
  if what == "stem":
    x = jnp.asarray(rng.normal(size=(1, 32, 48, 3)), jnp.float32)
    build = lambda fold: resnet.ResNetStem(50, 4)
    assert resnet.Bottleneck(4).fold_bn
  else:
    x = jnp.asarray(rng.normal(size=(3, 14, 14, 64)), jnp.float32)
    build = lambda fold: resnet.ResNetHead(50, 4, fold_bn=fold)
    assert not resnet.ResNetHead().fold_bn
  params = build(True).init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: (jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
                       if "scale" in jax.tree_util.keystr(path) else
                       jnp.asarray(0.1 * rng.normal(size=v.shape), v.dtype)
                       if "bias" in jax.tree_util.keystr(path) else v),
      params)
  folded = build(True).apply(params, x)
  if what == "stem":
    # The unfolded reference: the same blocks with fold_bn off.
    plain_block = functools.partial(resnet.Bottleneck, fold_bn=False)
    unfolded = _apply_with_block(params, x, plain_block)
  else:
    unfolded = build(False).apply(params, x)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(unfolded),
                             rtol=1e-4, atol=1e-4)


def _apply_with_block(params, x, block):
  """ResNetStem(50, 4) with every Bottleneck replaced by `block` (and conv1's
  BN unfolded): the stem written out by hand."""

  class Unfolded(nn.Module):
    @nn.compact
    def __call__(self, v):
      conv1 = resnet.StemConv(4, jnp.float32, name="conv1")
      bn1 = resnet.FrozenBatchNorm(name="bn1")
      v = nn.relu(bn1(conv1(v)))
      v = resnet.max_pool_window(v)
      for stage, first in ((1, 1), (2, 2), (3, 2)):
        planes = 4 * 2 ** (stage - 1)
        for b in range(resnet.STAGE_BLOCKS[50][stage - 1]):
          strides = first if b == 0 else 1
          v = block(planes, strides, b == 0,
                    name=f"layer{stage}_{b}")(v)
      return v

  return Unfolded().apply(params, x)


def test_conv_bn_leaves_group_norm_after_the_conv():
  """GroupNorm's statistics need the conv's output: conv_bn applies it there
  (the module's own result), not folded."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 6, 4))

  class Pair(nn.Module):
    @nn.compact
    def __call__(self, v):
      return resnet.conv_bn(resnet.Conv1x1(8, name="conv"),
                            resnet.FrozenBatchNorm(groups=2, name="bn"), v, 8)

  params = Pair().init(jax.random.PRNGKey(0), x)
  y = Pair().apply(params, x)
  # GroupNorm output: zero mean and unit variance within each (sample, group).
  g = np.asarray(y).reshape(2, 6 * 6, 2, 4).transpose(0, 2, 1, 3).reshape(
      2, 2, -1)
  np.testing.assert_allclose(g.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(g.var(-1), 1.0, atol=1e-3)


def test_max_pool_3x3_s2_ties_keep_the_gradient_mass():
  x = jnp.ones((1, 6, 6, 2), jnp.float32)  # every window is one big tie
  cot = jnp.arange(1.0, 1.0 + 3 * 3 * 2).reshape(1, 3, 3, 2)
  grad = jax.grad(lambda v: jnp.sum(cot * resnet.max_pool_3x3_s2(v)))(x)
  np.testing.assert_allclose(float(jnp.sum(grad)), float(jnp.sum(cot)),
                             rtol=1e-6)
  assert float(jnp.min(grad)) >= 0.0


def test_head_blocks_drops_res5_blocks_after_the_first():
  # model.head_blocks=1: res5 keeps only its first (strided) block. With
  # zero_init_residual the full head's second block starts as the identity
  # (its last norm scale is 0 and its input is post-ReLU), so at init the
  # one-block head on the same first-block weights gives the same map.
  rois = jax.random.normal(jax.random.PRNGKey(2), (3, 14, 14, 32))
  full = resnet.ResNetHead(depth=18, width=8, zero_init_residual=True,
                           train_bn=True, pool=False)
  short = resnet.ResNetHead(depth=18, width=8, zero_init_residual=True,
                            train_bn=True, pool=False, blocks=1)
  vf = full.init(jax.random.PRNGKey(3), rois)
  vs = short.init(jax.random.PRNGKey(3), rois)
  assert sorted(vf["params"]) == ["layer4_0", "layer4_1"]
  assert sorted(vs["params"]) == ["layer4_0"]
  vs = {"params": {"layer4_0": vf["params"]["layer4_0"]}}
  a, b = full.apply(vf, rois), short.apply(vs, rois)
  assert a.shape == b.shape == (3, 7, 7, 64)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6,
                             atol=1e-6)
  assert float(jnp.abs(a).max()) > 0


def _primitive_counts(fn, *args):
  """{primitive name: count} over a function's jaxpr (sub-jaxprs included)."""
  counts = {}

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def test_conv_modules_are_used_by_every_layer():
  """The conv3x3 / stem_conv module arguments reach every 3x3 conv and conv1.

  With an im2col weight gradient from 1 channel, each trainable 3x3 conv's
  weight gradient becomes one matmul, so the gradient's matmul count grows
  by exactly the number of 3x3 convs: ResNet-18's res2..res4 have 12, its
  res5 4, the RPN head 1.
  """
  im2col = functools.partial(resnet.Conv3x3, wgrad_im2col_min_channels=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 64, 3))
  rois = jax.random.normal(jax.random.PRNGKey(1), (2, 14, 14, 32))
  modules = {
      "stem": (lambda c: resnet.ResNetStem(18, 8, freeze_at=0, conv3x3=c),
               x, 12),
      "head": (lambda c: resnet.ResNetHead(18, 8, conv3x3=c), rois, 4),
      "rpn": (lambda c: rpn.RPNHead(3, 32, conv3x3=c), rois, 1),
  }
  for name, (build, inp, n3x3) in modules.items():
    counts = []
    for conv3x3 in (resnet.Conv3x3, im2col):
      module = build(conv3x3)
      params = module.init(jax.random.PRNGKey(2), inp)
      loss = lambda p, m=module: sum(
          jnp.sum(jnp.square(y)) for y in jax.tree.leaves(m.apply(p, inp)))
      counts.append(_primitive_counts(jax.grad(loss), params))
    plain, mine = counts
    assert (mine.get("dot_general", 0) - plain.get("dot_general", 0)
            == n3x3), name

  # conv1: the space-to-depth form (same numbers, another convolution).
  s2d = functools.partial(resnet.StemConv, space_to_depth=True)
  plain, mine = resnet.ResNetStem(18, 8), resnet.ResNetStem(18, 8,
                                                            stem_conv=s2d)
  params = plain.init(jax.random.PRNGKey(2), x)
  np.testing.assert_allclose(mine.apply(params, x), plain.apply(params, x),
                             rtol=1e-4, atol=1e-4)
  first_conv = lambda m: next(
      e for e in jax.make_jaxpr(lambda p: m.apply(p, x))(params).jaxpr.eqns
      if e.primitive.name == "conv_general_dilated")
  assert first_conv(plain).params["window_strides"] == (2, 2)
  assert first_conv(mine).params["window_strides"] == (1, 1)
