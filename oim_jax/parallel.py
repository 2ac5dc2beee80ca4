"""Data parallelism: one per-device step, run by shard_map (default) or pmap.

The per-device function uses named-axis collectives over AXIS ("data"):
gradients are `lax.pmean`-ed, OIM updates `lax.all_gather`-ed. The training
state is replicated; batches are split along their leading axis. With
several processes (TPU pod slices, GPU hosts) the mesh spans the devices of
all of them and each process feeds its own rows of every global batch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"

# Environment fallbacks of train.py / eval.py's --coordinator_address,
# --num_processes and --process_id (JAX itself reads only the first).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r}: use a whole number, or unset it "
                     "to let JAX detect the cluster.") from None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """`jax.distributed.initialize()`, once; call it before any other JAX call.

  Arguments left None come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES
  and $JAX_PROCESS_ID; where those are unset too JAX detects the cluster
  itself (Cloud TPU VMs, SLURM, Open MPI).

  Returns:
    False if it was already initialised (nothing done), else True.
  """
  if jax.distributed.is_initialized():
    return False
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  return True


def make_mesh(devices=None) -> Mesh:
  """A ('data',) mesh over `devices` (default: every device of every process,
  in jax.devices() order, so each process holds a contiguous block)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def data_parallel(per_device_fn: Callable, mode: str, mesh: Mesh,
                  donate_state: bool = True) -> Callable:
  """Wraps `per_device_fn(state, batch, rng) -> (state, metrics)`.

  Args:
    per_device_fn: the step on one device's shard; collectives over AXIS.
    mode: "shard_map" — jit(shard_map(...)) over `mesh`: state replicated,
      batch a global array sharded on axis 0; or "pmap" — jax.pmap with the
      state replicated along a leading local-device axis and the batch
      reshaped to [local devices, per_device, ...] (`put_replicated`,
      `put_batch`).
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


def _local_devices(mesh: Mesh) -> list:
  me = jax.process_index()
  return [d for d in mesh.devices.flat if d.process_index == me]


def to_host(x) -> np.ndarray:
  """A replicated (possibly multi-process) array, or any array-like -> numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def put_replicated(tree: Any, mesh: Mesh, mode: str) -> Any:
  """Places a pytree on all devices (replicated) in the layout of `mode`.

  Leaves may be numpy arrays or jax.Arrays anywhere (host CPU, one device, a
  replicated global array): a leaf already in the target sharding is kept
  as it is; with several processes other leaves go through host memory,
  since JAX does not move arrays between hosts.
  """
  if mode == "pmap":
    devices = _local_devices(mesh)
    local = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))

    def leaf(x):
      x = to_host(x)
      # One copy per local device along the leading axis (what pmap takes).
      return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape),
                            local)
    return jax.tree.map(leaf, tree)
  target = replicated_sharding(mesh)
  multi = jax.process_count() > 1

  def leaf(x):
    if isinstance(x, jax.Array):
      # Equivalent is not enough: a single-device array on a 1-device mesh
      # is equivalent, but jit keys its cache on the sharding itself and
      # would compile the step again for the NamedSharding it returns.
      if (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
          and x.sharding.is_equivalent_to(target, x.ndim)):
        return x
      if multi:
        x = to_host(x)
    return jax.device_put(x, target)
  return jax.tree.map(leaf, tree)


def unreplicate(tree: Any, mode: str) -> Any:
  if mode == "pmap":
    return jax.tree.map(lambda x: x[0], tree)
  return tree


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, mode: str) -> Any:
  """Host batch [local_B, ...] -> device arrays laid out for `mode`.

  Single process: local_B is the global batch. Multi-host: each process
  passes its own rows (the pipeline's share) and the global array is
  assembled from the process-local parts, in process order.
  """
  if mode == "pmap":
    n = len(_local_devices(mesh))
    return jax.tree.map(
        lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
  sharding = NamedSharding(mesh, P(AXIS))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def gather_to_host(tree: Any) -> Any:
  """Batch-sharded global arrays -> numpy on every process (the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
