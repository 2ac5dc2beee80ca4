"""The full model: shapes, dtypes, single compilation, freezing, overfitting."""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import np_decode, np_greedy_nms
from oim_jax import config_defaults
from oim_jax import oim
from oim_jax.models import person_search as ps
from oim_jax.models import resnet

# Identity -> (top colour, bottom colour) of a drawn "person".
_COLOURS = {0: ((220, 30, 30), (30, 30, 200)),
            1: ((30, 200, 30), (220, 220, 30)),
            2: ((30, 30, 220), (220, 30, 220)),
            -1: ((240, 240, 240), (20, 20, 20))}
# Per image: (image h, w) and persons (pid, x1, y1, x2, y2), drawn at 1.5x.
_SCALE = 1.5
_SCENES = [
    ((h * _SCALE, w * _SCALE), [(p,) + tuple(c * _SCALE for c in box)
                                for p, *box in persons])
    for (h, w), persons in [
        ((128, 192), [(0, 20, 20, 48, 92), (1, 110, 30, 140, 110)]),
        ((128, 176), [(1, 30, 40, 58, 120), (2, 120, 10, 150, 80),
                      (-1, 70, 50, 96, 118)]),
        ((112, 192), [(2, 10, 30, 40, 106), (0, 140, 20, 170, 100)]),
        ((128, 192), [(0, 60, 10, 92, 96), (2, 150, 40, 178, 120),
                      (1, 10, 50, 36, 118)]),
    ]]
_CANVAS = (192, 288)
_MAX_GT = 4


def _config(loss="oim"):
  c = ml_collections.ConfigDict()
  c.model = config_defaults.model_config("tiny")
  c.model.rpn.pre_nms_top_n_train = 300
  c.model.rpn.post_nms_top_n_train = 64
  c.model.rpn.pre_nms_top_n_test = 200
  c.model.rpn.post_nms_top_n_test = 32
  c.model.roi.batch_size = 32
  c.model.roi.detections_per_image = 8
  c.model.embedding_dim = 32
  c.oim = ml_collections.ConfigDict(dict(
      loss=loss, num_labeled=3, queue_size=8, scalar=30.0, momentum=0.5,
      normalize=True))
  return c


