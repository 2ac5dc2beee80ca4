"""torchvision state dict -> our parameter tree, checked against NumPy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax import config_defaults
from oim_jax import pretrained
from oim_jax.models import resnet


def _torchvision_state_dict(depth, width, seed=0):
  """A random state dict with torchvision's key names and shapes."""
  rng = np.random.default_rng(seed)
  sd = {}

  def bn(prefix, c):
    sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{prefix}.bias"] = rng.normal(size=c).astype(np.float32)
    sd[f"{prefix}.running_mean"] = rng.normal(size=c).astype(np.float32)
    sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2, c).astype(np.float32)
    sd[f"{prefix}.num_batches_tracked"] = np.array(7, np.int64)

  def conv(key, cout, cin, k):
    sd[key] = (rng.normal(size=(cout, cin, k, k)) /
               np.sqrt(cin * k * k)).astype(np.float32)

  conv("conv1.weight", width, 3, 7)
  bn("bn1", width)
  cin = width
  bottleneck = depth >= 50
  exp = 4 if bottleneck else 1
  for s, n in enumerate(resnet.STAGE_BLOCKS[depth], start=1):
    planes = width * 2 ** (s - 1)
    for b in range(n):
      p = f"layer{s}.{b}"
      if bottleneck:
        conv(f"{p}.conv1.weight", planes, cin, 1)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2.weight", planes, planes, 3)
        bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3.weight", planes * 4, planes, 1)
        bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1.weight", planes, cin, 3)
        bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2.weight", planes, planes, 3)
        bn(f"{p}.bn2", planes)
      if b == 0 and (s > 1 or cin != planes * exp):
        conv(f"{p}.downsample.0.weight", planes * exp, cin, 1)
        bn(f"{p}.downsample.1", planes * exp)
      cin = planes * exp
  sd["fc.weight"] = rng.normal(size=(1000, cin)).astype(np.float32)
  sd["fc.bias"] = np.zeros(1000, np.float32)
  return sd


def _np_conv(x, w, stride, pad):
  """x [H, W, Cin], torch weight [O, I, kh, kw] -> [H', W', O] (explicit loops)."""
  o, i, kh, kw = w.shape
  xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  hout = (x.shape[0] + 2 * pad - kh) // stride + 1
  wout = (x.shape[1] + 2 * pad - kw) // stride + 1
  out = np.zeros((hout, wout, o), np.float64)
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[dy:dy + stride * hout:stride, dx:dx + stride * wout:stride]
      out += np.einsum("hwi,oi->hwo", patch, w[:, :, dy, dx])
  return out


