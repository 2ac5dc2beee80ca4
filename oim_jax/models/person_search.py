"""The person-search network: ResNet stem -> RPN -> RoIAlign -> res5 -> heads.

Public faces (the train/eval libraries call these):
  create_model(config, axis_name=None, platform=None) -> PersonSearch
  init_variables(model, config, rng, pretrained=True) -> {"params", ...}
  init_params(model, config, rng, pretrained=True) -> params
  trainable_mask(params, config)                 -> pytree of bools
  loss_fn(model, config, params, oim_state, batch, rng, train=True,
          model_state=None, axis_name=None)
      -> (total_loss, aux{"losses", "embeddings" [B*R, D], "pids" [B*R],
                          "model_state"})
  detect(model, variables, images, image_sizes, *, flip_test=False)
      -> {"boxes" [B,M,4], "scores" [B,M], "embeddings" [B,M,D], "valid" [B,M]}
  embed_boxes(model, variables, images, boxes [B,K,4], image_sizes=None, *,
              flip_test=False) -> [B,K,D]

`config` is the full config (`config.model`, `config.oim`; the fields and
their defaults: oim_jax/config_defaults.py); `params` is the
'params' collection; `variables` the params alone or the full variables dict
({"params", "batch_stats"} with the BatchNorm neck). Images are uint8 [B, H, W, 3] canvases (H, W multiples of
32), normalised on device. All shapes are static; boxes are float32 pixels
(x1, y1, x2, y2) of the resized canvas.
"""

import functools
from typing import Any, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from oim_jax import config_defaults
from oim_jax import oim
from oim_jax import ops
from oim_jax import pretrained as pretrained_lib
from oim_jax.models import resnet
from oim_jax.models import roi_heads
from oim_jax.models import rpn
from oim_jax.ops import sampling
from oim_jax.ops.roi_align import DEFAULT_METHOD as _ROI_ALIGN_METHOD

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# Target platforms create_model accepts -> the name the choices below use.
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu",
             "tpu": "tpu"}


def resolve_platform(platform=None) -> str:
  """The target platform, normalised: "cpu" | "gpu" | "tpu".

  Args:
    platform: "cpu", "gpu", "cuda", "rocm" or "tpu"; None = the default
      backend of this process (where the model will run unless it is
      exported or compiled ahead of time for another platform).
  """
  if platform is None:
    # Other accelerator plugins get the GPU choices (what they got when the
    # choices were made from the default backend at trace time).
    return PLATFORMS.get(jax.default_backend(), "gpu")
  name = str(platform).lower()
  if name not in PLATFORMS:
    raise ValueError(f"platform={platform!r}: use None (the default backend) "
                     f"or one of {sorted(PLATFORMS)}")
  return PLATFORMS[name]


def wgrad_im2col_min_channels(model_config, platform=None) -> int:
  """`model.wgrad_im2col_min_channels` resolved for `platform`.

  -1 (auto) -> 512 on CPU, else 0; an explicit value wins on any platform.
  Configs saved before the field existed (config.json of older runs) get
  the auto value. platform: as `resolve_platform`.
  """
  value = model_config.get("wgrad_im2col_min_channels", -1)
  if value == -1:
    return 512 if resolve_platform(platform) == "cpu" else 0
  if value < 0:
    raise ValueError(f"config.model.wgrad_im2col_min_channels={value}: use "
                     "-1 (auto), 0 (never) or a channel count")
  return value


def stem_space_to_depth(model_config, platform=None) -> bool:
  """`model.stem_space_to_depth` on CPU; False elsewhere.

  The space-to-depth conv1 gives the same numbers and is only an XLA:CPU
  speed trick, so on accelerators the library's strided conv is used.
  """
  return (bool(model_config.get("stem_space_to_depth", False))
          and resolve_platform(platform) == "cpu")


