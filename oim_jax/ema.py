"""The exponential moving average of the model variables (config.train.ema_decay).

train_lib keeps it in the train state and checkpoints it as item "ema";
eval_lib evaluates it instead of the live weights when the decay is > 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def decay(config: ml_collections.ConfigDict) -> float:
  """config.train.ema_decay, checked: 0 (off) or in (0, 1)."""
  d = float(config.train.get("ema_decay", 0.0))
  if not 0.0 <= d < 1.0:
    raise ValueError(f"config.train.ema_decay={d}: use 0 (off) or a decay in "
                     "(0, 1), e.g. 0.998")
  return d


def update(ema: Any, variables: Any, step, decay: float) -> Any:
  """ema <- d * ema + (1 - d) * variables, d = min(decay, (1+t)/(10+t)).

  t = optimizer steps taken before this one. The warm-up of d (as TF's
  ExponentialMovingAverage with num_updates) keeps the average from
  remembering the random initialisation: d is 0.1 at the first step and
  reaches 0.99 after ~900 steps. Integer leaves are copied.
  """
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))

  def leaf(e, v):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      return v
    return (d * e.astype(jnp.float32)
            + (1.0 - d) * v.astype(jnp.float32)).astype(e.dtype)
  return jax.tree.map(leaf, ema, variables)
