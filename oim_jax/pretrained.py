"""Import torchvision-format ImageNet ResNet weights into our parameter tree.

Usage:
  python -m oim_jax.pretrained convert resnet50-0676ba61.pth resnet50.npz
  python -m oim_jax.pretrained convert resnet50.safetensors resnet50.npz

Input: a torchvision ResNet state dict (`conv1.weight`, `bn1.*`,
`layer{s}.{b}.conv{k}.weight`, `layer{s}.{b}.bn{k}.*`,
`layer{s}.{b}.downsample.{0,1}.*`, `fc.*`) as `.safetensors`, `.npz`, or
`.pth` (the last only when torch is installed; read with
`torch.load(..., weights_only=True)`, which never unpickles arbitrary
objects). Depth (18/34/50/101) and width are inferred from the keys.

Output: `.npz` (or `.msgpack`) with keys like `stem/layer1_0/conv1/kernel`
and `res5/layer4_0/bn1/scale`, i.e. the `stem` and `res5` sub-trees of the
PersonSearch parameters. Convolutions go from [O, I, kh, kw] to
[kh, kw, I, O]; each BatchNorm's running statistics are folded into its
affine (`scale = w / sqrt(var + 1e-5)`, `bias = b - mean * scale`), matching
`FrozenBatchNorm`. `fc.*` and `num_batches_tracked` are ignored on purpose;
every other key must be consumed, and every parameter must be found with the
expected shape, else a ValueError names the key.

Set `config.model.pretrained = "/path/resnet50.npz"` to load it at init.
"""

import os
import re
import sys
from typing import Dict, Mapping, Tuple

import flax
import numpy as np
from safetensors.numpy import load_file

from oim_jax.models import resnet