def conv_modules(model_config, platform=None
                 ) -> Tuple[resnet.ModuleDef, resnet.ModuleDef]:
  """(stem_conv, conv3x3): the backbone's and RPN's conv modules for `platform`.

  The plain XLA convolutions, or on CPU (as the config asks) their CPU-only
  forms with the same parameters and numbers: conv1 over 2x2 pixel blocks,
  3x3 weight gradients as im2col matmuls.
  """
  stem_conv, conv3x3 = resnet.StemConv, resnet.Conv3x3
  if stem_space_to_depth(model_config, platform):
    stem_conv = functools.partial(resnet.StemConv, space_to_depth=True)
  min_channels = wgrad_im2col_min_channels(model_config, platform)
  if min_channels:
    conv3x3 = functools.partial(resnet.Conv3x3,
                                wgrad_im2col_min_channels=min_channels)
  return stem_conv, conv3x3


def stem_max_pool(platform=None):
  """The stem's max pool for `platform`: the sliced form on CPU (faster
  there, its docstring says why), one reduce_window elsewhere."""
  if resolve_platform(platform) == "cpu":
    return resnet.max_pool_3x3_s2
  return resnet.max_pool_window


def roi_align_method(platform=None) -> str:
  """RoIAlign formulation for `platform`: "gather" (CPU, GPU), "einsum" (TPU)."""
  return _ROI_ALIGN_METHOD[resolve_platform(platform)]


