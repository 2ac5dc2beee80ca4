"""Tests for oim_jax/cpu_host/cpu_info.py."""

import platform

from oim_jax.cpu_host import cpu_info

# Abridged /proc/cpuinfo: an AVX2-only AMD EPYC (Zen 3) VM and an AVX-512
# Xeon.
_AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni
"""
_INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx fma avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""


def test_parse_cpuinfo():
  assert cpu_info.parse_cpuinfo(_AMD) == ("AMD EPYC", ["avx2", "fma"])
  model, flags = cpu_info.parse_cpuinfo(_INTEL)
  assert model.startswith("Intel(R) Xeon(R) Platinum 8481C")
  assert flags == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                   "amx_bf16", "amx_tile"]
  assert cpu_info.parse_cpuinfo("") == ("", [])


def test_cpu_summary(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(_AMD)
  line = cpu_info.cpu_summary(str(path))
  assert line.startswith("host CPU: AMD EPYC, ")
  assert "usable cores" in line
  if platform.machine() == "x86_64":
    assert line.endswith("(avx2 fma; no avx512f)")
  path.write_text(_INTEL)
  assert "no avx512f" not in cpu_info.cpu_summary(str(path))
  # Unreadable /proc/cpuinfo: still a line, no exception.
  assert cpu_info.cpu_summary(str(tmp_path / "missing")).startswith(
      "host CPU: ")


def _backend(environ, installed=(), devices=()):
  return cpu_info.accelerator_backend(
      environ, installed=lambda name: name in installed,
      exists=lambda path: path in devices)


def test_accelerator_backend_from_jax_platforms():
  assert _backend({"JAX_PLATFORMS": "tpu"}) == "tpu"
  assert _backend({"JAX_PLATFORMS": "cuda,cpu"}) == "cuda"
  assert _backend({"JAX_PLATFORMS": " CPU "}) is None
  # $JAX_PLATFORMS wins over what is installed.
  assert _backend({"JAX_PLATFORMS": "cpu"}, installed={"libtpu"},
                  devices={"/dev/accel0"}) is None


def test_accelerator_backend_needs_plugin_and_device():
  assert _backend({}) is None
  assert _backend({}, installed={"libtpu"}, devices={"/dev/accel0"}) == "tpu"
  assert _backend({}, installed={"libtpu"}, devices={"/dev/vfio/0"}) == "tpu"
  assert _backend({}, installed={"jax-cuda12-plugin"},
                  devices={"/dev/nvidia0"}) == "gpu"
  assert _backend({}, installed={"jax-rocm7-plugin"},
                  devices={"/dev/kfd"}) == "gpu"
  # A plugin without its hardware (a GPU image on a CPU VM) runs on the CPU,
  # as does hardware without a plugin.
  assert _backend({}, installed={"jax-cuda12-plugin"}) is None
  assert _backend({}, devices={"/dev/nvidia0", "/dev/accel0"}) is None
  assert _backend({"JAX_PLATFORMS": ""}, installed={"libtpu"}) is None


def test_this_machine_is_a_cpu_host():
  # The tests' own runs: CPU (the suite sets nothing else).
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] == "cpu":
    import jax  # pylint: disable=g-import-not-at-top
    assert (cpu_info.accelerator_backend() is None) == (
        jax.default_backend() == "cpu")
