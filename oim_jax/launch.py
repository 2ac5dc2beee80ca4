"""What train.py and eval.py share after their flags are parsed: the
multi-process start (TPU pod slices, several GPU hosts).

  --config.distributed=True            jax.distributed.initialize(), with
  --coordinator_address=HOST:PORT      these where JAX cannot detect the
  --num_processes=N --process_id=I     cluster itself (Cloud TPU VMs, SLURM
                                       and Open MPI it detects); or the
                                       environment $JAX_COORDINATOR_ADDRESS,
                                       $JAX_NUM_PROCESSES, $JAX_PROCESS_ID.
"""

from __future__ import annotations

from absl import flags
import ml_collections

from oim_jax import parallel

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs (--config.distributed=True): HOST:PORT of process "
    "0's coordinator (default: $JAX_COORDINATOR_ADDRESS or detected).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Multi-process runs: the number of processes (default: "
    "$JAX_NUM_PROCESSES or detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "Multi-process runs: this process's index (default: $JAX_PROCESS_ID or "
    "detected).")


def start(config: ml_collections.ConfigDict) -> None:
  """Initialises the multi-process runtime when the config asks for it.

  Call before anything touches JAX's devices (jax.devices(), jit, ...).

  Raises:
    ValueError: a process flag without --config.distributed=True.
  """
  given = [f"--{f.name}" for f in (COORDINATOR_ADDRESS, NUM_PROCESSES,
                                   PROCESS_ID) if f.value is not None]
  if not config.get("distributed", False):
    if given:
      raise ValueError(f"{', '.join(given)} given without "
                       "--config.distributed=True: add it to start a "
                       "multi-process run.")
    return
  parallel.initialize_distributed(COORDINATOR_ADDRESS.value,
                                  NUM_PROCESSES.value, PROCESS_ID.value)