class PersonSearch(nn.Module):
  """Detector + re-identification network (Xiao et al., CVPR 2017).

  Attributes:
    config: frozen `config.model`.
    num_softmax_classes: > 0 adds the softmax-baseline identity classifier
      (config.oim.loss == "softmax") with that many classes.
    axis_name: data-parallel axis (synchronised BN neck).
    platform, stem_conv, conv3x3, max_pool, roi_align_method: the
      backend-specific choices, resolved for the target platform by
      `create_model` (the defaults suit any platform; `conv_modules`,
      `stem_max_pool`). Fixed when the model is built, so that tracing for
      another platform (export, AOT compilation) does not pick the host's
      code paths.
  """
  config: Any
  num_softmax_classes: int = 0
  axis_name: Any = None
  platform: str = ""  # "cpu" | "gpu" | "tpu"; informational
  stem_conv: resnet.ModuleDef = resnet.StemConv
  conv3x3: resnet.ModuleDef = resnet.Conv3x3
  max_pool: Any = resnet.max_pool_window
  roi_align_method: str = "gather"  # ops.roi_align `method`

  def setup(self):
    c = self.config
    dtype = _dtype(c)
    c4 = resnet.stem_channels(c.depth, c.width)
    self.stem = resnet.ResNetStem(c.depth, c.width, c.freeze_at, c.train_bn,
                                  c.zero_init_residual, dtype, c.norm_groups,
                                  c.stride, stem_conv=self.stem_conv,
                                  conv3x3=self.conv3x3,
                                  max_pool=self.max_pool)
    self.rpn_head = rpn.RPNHead(ops.num_anchors(c.anchor_sizes,
                                                c.anchor_ratios),
                                c.rpn.channels or c4, dtype,
                                conv3x3=self.conv3x3)
    self.res5 = resnet.ResNetHead(c.depth, c.width, c.train_bn,
                                  c.zero_init_residual, dtype, c.norm_groups,
                                  pool=False, conv3x3=self.conv3x3,
                                  blocks=c.get("head_blocks", 0))
    self.predictor = roi_heads.BoxPredictor(c.embedding_dim,
                                            c.embedding_norm, dtype,
                                            self.axis_name,
                                            c.roi.det_features,
                                            c.roi.embedding_features)
    if self.num_softmax_classes:
      self.reid_classifier = oim.SoftmaxClassifier(self.num_softmax_classes)

  # -- building blocks ----------------------------------------------------

  def features(self, images):
    """uint8 [B, H, W, 3] -> C4 [B, H/s, W/s, C4], s = config.stride."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3] uint8, got "
                       f"{images.shape} {images.dtype}")
    return self.stem(ops.normalize(images, _dtype(self.config)))

  def rpn_stride(self) -> int:
    """Stride of the map the RPN reads: config.rpn.stride, 0 = C4's."""
    return self.config.rpn.stride or self.config.stride

  def rpn_input(self, c4):
    """C4 -> the RPN's input map [B, H/r, W/r, C4], r = rpn_stride().

    With a stride-8 C4 and rpn.stride 16 the RPN reads C4 averaged over 2x2
    cells: stride-16 anchors (4x fewer, each cell seeing twice the context)
    while the RoI features still come from the finer map.
    """
    if self.rpn_stride() == self.config.stride:
      return c4
    return nn.avg_pool(c4, (2, 2), strides=(2, 2), padding="SAME",
                       count_include_pad=False)

  def anchors(self, rpn_map, image_size):
    """rpn_map: [B, h, w, C] (rpn_input) -> (anchors [A, 4], valid [B, A])."""
    c = self.config
    a = ops.anchors(tuple(rpn_map.shape[1:3]), self.rpn_stride(),
                    c.anchor_sizes, c.anchor_ratios)
    valid = jax.vmap(rpn.anchor_valid_mask, (None, 0))(a, image_size)
    return a, valid

  def proposals(self, rpn_map, image_size, logits, deltas, train: bool):
    """-> (proposals [B, P, 4], valid [B, P]); no gradient."""
    c = self.config.rpn
    anchors, valid = self.anchors(rpn_map, image_size)
    pre = c.pre_nms_top_n_train if train else c.pre_nms_top_n_test
    post = c.post_nms_top_n_train if train else c.post_nms_top_n_test
    fn = lambda l, d, v, s: rpn.proposals(
        l, d, anchors, v, s, pre_nms_top_n=pre, post_nms_top_n=post,
        nms_thresh=c.nms_thresh, min_size=c.min_size)
    return jax.vmap(fn)(jax.lax.stop_gradient(logits),
                        jax.lax.stop_gradient(deltas), valid, image_size)

  def box_features(self, c4, boxes):
    """C4 [B, h, w, C], boxes [B, K, 4] -> res5 maps [B*K, h5, w5, C5]."""
    c = self.config.roi
    rois = ops.roi_align_per_image(
        c4, jax.lax.stop_gradient(boxes),
        output_size=(c.pool_size, c.pool_size),
        spatial_scale=1.0 / self.config.stride,
        sampling_ratio=c.sampling_ratio, aligned=c.aligned,
        method=self.roi_align_method)
    return self.res5(rois.reshape((-1,) + rois.shape[2:]))

  def __call__(self, images, boxes):
    """Touches every submodule (used by init): returns embeddings [B*K, D]."""
    c4 = self.features(images)
    self.rpn_head(self.rpn_input(c4))
    _, _, emb = self.predictor(self.box_features(c4, boxes))
    if self.num_softmax_classes:
      self.reid_classifier(emb)
    return emb

  # -- the three uses -----------------------------------------------------

  def train_outputs(self, batch, key, train: bool = True):
    """Losses (except re-id), sampled-RoI embeddings and pids.

    Args:
      batch: the pipeline's dict ("image", "image_size", "boxes", "pids",
        "box_mask").
      key: PRNG key for anchor and RoI sampling.
      train: use the training (else test) pre/post-NMS proposal counts.
    """
    c = self.config
    images = jnp.asarray(batch["image"])
    image_size = jnp.asarray(batch["image_size"], jnp.int32)
    gt_boxes = jnp.asarray(batch["boxes"], jnp.float32)
    gt_pids = jnp.asarray(batch["pids"], jnp.int32)
    gt_valid = jnp.asarray(batch["box_mask"], bool)
    b = images.shape[0]
    c4 = self.features(images)
    rpn_map = self.rpn_input(c4)
    logits, deltas = self.rpn_head(rpn_map)
    anchors, anchor_valid = self.anchors(rpn_map, image_size)
    # One key per image from its dataset index: the sampling of an image
    # does not depend on how the global batch is split over devices.
    if "index" in batch:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
          jnp.asarray(batch["index"], jnp.int32))
    else:
      keys = jax.random.split(key, b)
    key_rpn, key_roi = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    targets = jax.vmap(lambda v, g, m, k: rpn.rpn_targets(
        anchors, v, g, m, k, fg_iou=c.rpn.fg_iou, bg_iou=c.rpn.bg_iou,
        batch_size=c.rpn.batch_size, fg_fraction=c.rpn.fg_fraction))(
            anchor_valid, gt_boxes, gt_valid, key_rpn)
    rpn_cls, rpn_reg = rpn.rpn_losses(logits, deltas, targets,
                                      c.rpn.smooth_l1_beta)

    props, props_valid = self.proposals(rpn_map, image_size, logits, deltas,
                                        train)
    samples = jax.vmap(lambda p, pv, g, gp, m, k: roi_heads.sample_rois(
        p, pv, g, gp, m, k, batch_size=c.roi.batch_size,
        fg_fraction=c.roi.fg_fraction, fg_iou=c.roi.fg_iou,
        bg_iou=c.roi.bg_iou, bg_iou_lo=c.roi.bg_iou_lo))(
            props, props_valid, gt_boxes, gt_pids, gt_valid, key_roi)
    flat = jax.tree_util.tree_map(
        lambda x: x.reshape((-1,) + x.shape[2:]), samples)
    stats_mask = None
    if c.embedding_bn_rois == "persons":
      stats_mask = flat.labels == sampling.FG
    elif c.embedding_bn_rois != "all":
      raise ValueError(f"model.embedding_bn_rois={c.embedding_bn_rois!r}: "
                       "use 'all' or 'persons'")
    cls_logits, box_deltas, emb = self.predictor(
        self.box_features(c4, samples.boxes), train, stats_mask)
    det_cls, det_reg = roi_heads.detection_losses(
        cls_logits, box_deltas, flat, c.roi.smooth_l1_beta)
    out = {"losses": {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg,
                      "det_cls": det_cls, "det_reg": det_reg},
           "embeddings": emb, "pids": flat.pids}
    if self.num_softmax_classes:
      out["reid_logits"] = self.reid_classifier(emb)
    return out

  def detect(self, images, image_sizes, flip_test: bool = False):
    """Detections with embeddings of the final (regressed) boxes.

    With config.roi.refine_iters = N > 0 the box head runs N more times on
    its own regressed boxes (static shapes: the same P boxes per pass).
    flip_test: also embed the boxes in the mirrored images and average.
    """
    c = self.config.roi
    image_sizes = jnp.asarray(image_sizes, jnp.int32)
    c4 = self.features(images)
    rpn_map = self.rpn_input(c4)
    logits, deltas = self.rpn_head(rpn_map)
    props, props_valid = self.proposals(rpn_map, image_sizes, logits, deltas,
                                        False)
    b, p = props.shape[:2]

    def box_head(boxes):  # [B, P, 4] -> logits [B, P, 2], deltas [B, P, 4]
      logits, deltas, _ = self.predictor(self.box_features(c4, boxes))
      return logits.reshape(b, p, 2), deltas.reshape(b, p, 4)

    cls_logits, box_deltas = box_head(props)
    scores = jax.nn.softmax(cls_logits, axis=-1)[..., 1]
    # Iterative regression (Gidaris & Komodakis 2015): the head's boxes are
    # fed back through the same head; the scores of all passes are averaged.
    passes = 1 + c.get("refine_iters", 0)
    for _ in range(passes - 1):
      props = jax.vmap(roi_heads.refine_boxes)(props, box_deltas, image_sizes)
      cls_logits, box_deltas = box_head(props)
      scores += jax.nn.softmax(cls_logits, axis=-1)[..., 1]
    scores = scores / passes
    boxes, scores, valid = jax.vmap(lambda pr, pv, cl, d, s, sc:
                                    roi_heads.postprocess(
        pr, pv, cl, d, s, score_thresh=c.score_thresh,
        nms_thresh=c.nms_thresh, detections=c.detections_per_image,
        min_size=c.min_size, scores=sc))(
            props, props_valid, cls_logits, box_deltas, image_sizes, scores)
    # OIM inference: re-pool the regressed boxes and embed them.
    emb = self.embed(c4, boxes)
    if flip_test:
      emb = self._with_flipped(emb, images, image_sizes, boxes)
    emb = jnp.where(valid[..., None], emb, 0.0)
    return {"boxes": boxes, "scores": scores, "embeddings": emb,
            "valid": valid}

  def embed(self, c4, boxes):
    """C4, boxes [B, K, 4] -> embeddings [B, K, D]."""
    _, _, emb = self.predictor(self.box_features(c4, boxes))
    return emb.reshape(boxes.shape[:2] + emb.shape[-1:])

  def embed_images(self, images, boxes, image_sizes=None,
                   flip_test: bool = False):
    """uint8 images [B, H, W, 3], boxes [B, K, 4] -> embeddings [B, K, D]."""
    boxes = jnp.asarray(boxes, jnp.float32)
    emb = self.embed(self.features(images), boxes)
    if flip_test:
      if image_sizes is None:
        raise ValueError("flip_test needs image_sizes (the valid h, w of "
                         "each padded image)")
      emb = self._with_flipped(emb, images, image_sizes, boxes)
    return emb

  def _with_flipped(self, emb, images, image_sizes, boxes):
    """The mean of emb and the mirrored boxes' embeddings, re-normalised."""
    widths = jnp.asarray(image_sizes, jnp.int32)[:, 1]
    flipped = self.embed(self.features(ops.flip_images(images, widths)),
                         ops.flip_boxes(boxes, widths))
    mean = emb + flipped
    return mean * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(mean * mean, axis=-1, keepdims=True), 1e-12))