def _batch(seed=0):
  """4 synthetic scenes with two-colour rectangles as persons."""
  rng = np.random.default_rng(seed)
  b = len(_SCENES)
  image = np.zeros((b,) + _CANVAS + (3,), np.uint8)
  boxes = np.zeros((b, _MAX_GT, 4), np.float32)
  pids = np.full((b, _MAX_GT), -2, np.int32)
  mask = np.zeros((b, _MAX_GT), bool)
  sizes = np.zeros((b, 2), np.int32)
  for i, ((h, w), persons) in enumerate(_SCENES):
    h, w = int(h), int(w)
    sizes[i] = (h, w)
    image[i, :h, :w] = rng.integers(90, 150, (h, w, 3))
    for j, (pid, x1, y1, x2, y2) in enumerate(persons):
      top, bottom = _COLOURS[pid]
      x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
      ym = (y1 + y2) // 2
      image[i, y1:ym, x1:x2] = top
      image[i, ym:y2, x1:x2] = bottom
      boxes[i, j] = (x1, y1, x2, y2)
      pids[i, j] = pid
      mask[i, j] = True
  return dict(image=image, image_size=sizes, boxes=boxes, pids=pids,
              box_mask=mask)


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) +
                  (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_shapes_dtypes_single_compile_and_embeddings():
  config = _config()
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.PRNGKey(0))
  params, model_state = ps.split_variables(variables)
  assert set(model_state) == {"batch_stats"}  # the tiny preset's BN neck
  state = oim.init_state(3, 8, 32)
  batch = _batch()
  traces = []

  def f(p, s, b, r):
    traces.append(1)  # Python side effect: runs once per trace
    return ps.loss_fn(model, config, p, s, b, r, model_state=model_state)

  step = jax.jit(jax.value_and_grad(f, has_aux=True))
  (loss, aux), grads = step(params, state, batch, jax.random.PRNGKey(1))
  (loss2, _), _ = step(params, state, _batch(seed=1), jax.random.PRNGKey(2))
  assert len(traces) == 1
  assert np.isfinite(loss) and np.isfinite(loss2)
  assert set(aux["losses"]) == {"rpn_cls", "rpn_reg", "det_cls", "det_reg",
                                "reid"}
  # Zero LUT/queue: every logit is 0, the OIM loss is log(L + Q).
  np.testing.assert_allclose(aux["losses"]["reid"], np.log(3 + 8), rtol=1e-5)
  np.testing.assert_allclose(loss, sum(aux["losses"].values()), rtol=1e-5)
  r = 4 * 32
  assert aux["embeddings"].shape == (r, 32)
  assert aux["embeddings"].dtype == jnp.float32
  assert aux["pids"].shape == (r,) and aux["pids"].dtype == jnp.int32
  # Every GT is a candidate RoI, so every labeled pid of the batch appears.
  labeled = sorted(set(np.asarray(aux["pids"]).tolist()))
  assert labeled[0] == -2 and {-1, 0, 1, 2} <= set(labeled)
  flat = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in flat)
  # Training updated the BN neck's running statistics.
  new_stats = jax.tree_util.tree_leaves(aux["model_state"])
  old_stats = jax.tree_util.tree_leaves(model_state)
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(new_stats, old_stats))

  det = jax.jit(lambda p, im, sz: ps.detect(model, p, im, sz))
  out = det(variables, batch["image"], batch["image_size"])
  assert out["boxes"].shape == (4, 8, 4) and out["boxes"].dtype == jnp.float32
  assert out["scores"].shape == (4, 8) and out["valid"].dtype == jnp.bool_
  assert out["embeddings"].shape == (4, 8, 32)
  valid = np.asarray(out["valid"])
  norms = np.linalg.norm(np.asarray(out["embeddings"]), axis=-1)
  np.testing.assert_allclose(norms[valid], 1.0, rtol=1e-5)
  np.testing.assert_array_equal(norms[~valid], 0.0)
  b = np.asarray(out["boxes"])
  assert (b[..., 2] <= batch["image_size"][:, None, 1]).all()
  assert (b[..., 3] <= batch["image_size"][:, None, 0]).all()
  # Detection embeddings are those of the re-pooled final boxes.
  emb = jax.jit(lambda p, im, bx: ps.embed_boxes(model, p, im, bx))(
      variables, batch["image"], out["boxes"])
  np.testing.assert_allclose(np.asarray(emb)[valid],
                             np.asarray(out["embeddings"])[valid], atol=1e-5)


