"""A faster malloc for the entry points on CPU hosts.

glibc malloc serves XLA:CPU's per-step buffers from per-thread arenas that it
unmaps again, so every train step faults its working set back in; jemalloc or
mimalloc with purging off keep the pages (the synthetic training loop runs
13-25 % faster; docs/cpu_performance.md). mimalloc comes from PyPI (the
cmeel-mimalloc wheel in requirements.txt), a system libjemalloc.so.2 is taken
first where installed.

train.py, eval.py and search.py call `use_fast_malloc()` (through
oim_jax.cpu_host) before their other imports: it re-executes the same command
with the allocator preloaded. OIM_JAX_MALLOC picks one (auto | jemalloc |
mimalloc | system). The price: the process keeps its peak heap until it exits,
which is what a training process wants.
"""

from __future__ import annotations

import glob
import os
import platform
import site
import sys
import sysconfig

from oim_jax.cpu_host import cpu_info

ENV_VAR = "OIM_JAX_MALLOC"
CHOICES = ("auto", "jemalloc", "mimalloc", "system")
_REEXEC_MARK = "OIM_JAX_MALLOC_REEXEC"
# Never give freed pages back (jemalloc's default purges after 10 s, which
# experiments/host_allocator.py measured slower than glibc).
NO_PURGE = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
MIMALLOC_NO_PURGE = {"MIMALLOC_PURGE_DELAY": "-1"}
_SEARCH = ("/usr/lib/*-linux-gnu/libjemalloc.so.2",
           "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
           "/usr/local/lib/libjemalloc.so.2")


def find_jemalloc(patterns=_SEARCH) -> str | None:
  """Path of an installed libjemalloc.so.2 ($CONDA_PREFIX/lib first) or None."""
  conda = os.environ.get("CONDA_PREFIX")
  if conda:
    patterns = (os.path.join(conda, "lib", "libjemalloc.so.2"),) + tuple(
        patterns)
  for pattern in patterns:
    for path in sorted(glob.glob(pattern)):
      if os.path.isfile(path):
        return path
  return None


def find_mimalloc() -> str | None:
  """Path of mimalloc from the cmeel-mimalloc wheel (pip) or conda, or None."""
  dirs = [os.path.join(p, "cmeel.prefix", "lib") for p in _site_dirs()]
  conda = os.environ.get("CONDA_PREFIX")
  if conda:
    dirs.insert(0, os.path.join(conda, "lib"))
  for d in dirs:
    for name in ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"):
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def _site_dirs() -> list[str]:
  """site-packages directories of this interpreter (venv and user included)."""
  dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
  try:
    dirs += site.getsitepackages() + [site.getusersitepackages()]
  except AttributeError:  # some embedded/virtualenv builds lack these
    pass
  return list(dict.fromkeys(dirs))


def loaded_allocator() -> str | None:
  """"jemalloc" / "mimalloc" when this process has that library mapped."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return None
  for name in ("jemalloc", "mimalloc"):
    if name in maps:
      return name
  return None


def jemalloc_loaded() -> bool:
  """Whether this process has a jemalloc library mapped (Linux)."""
  return loaded_allocator() == "jemalloc"


def preload_env(choice: str = "auto") -> dict[str, str]:
  """Environment that preloads the allocator `choice` with purging off.

  Args:
    choice: "auto" (jemalloc if installed, else mimalloc), "jemalloc" or
      "mimalloc".

  Returns:
    {"LD_PRELOAD": path, plus MALLOC_CONF or MIMALLOC_PURGE_DELAY}, or {}
    when that allocator is not installed. For subprocesses (benchmarks) as
    much as for the entry points' re-execution.
  """
  order = ("jemalloc", "mimalloc") if choice == "auto" else (choice,)
  for name in order:
    if name == "jemalloc":
      path = find_jemalloc()
      if path:
        return {"LD_PRELOAD": path, "MALLOC_CONF": NO_PURGE}
    elif name == "mimalloc":
      path = find_mimalloc()
      if path:
        return {"LD_PRELOAD": path, **MIMALLOC_NO_PURGE}
    else:
      raise ValueError(f"allocator {name!r}: jemalloc | mimalloc")
  return {}


def _choice() -> str:
  value = os.environ.get(ENV_VAR, "").strip().lower()
  if value:
    if value not in CHOICES:
      raise ValueError(f"{ENV_VAR}={value!r}: use one of {', '.join(CHOICES)}")
    return value
  return "auto"


def _settings(name: str) -> str:
  if name == "jemalloc":
    return f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '(jemalloc defaults)')}"
  return ("MIMALLOC_PURGE_DELAY="
          f"{os.environ.get('MIMALLOC_PURGE_DELAY', '(mimalloc default)')}")


def use_fast_malloc(argv: list[str] | None = None) -> str:
  """Re-executes this process with jemalloc or mimalloc preloaded.

  Call first thing in an entry point: the process is replaced (os.execve),
  so nothing done before survives. Does nothing where JAX will run on a GPU
  or TPU (cpu_info.accelerator_backend), when $OIM_JAX_MALLOC is
  "system", off Linux, when either allocator is already loaded, when the
  user's LD_PRELOAD is set (tcmalloc on some TPU VMs, a profiler, ...), or
  when neither is installed. Your own MALLOC_CONF /
  MIMALLOC_PURGE_DELAY win over ours.

  Args:
    argv: the command to re-execute; default sys.orig_argv (interpreter
      options included).

  Returns:
    A line for the log saying which allocator serves the process (only
    when it did not re-execute).

  Raises:
    ValueError: a bad $OIM_JAX_MALLOC.
  """
  choice = _choice()
  accelerator = cpu_info.accelerator_backend()
  if accelerator:
    # The host allocator matters for XLA:CPU's step buffers only.
    return f"host malloc: system default (JAX backend {accelerator})"
  if choice == "system":
    return f"host malloc: system default ({ENV_VAR}=system)"
  if platform.system() != "Linux":
    return "host malloc: system default (preloading is Linux-only)"
  loaded = loaded_allocator()
  if loaded:
    os.environ.pop(_REEXEC_MARK, None)
    return f"host malloc: {loaded}, {_settings(loaded)}"
  if os.environ.get(_REEXEC_MARK):
    return ("host malloc: system default (preloading "
            f"{os.environ.get('LD_PRELOAD')} failed; see the loader's "
            f"message above; {ENV_VAR}=system skips the attempt)")
  preloaded = os.environ.get("LD_PRELOAD", "").strip()
  if preloaded:
    return f"host malloc: as preloaded (LD_PRELOAD={preloaded})"
  preload = preload_env(choice)
  if not preload:
    if choice == "auto":
      return ("host malloc: glibc; pip install -r requirements.txt (its "
              "cmeel-mimalloc) or apt-get install libjemalloc2 for "
              "5-25 % faster CPU train steps (README)")
    raise ValueError(
        f"{ENV_VAR}={choice}: no lib{choice} found ("
        + ("apt-get install libjemalloc2" if choice == "jemalloc"
           else "pip install cmeel-mimalloc") + ")")
  env = dict(os.environ)
  env["LD_PRELOAD"] = preload.pop("LD_PRELOAD")
  for key, value in preload.items():
    env.setdefault(key, value)
  env[_REEXEC_MARK] = "1"
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
  raise AssertionError("unreachable: os.execve returned")