def _dtype(model_config):
  if model_config.dtype not in _DTYPES:
    raise ValueError(config_defaults.choice_error("model.dtype",
                                                  model_config.dtype))
  return _DTYPES[model_config.dtype]


def create_model(config, axis_name=None, platform=None) -> PersonSearch:
  """Builds the module from the full config (`config.model`, `config.oim`).

  Args:
    config: the full config.
    axis_name: the data-parallel axis the train step runs under (for the
      synchronised BatchNorm neck); None for inference or a plain jit.
    platform: the platform the model is traced for: "cpu", "gpu", "cuda",
      "rocm" or "tpu"; None = the default backend. The backend-specific
      choices (im2col weight gradients, RoIAlign formulation, the
      space-to-depth stem, the max pool) are resolved here, once: pass the
      target when exporting or compiling ahead of time for another platform.
  """
  config_defaults.validate_model(config)
  target = resolve_platform(platform)
  loss = config.oim.loss
  stem_conv, conv3x3 = conv_modules(config.model, target)
  return PersonSearch(
      ml_collections.FrozenConfigDict(config.model),
      config.oim.num_labeled if loss == "softmax" else 0, axis_name,
      platform=target, stem_conv=stem_conv, conv3x3=conv3x3,
      max_pool=stem_max_pool(target),
      roi_align_method=roi_align_method(target))


