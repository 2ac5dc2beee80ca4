"""Cross-platform export: the model lowers for TPU and GPU from a CPU host.

`create_model(config, platform=...)` fixes the backend-specific choices for
the target platform; these tests lower the real ResNet-50 train step of
configs/cuhk.py (its landscape canvas, per-device batch 2, inside the
trainer's shard_map over meshes of 1 and 8 devices, float32 and bfloat16)
and detect / embed (batch 2) with `jax.export.export(jax.jit(f),
platforms=(...))`, and check the lowered StableHLO text:

  * the export is for the platform asked, without effects (host callbacks
    are effects) and without custom calls except the GSPMD sharding
    annotations a shard_map may emit (Sharding, SPMDFullToShardShape,
    SPMDShardToFullShape; with Shardy, JAX 0.10's default partitioner,
    shard_map is an sdy.manual_computation and there are none at all);
  * no f64 anywhere;
  * no CPU-only code path: resnet.Conv3x3's im2col weight gradient,
    StemConv's space-to-depth form and the sliced max pool run under
    jax.named_scope (resnet.IM2COL_WGRAD_SCOPE, SPACE_TO_DEPTH_SCOPE,
    SLICED_MAX_POOL_SCOPE), whose names appear
    in the module's locations (`Exported.mlir_module()` prints them); the
    config sets stem_space_to_depth = True, which accelerators must ignore.
    Positive control: the same config lowered for "cpu" contains both.
  * the RoIAlign formulation the model was built with: einsum on TPU,
    gather on GPU.

Lowering only (nothing is compiled or run; parameters are abstract, from
jax.eval_shape, so no pretrained file is read): the whole grid (2 platforms
x 2 dtypes x 2 mesh sizes for the train step, plus detect and embed for
both platforms and the CPU control) runs in one subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this process has one
CPU device). Measured on the 2-core CPU machine: about 3-7 s per train-step
lowering, ~60 s for the subprocess in all.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Custom calls a shard_map may lower to (GSPMD); anything else fails.
ALLOWED_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape",
                        "SPMDShardToFullShape"}

SCRIPT = textwrap.dedent(r"""
    import functools, importlib.util, json, os, re, sys, time
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp
    from jax import export
    from oim_jax import optim, parallel, train_lib
    from oim_jax.data import pipeline
    from oim_jax.models import person_search, resnet

    spec = importlib.util.spec_from_file_location(
        "cuhk_config", os.path.join(sys.argv[1], "configs", "cuhk.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    # Configured on: accelerators must ignore it (the CPU control uses it).
    config.model.stem_space_to_depth = True
    h, w = pipeline.canvas_sizes(config.data.min_size,
                                 config.data.max_size)[pipeline.LANDSCAPE]
    g = config.data.max_gt
    S = jax.ShapeDtypeStruct

    def batch_spec(b):  # the keys and dtypes of pipeline.load_example
      return {"image": S((b, h, w, 3), jnp.uint8),
              "image_size": S((b, 2), jnp.int32),
              "boxes": S((b, g, 4), jnp.float32),
              "pids": S((b, g), jnp.int32),
              "box_mask": S((b, g), jnp.bool_),
              "index": S((b,), jnp.int32)}

    # Abstract parameters and train state (the same for every platform).
    model = person_search.create_model(config, axis_name=parallel.AXIS,
                                       platform="tpu")
    variables = jax.eval_shape(lambda: person_search.init_variables(
        model, config, jax.random.key(0), pretrained=False))
    params, model_state = person_search.split_variables(variables)
    tx, _ = optim.create_optimizer(
        config.train, 100, person_search.trainable_mask(params, config))
    state = jax.eval_shape(lambda p, ms: train_lib.create_train_state(
        p, tx, config, config.model.embedding_dim, ms), params, model_state)
    rng = jax.eval_shape(lambda: jax.random.key(0))

    def facts(name, fn, args, platform, model):
      start = time.perf_counter()
      exp = export.export(fn, platforms=(platform,))(*args)
      text = exp.mlir_module()  # with locations (named scopes)
      seconds = time.perf_counter() - start
      return {
          "name": name, "seconds": round(seconds, 2),
          "platforms": list(exp.platforms), "nr_devices": exp.nr_devices,
          "effects": len(exp.ordered_effects) + len(exp.unordered_effects),
          "custom_calls": sorted(set(re.findall(
              r'custom_call\s*@"?([\w.$-]+)', text))),
          "callback": "callback" in text,
          "f64": bool(re.search(r"\bf64\b", text)),
          "locations": "loc(" in text and "/dot_general" in text,
          "im2col": resnet.IM2COL_WGRAD_SCOPE in text,
          "space_to_depth": resnet.SPACE_TO_DEPTH_SCOPE in text,
          "sliced_max_pool": resnet.SLICED_MAX_POOL_SCOPE in text,
          "roi_align_method": model.roi_align_method,
          "model_platform": model.platform,
      }

    def train(platform, dtype, devices):
      config.model.dtype = dtype
      model = person_search.create_model(config, axis_name=parallel.AXIS,
                                         platform=platform)
      loss_fn = functools.partial(person_search.loss_fn, model, config)
      per_device = lambda st, b, r: train_lib.train_step(
          st, b, r, loss_fn=loss_fn, tx=tx, config=config,
          axis_name=parallel.AXIS)
      step = parallel.data_parallel(
          per_device, "shard_map", parallel.make_mesh(jax.devices()[:devices]))
      return facts(f"train/{platform}/{dtype}/{devices}", step,
                   (state, batch_spec(2 * devices), rng), platform, model)

    def inference(platform, what):
      config.model.dtype = "float32"
      model = person_search.create_model(config, platform=platform)
      b = batch_spec(2)
      if what == "detect":
        fn = lambda v, im, sz: person_search.detect(model, v, im, sz)
        args = (variables, b["image"], b["image_size"])
      else:
        fn = lambda v, im, bx: person_search.embed_boxes(model, v, im, bx)
        args = (variables, b["image"], S((2, 1, 4), jnp.float32))
      return facts(f"{what}/{platform}", jax.jit(fn), args, platform, model)

    jobs = [functools.partial(train, p, d, n) for p in ("tpu", "cuda")
            for d in ("float32", "bfloat16") for n in (1, 8)]
    jobs += [functools.partial(inference, p, what) for p in ("tpu", "cuda")
             for what in ("detect", "embed")]
    jobs.append(functools.partial(train, "cpu", "float32", 1))  # control
    jobs.append(functools.partial(inference, "cpu", "detect"))  # control
    for job in jobs:
      print("RESULT " + json.dumps(job()), flush=True)
""")


@pytest.fixture(scope="module")
def lowerings(tmp_path_factory):
  """{name: facts} of every lowering (see SCRIPT), from one subprocess."""
  script = tmp_path_factory.mktemp("export") / "export_check.py"
  script.write_text(SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, str(script), REPO], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      facts = json.loads(line[len("RESULT "):])
      out[facts["name"]] = facts
  for name, facts in sorted(out.items()):
    print(f"{name}: lowered in {facts['seconds']:.1f} s")
  return out


def _check_portable(facts, platform):
  name = facts["name"]
  assert facts["platforms"] == [platform], name
  assert facts["effects"] == 0, name  # host callbacks are effects
  assert not facts["callback"], name
  assert set(facts["custom_calls"]) <= ALLOWED_CUSTOM_CALLS, facts
  assert not facts["f64"], name
  # The scope check means something only where locations are printed.
  assert facts["locations"], name
  if platform != "cpu":
    assert not facts["im2col"], name
    assert not facts["space_to_depth"], name
    assert not facts["sliced_max_pool"], name
  assert facts["roi_align_method"] == {"tpu": "einsum"}.get(platform,
                                                            "gather"), name
  assert facts["model_platform"] == {"cuda": "gpu"}.get(platform, platform)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("devices", [1, 8])
def test_train_step_lowers_for_accelerators(lowerings, platform, dtype,
                                            devices):
  facts = lowerings[f"train/{platform}/{dtype}/{devices}"]
  _check_portable(facts, platform)
  assert facts["nr_devices"] == devices


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("what", ["detect", "embed"])
def test_inference_lowers_for_accelerators(lowerings, platform, what):
  facts = lowerings[f"{what}/{platform}"]
  _check_portable(facts, platform)
  assert facts["nr_devices"] == 1


@pytest.mark.slow
def test_cpu_lowering_has_the_cpu_paths(lowerings):
  """Positive control: the markers the accelerator checks look for exist."""
  train = lowerings["train/cpu/float32/1"]
  _check_portable(train, "cpu")
  # Auto threshold 512 on CPU: the RPN's 1024-channel conv and res5's.
  assert train["im2col"] and train["space_to_depth"], train
  assert train["sliced_max_pool"], train
  detect = lowerings["detect/cpu"]
  _check_portable(detect, "cpu")
  assert detect["space_to_depth"] and detect["sliced_max_pool"], detect
