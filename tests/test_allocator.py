"""Tests for oim_jax/cpu_host/allocator.py.

The allocator is chosen when a process starts, so the cases that load
jemalloc or mimalloc run in fresh Python subprocesses. The fault probe
mallocs, touches and frees a 48 MiB block five times (the pattern of
XLA:CPU's per-step temporaries) and reports the minor page faults of the
last four rounds: glibc mmaps a block that size and unmaps it on free, so
each round faults all 12,288 pages back in; jemalloc and mimalloc without
purging reuse the pages.
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from oim_jax.cpu_host import allocator

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PAGES = 48 * 2**20 // 4096
_JEMALLOC = allocator.find_jemalloc()
_MIMALLOC = allocator.find_mimalloc()

needs_jemalloc = pytest.mark.skipif(
    _JEMALLOC is None or platform.system() != "Linux",
    reason="no libjemalloc.so.2 installed (.ci/run installs libjemalloc2)")
needs_mimalloc = pytest.mark.skipif(
    _MIMALLOC is None or platform.system() != "Linux",
    reason="no libmimalloc (requirements.txt installs cmeel-mimalloc)")

@pytest.fixture(autouse=True)
def _cpu_host(monkeypatch):
  """A CPU host, as here, even where the suite runs on a GPU or TPU machine
  (those get nothing: tested with $JAX_PLATFORMS set below)."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


# Entry-point prologue as train.py has it, then the fault probe.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    sys.path.insert(0, {root!r})
    from oim_jax.cpu_host import allocator
    line = allocator.use_fast_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 48 * 2**20

    def round_trip():
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)  # touch every page
      libc.free(p)

    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      round_trip()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(allocator.loaded_allocator(), (after - before) / 4)
    print(line)