def init_variables(model: PersonSearch, config, rng, pretrained: bool = True):
  """Random init, then the converted ImageNet weights if configured.

  Returns:
    {"params": ..., and "batch_stats" when the BN neck is used}: nested
    dicts of float32 arrays.
  """
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  boxes = jnp.array([[[0.0, 0.0, 32.0, 32.0]]], jnp.float32)
  variables = flax.core.unfreeze(jax.jit(model.init)(rng, images, boxes))
  params = variables["params"]
  path = config.model.pretrained
  if pretrained and path:
    weights = pretrained_lib.load(path)
    if config.model.get("head_blocks", 0) and "res5" in weights:
      # A shortened res5 takes the file's first blocks; the rest are unused.
      weights["res5"] = {k: v for k, v in weights["res5"].items()
                         if k in params["res5"]}
    params = pretrained_lib.merge(params, weights,
                                  source=f"config.model.pretrained={path}")
    params = jax.tree_util.tree_map(jnp.asarray, params)
  variables["params"] = params
  return variables


def init_params(model: PersonSearch, config, rng, pretrained: bool = True):
  """The 'params' collection of `init_variables`."""
  return init_variables(model, config, rng, pretrained)["params"]


def split_variables(variables):
  """-> (params, model_state: the other collections, e.g. batch_stats)."""
  state = {k: v for k, v in variables.items() if k != "params"}
  return variables["params"], state