def test_resnet50_model_params_mask_and_softmax_variant():
  config = _config("softmax")
  config.model = config_defaults.model_config("resnet50")
  model = ps.create_model(config)
  shapes = jax.eval_shape(
      lambda k: ps.init_params(model, config, k, pretrained=False),
      jax.random.PRNGKey(0))
  trunk = resnet.count_params(shapes["stem"]) + resnet.count_params(
      shapes["res5"])
  assert trunk == 23_508_032
  assert shapes["reid_classifier"]["classifier"]["kernel"].shape == (256, 3)
  assert shapes["rpn_head"]["cls_logits"]["kernel"].shape == (1, 1, 1024, 15)
  mask = ps.trainable_mask(shapes, config)
  assert not mask["stem"]["conv1"]["kernel"]
  assert not mask["stem"]["layer1_2"]["conv3"]["kernel"]
  assert mask["stem"]["layer2_0"]["conv1"]["kernel"]
  assert not mask["stem"]["layer2_0"]["bn1"]["scale"]
  assert mask["res5"]["layer4_0"]["conv2"]["kernel"]
  assert mask["predictor"]["embedding"]["kernel"]
  # Trainable count: trunk minus conv1/res2 convs and every BN affine.
  n_train = sum(int(np.prod(s.shape)) for s, m in zip(
      jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(mask)) if m)
  bn = sum(int(np.prod(s.shape)) for p, s in
           jax.tree_util.tree_flatten_with_path(shapes)[0]
           if "bn" in str(p[-2]))
  # 53 BNs: channel sum 64 + 1408 + 3584 + 10240 + 11264 = 26,560 (by hand).
  assert bn == 2 * 26_560
  # Frozen (freeze_at=2): conv1 7*7*3*64 = 9,408; res2 convs 73,728 + 2 *
  # 69,632 = 212,992; all BN affines 53,120.
  heads = sum(int(np.prod(s.shape)) for k, v in shapes.items()
              if k not in ("stem", "res5")
              for s in jax.tree_util.tree_leaves(v))
  assert n_train - heads == 23_508_032 - 9_408 - 212_992 - 53_120
  # The softmax loss path traces (shapes only, no compilation).
  batch = jax.tree_util.tree_map(jnp.asarray, _batch())
  config.model.rpn.pre_nms_top_n_train = 100
  total, aux = jax.eval_shape(
      lambda p: ps.loss_fn(model, config, p, oim.init_state(3, 8, 256), batch,
                           jax.random.PRNGKey(0)), shapes)
  assert total.shape == () and aux["embeddings"].shape == (4 * 128, 256)


def test_bad_config_errors():
  config = _config()
  config.oim.loss = "arcface"
  with pytest.raises(ValueError, match="config.oim.loss"):
    ps.create_model(config)
  with pytest.raises(ValueError, match="preset"):
    config_defaults.model_config("resnet9000")
  for field, value in (("stride", 4), ("embedding_bn_rois", "fg"),
                       ("roi.det_features", "flat"),
                       ("roi.embedding_features", "avg"),
                       ("rpn.stride", 32),
                       ("wgrad_im2col_min_channels", -2),
                       ("head_blocks", -1)):
    config = _config()
    config.update_from_flattened_dict({f"model.{field}": value})
    with pytest.raises(ValueError, match=f"config.model.{field}="):
      ps.create_model(config)


def test_wgrad_im2col_auto_is_512_on_cpu_and_old_configs_get_it():
  assert jax.default_backend() == "cpu"
  model_config = config_defaults.model_config("resnet50")
  assert model_config.wgrad_im2col_min_channels == -1
  assert ps.wgrad_im2col_min_channels(model_config) == 512
  model_config.wgrad_im2col_min_channels = 0
  assert ps.wgrad_im2col_min_channels(model_config) == 0
  # config.json of runs from before the field existed.
  old = ml_collections.ConfigDict(config_defaults.model_config("tiny").to_dict())
  del old["wgrad_im2col_min_channels"]
  assert ps.wgrad_im2col_min_channels(old) == 512


@pytest.mark.parametrize("platform,im2col,s2d,method", [
    (None, 512, True, "gather"),  # the default backend: CPU here
    ("cpu", 512, True, "gather"),
    ("tpu", 0, False, "einsum"),
    ("gpu", 0, False, "gather"),
    ("cuda", 0, False, "gather"),
    ("rocm", 0, False, "gather"),
])
def test_create_model_resolves_backend_choices_for_the_platform(
    platform, im2col, s2d, method):
  config = _config()  # the tiny preset: stem_space_to_depth = True
  assert config.model.stem_space_to_depth
  model = ps.create_model(config, platform=platform)
  assert model.platform == {"cuda": "gpu", "rocm": "gpu"}.get(
      platform, platform or "cpu")
  assert _conv_option(model.conv3x3, "wgrad_im2col_min_channels") == im2col
  assert _conv_option(model.stem_conv, "space_to_depth") == s2d
  assert model.roi_align_method == method
  # An explicit threshold wins everywhere; space-to-depth only ever on CPU.
  config.model.wgrad_im2col_min_channels = 16
  config.model.stem_space_to_depth = False
  model = ps.create_model(config, axis_name="data", platform=platform)
  assert _conv_option(model.conv3x3, "wgrad_im2col_min_channels") == 16
  assert model.stem_conv is resnet.StemConv
  assert model.axis_name == "data"


