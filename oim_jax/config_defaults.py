"""The config schema: every field, its reference (CUHK-SYSU) default, and
`validate`, the one check of the values.

Every configs/*.py starts from `base_config()` and overrides what differs, so
a misspelled override (`--config.train.lrr=...`) fails: the dict is locked.
`validate(config)` runs before anything compiles (train.py, eval.py,
search.py) and names the field and its allowed values in every error. What
each option measured: docs/configs.md.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.parallelism = "shard_map"  # or "pmap": the same per-device step.
  c.distributed = False  # jax.distributed.initialize() (multi-host).

  # Data: see oim_jax/data/pipeline.py.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cuhk_sysu"  # synthetic | cuhk_sysu | prw
  c.data.root = "data/cuhk_sysu"
  c.data.min_size = 900  # shorter side after resizing
  c.data.max_size = 1500  # cap on the longer side
  c.data.max_gt = 32  # GT boxes per image, padded
  c.data.flip = True  # random horizontal flip (training)
  c.data.num_workers = 2  # decoding threads; 0 = synchronous
  c.data.skip_unlabeled_only = False  # drop train images with no labeled box
  c.data.skip_empty = False  # drop train images with no box at all
  c.data.too_many_gt = "error"  # or "truncate" images with > max_gt boxes
  c.data.prefetch_batches = 2  # bounded read-ahead of the input pipeline
  # Non-empty: read images from the array_record files that
  # `python -m oim_jax.data.prepare --data_dir=...` wrote there (annotations
  # and evaluation protocols still come from data.root).
  c.data.tfds_dir = ""
  c.data.synthetic = ml_collections.ConfigDict()  # generator sizes

  # Model (backbone, RPN, RoI heads): see model_config() below.
  c.model = model_config()

  # OIM: see oim_jax/oim.py.
  c.oim = ml_collections.ConfigDict()
  c.oim.loss = "oim"  # or "softmax": the paper's baseline
  c.oim.num_labeled = 5532  # LUT rows = labeled train identities
  c.oim.queue_size = 5000  # circular queue of unlabeled features
  c.oim.scalar = 30.0  # 1 / temperature (Caffe original: 10)
  c.oim.momentum = 0.5  # LUT update momentum
  c.oim.normalize = True  # re-normalise LUT rows (Caffe original: False)

  # Optimisation: see oim_jax/optim.py. The learning rate is for the global
  # batch; scale it linearly with batch_size (lr = 0.003 * batch_size / 5).
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 5  # global batch (all devices together)
  c.train.epochs = 20
  c.train.num_steps = 0  # > 0 overrides epochs
  c.train.optimizer = "sgd"  # "sgd" (momentum) | "adam"
  c.train.lr = 0.003
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.clip_norm = 10.0
  c.train.schedule_unit = "epoch"  # "epoch" or "step" (units below)
  c.train.warmup_epochs = 1.0
  c.train.warmup_steps = 0
  c.train.warmup_factor = 1e-3  # warm-up starts at lr * warmup_factor
  c.train.lr_milestones = (16,)
  c.train.lr_gamma = 0.1
  c.train.lr_decay = "step"  # "step" (milestones x lr_gamma) | "cosine"
  # > 0: also keep an exponential moving average of the model variables
  # (oim_jax/ema.py); evaluation then uses the average.
  c.train.ema_decay = 0.0
  c.train.log_every = 20
  c.train.checkpoint_every = 1000  # steps; also at the end and on SIGTERM
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True

  # Evaluation: see oim_jax/evaluation.py.
  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True
  c.eval.every_steps = 0  # > 0: also evaluate during training (curves)
  c.eval.gallery_size = 100  # CUHK-SYSU: 50..4000, -1 = whole test set
  c.eval.det_thresh = 0.5
  c.eval.ignore_cam_id = True  # PRW: also search same-camera frames
  c.eval.batch_size = 2
  # Embed every box also in the mirrored image and average (test-time
  # augmentation; one more backbone pass per image).
  c.eval.flip_test = False
  return c


def model_config(preset: str = "resnet50") -> ml_collections.ConfigDict:
  """`config.model`: every field of the network, with the reference values.

  Args:
    preset: "resnet50" (DESIGN §3 reference setup) or "tiny" (ResNet-18
      layout, width 8, from scratch: tests and the synthetic dataset).
  """
  c = ml_collections.ConfigDict()
  # Backbone (oim_jax/models/resnet.py).
  c.depth = 50  # 18 | 34 | 50 | 101
  c.width = 64  # conv1 channels / first-stage planes (64 = ImageNet ResNet)
  c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params float32)
  c.freeze_at = 2  # 0 none, 1 conv1, 2 conv1+res2 (default), ... 4 the stem
  c.train_bn = False  # train the folded BN affines (only sensible from scratch)
  c.zero_init_residual = False  # zero-init last BN of each block (scratch)
  c.norm_groups = 0  # 0: frozen BN; > 0: GroupNorm groups (from scratch)
  c.pretrained = ""  # converted ImageNet weights (.npz/.msgpack), see README
  # Residual blocks in res5 (the per-RoI head); 0 = the depth's own.
  # Experimental: fewer blocks cost mAP (docs/configs.md).
  c.head_blocks = 0
  c.stride = 16  # of C4: 16, or 8 (res4 unstrided, for small people)
  # conv1 as a 4x4 conv over 2x2 pixel blocks: same numbers, faster on CPU
  # for narrow stems (resnet.StemConv); slower at ResNet-50's 64 channels.
  # Used only when create_model's platform is CPU.
  c.stem_space_to_depth = False
  # 3x3 convs with at least this many input channels compute their weight
  # gradient as one im2col matmul (resnet.Conv3x3; same numbers up to float
  # rounding): on XLA:CPU 2.2x faster for ResNet-50's RPN conv, 1.4-2.1x
  # for res5's, the ResNet-50 train step 3-10 % faster. -1 = auto, for
  # create_model's platform: 512 on CPU (the RPN and res5; narrower layers
  # gain little for the patches' memory), 0 (never: XLA's own conv
  # gradient) on GPU/TPU.
  c.wgrad_im2col_min_channels = -1
  # Anchors (one feature map, stride 16); ratio = h / w as torchvision.
  c.anchor_sizes = (32, 64, 128, 256, 512)
  c.anchor_ratios = (0.5, 1.0, 2.0)
  # RPN (oim_jax/models/rpn.py).
  c.rpn = ml_collections.ConfigDict()
  c.rpn.channels = 0  # 3x3 conv channels; 0 = C4 channels (1024)
  # Stride of the RPN's map: 0 = C4's; 16 with stride 8: C4 averaged over 2x2.
  c.rpn.stride = 0
  c.rpn.fg_iou = 0.7  # anchor fg iff IoU >= 0.7 (plus each GT's best)
  c.rpn.bg_iou = 0.3  # anchor bg iff IoU < 0.3
  c.rpn.batch_size = 256  # sampled anchors per image
  c.rpn.fg_fraction = 0.5
  c.rpn.pre_nms_top_n_train = 12000
  c.rpn.post_nms_top_n_train = 2000
  c.rpn.pre_nms_top_n_test = 6000
  c.rpn.post_nms_top_n_test = 300
  c.rpn.nms_thresh = 0.7
  c.rpn.min_size = 1e-3  # drop proposals narrower/shorter than this (px)
  c.rpn.smooth_l1_beta = 1.0 / 9
  # RoI heads (oim_jax/models/roi_heads.py).
  c.roi = ml_collections.ConfigDict()
  c.roi.batch_size = 128  # sampled RoIs per image
  c.roi.fg_fraction = 0.5  # PyTorch ports 0.5, Caffe original 0.25
  c.roi.fg_iou = 0.5  # RoI fg iff IoU >= 0.5
  c.roi.bg_iou = 0.5  # RoI bg iff bg_iou_lo <= IoU < 0.5
  c.roi.bg_iou_lo = 0.0
  c.roi.pool_size = 14  # RoIAlign output (res5 halves it to 7)
  # Input of the person classifier / box regressor: "pooled" (the paper) or
  # "spatial" (flattened res5 map; needed from scratch, see roi_heads.py).
  c.roi.det_features = "pooled"
  # The same for the identity embedding, plus "stripes" (the res5 map
  # averaged over its width: head / torso / legs, mirror-invariant).
  c.roi.embedding_features = "pooled"
  c.roi.sampling_ratio = 2
  c.roi.aligned = False  # torchvision RoIAlign `aligned`
  c.roi.score_thresh = 0.5  # test: person score threshold
  c.roi.nms_thresh = 0.4  # test: NMS between detections
  c.roi.detections_per_image = 100  # test: M, padded with valid=False
  c.roi.min_size = 1e-2
  c.roi.smooth_l1_beta = 1.0 / 9
  # Test: feed the regressed boxes back through the box head this many more
  # times (scores averaged over the passes); 0 = one pass (the paper).
  c.roi.refine_iters = 0
  # Identity embedding.
  c.embedding_dim = 256
  # "none" | "batchnorm" (BN neck, state in `batch_stats`) | "layernorm"
  c.embedding_norm = "none"
  # RoIs whose projections form the BN neck's batch statistics in training:
  # "all" sampled RoIs (half background) or "persons" (fg RoIs only, the
  # population it normalises at test time).
  c.embedding_bn_rois = "all"
  # Loss weights (total = sum of weight * loss).
  c.loss_weights = ml_collections.ConfigDict(dict(
      rpn_cls=1.0, rpn_reg=1.0, det_cls=1.0, det_reg=1.0, reid=1.0))
  if preset == "tiny":
    c.depth, c.width = 18, 8
    c.freeze_at, c.train_bn, c.zero_init_residual = 0, True, True
    c.stem_space_to_depth = True
    # From scratch, post-ReLU RoI features all point the same way: the BN
    # neck spreads the embeddings so that OIM has a gradient to follow.
    c.embedding_norm = "batchnorm"
    c.anchor_sizes = (16, 32, 64, 128)
    c.rpn.pre_nms_top_n_train, c.rpn.post_nms_top_n_train = 600, 150
    c.rpn.pre_nms_top_n_test, c.rpn.post_nms_top_n_test = 300, 50
    c.roi.batch_size = 32
    c.roi.detections_per_image = 16
    c.embedding_dim = 64
  elif preset != "resnet50":
    raise ValueError(f"unknown model preset {preset!r}: use 'resnet50' or "
                     "'tiny'")
  return c


# Fields with a closed set of values (None: any, checked in _RULES below).
CHOICES = {
    "parallelism": ("shard_map", "pmap"),
    "data.dataset": ("synthetic", "cuhk_sysu", "prw"),
    "data.too_many_gt": ("error", "truncate"),
    "model.depth": (18, 34, 50, 101),
    "model.dtype": ("float32", "bfloat16"),
    "model.freeze_at": (0, 1, 2, 3, 4),
    "model.stride": (16, 8),
    "model.roi.det_features": ("pooled", "spatial"),
    "model.roi.embedding_features": ("pooled", "spatial", "stripes"),
    "model.embedding_norm": ("none", "batchnorm", "layernorm"),
    "model.embedding_bn_rois": ("all", "persons"),
    "oim.loss": ("oim", "softmax"),
    "train.optimizer": ("sgd", "adam"),
    "train.schedule_unit": ("epoch", "step"),
    "train.lr_decay": ("step", "cosine"),
}


def _int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _at_least(low: int, accepts: str):
  return (lambda v: _int(v) and v >= low, accepts)


def _in_range(low: float, high: float, accepts: str, open_low=False,
              open_high=False):
  def test(v):
    return (_num(v) and (v > low if open_low else v >= low)
            and (v < high if open_high else v <= high))
  return (test, accepts)


_POSITIVE_INT = _at_least(1, "a positive integer")
_FRACTION = _in_range(0, 1, "a fraction in (0, 1]", open_low=True)

# field -> (test, what the field accepts).
_RULES = {
    "seed": (_int, "an integer"),
    "data.min_size": _POSITIVE_INT,
    "data.max_size": _POSITIVE_INT,
    "data.max_gt": _POSITIVE_INT,
    "data.num_workers": _at_least(0, "0 or more threads"),
    "data.prefetch_batches": _at_least(1, "1 or more"),
    "model.width": _POSITIVE_INT,
    "model.head_blocks": _at_least(
        0, "0 (the depth's own res5) or a block count"),
    "model.wgrad_im2col_min_channels": _at_least(
        -1, "-1 (auto), 0 (never) or a channel count"),
    "model.embedding_dim": _POSITIVE_INT,
    "model.rpn.batch_size": _POSITIVE_INT,
    "model.rpn.fg_fraction": _FRACTION,
    "model.roi.batch_size": _POSITIVE_INT,
    "model.roi.fg_fraction": _FRACTION,
    "model.roi.refine_iters": _at_least(0, "0 or more"),
    "oim.num_labeled": _POSITIVE_INT,
    "oim.queue_size": _at_least(0, "0 or more"),
    "oim.scalar": (lambda v: _num(v) and v > 0, "a positive number"),
    "oim.momentum": _in_range(0, 1, "a number in [0, 1]"),
    "train.batch_size": _POSITIVE_INT,
    "train.epochs": (lambda v: _num(v) and v >= 0, "0 or more"),
    "train.num_steps": _at_least(0, "0 (use epochs) or a step count"),
    "train.lr": (lambda v: _num(v) and v > 0, "a positive number"),
    "train.ema_decay": _in_range(
        0, 1, "0 (off) or a decay in (0, 1), e.g. 0.998", open_high=True),
    "train.log_every": _POSITIVE_INT,
    "train.checkpoint_every": _at_least(1, "a positive step count"),
    "eval.every_steps": _at_least(0, "0 (only at the end) or a step count"),
    "eval.gallery_size": (lambda v: _int(v) and (v == -1 or v > 0),
                          "-1 (the whole test set) or a gallery size"),
    "eval.batch_size": _POSITIVE_INT,
    "eval.det_thresh": _in_range(0, 1, "a score in [0, 1]"),
}

_MISSING = object()


def _lookup(config, path: str) -> Any:
  node = config
  for key in path.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def choice_error(field: str, value: Any) -> str:
  """The message for a value of `field` outside CHOICES[field]."""
  allowed = ", ".join(repr(v) for v in CHOICES[field])
  return f"config.{field}={value!r}: use one of {allowed}"


def _errors(config, fields) -> list[str]:
  errors = []
  for field in fields:
    value = _lookup(config, field)
    if value is _MISSING:
      continue  # absent in a config.json written before the field existed
    if field in CHOICES:
      if value not in CHOICES[field]:
        errors.append(choice_error(field, value))
    else:
      test, accepts = _RULES[field]
      if not test(value):
        errors.append(f"config.{field}={value!r}: use {accepts}")
  return errors


def _data_errors(config) -> list[str]:
  data = config.get("data")
  if (data is not None and _int(data.get("min_size"))
      and _int(data.get("max_size")) and data.max_size < data.min_size):
    return [f"config.data.max_size={data.max_size} is below "
            f"config.data.min_size={data.min_size}: use max_size >= min_size"]
  return []


def _model_errors(config) -> list[str]:
  model = config.get("model")
  if model is not None and "rpn" in model:
    if model.rpn.get("stride", 0) not in (0, model.get("stride", 16), 16):
      return [f"config.model.rpn.stride={model.rpn.stride!r}: use 0 (C4's "
              "own) or 16 (C4 averaged over 2x2 cells when "
              "config.model.stride=8)"]
  return []


def validate_model(config) -> None:
  """The model's and OIM's fields of `validate` (create_model calls this)."""
  fields = [f for f in (*CHOICES, *_RULES)
            if f.startswith(("model.", "oim."))]
  errors = _errors(config, fields) + _model_errors(config)
  if errors:
    raise ValueError("; ".join(errors))


def validate(config, num_devices: Optional[int] = None) -> None:
  """Checks every field with a rule; raises one ValueError naming all bad ones.

  Args:
    config: a full config (from base_config() and a configs/*.py, or a
      run's config.json). Fields it lacks are skipped.
    num_devices: when given, train.batch_size must be a multiple of it (the
      global batch is split evenly over the devices).
  """
  errors = (_errors(config, (*CHOICES, *_RULES)) + _data_errors(config)
            + _model_errors(config))
  if num_devices and not errors:
    batch = _lookup(config, "train.batch_size")
    if batch is not _MISSING and batch % num_devices:
      errors.append(
          f"config.train.batch_size={batch} must be a multiple of the number "
          f"of devices ({num_devices}); scale config.train.lr with it "
          "(lr = 0.003 x batch_size / 5 for the ResNet-50 recipes)")
  if errors:
    raise ValueError("; ".join(errors))
