"""Data parallelism: one per-device step, run by shard_map (default) or pmap.

The per-device function uses named-axis collectives over AXIS ("data"):
gradients are `lax.pmean`-ed, OIM updates `lax.all_gather`-ed. The training
state is replicated; batches are split along their leading axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def data_parallel(per_device_fn: Callable, mode: str, mesh: Mesh,
                  donate_state: bool = True) -> Callable:
  """Wraps `per_device_fn(state, batch, rng) -> (state, metrics)`.

  Args:
    per_device_fn: the step on one device's shard; collectives over AXIS.
    mode: "shard_map" — jit(shard_map(...)) over `mesh`: state replicated,
      batch a global array sharded on axis 0; or "pmap" — jax.pmap with the
      state replicated along a leading device axis and the batch reshaped to
      [devices, per_device, ...] (see `to_pmap_batch`, `replicate`).
    mesh: the ('data',) mesh (shard_map; pmap uses its devices).
    donate_state: donate the old state's buffers to the new one.

  Returns:
    step(state, batch, rng) -> (state, metrics); metrics replicated.
  """
  donate = (0,) if donate_state else ()
  if mode == "shard_map":
    fn = jax.shard_map(per_device_fn, mesh=mesh,
                       in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()),
                       check_vma=False)
    return jax.jit(fn, donate_argnums=donate)
  if mode == "pmap":
    return jax.pmap(per_device_fn, axis_name=AXIS, in_axes=(0, 0, None),
                    devices=list(mesh.devices.flat), donate_argnums=donate)
  raise ValueError(f"config.parallelism must be 'shard_map' or 'pmap', "
                   f"got {mode!r}")


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh, mode: str) -> Any:
  """Places a host pytree on all devices (replicated) for the given mode."""
  if mode == "pmap":
    n = mesh.devices.size

    def leaf(x):
      x = np.asarray(x)
      stacked = np.broadcast_to(x, (n,) + x.shape)
      # One copy per device along the leading axis (what pmap consumes).
      return jax.device_put(stacked, NamedSharding(mesh, P(AXIS)))
    return jax.tree.map(leaf, tree)
  return jax.device_put(tree, replicated_sharding(mesh))


def unreplicate(tree: Any, mode: str) -> Any:
  if mode == "pmap":
    return jax.tree.map(lambda x: x[0], tree)
  return tree


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, mode: str) -> Any:
  """Host batch [global_B, ...] -> device arrays laid out for `mode`.

  Multi-host: each process passes its own [local_B, ...] part; the global
  array is assembled from the process-local shards.
  """
  if mode == "pmap":
    n = jax.local_device_count()
    return jax.tree.map(
        lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
  sharding = NamedSharding(mesh, P(AXIS))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