""")


def _probe(**env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY",
                      allocator.ENV_VAR,
                      "OIM_JAX_MALLOC_REEXEC")}
  env.update(env_extra, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE.format(root=_ROOT)],
                       env=env, capture_output=True, text=True, check=True,
                       timeout=60)
  first, line = out.stdout.strip().split("\n")
  loaded, faults = first.split()
  return loaded, float(faults), line


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="the reference behaviour is glibc's")
def test_glibc_faults_the_block_in_every_round():
  # The reference the preload is measured against (and the switch off).
  loaded, faults, line = _probe(OIM_JAX_MALLOC="system")
  assert loaded == "None"
  assert faults > 0.9 * _PAGES
  assert "OIM_JAX_MALLOC=system" in line


@needs_jemalloc
def test_reexecs_with_jemalloc_that_keeps_freed_pages():
  loaded, faults, line = _probe()  # auto: jemalloc first when installed
  assert loaded == "jemalloc"
  assert faults < 0.01 * _PAGES
  assert allocator.NO_PURGE in line


@needs_mimalloc
def test_reexecs_with_mimalloc_that_keeps_freed_pages():
  loaded, faults, line = _probe(OIM_JAX_MALLOC="mimalloc")
  assert loaded == "mimalloc"
  assert faults < 0.01 * _PAGES
  assert "MIMALLOC_PURGE_DELAY=-1" in line


def test_auto_falls_back_to_mimalloc(monkeypatch):
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  for var in ("LD_PRELOAD", "OIM_JAX_MALLOC_REEXEC", "MIMALLOC_PURGE_DELAY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
  monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
  monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/x/libmimalloc.so.3")
  calls = []
  def fake_execve(exe, argv, env):
    calls.append(env)
    raise SystemExit(0)
  monkeypatch.setattr(os, "execve", fake_execve)
  if platform.system() != "Linux":
    return
  with pytest.raises(SystemExit):
    allocator.use_fast_malloc(["python", "train.py"])
  env, = calls
  assert env["LD_PRELOAD"] == "/x/libmimalloc.so.3"
  assert env["MIMALLOC_PURGE_DELAY"] == "-1"
  assert env["OIM_JAX_MALLOC_REEXEC"] == "1"


def test_preload_env(monkeypatch):
  monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/j/libjemalloc.so.2")
  monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/m/libmimalloc.so.3")
  assert allocator.preload_env() == {
      "LD_PRELOAD": "/j/libjemalloc.so.2", "MALLOC_CONF": allocator.NO_PURGE}
  assert allocator.preload_env("mimalloc") == {
      "LD_PRELOAD": "/m/libmimalloc.so.3", "MIMALLOC_PURGE_DELAY": "-1"}
  monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
  assert allocator.preload_env()["LD_PRELOAD"] == "/m/libmimalloc.so.3"
  assert allocator.preload_env("jemalloc") == {}
  with pytest.raises(ValueError, match="tcmalloc"):
    allocator.preload_env("tcmalloc")


def test_asked_for_allocator_missing_is_an_error(monkeypatch):
  monkeypatch.setenv(allocator.ENV_VAR, "jemalloc")
  monkeypatch.delenv("OIM_JAX_MALLOC_REEXEC", raising=False)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
  monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  if platform.system() == "Linux":
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
      allocator.use_fast_malloc()


@needs_jemalloc
def test_user_malloc_conf_is_kept():
  _, _, line = _probe(MALLOC_CONF="narenas:2")
  assert line.endswith("MALLOC_CONF=narenas:2")


def test_nothing_installed_leaves_the_process_alone(monkeypatch):
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  monkeypatch.delenv("OIM_JAX_MALLOC_REEXEC", raising=False)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
  monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
  monkeypatch.setattr(allocator, "find_mimalloc", lambda: None)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  if platform.system() == "Linux":
    line = allocator.use_fast_malloc()
    assert "pip install -r requirements.txt" in line
    assert "apt-get install libjemalloc2" in line


def test_failed_preload_does_not_loop(monkeypatch):
  # The loader ignores a preload it cannot load; the second pass must not
  # try again.
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  monkeypatch.setenv("OIM_JAX_MALLOC_REEXEC", "1")
  monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libjemalloc.so.2")
  monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  if platform.system() == "Linux":
    assert "failed" in allocator.use_fast_malloc()


@pytest.mark.parametrize("preload", ["/usr/lib/libtcmalloc.so.4",
                                     "/opt/profiler/libprofiler.so"])
def test_users_preload_is_kept(monkeypatch, preload):
  # Another allocator, or any library the user preloads: we add nothing.
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  monkeypatch.delenv("OIM_JAX_MALLOC_REEXEC", raising=False)
  monkeypatch.setenv("LD_PRELOAD", preload)
  monkeypatch.setattr(allocator, "loaded_allocator", lambda: None)
  monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/x/libmimalloc.so.3")
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  if platform.system() == "Linux":
    assert allocator.use_fast_malloc() == (
        f"host malloc: as preloaded (LD_PRELOAD={preload})")


def test_find_jemalloc(tmp_path, monkeypatch):
  monkeypatch.delenv("CONDA_PREFIX", raising=False)
  assert allocator.find_jemalloc((str(tmp_path / "*.so.2"),)) is None
  lib = tmp_path / "lib" / "libjemalloc.so.2"
  lib.parent.mkdir()
  lib.write_bytes(b"")
  assert allocator.find_jemalloc((str(tmp_path / "lib" / "*.so.2"),)) == (
      str(lib))
  monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))
  assert allocator.find_jemalloc(()) == str(lib)


def test_find_mimalloc(tmp_path, monkeypatch):
  # The cmeel-mimalloc wheel puts it under site-packages/cmeel.prefix/lib.
  monkeypatch.delenv("CONDA_PREFIX", raising=False)
  monkeypatch.setattr(allocator, "_site_dirs", lambda: [str(tmp_path)])
  assert allocator.find_mimalloc() is None
  lib = tmp_path / "cmeel.prefix" / "lib" / "libmimalloc.so.3"
  lib.parent.mkdir(parents=True)
  lib.write_bytes(b"")
  assert allocator.find_mimalloc() == str(lib)


def test_bad_switch(monkeypatch):
  monkeypatch.setenv("OIM_JAX_MALLOC", "tcmalloc")
  with pytest.raises(ValueError, match="OIM_JAX_MALLOC='tcmalloc'"):
    allocator.use_fast_malloc()


@pytest.mark.parametrize("platforms", ["tpu", "cuda,cpu"])
def test_nothing_done_on_accelerator_hosts(monkeypatch, platforms):
  # XLA's host allocator matters for XLA:CPU's buffers only.
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv(allocator.ENV_VAR, "jemalloc")
  monkeypatch.delenv("OIM_JAX_MALLOC_REEXEC", raising=False)
  monkeypatch.setattr(allocator, "find_jemalloc",
                      lambda: "/j/libjemalloc.so.2")
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  backend = platforms.split(",")[0]
  assert allocator.use_fast_malloc() == (
      f"host malloc: system default (JAX backend {backend})")
