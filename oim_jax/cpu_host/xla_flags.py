"""XLA:CPU flags that train.py, eval.py and search.py set before JAX starts.

jaxlib 0.10-0.11 hands CPU convolutions and unfused dots to YNNPACK by
default; for this project's layers XLA's own kernels are faster (the
synthetic train step 0.41 -> 0.30 s on an AVX2 CPU; A/B numbers in
docs/cpu_performance.md, `python experiments/xla_cpu_flags.py`). Fused dots,
reductions and elementwise fusions stay with YNNPACK. The model computes the
same convolutions and matmuls in other kernels, so only float rounding
differs.

A user's XLA_FLAGS that already set the flag win; OIM_JAX_YNN_CONV=1 keeps
YNNPACK's kernels. Other jaxlib versions get no flag (XLA aborts on a flag
value it does not know), and hosts where JAX runs on a GPU or TPU get none.
"""

from __future__ import annotations

import importlib.metadata
import os

from oim_jax.cpu_host import cpu_info

ENV_VAR = "OIM_JAX_YNN_CONV"
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
NO_YNN_CONV = FLAG + "=-individual_convolution"  # convolutions only (A/B runs)
# What the entry points set: XLA's own convolutions and unfused dots.
NO_YNN_CONV_DOT = FLAG + "=-individual_convolution,-individual_dot"
# jaxlib versions known to have the flag (measured: 0.10.2; 0.11 has it too).
_TESTED = ((0, 10), (0, 12))


def _version_tuple(version: str) -> tuple[int, ...]:
  parts = []
  for piece in version.split(".")[:3]:
    digits = "".join(c for c in piece if c.isdigit())
    if not digits:
      break
    parts.append(int(digits))
  return tuple(parts)


def cpu_flags(xla_flags: str, jaxlib_version: str,
              keep_ynn_conv: bool = False) -> tuple[str, str]:
  """(new XLA_FLAGS, log line) for the given XLA_FLAGS and jaxlib version.

  Args:
    xla_flags: the current XLA_FLAGS ("" if unset).
    jaxlib_version: e.g. "0.10.2".
    keep_ynn_conv: leave YNNPACK's convolutions and dots on
        (OIM_JAX_YNN_CONV=1).
  """
  if keep_ynn_conv:
    return xla_flags, f"XLA:CPU convolutions and dots: YNNPACK ({ENV_VAR}=1)"
  if FLAG in xla_flags:
    return xla_flags, "XLA:CPU convolutions and dots: as XLA_FLAGS says"
  low, high = _TESTED
  if not low <= _version_tuple(jaxlib_version)[:2] < high:
    return xla_flags, (f"XLA:CPU convolutions and dots: jaxlib "
                       f"{jaxlib_version}'s default (flag not set outside "
                       "jaxlib 0.10-0.11)")
  new = " ".join(f for f in (xla_flags, NO_YNN_CONV_DOT) if f)
  return new, f"XLA:CPU convolutions and dots: XLA's own ({NO_YNN_CONV_DOT})"


def use_fast_cpu_flags() -> str:
  """Sets XLA_FLAGS in os.environ (before JAX starts); returns a log line.

  Nothing is set where JAX will run on a GPU or TPU.
  """
  accelerator = cpu_info.accelerator_backend()
  if accelerator:
    return f"XLA:CPU flags: none (JAX backend {accelerator})"
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "XLA:CPU convolutions: jaxlib not installed"
  new, message = cpu_flags(
      os.environ.get("XLA_FLAGS", ""), version,
      keep_ynn_conv=os.environ.get(ENV_VAR, "").strip() in ("1", "true"))
  if new:
    os.environ["XLA_FLAGS"] = new
  return message
