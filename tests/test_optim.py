"""Optimizer and schedule against hand-computed numbers and a NumPy SGD."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from oim_jax import optim


def _train_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.003, momentum=0.9, weight_decay=5e-4, clip_norm=10.0,
      warmup_epochs=1.0, warmup_steps=0, warmup_factor=1e-3,
      lr_milestones=(16,), lr_gamma=0.1, schedule_unit="epoch"))
  c.update(overrides)
  return c


def test_schedule_hand_computed():
  sched = optim.learning_rate_schedule(0.003, warmup_steps=100,
                                       warmup_factor=1e-3, milestones=[1600],
                                       gamma=0.1)
  # Linear from lr/1000 to lr over 100 steps, flat, then x0.1 at 1600.
  np.testing.assert_allclose(sched(0), 3e-6, rtol=1e-5)
  np.testing.assert_allclose(sched(50), 0.003 * (0.001 * 0.5 + 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(sched(100), 0.003, rtol=1e-6)
  np.testing.assert_allclose(sched(1599), 0.003, rtol=1e-6)
  np.testing.assert_allclose(sched(1600), 0.0003, rtol=1e-5)


def test_epoch_units_convert_to_steps():
  _, sched = optim.create_optimizer(_train_config(), steps_per_epoch=10,
                                    trainable={"w": True})
  np.testing.assert_allclose(sched(10), 0.003, rtol=1e-6)
  np.testing.assert_allclose(sched(159), 0.003, rtol=1e-6)
  np.testing.assert_allclose(sched(160), 0.0003, rtol=1e-5)


def test_sgd_matches_torch_style_numpy_reference_and_freezes():
  cfg = _train_config(warmup_epochs=0.0, clip_norm=1.0)
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "frozen": jnp.array([5.0])}
  tx, _ = optim.create_optimizer(cfg, steps_per_epoch=10,
                                 trainable={"w": True, "frozen": False})
  state = tx.init(params)
  rng = np.random.default_rng(0)
  w = np.array([1.0, -2.0, 3.0])
  buf = np.zeros(3)
  for _ in range(3):
    g = rng.normal(size=3) * 3
    grads = {"w": jnp.asarray(g, jnp.float32),
             "frozen": jnp.array([100.0])}
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    # torch: clip_grad_norm_ over trainable grads, then SGD(wd, momentum).
    g = g * min(1.0, 1.0 / (np.linalg.norm(g) + 1e-16))
    d = g + 5e-4 * w
    buf = 0.9 * buf + d
    w = w - 0.003 * buf
  np.testing.assert_allclose(params["w"], w, rtol=1e-5)
  np.testing.assert_array_equal(params["frozen"], [5.0])


def test_bad_schedule_unit():
  with pytest.raises(ValueError, match="schedule_unit"):
    optim.create_optimizer(_train_config(schedule_unit="iters"), 10,
                           {"w": True})


def test_cosine_schedule_hand_computed():
  # 10 steps/epoch, 1 warm-up epoch, 5 epochs: cosine over steps 10..50.
  _, sched = optim.create_optimizer(
      _train_config(lr_decay="cosine", epochs=5, num_steps=0),
      steps_per_epoch=10, trainable={"w": True})
  np.testing.assert_allclose(sched(0), 3e-6, rtol=1e-5)
  np.testing.assert_allclose(sched(10), 0.003, rtol=1e-6)
  np.testing.assert_allclose(sched(20), 0.003 * (1 + np.cos(np.pi / 4)) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(sched(30), 0.0015, rtol=1e-5)
  np.testing.assert_allclose(sched(50), 0.0, atol=1e-12)
  np.testing.assert_allclose(sched(60), 0.0, atol=1e-12)
  # num_steps overrides epochs.
  _, sched = optim.create_optimizer(
      _train_config(lr_decay="cosine", epochs=5, num_steps=30,
                    warmup_epochs=0.0),
      steps_per_epoch=10, trainable={"w": True})
  np.testing.assert_allclose(sched(15), 0.0015, rtol=1e-5)


def test_bad_lr_decay():
  with pytest.raises(ValueError, match="lr_decay"):
    optim.create_optimizer(_train_config(lr_decay="linear"), 10, {"w": True})
  with pytest.raises(ValueError, match="warm-up"):
    optim.create_optimizer(
        _train_config(lr_decay="cosine", epochs=1, num_steps=0), 10,
        {"w": True})
