"""Data parallelism on 8 CPU devices: shard_map and pmap equal one device.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(this process already initialised JAX with one device). Two train steps of
the tiny model on a global batch of 8 images: one device with all 8, eight
devices with one each under shard_map and under pmap. Per-image sampling keys
come from the image index and the re-id loss is normalised over the global
number of labeled RoIs, so the runs compute the same function; they differ
only by float reassociation (tolerance below).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    sys.path.insert(0, sys.argv[2] + "/tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_train_config
    from oim_jax import parallel, train_lib
    from oim_jax.data import datasets, pipeline

    config = tiny_train_config(sys.argv[1])
    config.train.batch_size = 8
    # SGD: parameter differences then mirror gradient differences (Adam's
    # m / sqrt(v) would blow float noise in ~0 gradients up to lr-sized steps).
    config.train.optimizer, config.train.lr = "sgd", 0.01
    dataset = datasets.load_dataset(config.data)
    it = pipeline.TrainIterator(
        pipeline.source_for(dataset, "train"), batch_size=8, seed=0,
        options=pipeline.PipelineOptions.from_config(config.data))
    batches = [next(it), next(it)]
    it.close()
    model, tx, _, state0 = train_lib.create_model_and_state(
        config, 10, jax.random.key(0))

    def run(devices, mode):
      mesh = parallel.make_mesh(devices)
      step = train_lib.make_train_step(model, config, tx, mesh, mode,
                                       donate_state=False)
      st = parallel.put_replicated(state0, mesh, mode)
      losses = []
      for i, b in enumerate(batches):
        st, m = step(st, parallel.put_batch(b, mesh, mode),
                     jax.random.key(i))
        losses.append({k: float(v) for k, v in
                       jax.device_get(parallel.unreplicate(m, mode)).items()})
      if mode == "pmap":  # every replica must hold the same state
        for leaf in jax.tree.leaves(st):
          leaf = np.asarray(leaf)
          assert all((leaf[i] == leaf[0]).all() for i in range(len(leaf)))
      st = jax.device_get(parallel.unreplicate(st, mode))
      return losses, st

    out = {}
    ref_losses, ref = run(jax.devices()[:1], "shard_map")
    out["one"] = ref_losses
    for mode in ("shard_map", "pmap"):
      losses, st = run(jax.devices(), mode)
      out[mode] = losses
      diff = jax.tree.map(lambda a, b: float(np.max(np.abs(
          np.asarray(a, np.float64) - np.asarray(b, np.float64)))), st, ref)
      out[mode + "_params"] = max(jax.tree.leaves(diff.params))
      out[mode + "_bn"] = max(jax.tree.leaves(diff.model_state) or [0.0])
      out[mode + "_lut"] = diff.oim.lut
      out[mode + "_queue"] = diff.oim.queue
      out[mode + "_pointer"] = int(st.oim.pointer)
      out["ref_pointer"] = int(ref.oim.pointer)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_shard_map_and_pmap_equal_one_device(tiny_synthetic_root, tmp_path):
  script = tmp_path / "parallel_check.py"
  script.write_text(SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, str(script), tiny_synthetic_root,
                         REPO], env=env, capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  for mode in ("shard_map", "pmap"):
    for ref, got in zip(out["one"], out[mode]):
      for key in ("loss", "rpn_cls", "rpn_reg", "det_cls", "det_reg",
                  "reid"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4,
                                   atol=1e-5, err_msg=f"{mode} {key}")
    # float32 reassociation of the 8-way gradient mean: parameters and
    # OIM tables agree to ~1e-5 after two steps.
    assert out[mode + "_params"] < 1e-4, out
    assert out[mode + "_bn"] < 1e-4, out  # synchronised BN-neck statistics
    assert out[mode + "_lut"] < 1e-4, out
    assert out[mode + "_queue"] < 1e-4, out
    assert out[mode + "_pointer"] == out["ref_pointer"]


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tiny_synthetic_root, tmp_path):
  from conftest import tiny_cli_flags, tiny_train_config
  from oim_jax import checkpointing, train_lib
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(REPO, "train.py"),
         f"--workdir={workdir}", *tiny_cli_flags(tiny_synthetic_root),
         "--config.train.batch_size=8", "--config.train.num_steps=1",
         "--config.eval.at_end=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Resume on this process's single device, with a per-device batch of 2.
  config = tiny_train_config(tiny_synthetic_root, num_steps=2, batch_size=2)
  out = train_lib.train_and_evaluate(config, workdir)
  assert np.isfinite(out["loss"])
  mgr = checkpointing.manager(workdir, read_only=True, async_saves=False)
  assert list(mgr.all_steps()) == [1, 2]


def test_put_replicated_gives_the_mesh_sharding_jit_returns():
  # On one device a SingleDeviceSharding is *equivalent* to the mesh's
  # replicated sharding, but jit caches on the sharding object: keeping it
  # made the second train step compile again (the bench suite's count).
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from oim_jax import parallel

  mesh = parallel.make_mesh(jax.devices()[:1])
  target = parallel.replicated_sharding(mesh)
  x = jnp.arange(6.0).reshape(2, 3)
  placed = parallel.put_replicated({"x": x, "n": np.ones(3)}, mesh,
                                   "shard_map")
  for leaf in jax.tree.leaves(placed):
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding == target
  np.testing.assert_array_equal(placed["x"], np.arange(6.0).reshape(2, 3))
  # Already in the target sharding: kept, not copied.
  again = parallel.put_replicated(placed, mesh, "shard_map")
  assert again["x"] is placed["x"]
  # A jitted function fed what it returns does not retrace.
  traces = []

  @jax.jit
  def f(t):
    traces.append(1)
    return jax.tree.map(lambda a: a + 1, t)

  out = f(placed)
  out = f(jax.device_put(out, target))
  assert len(traces) == 1
