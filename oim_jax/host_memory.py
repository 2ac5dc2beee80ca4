"""A faster malloc for the entry points: XLA:CPU's step buffers without faults.

XLA:CPU's worker threads allocate each step's large temporaries with malloc.
glibc serves those from per-thread arenas whose heaps it maps and unmaps (and
mmaps blocks over 64 MiB outright), so every train step faults its working
set back in page by page: ~124,000 page faults and ~0.28 cores of kernel
time per second in the synthetic training loop. jemalloc with purging
turned off keeps freed pages in the process: the same loop runs 13-25 %
faster (steps of train.py interleaved with SIGSTOP/SIGCONT,
BENCHMARKS.md "Host allocator"). glibc's own knobs (mallopt: arena count,
no mmap, no trim) are no reliable fix: they removed the faults in one
bare-step harness but not in another, nor in train.py, which was no faster
with them. jemalloc with its default purging is slower than glibc.

mimalloc with purging off (MIMALLOC_PURGE_DELAY=-1) does the same: 2 faults
per bare step instead of glibc's 32,777, as fast as jemalloc (BENCHMARKS.md
"Host allocator", session 11), and it comes from PyPI (the cmeel-mimalloc
wheel in requirements.txt), so `pip install -r requirements.txt` alone gets
the fast path.

train.py, eval.py and search.py call `use_fast_malloc()` before their other
imports: it re-executes the same command with an allocator preloaded, the
first found of: jemalloc (a system libjemalloc.so.2: apt-get install
libjemalloc2), mimalloc (the pip wheel). OIM_JAX_MALLOC picks one
(auto | jemalloc | mimalloc | system); OIM_JAX_JEMALLOC=0, the switch of
earlier versions, still means system. The price: the process keeps its peak
heap until it exits, which is what a training process wants.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from oim_jax import host_info

ENV_VAR = "OIM_JAX_MALLOC"
LEGACY_ENV_VAR = "OIM_JAX_JEMALLOC"  # "0" = system (before mimalloc)
CHOICES = ("auto", "jemalloc", "mimalloc", "system")
_REEXEC_MARK = "OIM_JAX_MALLOC_REEXEC"
# Never give freed pages back (jemalloc's default purges after 10 s, which
# bench/host_allocator.py measured slower than glibc).
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
  import site  # pylint: disable=g-import-not-at-top
  import sysconfig  # pylint: disable=g-import-not-at-top
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
  legacy = os.environ.get(LEGACY_ENV_VAR, "1").strip().lower()
  if legacy in ("0", "false", "no", "off"):
    return "system"
  if legacy not in ("1", "true", "yes", "on"):
    raise ValueError(f"{LEGACY_ENV_VAR}={legacy!r}: use 1 (default) or 0, "
                     f"or {ENV_VAR}={'|'.join(CHOICES)}")
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
  or TPU (host_info.accelerator_backend), when $OIM_JAX_MALLOC is
  "system" (or $OIM_JAX_JEMALLOC is 0), off Linux, when either allocator is
  already loaded, when LD_PRELOAD names another allocator (tcmalloc, as on
  some TPU VMs), or when neither is installed. Your own MALLOC_CONF /
  MIMALLOC_PURGE_DELAY win over ours.

  Args:
    argv: the command to re-execute; default sys.orig_argv (interpreter
      options included).

  Returns:
    A line for the log saying which allocator serves the process (only
    when it did not re-execute).

  Raises:
    ValueError: a bad $OIM_JAX_MALLOC / $OIM_JAX_JEMALLOC.
  """
  choice = _choice()
  accelerator = host_info.accelerator_backend()
  if accelerator:
    # The host allocator matters for XLA:CPU's step buffers only.
    return f"host malloc: system default (JAX backend {accelerator})"
  if choice == "system":
    var = ENV_VAR if os.environ.get(ENV_VAR, "").strip() else LEGACY_ENV_VAR
    return f"host malloc: system default ({var}={os.environ[var].strip()})"
  if platform.system() != "Linux":
    return "host malloc: system default (preloading is Linux-only)"
  loaded = loaded_allocator()
  if loaded:
    os.environ.pop(_REEXEC_MARK, None)
    return f"host malloc: {loaded}, {_settings(loaded)}"
  preloaded = os.environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preloaded:
    return f"host malloc: as preloaded (LD_PRELOAD={preloaded})"
  if os.environ.get(_REEXEC_MARK):
    return ("host malloc: system default (preloading "
            f"{os.environ.get('LD_PRELOAD')} failed; see the loader's "
            f"message above; {ENV_VAR}=system skips the attempt)")
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
  env["LD_PRELOAD"] = ":".join(
      p for p in (preload.pop("LD_PRELOAD"), env.get("LD_PRELOAD")) if p)
  for key, value in preload.items():
    env.setdefault(key, value)
  env[_REEXEC_MARK] = "1"
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
  raise AssertionError("unreachable: os.execve returned")


def use_jemalloc(argv: list[str] | None = None) -> str:
  """Former name of `use_fast_malloc` (kept for scripts that call it)."""
  return use_fast_malloc(argv)