def _conv_option(conv_module, name):
  """The option a conv module (class or partial) is built with."""
  if conv_module in (resnet.StemConv, resnet.Conv3x3):
    return getattr(conv_module, name)  # the class default
  assert conv_module.func in (resnet.StemConv, resnet.Conv3x3)
  return conv_module.keywords[name]


def test_create_model_rejects_an_unknown_platform():
  with pytest.raises(ValueError, match="platform='metal'"):
    ps.create_model(_config(), platform="metal")
  with pytest.raises(ValueError, match="platform="):
    ps.wgrad_im2col_min_channels(config_defaults.model_config(), platform="xpu")


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_model_trace_does_not_ask_for_the_default_backend(monkeypatch,
                                                          platform):
  """The choices are fixed at build time, not looked up while tracing."""
  config = _config()
  model = ps.create_model(config, platform=platform)
  variables = jax.eval_shape(
      lambda: ps.init_variables(model, config, jax.random.PRNGKey(0)))
  params, model_state = ps.split_variables(variables)
  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  batch = jax.tree.map(abstract, _batch())
  state = jax.eval_shape(lambda: oim.init_state(3, 8, 32))

  def fail():
    raise AssertionError("jax.default_backend() called while tracing")
  monkeypatch.setattr(jax, "default_backend", fail)
  grad = jax.grad(lambda p, ms, st, b: ps.loss_fn(
      model, config, p, st, b, jax.random.PRNGKey(1), model_state=ms)[0])
  jax.make_jaxpr(grad)(params, model_state, state, batch)
  jax.make_jaxpr(lambda v, b: ps.detect(model, v, b["image"],
                                        b["image_size"]))(variables, batch)


def test_rpn_on_pooled_stride8_map():
  config = _config()
  config.model.stride = 8
  config.model.rpn.stride = 16
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.PRNGKey(0))
  # Odd sizes: the last row / column of 2x2 cells is incomplete.
  c4 = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
  pooled = np.asarray(model.apply(variables, c4,
                                  method=lambda m, x: m.rpn_input(x)))
  x = np.asarray(c4, np.float64)
  ref = np.zeros((2, 3, 4, 3))
  for i in range(3):
    for j in range(4):
      ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  np.testing.assert_allclose(pooled, ref, rtol=1e-5, atol=1e-6)
  # Its anchors are the stride-16 model's for the same image.
  size = jnp.array([[72, 100], [80, 112]], jnp.int32)
  a8, v8 = model.apply(variables, jnp.asarray(pooled), size,
                       method=lambda m, r, s: m.anchors(r, s))
  config16 = _config()
  model16 = ps.create_model(config16)
  c4_16 = jnp.zeros((2, 3, 4, 3))
  a16, v16 = model16.apply({}, c4_16, size,
                           method=lambda m, r, s: m.anchors(r, s))
  np.testing.assert_array_equal(np.asarray(a8), np.asarray(a16))
  np.testing.assert_array_equal(np.asarray(v8), np.asarray(v16))
  # The whole train step runs and the RoI features come from the finer map.
  params, model_state = ps.split_variables(variables)
  loss, aux = ps.loss_fn(model, config, params, oim.init_state(3, 8, 32),
                         _batch(), jax.random.PRNGKey(2),
                         model_state=model_state)
  assert np.isfinite(loss) and aux["embeddings"].shape == (4 * 32, 32)


