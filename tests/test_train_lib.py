"""Training loop: determinism, resume (also after SIGKILL), config errors.

All runs use the tiny synthetic dataset and a tiny model (tests/conftest.py).
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import synthetic_config_module, tiny_train_config
from oim_jax import checkpointing
from oim_jax import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_state(workdir):
  mgr = checkpointing.manager(workdir, read_only=True, async_saves=False)
  step = mgr.latest_step()
  return step, jax.tree.map(np.asarray, checkpointing.restore_raw(mgr, step))


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


def test_same_seed_is_bit_identical_and_resume_matches(tiny_synthetic_root,
                                                       tmp_path):
  config = tiny_train_config(tiny_synthetic_root)
  out_a = train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  out_b = train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  assert np.isfinite(out_a["loss"]) and out_a["loss"] == out_b["loss"]
  assert out_a["step_compilations"] <= 2  # one per canvas bucket at most
  step_a, state_a = _final_state(str(tmp_path / "a"))
  step_b, state_b = _final_state(str(tmp_path / "b"))
  assert step_a == step_b == 4
  _assert_trees_equal(state_a, state_b)
  # The OIM state really moved (the LUT got rows, the queue got features).
  oim_a = jax.tree.leaves(state_a["oim"])
  assert max(np.abs(x).sum() for x in oim_a if x.ndim == 2) > 0

  # Stop after 2 steps, then rerun the same command to 4: resumes from the
  # step-2 checkpoint (params, optimizer, OIM state, pipeline position).
  config_short = tiny_train_config(tiny_synthetic_root, num_steps=2)
  train_lib.train_and_evaluate(config_short, str(tmp_path / "c"))
  assert _final_state(str(tmp_path / "c"))[0] == 2
  train_lib.train_and_evaluate(config, str(tmp_path / "c"))
  step_c, state_c = _final_state(str(tmp_path / "c"))
  assert step_c == 4
  _assert_trees_equal(state_a, state_c)
  # TensorBoard events, config and curves were written.
  assert os.listdir(tmp_path / "a" / "tensorboard")
  assert (tmp_path / "a" / "config.json").exists()
  assert (tmp_path / "a" / "curves.png").exists()


def _train_cmd(root, workdir, steps):
  """train.py on the tiny config: a checkpoint every step, async saves."""
  from conftest import tiny_cli_flags
  return [sys.executable, os.path.join(REPO, "train.py"),
          f"--workdir={workdir}", *tiny_cli_flags(root),
          "--config.data.num_workers=1",
          "--config.train.async_checkpoints=True",
          "--config.train.batch_size=2", f"--config.train.num_steps={steps}",
          "--config.train.checkpoint_every=1", "--config.eval.at_end=False"]


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_synthetic_root,
                                                  tmp_path):
  from oim_jax.data import synthetic  # the fixture's sizes must be reused
  del synthetic
  steps = 6
  ref, crashed = str(tmp_path / "ref"), str(tmp_path / "crashed")
  subprocess.run(_train_cmd(tiny_synthetic_root, ref, steps),
                 env=_env(), check=True, capture_output=True, timeout=900)

  proc = subprocess.Popen(_train_cmd(tiny_synthetic_root, crashed, steps),
                          env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill at a random point after the first checkpoint exists.
  kill_after = random.Random(os.getpid()).randint(1, steps - 2)
  deadline = time.time() + 600
  ckpt_dir = os.path.join(crashed, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir)
                        else []) if d.isdigit()]
    if done and max(map(int, done)) >= kill_after:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _final_state(crashed)[0]
  assert killed_at < steps

  subprocess.run(_train_cmd(tiny_synthetic_root, crashed, steps),
                 env=_env(), check=True, capture_output=True, timeout=900)
  step_ref, state_ref = _final_state(ref)
  step_res, state_res = _final_state(crashed)
  assert step_ref == step_res == steps
  _assert_trees_equal(state_ref, state_res)


def test_config_errors_fail_before_compiling(tiny_synthetic_root, tmp_path):
  compiles = []
  listener = lambda event, *a, **k: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = tiny_train_config(tiny_synthetic_root)
    config.oim.num_labeled = 7
    with pytest.raises(ValueError, match="num_labeled=8"):
      train_lib.train_and_evaluate(config, str(tmp_path / "w1"))
    config = tiny_train_config(tiny_synthetic_root)
    config.parallelism = "ddp"
    with pytest.raises(ValueError, match="parallelism"):
      train_lib.train_and_evaluate(config, str(tmp_path / "w2"))
    config = tiny_train_config(tiny_synthetic_root, ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
      train_lib.train_and_evaluate(config, str(tmp_path / "w4"))
    config = tiny_train_config(tiny_synthetic_root)
    config.data.dataset = "cuhk_sysu"
    config.data.root = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
      train_lib.train_and_evaluate(config, str(tmp_path / "w3"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in compiles if "backend_compile" in e]


def test_unknown_config_field_is_rejected_by_train_py(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       "--config=" + os.path.join(REPO, "configs", "synthetic.py"),
       f"--workdir={tmp_path}", "--config.train.lrr=0.1"],
      env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


def test_non_finite_loss_stops_without_checkpointing_it(tiny_synthetic_root,
                                                        tmp_path):
  # lr 1e20: the first update makes the parameters overflow.
  config = tiny_train_config(tiny_synthetic_root, lr=1e20, clip_norm=0.0,
                             checkpoint_every=1)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train_lib.NonFiniteLossError, match="Non-finite"):
    train_lib.train_and_evaluate(config, workdir)
  mgr = checkpointing.manager(workdir, read_only=True, async_saves=False)
  for step in mgr.all_steps():  # whatever was saved is finite
    state = checkpointing.restore_raw(mgr, step)
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tiny_synthetic_root, tmp_path):
  workdir = str(tmp_path / "term")
  cmd = _train_cmd(tiny_synthetic_root, workdir, 200) + [
      "--config.train.checkpoint_every=1000"]
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  history = os.path.join(workdir, "history.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(history) and os.path.getsize(history) > 0:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  step, _ = _final_state(workdir)
  assert 1 <= step < 200  # saved where it stopped, not at a periodic step


@pytest.mark.parametrize("variant,epochs,milestones,every", [
    ("long", 30, (24,), 1343), ("fast", 15, (12,), 1343)])
def test_synthetic_variants_only_change_the_schedule(variant, epochs,
                                                     milestones, every):
  from flax import traverse_util
  module = synthetic_config_module()
  flat = lambda c: traverse_util.flatten_dict(c.to_dict(), sep=".")
  base = flat(module.get_config())
  other = flat(module.get_config(variant))
  assert base.keys() == other.keys()
  changed = {k: (base[k], other[k]) for k in base if base[k] != other[k]}
  assert changed == {"train.epochs": (24, epochs),
                     "train.lr_milestones": ((19,), milestones),
                     "eval.every_steps": (1074, every)}


def test_synthetic_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="'long'.*'fast'"):
    synthetic_config_module().get_config("short")


def test_ema_is_checkpointed_resumed_and_evaluated(tiny_synthetic_root,
                                                   tmp_path):
  from oim_jax import eval_lib  # pylint: disable=g-import-not-at-top
  config = tiny_train_config(tiny_synthetic_root, ema_decay=0.9)
  train_lib.train_and_evaluate(config, str(tmp_path / "a"))
  mgr = checkpointing.manager(str(tmp_path / "a"), read_only=True,
                              async_saves=False)
  full = jax.tree.map(np.asarray, checkpointing.restore_raw(
      mgr, 4, items=checkpointing.ARRAY_ITEMS + ("ema",)))
  # The average lags the weights: after 4 steps d = 0.1 .. 0.4 has mixed in
  # every earlier state, so no float leaf equals the live one.
  for path, e in jax.tree_util.tree_leaves_with_path(full["ema"]):
    live = full["params"]
    for key in path:
      live = live[key.key]
    assert e.shape == live.shape
    if e.dtype.kind == "f" and np.abs(live).max() > 0:
      assert not np.array_equal(e, live), path
  variables, step = eval_lib.restore_params(config, str(tmp_path / "a"))
  assert step == 4
  _assert_trees_equal(jax.tree.map(np.asarray, variables), full["ema"])

  # 2 steps, then resume to 4: the average resumes too, bit for bit.
  train_lib.train_and_evaluate(
      tiny_train_config(tiny_synthetic_root, ema_decay=0.9, num_steps=2),
      str(tmp_path / "b"))
  train_lib.train_and_evaluate(config, str(tmp_path / "b"))
  mgr_b = checkpointing.manager(str(tmp_path / "b"), read_only=True,
                                async_saves=False)
  _assert_trees_equal(
      full, jax.tree.map(np.asarray, checkpointing.restore_raw(
          mgr_b, 4, items=checkpointing.ARRAY_ITEMS + ("ema",))))

  # A checkpoint without an average: evaluating it as EMA is a clear error.
  plain = str(tmp_path / "plain")
  train_lib.train_and_evaluate(
      tiny_train_config(tiny_synthetic_root, num_steps=2), plain)
  with pytest.raises(ValueError, match="ema_decay=0"):
    eval_lib.restore_params(config, plain)
  # Resuming it with an average on starts the average from its weights.
  train_lib.train_and_evaluate(config, plain)
  mgr_p = checkpointing.manager(plain, read_only=True, async_saves=False)
  assert checkpointing.has_item(mgr_p, 4, "ema")
  assert not checkpointing.has_item(mgr_p, 2, "ema")
