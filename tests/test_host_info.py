"""Tests for oim_jax/host_info.py."""

import platform

from oim_jax import host_info

# Abridged /proc/cpuinfo: an AVX2-only AMD VM (session 11's) and an AVX-512
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
  assert host_info.parse_cpuinfo(_AMD) == ("AMD EPYC", ["avx2", "fma"])
  model, flags = host_info.parse_cpuinfo(_INTEL)
  assert model.startswith("Intel(R) Xeon(R) Platinum 8481C")
  assert flags == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                   "amx_bf16", "amx_tile"]
  assert host_info.parse_cpuinfo("") == ("", [])


def test_cpu_summary(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(_AMD)
  line = host_info.cpu_summary(str(path))
  assert line.startswith("host CPU: AMD EPYC, ")
  assert "usable cores" in line
  if platform.machine() == "x86_64":
    assert line.endswith("(avx2 fma; no avx512f)")
  path.write_text(_INTEL)
  assert "no avx512f" not in host_info.cpu_summary(str(path))
  # Unreadable /proc/cpuinfo: still a line, no exception.
  assert host_info.cpu_summary(str(tmp_path / "missing")).startswith(
      "host CPU: ")