@pytest.mark.slow
def test_tiny_model_overfits_four_images():
  config = _config()
  model = ps.create_model(config)
  params, model_state = ps.split_variables(
      ps.init_variables(model, config, jax.random.PRNGKey(0)))
  state = oim.init_state(3, 8, 32)
  batch = jax.tree_util.tree_map(jnp.asarray, _batch())
  num_steps = 300
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, num_steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, model_state, opt_state, state, rng):
    (_, aux), grads = jax.value_and_grad(
        lambda p: ps.loss_fn(model, config, p, state, batch, rng,
                             model_state=model_state),
        has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = oim.update_state(state, aux["embeddings"], aux["pids"],
                             momentum=0.5)
    return params, aux["model_state"], opt_state, state, aux["losses"]

  history = []
  t0 = time.time()
  for i in range(num_steps):
    params, model_state, opt_state, state, losses = step(
        params, model_state, opt_state, state, jax.random.PRNGKey(100 + i))
    history.append({k: float(v) for k, v in losses.items()})
  print(f"{num_steps} steps in {time.time() - t0:.1f} s")
  det = lambda h: h["rpn_cls"] + h["rpn_reg"] + h["det_cls"] + h["det_reg"]
  # Initial losses (step 0, before any update; re-id = log(L + Q) with the
  # zero LUT/queue) vs the mean of the last 20 steps. det_reg starts near 0
  # because at init almost no proposal is fg, so the sum is compared.
  last = history[-20:]
  det0, det1 = det(history[0]), np.mean([det(h) for h in last])
  reid0, reid1 = history[0]["reid"], np.mean([h["reid"] for h in last])
  np.testing.assert_allclose(reid0, np.log(3 + 8), rtol=1e-5)
  print(f"detection loss {det0:.3f} -> {det1:.3f}, re-id {reid0:.3f} -> "
        f"{reid1:.3f}")
  assert det1 < 0.5 * det0 and reid1 < 0.5 * reid0

  out = jax.jit(lambda p, im, sz: ps.detect(model, p, im, sz))(
      {"params": params, **model_state}, batch["image"], batch["image_size"])
  lut = np.asarray(state.lut)
  for i, (_, persons) in enumerate(_SCENES):
    valid = np.asarray(out["valid"][i])
    boxes = np.asarray(out["boxes"][i])[valid]
    emb = np.asarray(out["embeddings"][i])[valid]
    for pid, *gt in persons:
      ious = [_iou(b, gt) for b in boxes]
      assert ious and max(ious) >= 0.5, (i, pid, gt, boxes)
      if pid >= 0:
        # The detection on this person is nearest to its own LUT row.
        e = emb[int(np.argmax(ious))]
        assert int(np.argmax(lut @ e)) == pid, (i, pid, lut @ e)


def test_flip_test_averages_mirrored_embeddings():
  config = _config()
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.PRNGKey(0))
  batch = _batch()
  embed = lambda flip: jax.jit(lambda im, bx, sz: ps.embed_boxes(
      model, variables, im, bx, sz, flip_test=flip))
  plain, flipped = embed(False), embed(True)
  # The mirrored scenes, built in NumPy.
  images, boxes = batch["image"].copy(), batch["boxes"].copy()
  for i, (h, w) in enumerate(batch["image_size"]):
    images[i, :h, :w] = batch["image"][i, :h, :w][:, ::-1]
    boxes[i, :, 0] = w - batch["boxes"][i, :, 2]
    boxes[i, :, 2] = w - batch["boxes"][i, :, 0]
  sizes = batch["image_size"]
  e = np.asarray(plain(batch["image"], batch["boxes"], sizes))
  e_mirror = np.asarray(plain(images, boxes, sizes))
  want = (e + e_mirror) / np.linalg.norm(e + e_mirror, axis=-1,
                                         keepdims=True)
  got = np.asarray(flipped(batch["image"], batch["boxes"], sizes))
  m = batch["box_mask"]
  np.testing.assert_allclose(got[m], want[m], atol=1e-5)
  assert np.abs(e[m] - e_mirror[m]).max() > 1e-3  # the flip matters
  # Mirror-invariant: the mirrored scene gives the same embeddings.
  np.testing.assert_allclose(np.asarray(flipped(images, boxes, sizes))[m],
                             got[m], atol=1e-5)
  # detect(): same boxes as without flipping, flip-averaged embeddings.
  det = lambda flip: jax.jit(lambda im, sz: ps.detect(
      model, variables, im, sz, flip_test=flip))(batch["image"], sizes)
  d0, d1 = det(False), det(True)
  np.testing.assert_array_equal(np.asarray(d0["boxes"]),
                                np.asarray(d1["boxes"]))
  valid = np.asarray(d1["valid"])
  assert valid.any()
  ref = np.asarray(flipped(batch["image"], d1["boxes"], sizes))
  np.testing.assert_allclose(np.asarray(d1["embeddings"])[valid],
                             ref[valid], atol=1e-5)


