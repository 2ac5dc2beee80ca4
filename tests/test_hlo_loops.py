"""bench/hlo_loops.py's counting, on hand-built functions."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import hlo_loops  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_counts_loops_sorts_and_top_k_inside_sub_jaxprs():
  def f(x):
    def body(c):
      i, v = c
      return i + 1, jnp.sort(v)  # a sort inside the while body
    _, y = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))
    z, _ = jax.lax.scan(lambda c, v: (c + v, None), 0.0, y)
    return z + jax.lax.top_k(x, 2)[0].sum()

  x = jnp.arange(5.0)
  ops = hlo_loops.serial_ops(jax.make_jaxpr(f)(x))
  assert {k: sum(v.values()) for k, v in ops.items()} == {
      "while": 1, "sort": 1, "scan": 1, "top_k": 1}
  text = jax.jit(f).lower(x).as_text()
  counts = hlo_loops.hlo_counts(text)
  assert counts["stablehlo.while"] >= 2  # the while, and the scan lowers to one
  assert counts["stablehlo.sort"] == 1


def test_top_k_decomposition_is_not_counted_as_a_sort():
  # Exported for TPU, each chlo.top_k comes with a sort-based reference
  # function; only the real argsort counts as a sort outside top_k.
  from jax import export  # pylint: disable=g-import-not-at-top
  def f(x):
    return jax.lax.top_k(x, 2)[0].sum() + jnp.argsort(x)[0]
  text = export.export(jax.jit(f), platforms=("tpu",))(
      jax.ShapeDtypeStruct((16,), jnp.float32)).mlir_module()
  counts = hlo_loops.hlo_counts(text)
  assert counts["chlo.top_k"] >= 1 and counts["stablehlo.sort"] == 2, counts
  assert counts["stablehlo.sort_outside_top_k"] == 1, counts
