"""Tests for oim_jax/ema.py."""

import jax
import numpy as np
import pytest

from conftest import tiny_train_config
from oim_jax import ema as ema_lib


def test_update_matches_numpy_reference():
  rng = np.random.default_rng(3)
  decay = 0.9
  values = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(30)]
  ema = {"w": jax.numpy.asarray(values[0]), "n": jax.numpy.int32(0)}
  want = values[0].astype(np.float64)
  for t, v in enumerate(values[1:]):
    ema = ema_lib.update(ema, {"w": v, "n": np.int32(t + 1)}, t, decay)
    d = min(decay, (1.0 + t) / (10.0 + t))  # 0.1, 0.18, ... then 0.9
    want = d * want + (1.0 - d) * v
  np.testing.assert_allclose(np.asarray(ema["w"]), want, rtol=1e-5,
                             atol=1e-6)
  assert int(ema["n"]) == 29  # integer leaves are copied, not averaged
  with pytest.raises(ValueError, match="ema_decay"):
    ema_lib.decay(tiny_train_config("unused", ema_decay=1.0))