def _decode_clip_np(deltas, boxes, size):
  """The RoI head's decoding (weights 10, 10, 5, 5), clipped to (h, w)."""
  out = np_decode(deltas, boxes, (10.0, 10.0, 5.0, 5.0))
  out[:, 0::2] = np.clip(out[:, 0::2], 0, size[1])
  out[:, 1::2] = np.clip(out[:, 1::2], 0, size[0])
  return out


def test_iterative_box_refinement_matches_numpy_two_pass():
  config = _config()
  config.model.roi.score_thresh = 0.3  # an untrained head: keep some boxes
  model = ps.create_model(config)
  variables = ps.init_variables(model, config, jax.random.PRNGKey(0))
  batch = _batch()
  images, sizes = batch["image"], batch["image_size"]
  refined_config = _config()
  refined_config.model.roi.score_thresh = 0.3
  refined_config.model.roi.refine_iters = 1
  refined_model = ps.create_model(refined_config)
  got = jax.jit(lambda im, sz: ps.detect(
      refined_model, variables, im, sz))(images, sizes)

  def first_pass(m, im, sz):
    c4 = m.features(im)
    rpn_map = m.rpn_input(c4)
    logits, deltas = m.rpn_head(rpn_map)
    props, valid = m.proposals(rpn_map, sz, logits, deltas, False)
    cls, d, _ = m.predictor(m.box_features(c4, props))
    return props, valid, cls, d

  def head(m, im, boxes):
    cls, d, _ = m.predictor(m.box_features(m.features(im), boxes))
    return cls, d

  props, pvalid, cls1, d1 = map(np.asarray, model.apply(
      variables, images, sizes, method=first_pass))
  b, p = props.shape[:2]
  refined = np.stack([_decode_clip_np(d1.reshape(b, p, 4)[i], props[i], sizes[i])
                      for i in range(b)]).astype(np.float32)
  cls2, d2 = map(np.asarray, model.apply(variables, images, refined,
                                         method=head))
  soft = lambda z: (np.exp(z) / np.exp(z).sum(-1, keepdims=True))[..., 1]
  scores = (soft(cls1.reshape(b, p, 2)) + soft(cls2.reshape(b, p, 2))) / 2
  n_kept = 0
  for i in range(b):
    final = _decode_clip_np(d2.reshape(b, p, 4)[i], refined[i], sizes[i])
    ok = (pvalid[i] & (scores[i] >= 0.3) &
          (final[:, 2] - final[:, 0] >= 1e-2) &
          (final[:, 3] - final[:, 1] >= 1e-2))
    keep = np_greedy_nms(final, scores[i], 0.4, valid=ok)[:8]
    valid = np.asarray(got["valid"][i])
    assert valid.sum() == len(keep), (i, valid.sum(), len(keep))
    np.testing.assert_allclose(np.asarray(got["boxes"][i])[valid],
                               final[keep], atol=2e-3)
    np.testing.assert_allclose(np.asarray(got["scores"][i])[valid],
                               scores[i][keep], atol=1e-5)
    n_kept += len(keep)
    # The second pass moved the boxes: refinement is not a no-op here.
    assert np.abs(refined[i][pvalid[i]] - props[i][pvalid[i]]).max() > 1e-3
  assert n_kept > 0