def _np_bn(x, sd, prefix):
  return ((x - sd[f"{prefix}.running_mean"]) /
          np.sqrt(sd[f"{prefix}.running_var"] + 1e-5) *
          sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"])


@pytest.mark.parametrize("depth", [18, 50])
def test_convert_consumes_every_key(depth):
  width = 4
  sd = _torchvision_state_dict(depth, width)
  flat = pretrained.convert(sd)
  assert pretrained.infer_architecture(sd) == (depth, width)
  stem, head = resnet.pretrained_shapes(depth, width)
  n_expected = (len(jax.tree_util.tree_leaves(stem)) +
                len(jax.tree_util.tree_leaves(head)))
  assert len(flat) == n_expected
  # Conv kernels transposed to [kh, kw, I, O].
  np.testing.assert_array_equal(flat["stem/conv1/kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  assert flat["stem/conv1/kernel"].shape == (7, 7, 3, width)
  # Every non-ignored key was consumed: adding a stray key is an error ...
  bad = dict(sd, **{"layer1.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="layer1.0.extra.weight"):
    pretrained.convert(bad)
  # ... and so is a shape mismatch, naming the key.
  bad = dict(sd)
  bad["layer2.0.bn1.running_var"] = np.ones(3, np.float32)
  with pytest.raises(ValueError, match=r"layer2\.0\.bn1\.running_var"):
    pretrained.convert(bad)
  bad = dict(sd)
  del bad["layer3.0.downsample.0.weight"]
  with pytest.raises(ValueError, match=r"layer3\.0\.downsample\.0\.weight"):
    pretrained.convert(bad)


def test_converted_block_equals_numpy():
  """layer2.0 of a ResNet-50 (stride 2, projection shortcut) vs NumPy."""
  width = 4
  sd = _torchvision_state_dict(50, width, seed=1)
  tree = pretrained.unflatten(pretrained.convert(sd))
  block_params = tree["stem"]["layer2_0"]
  rng = np.random.default_rng(2)
  x = rng.normal(size=(7, 9, 4 * width)).astype(np.float32)
  block = resnet.Bottleneck(planes=2 * width, strides=2, downsample=True)
  y = np.asarray(block.apply({"params": block_params}, jnp.asarray(x[None])))[0]

  p = "layer2.0"
  h = np.maximum(_np_bn(_np_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd,
                        f"{p}.bn1"), 0)
  h = np.maximum(_np_bn(_np_conv(h, sd[f"{p}.conv2.weight"], 2, 1), sd,
                        f"{p}.bn2"), 0)
  h = _np_bn(_np_conv(h, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
  s = _np_bn(_np_conv(x, sd[f"{p}.downsample.0.weight"], 2, 0), sd,
             f"{p}.downsample.1")
  ref = np.maximum(h + s, 0)
  assert y.shape == ref.shape == (4, 5, 2 * width * 4)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_cli_round_trip_and_merge(tmp_path):
  sd = _torchvision_state_dict(18, 4, seed=3)
  src = os.path.join(tmp_path, "r18.npz")
  np.savez(src, **sd)
  for ext in ("npz", "msgpack"):
    out = os.path.join(tmp_path, f"r18_conv.{ext}")
    assert pretrained.main(["x", "convert", src, out]) == 0
    tree = pretrained.load(out)
    np.testing.assert_allclose(
        tree["res5"]["layer4_1"]["bn2"]["scale"],
        sd["layer4.1.bn2.weight"] / np.sqrt(sd["layer4.1.bn2.running_var"]
                                            + 1e-5), rtol=1e-6)
  # merge() puts the weights into a bigger tree and checks shapes.
  stem, head = resnet.pretrained_shapes(18, 4)
  zeros = lambda t: jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, np.float32), t)
  params = {"stem": zeros(stem), "res5": zeros(head),
            "rpn": {"w": np.zeros(3, np.float32)}}
  merged = pretrained.merge(params, tree)
  np.testing.assert_array_equal(merged["stem"]["conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  assert not merged["rpn"]["w"].any()
  stem8, _ = resnet.pretrained_shapes(18, 8)
  with pytest.raises(ValueError, match=r"stem/bn1/bias.*\(4,\).*\(8,\)"):
    pretrained.merge({"stem": zeros(stem8), "res5": zeros(head)}, tree)


def test_safetensors_input(tmp_path):
  from safetensors.numpy import save_file
  sd = _torchvision_state_dict(34, 2, seed=4)
  src = os.path.join(tmp_path, "r34.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, src)
  flat = pretrained.convert(pretrained.read_state_dict(src))
  assert flat["res5/layer4_2/conv2/kernel"].shape == (3, 3, 16, 16)


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  src = os.path.join(tmp_path, "w.pth")
  open(src, "wb").close()
  with pytest.raises(ImportError, match="safetensors"):
    pretrained.read_state_dict(src)


@pytest.mark.parametrize("head_blocks", [0, 1])
def test_model_init_loads_the_file_into_a_shortened_res5(tmp_path, head_blocks):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from oim_jax.models import person_search as ps  # pylint: disable=g-import-not-at-top
  sd = _torchvision_state_dict(18, 8, seed=5)
  src, out = (os.path.join(tmp_path, n) for n in ("r18.npz", "r18_conv.npz"))
  np.savez(src, **sd)
  assert pretrained.main(["x", "convert", src, out]) == 0
  c = ml_collections.ConfigDict()
  c.model = config_defaults.model_config("tiny")
  c.model.pretrained = out
  c.model.head_blocks = head_blocks
  c.oim = ml_collections.ConfigDict(dict(
      loss="oim", num_labeled=3, queue_size=8, scalar=30.0, momentum=0.5,
      normalize=True))
  params = ps.init_params(ps.create_model(c), c, jax.random.PRNGKey(0))
  # head_blocks=1 keeps res5's first block and takes it from the file; the
  # file's second block has nowhere to go and is left out, not an error.
  want = ["layer4_0"] if head_blocks == 1 else ["layer4_0", "layer4_1"]
  assert sorted(params["res5"]) == want
  for block in want:
    np.testing.assert_array_equal(
        np.asarray(params["res5"][block]["conv1"]["kernel"]),
        sd[f"layer4.{block[-1]}.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(params["stem"]["layer3_1"]["conv2"]["kernel"]),
      sd["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
