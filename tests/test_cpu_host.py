"""oim_jax/cpu_host: the entry points' one call, and when it must do nothing."""

import ast
import json
import os
import subprocess
import sys

import pytest

from oim_jax.cpu_host import allocator
from oim_jax.cpu_host import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what set_up() left in the process: its log lines and the variables
# it may change.
_PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from oim_jax import cpu_host
lines = cpu_host.set_up()
print(json.dumps({{"lines": lines,
                   "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                   "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                   "loaded": cpu_host.allocator.loaded_allocator()}}))
"""


def _probe(**env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY",
                      "XLA_FLAGS", "JAX_PLATFORMS", allocator.ENV_VAR,
                      xla_flags.ENV_VAR, "OIM_JAX_MALLOC_REEXEC")}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)],
                       env=env, capture_output=True, text=True, check=True,
                       timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["train.py", "eval.py", "search.py"])
def test_entry_points_set_up_the_host_first_and_log_it(script):
  # The re-exec and XLA_FLAGS must come before anything that may load JAX
  # (search.py loads it only through oim_jax.cli).
  with open(os.path.join(ROOT, script)) as f:
    text = f.read()
  body = [s for s in ast.parse(text).body
          if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
  first, second = body[0], body[1]
  assert (isinstance(first, ast.ImportFrom) and first.module == "oim_jax"
          and [a.name for a in first.names] == ["cpu_host"])
  assert ast.unparse(second) == "_CPU_HOST = cpu_host.set_up()"
  assert ("cpu_host.log(_CPU_HOST)" in text
          or "cli.start(FLAGS.config, _CPU_HOST)" in text)


@pytest.mark.parametrize("platforms", ["tpu", "cuda"])
def test_inert_on_accelerator_hosts(platforms):
  out = _probe(JAX_PLATFORMS=platforms, XLA_FLAGS="--xla_dump_to=/tmp/x")
  assert out["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
  assert out["LD_PRELOAD"] is None and out["loaded"] is None
  malloc, flags, _ = out["lines"]
  assert malloc == f"host malloc: system default (JAX backend {platforms})"
  assert flags == f"XLA:CPU flags: none (JAX backend {platforms})"


def test_users_preload_and_flag_are_left_alone():
  user_flags = f"{xla_flags.FLAG}=-individual_dot --xla_dump_to=/tmp/x"
  out = _probe(JAX_PLATFORMS="cpu", LD_PRELOAD="libm.so.6",
               XLA_FLAGS=user_flags)
  assert out["LD_PRELOAD"] == "libm.so.6" and out["loaded"] is None
  assert out["XLA_FLAGS"] == user_flags
  assert out["lines"][0] == "host malloc: as preloaded (LD_PRELOAD=libm.so.6)"


@pytest.mark.skipif(allocator.find_mimalloc() is None
                    and allocator.find_jemalloc() is None,
                    reason="neither allocator installed")
def test_cpu_host_gets_the_allocator_and_the_flag():
  import jaxlib  # pylint: disable=g-import-not-at-top
  out = _probe(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_dump_to=/tmp/x")
  assert out["loaded"] in ("jemalloc", "mimalloc")
  expected, _ = xla_flags.cpu_flags("--xla_dump_to=/tmp/x", jaxlib.__version__)
  assert out["XLA_FLAGS"] == expected
  assert out["lines"][2].startswith("host CPU: ")
