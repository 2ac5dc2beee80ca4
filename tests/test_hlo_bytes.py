"""bench/hlo_bytes.py: per-instruction HBM bytes of a compiled module's text."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import hlo_bytes  # noqa: E402  pylint: disable=g-import-not-at-top


def test_array_bytes_pads_the_minor_dims_to_the_tile():
  # Minor-to-major 3,2,1,0: dim 3 (C) is padded to 128, dim 2 (W) to 8.
  assert hlo_bytes.array_bytes("bf16", [4, 58, 94, 1000],
                               "3,2,1,0:T(8,128)(2,1)") == 4 * 58 * 96 * 1024 * 2
  # W-minor layout (2,3,1,0): W to 128, C (64) to 8: 376 -> 384, 64 stays.
  assert hlo_bytes.array_bytes("bf16", [4, 232, 376, 64],
                               "2,3,1,0:T(8,128)(2,1)") == 4 * 232 * 384 * 64 * 2
  assert hlo_bytes.array_bytes("f32", [3, 5], "") == 60  # untiled (CPU)
  assert hlo_bytes.array_bytes("f32", [], "") == 4  # scalar
  assert hlo_bytes.array_bytes("pred", [10], "0") == 10


def test_memory_space():
  assert hlo_bytes.memory_space("2,3,1,0:T(8,128)(2,1)S(1)") == 1
  assert hlo_bytes.memory_space("3,2,1,0:T(8,128)(2,1)") == 0
  assert hlo_bytes.memory_space("") == 0


HLO = """\
HloModule m, entry_computation_layout={(f32[256]{0:T(256)})->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation (p: f32[256]) -> f32[256] {
  %p = f32[256]{0:T(256)} parameter(0)
  ROOT %n = f32[256]{0:T(256)} negate(%p)
}

ENTRY %main (x: f32[256]) -> f32[] {
  %x = f32[256]{0:T(256)} parameter(0)
  %copy-start = (f32[256]{0:T(256)S(1)}, f32[256]{0:T(256)}, u32[]{:S(2)}) copy-start(%x)
  %copy-done = f32[256]{0:T(256)S(1)} copy-done(%copy-start)
  %fusion = f32[256]{0:T(256)} fusion(%copy-done), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/jvp(Model)/layer1/neg"}
  %c = f32[] constant(0)
  ROOT %r = f32[] reduce(%fusion, %c), dimensions={0}, to_apply=%add, metadata={op_name="jit(f)/transpose(jvp(Model))/layer1/reduce_sum"}
}
"""


def test_instructions_charge_hbm_once_per_async_copy():
  ins = {i["name"]: i for i in hlo_bytes.instructions(HLO)}
  # Fused and reducer bodies are charged through their instruction only.
  assert set(ins) == {"copy-start", "copy-done", "fusion", "r"}
  assert ins["copy-start"]["bytes"] == 1024  # source read from HBM
  # Destination write, plus the 4-byte u32 sync context in S(2).
  assert ins["copy-start"]["on_chip_bytes"] == 1024 + 4
  assert ins["copy-done"]["bytes"] == 0
  # The fusion reads its operand from on-chip memory and writes to HBM.
  assert ins["fusion"]["bytes"] == 1024
  assert ins["fusion"]["on_chip_bytes"] == 1024
  assert ins["r"]["bytes"] == 1024 + 4 + 4  # operand, init constant, result
  # An instruction without metadata takes its first operand's op_name.
  assert ins["copy-start"]["op_name"] == ""
  assert hlo_bytes.scope(ins["r"]["op_name"], 2) == "backward Model/layer1"
  assert hlo_bytes.scope(ins["fusion"]["op_name"], 3) == "Model/layer1/neg"


def test_group_sorts_by_bytes():
  g = hlo_bytes.group(hlo_bytes.instructions(HLO), by="kind")
  assert list(g)[0] == "reduce"
  assert g["fusion:kLoop"] == [1024, 1]
  assert g["reduce"] == [1032, 1]


def test_untiled_cpu_module_matches_the_cost_analysis():
  """On an XLA:CPU module (no tiles, one memory space) the charged bytes of
  a conv + fused relu-sum equal XLA's own bytes-accessed count."""
  f = jax.jit(lambda x, w: jnp.sum(jax.nn.relu(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))
  compiled = f.lower(jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4))).compile()
  total = sum(i["bytes"] for i in hlo_bytes.instructions(compiled.as_text()))
  # Hand count: input, kernel, conv output written once and read once, sum.
  assert total == (2 * 16 * 16 * 8 + 3 * 3 * 8 * 4 + 2 * 2 * 16 * 16 * 4) * 4 + 4
