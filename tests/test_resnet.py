"""ResNet stem/head: parameter counts, shapes, dtypes, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax.models import resnet


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
