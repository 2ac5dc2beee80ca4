"""One log line about the host CPU: what CPU-side timings depend on.

XLA:CPU compiles for the host's instruction set, so the same command runs at
different speeds (and, through different float rounding, on slightly
different trajectories) on different CPU kinds: this project's 2-core "AMD
EPYC" VMs came as an AVX-512 kind (Zen 4: matmul peak 0.32-0.40 TFLOP/s, the
synthetic train step ~0.20 s) and an AVX2-only kind (Zen 3: 0.15 TFLOP/s,
~0.47 s), under the same model name.
train.py and eval.py log this line first so that a log says which it was.

`accelerator_backend()` tells, before JAX starts, whether JAX will run on a
GPU or TPU: the entry points' CPU tuning (allocator, xla_flags) then does
nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Callable, Iterable, Optional

# JAX plugins (PyPI distributions) and the device nodes that show their
# hardware is there: the plugin alone (a GPU image on a CPU host) falls back
# to the CPU.
_ACCELERATOR_PLUGINS = (
    ("tpu", ("libtpu", "libtpu-nightly"), ("/dev/accel0", "/dev/vfio/0")),
    ("gpu", ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt",
             "jax-cuda13-pjrt"), ("/dev/nvidia0",)),
    ("gpu", ("jax-rocm6-plugin", "jax-rocm7-plugin", "jax-rocm60-plugin"),
     ("/dev/kfd",)),
)


def _installed(name: str) -> bool:
  try:
    importlib.metadata.version(name)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def accelerator_backend(environ=None,
                        installed: Callable[[str], bool] = _installed,
                        exists: Callable[[str], bool] = os.path.exists,
                        plugins: Iterable = _ACCELERATOR_PLUGINS
                        ) -> Optional[str]:
  """"tpu" / "gpu" (or $JAX_PLATFORMS' first entry) when JAX will not run on
  the CPU, else None. Needs no JAX import (call it before JAX starts).

  $JAX_PLATFORMS decides when set; otherwise an installed accelerator plugin
  whose device node exists.
  """
  environ = os.environ if environ is None else environ
  wanted = environ.get("JAX_PLATFORMS", "").strip().lower()
  if wanted:
    first = wanted.split(",")[0].strip()
    return None if first == "cpu" else first
  for backend, packages, devices in plugins:
    if any(installed(p) for p in packages) and any(exists(d)
                                                    for d in devices):
      return backend
  return None

# ISA extensions that change XLA:CPU's speed here, in the order shown.
_NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                  "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
  """(model name, notable ISA flags) of the first processor in /proc/cpuinfo."""
  model, flags = "", []
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key, value = key.strip(), value.strip()
    if key == "model name" and not model:
      model = value
    elif key in ("flags", "Features") and not flags:
      present = set(value.split())
      flags = [f for f in _NOTABLE_FLAGS if f in present]
  return model, flags


def cpu_summary(cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """e.g. "host CPU: AMD EPYC, 2 usable cores, x86_64 (avx2 fma; no avx512f)"."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 0
  model, flags = "", []
  try:
    with open(cpuinfo_path) as f:
      model, flags = parse_cpuinfo(f.read())
  except OSError:
    pass
  model = model or platform.processor() or "unknown model"
  isa = " ".join(flags)
  if platform.machine() in ("x86_64", "AMD64") and "avx512f" not in flags:
    isa = f"{isa}; no avx512f" if isa else "no avx512f"
  return (f"host CPU: {model}, {cores} usable cores, {platform.machine()}"
          + (f" ({isa})" if isa else ""))