def _variables(params_or_variables):
  """Accepts the params collection or a full variables dict."""
  if "params" in params_or_variables:
    return params_or_variables
  return {"params": params_or_variables}


def trainable_mask(params, config):
  """Pytree of bools like `params`: True where the optimizer updates."""
  c = config.model

  def leaf(path, _):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if names[0] in ("stem", "res5"):
      return resnet.backbone_trainable(names[1:], c.freeze_at, c.train_bn)
    return True

  return jax.tree_util.tree_map_with_path(leaf, params)


def loss_fn(model: PersonSearch, config, params, oim_state, batch, rng,
            train: bool = True, model_state=None, axis_name=None):
  """Total training loss and what the OIM update needs.

  Args:
    model, config: from create_model.
    params: the 'params' collection (differentiated).
    oim_state: the OIM lookup table and queue.
    batch: the pipeline's batch (this device's part of it).
    rng: the step's key; each image's sampling key is folded from its index.
    train: training mode (training proposal counts, BN-neck batch stats).
    model_state: the other variable collections ({"batch_stats": ...} with
      the BN neck, else {}).
    axis_name: inside a data-parallel step, the device axis: the re-id loss
      is then normalised by the number of labeled RoIs of the whole global
      batch, so that the mean of the per-device gradients is the gradient of
      the global-batch loss.

  Returns:
    (total, aux) with aux = {"losses": {rpn_cls, rpn_reg, det_cls, det_reg,
    reid}, "embeddings": [B*R, D] (no gradient), "pids": [B*R] int32 (-2 for
    background and unused RoI slots), "model_state": updated collections}.
  """
  model_state = dict(model_state or {})
  variables = {"params": params, **model_state}
  if train and model_state:
    out, model_state = model.apply(variables, batch, rng, train,
                                   method=PersonSearch.train_outputs,
                                   mutable=list(model_state))
    model_state = dict(model_state)
  else:
    out = model.apply(variables, batch, rng, train,
                      method=PersonSearch.train_outputs)
  if config.oim.loss == "softmax":
    reid = oim.softmax_loss(out["reid_logits"], out["pids"])
  else:
    reid = oim.oim_loss(oim_state, out["embeddings"], out["pids"],
                        config.oim.scalar)
  if axis_name is not None:
    local = jnp.sum(out["pids"] >= 0).astype(jnp.float32)
    total_labeled = jax.lax.psum(local, axis_name)
    devices = jax.lax.psum(1.0, axis_name)
    reid = reid * local * devices / jnp.maximum(total_labeled, 1.0)
  losses = dict(out["losses"], reid=reid)
  w = config.model.loss_weights
  total = sum(w[k] * v for k, v in losses.items())
  aux = {"losses": losses,
         "embeddings": jax.lax.stop_gradient(out["embeddings"]),
         "pids": out["pids"], "model_state": model_state}
  return total, aux


def detect(model: PersonSearch, params, images, image_sizes, *,
           flip_test: bool = False):
  """uint8 images [B, H, W, 3], image_sizes [B, 2] (h, w) -> detections.

  flip_test: also embed the boxes in the mirrored images and average (the
  evaluation's config.eval.flip_test; the boxes are the unflipped image's).

  Returns:
    {"boxes" [B, M, 4], "scores" [B, M], "embeddings" [B, M, D],
     "valid" bool [B, M]} with M = config.model.roi.detections_per_image.
  """
  return model.apply(_variables(params), images, image_sizes, flip_test,
                     method=PersonSearch.detect)


def embed_boxes(model: PersonSearch, params, images, boxes, image_sizes=None,
                *, flip_test: bool = False):
  """Embeddings of given boxes (e.g. a query's GT box): [B, K, D].

  image_sizes [B, 2] (h, w) is needed with flip_test (as in `detect`).
  """
  return model.apply(_variables(params), images, boxes, image_sizes,
                     flip_test, method=PersonSearch.embed_images)
