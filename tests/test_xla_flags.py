"""oim_jax/cpu_host/xla_flags.py: the XLA:CPU flag the entry points set before JAX starts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import np_conv3x3
from conftest import np_conv3x3_grads
from oim_jax.cpu_host import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _cpu_host(monkeypatch):
  """A CPU host, as here, even where the suite runs on a GPU or TPU machine
  (those get nothing: tested with $JAX_PLATFORMS set below)."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_flag_appended_on_tested_jaxlib():
  new, msg = xla_flags.cpu_flags("", "0.10.2")
  assert new == ("--xla_cpu_experimental_ynn_fusion_type="
                 "-individual_convolution,-individual_dot")
  assert "XLA's own" in msg
  new, _ = xla_flags.cpu_flags("--xla_force_host_platform_device_count=8",
                               "0.11.0")
  assert new.split() == ["--xla_force_host_platform_device_count=8",
                         xla_flags.NO_YNN_CONV_DOT]


def test_users_flag_opt_out_and_other_versions_left_alone():
  mine = "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.cpu_flags(mine, "0.10.2")[0] == mine
  assert xla_flags.cpu_flags("", "0.10.2", keep_ynn_conv=True)[0] == ""
  for version in ("0.9.0", "0.12.0", "0.6.2", "1.0.0"):
    new, msg = xla_flags.cpu_flags("", version)
    assert new == "" and version in msg
  assert xla_flags.cpu_flags("", "0.10.2rc1")[0] == xla_flags.NO_YNN_CONV_DOT


def test_use_fast_cpu_flags_sets_the_environment(monkeypatch):
  monkeypatch.setattr(xla_flags.importlib.metadata, "version",
                      lambda name: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.delenv(xla_flags.ENV_VAR, raising=False)
  xla_flags.use_fast_cpu_flags()
  assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x "
                                     + xla_flags.NO_YNN_CONV_DOT)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(xla_flags.ENV_VAR, "1")
  assert "YNNPACK" in xla_flags.use_fast_cpu_flags()
  assert os.environ["XLA_FLAGS"] == ""


_CONV = """
import json, sys
import numpy as np
import pytest
import jax, jax.numpy as jnp
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 9, 11, 24)).astype(np.float32)
k = rng.standard_normal((3, 3, 24, 16)).astype(np.float32)
f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC")))
g = jax.jit(jax.grad(lambda k, x: jnp.sum(f(x, k) ** 2)))
hlo = f.lower(x, k).compile().as_text()
a = rng.standard_normal((64, 24)).astype(np.float32)
mm = jax.jit(lambda a, b: a @ b)
dot_hlo = mm.lower(a, k[0, 0]).compile().as_text()
print(json.dumps({"y": np.asarray(f(x, k)).tolist(),
                  "dk": np.asarray(g(k, x)).tolist(),
                  "mm": np.asarray(mm(a, k[0, 0])).tolist(),
                  "ynn_conv": "__ynn_fusion" in hlo,
                  "ynn_dot": "__ynn_fusion" in dot_hlo}))
"""


def _run_conv(flags):
  import json  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _CONV], env=env, cwd=ROOT,
                     capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_jaxlib_accepts_the_flag_and_convolutions_stay_exact():
  # In a fresh process with the flag set as train.py sets it: XLA aborts on
  # flags it does not know, so this also guards the version range.
  import jaxlib  # pylint: disable=g-import-not-at-top
  flags, _ = xla_flags.cpu_flags("", jaxlib.__version__)
  out = _run_conv(flags)
  if flags:
    # The flag does what it says: the convolution and the matmul left
    # YNNPACK, which jaxlib's default uses for them.
    assert not out["ynn_conv"] and not out["ynn_dot"]
    default = _run_conv("")
    assert default["ynn_conv"] and default["ynn_dot"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 11, 24)).astype(np.float32)
  k = rng.standard_normal((3, 3, 24, 16)).astype(np.float32)
  y = np_conv3x3(x, k, 1)
  np.testing.assert_allclose(out["y"], y, rtol=1e-4, atol=1e-4)
  a = rng.standard_normal((64, 24)).astype(np.float32)
  np.testing.assert_allclose(out["mm"], a.astype(np.float64) @ k[0, 0],
                             rtol=1e-4, atol=1e-4)
  # d/dk sum(y^2) = d/dk sum(y * g) at g = 2 y.
  dk, _ = np_conv3x3_grads(x, k, 2 * y, 1)
  np.testing.assert_allclose(out["dk"], dk, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("platforms", ["tpu", "cuda"])
def test_no_cpu_flags_on_accelerator_hosts(monkeypatch, platforms):
  monkeypatch.setattr(xla_flags.importlib.metadata, "version",
                      lambda name: "0.10.2")
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.delenv(xla_flags.ENV_VAR, raising=False)
  line = xla_flags.use_fast_cpu_flags()
  assert line == f"XLA:CPU flags: none (JAX backend {platforms})"
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
