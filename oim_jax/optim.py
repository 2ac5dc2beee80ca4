"""Optimizer and learning-rate schedule (optax).

The recipe of the PyTorch OIM reimplementations: SGD with momentum, weight
decay added to the gradient before momentum (as torch.optim.SGD does), global
gradient-norm clipping, a linear warm-up from `lr * warmup_factor`, then steps
of `gamma` at the milestones (or, with `lr_decay="cosine"`, a half cosine from
the end of the warm-up to zero at the last step). Frozen parameters get no
update and no decay.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(base_lr: float, warmup_steps: int,
                           warmup_factor: float, milestones: Sequence[int],
                           gamma: float) -> optax.Schedule:
  """lr(step) = base_lr * warmup(step) * gamma ** #(milestones <= step)."""
  milestones = jnp.asarray(sorted(int(m) for m in milestones) or [2**31 - 1],
                           jnp.int32)

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    if warmup_steps > 0:
      alpha = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)
      warm = warmup_factor * (1.0 - alpha) + alpha
    else:
      warm = 1.0
    decays = jnp.sum(step >= milestones)
    return base_lr * warm * gamma**decays.astype(jnp.float32)

  return schedule


def cosine_schedule(base_lr: float, warmup_steps: int, warmup_factor: float,
                    total_steps: int) -> optax.Schedule:
  """Linear warm-up, then lr = base_lr * (1 + cos(pi * t)) / 2, t: 0 -> 1.

  t runs from the end of the warm-up to `total_steps`, where lr reaches 0
  (held at 0 past it).
  """
  if total_steps <= warmup_steps:
    raise ValueError(f"a cosine schedule needs more steps ({total_steps}) "
                     f"than warm-up steps ({warmup_steps})")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps > 0:
      alpha = jnp.minimum(step / warmup_steps, 1.0)
      warm = warmup_factor * (1.0 - alpha) + alpha
    else:
      warm = 1.0
    t = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    return base_lr * warm * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

  return schedule


def create_optimizer(train_config: Any, steps_per_epoch: int,
                     trainable: Any) -> tuple[optax.GradientTransformation,
                                              optax.Schedule]:
  """Builds the optimizer from `config.train`.

  Args:
    train_config: ConfigDict with optimizer ("sgd" | "adam"), lr, momentum,
      weight_decay, clip_norm,
      warmup_epochs (or warmup_steps when schedule_unit == "step"),
      warmup_factor, lr_milestones, lr_gamma, schedule_unit ("epoch"/"step"),
      lr_decay ("step": x lr_gamma at each milestone; "cosine": to 0 at the
      last step, milestones unused; absent = "step"), and epochs / num_steps
      (the length of a cosine schedule).
    steps_per_epoch: optimizer steps per epoch (for epoch-based schedules).
    trainable: pytree of bools with the params' structure; False = frozen.

  Returns:
    (optimizer, learning-rate schedule).
  """
  c = train_config
  if c.schedule_unit == "epoch":
    warmup = int(round(c.warmup_epochs * steps_per_epoch))
    milestones = [int(m * steps_per_epoch) for m in c.lr_milestones]
  elif c.schedule_unit == "step":
    warmup = int(c.warmup_steps)
    milestones = [int(m) for m in c.lr_milestones]
  else:
    raise ValueError(f"config.train.schedule_unit must be 'epoch' or 'step', "
                     f"got {c.schedule_unit!r}")
  decay = c.get("lr_decay", "step")
  if decay == "step":
    schedule = learning_rate_schedule(c.lr, warmup, c.warmup_factor,
                                      milestones, c.lr_gamma)
  elif decay == "cosine":
    total = (int(c.num_steps) if c.get("num_steps", 0) > 0
             else int(round(c.epochs * steps_per_epoch)))
    schedule = cosine_schedule(c.lr, warmup, c.warmup_factor, total)
  else:
    raise ValueError(f"config.train.lr_decay must be 'step' or 'cosine', got "
                     f"{decay!r}")
  parts = []
  if c.clip_norm and c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  if c.weight_decay:
    parts.append(optax.add_decayed_weights(c.weight_decay))
  if c.optimizer == "sgd":
    parts.append(optax.sgd(schedule, momentum=c.momentum or None,
                           nesterov=False))
  elif c.optimizer == "adam":
    # For small from-scratch models (the synthetic config); weight decay is
    # then L2 added to the gradient, as above.
    parts.append(optax.adam(schedule))
  else:
    raise ValueError(f"config.train.optimizer must be 'sgd' or 'adam', got "
                     f"{c.optimizer!r}")
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  # Frozen leaves get zeros: their gradients are then unused, and XLA drops
  # their computation altogether.
  tx = optax.multi_transform(
      {"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
