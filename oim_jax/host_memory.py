"""jemalloc for the entry points: XLA:CPU's step buffers without page faults.

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

train.py, eval.py and search.py call `use_jemalloc()` before their other
imports: if a libjemalloc.so.2 is installed (Debian/Ubuntu: apt-get install
libjemalloc2) and not yet loaded, it re-executes the same command with it
preloaded. OIM_JAX_JEMALLOC=0 turns this off. The price: the process keeps
its peak heap until it exits, which is what a training process wants.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

ENV_VAR = "OIM_JAX_JEMALLOC"
_REEXEC_MARK = "OIM_JAX_JEMALLOC_REEXEC"
# Never give freed pages back (jemalloc's default purges after 10 s, which
# bench/host_allocator.py measured slower than glibc).
NO_PURGE = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
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


def jemalloc_loaded() -> bool:
  """Whether this process has a jemalloc library mapped (Linux)."""
  try:
    with open("/proc/self/maps") as f:
      return "jemalloc" in f.read()
  except OSError:
    return False


def use_jemalloc(argv: list[str] | None = None) -> str:
  """Re-executes this process with jemalloc preloaded, where it can.

  Call first thing in an entry point: the process is replaced (os.execve),
  so nothing done before survives. Does nothing when $OIM_JAX_JEMALLOC is 0,
  off Linux, when jemalloc is already loaded, when LD_PRELOAD names another
  allocator (tcmalloc, as on some TPU VMs, or mimalloc), or when no jemalloc
  is installed.

  Args:
    argv: the command to re-execute; default sys.orig_argv (interpreter
      options included).

  Returns:
    A line for the log saying which allocator serves the process (only
    when it did not re-execute).
  """
  value = os.environ.get(ENV_VAR, "1").strip().lower()
  if value in ("0", "false", "no", "off"):
    return f"host malloc: system default ({ENV_VAR}={value})"
  if value not in ("1", "true", "yes", "on"):
    raise ValueError(f"{ENV_VAR}={value!r}: use 1 (default) or 0")
  if platform.system() != "Linux":
    return "host malloc: system default (jemalloc preloading is Linux-only)"
  if jemalloc_loaded():
    os.environ.pop(_REEXEC_MARK, None)
    return ("host malloc: jemalloc, MALLOC_CONF="
            f"{os.environ.get('MALLOC_CONF', '(jemalloc defaults)')}")
  preload = os.environ.get("LD_PRELOAD", "")
  if any(name in preload for name in ("tcmalloc", "mimalloc")):
    return f"host malloc: as preloaded (LD_PRELOAD={preload})"
  if os.environ.get(_REEXEC_MARK):
    return ("host malloc: system default (preloading "
            f"{os.environ.get('LD_PRELOAD')} failed; see the loader's "
            f"message above; {ENV_VAR}=0 skips the attempt)")
  path = find_jemalloc()
  if path is None:
    return ("host malloc: glibc; install jemalloc (apt-get install "
            "libjemalloc2) for 13-25 % faster CPU train steps (README)")
  env = dict(os.environ)
  env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD")) if p)
  env.setdefault("MALLOC_CONF", NO_PURGE)
  env[_REEXEC_MARK] = "1"
  argv = list(argv if argv is not None else sys.orig_argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)
  raise AssertionError("unreachable: os.execve returned")