_IGNORED = re.compile(r"^fc\.|\.num_batches_tracked$|^num_batches_tracked$")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a torchvision state dict from .safetensors, .npz or .pth."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained weights file not found: {path}")
  if path.endswith(".safetensors"):
    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith((".pth", ".pt")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"{path}: reading .pth needs torch (not a dependency of oim-jax). "
          "Either `pip install torch` once, or convert the file to "
          ".safetensors elsewhere (safetensors.torch.save_file), or download "
          "the timm .safetensors weights.") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
      sd = sd["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}
  raise ValueError(f"{path}: unknown weights format; expected .safetensors, "
                   ".npz or .pth")


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> Tuple[int, int]:
  """(depth, width) of a torchvision ResNet state dict."""
  if "conv1.weight" not in state_dict:
    raise ValueError("state dict has no 'conv1.weight': not a torchvision "
                     "ResNet state dict (keys start with "
                     f"{sorted(state_dict)[:3]}).")
  width = int(state_dict["conv1.weight"].shape[0])
  blocks = []
  for stage in range(1, 5):
    idx = {int(m.group(1)) for k in state_dict
           if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
    blocks.append(max(idx) + 1 if idx else 0)
  bottleneck = any(re.match(r"layer1\.0\.conv3\.", k) for k in state_dict)
  for depth, stage_blocks in resnet.STAGE_BLOCKS.items():
    if tuple(blocks) == stage_blocks and bottleneck == (depth >= 50):
      return depth, width
  raise ValueError(f"unsupported ResNet layout: blocks per stage {blocks}, "
                   f"bottleneck={bottleneck}")


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _torch_prefix(path: Tuple[str, ...]) -> Tuple[str, str]:
  """Our module path (e.g. ('layer1_0', 'downsample_bn')) -> torch prefix and kind."""
  *mods, = path
  names = []
  for m in mods:
    if m.startswith("layer"):
      stage, block = m[len("layer"):].split("_")
      names.append(f"layer{stage}.{block}")
    elif m == "downsample_conv":
      names.append("downsample.0")
    elif m == "downsample_bn":
      names.append("downsample.1")
    else:
      names.append(m)
  return ".".join(names)


def convert(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """torchvision ResNet state dict -> flat {'stem/.../kernel': array}.

  Raises:
    ValueError naming the key on a shape mismatch, a missing key, or an
    unexpected (unconsumed) key.
  """
  depth, width = infer_architecture(state_dict)
  stem_shapes, res5_shapes = resnet.pretrained_shapes(depth, width)
  expected = {("stem",) + k: v for k, v in _flat(stem_shapes).items()}
  expected.update({("res5",) + k: v for k, v in _flat(res5_shapes).items()})
  consumed = set()

  def take(key, shape):
    if key not in state_dict:
      raise ValueError(f"missing key '{key}' in the state dict (ResNet-{depth}"
                       f", width {width})")
    value = np.asarray(state_dict[key], dtype=np.float32)
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"key '{key}': shape {tuple(value.shape)}, expected "
                       f"{tuple(shape)} for ResNet-{depth} width {width}")
    consumed.add(key)
    return value

  out = {}
  for path, spec in expected.items():
    module_path, leaf = path[1:-1], path[-1]
    prefix = _torch_prefix(module_path)
    name = "/".join(path)
    if leaf == "kernel":
      kh, kw, cin, cout = spec.shape
      w = take(f"{prefix}.weight", (cout, cin, kh, kw))
      out[name] = np.transpose(w, (2, 3, 1, 0))
    elif leaf in ("scale", "bias"):
      c = spec.shape[0]
      gamma = take(f"{prefix}.weight", (c,))
      beta = take(f"{prefix}.bias", (c,))
      mean = take(f"{prefix}.running_mean", (c,))
      var = take(f"{prefix}.running_var", (c,))
      scale = gamma / np.sqrt(var + resnet.BN_EPSILON)
      out[name] = scale if leaf == "scale" else beta - mean * scale
    else:
      raise ValueError(f"unexpected parameter {name}")
    if out[name].shape != tuple(spec.shape):
      raise AssertionError(f"{name}: converted {out[name].shape} vs "
                           f"{spec.shape}")
  leftover = sorted(k for k in state_dict
                    if k not in consumed and not _IGNORED.search(k))
  if leftover:
    raise ValueError(f"state dict keys not consumed by ResNet-{depth} "
                     f"conversion: {leftover[:10]}"
                     f"{' ...' if len(leftover) > 10 else ''}")
  return {k: v.astype(np.float32) for k, v in out.items()}


def save(flat: Mapping[str, np.ndarray], path: str):
  """Writes a converted flat dict as .npz or .msgpack."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".msgpack"):
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(unflatten(flat)))
  elif path.endswith(".npz"):
    np.savez(path, **flat)
  else:
    raise ValueError(f"{path}: output must end in .npz or .msgpack")


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(v)
  return tree


def load(path: str) -> dict:
  """Reads a converted file into a nested dict {'stem': ..., 'res5': ...}."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.model.pretrained={path!r} does not exist. Convert torchvision "
        "weights with `python -m oim_jax.pretrained convert <in> <out.npz>`.")
  if path.endswith(".msgpack"):
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  with np.load(path, allow_pickle=False) as f:
    return unflatten({k: f[k] for k in f.files})


def merge(params, pretrained, source: str = "pretrained weights"):
  """Replaces the matching leaves of `params` by `pretrained` (shape-checked).

  Every leaf of `pretrained` must exist in `params` with the same shape.
  Returns a new params tree (plain dicts).
  """
  params = flax.core.unfreeze(params)
  flat_params = _flat(params)
  for path, value in _flat(pretrained).items():
    name = "/".join(path)
    if path not in flat_params:
      raise ValueError(f"{source}: '{name}' has no counterpart in the model "
                       "(check model.depth / model.width against the file)")
    want = flat_params[path].shape
    if tuple(value.shape) != tuple(want):
      raise ValueError(f"{source}: '{name}' has shape {tuple(value.shape)}, "
                       f"the model expects {tuple(want)} (check model.depth /"
                       " model.width)")
    node = params
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = np.asarray(value, dtype=flat_params[path].dtype)
  return params


def main(argv):
  if len(argv) != 4 or argv[1] != "convert":
    print("usage: python -m oim_jax.pretrained convert <in.{safetensors,npz,"
          "pth}> <out.{npz,msgpack}>", file=sys.stderr)
    return 2
  sd = read_state_dict(argv[2])
  depth, width = infer_architecture(sd)
  flat = convert(sd)
  save(flat, argv[3])
  print(f"converted ResNet-{depth} (width {width}): {len(flat)} arrays -> "
        f"{argv[3]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
