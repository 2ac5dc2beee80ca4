"""CPU-host tuning for the entry points, behind one call; inert elsewhere.

  from oim_jax import cpu_host  # before any other import
  _CPU_HOST = cpu_host.set_up()
  ...
  cpu_host.log(_CPU_HOST)       # once absl logging is up

On a CPU host `set_up` re-executes the command with a faster malloc
(allocator.py) and adds the XLA:CPU flag (xla_flags.py) before JAX starts.
Where JAX will run on a GPU or TPU, or where the user already preloads a
library or sets that flag, it changes nothing. Why and by how much:
docs/cpu_performance.md.
"""

from __future__ import annotations

from absl import logging

from oim_jax.cpu_host import allocator
from oim_jax.cpu_host import cpu_info
from oim_jax.cpu_host import xla_flags


def set_up() -> list[str]:
  """Tunes this process for XLA:CPU; returns the lines for the log.

  Call it first in a script: the allocator step replaces the process
  (os.execve), and XLA reads XLA_FLAGS once, when JAX starts.
  """
  return [allocator.use_fast_malloc(), xla_flags.use_fast_cpu_flags(),
          cpu_info.cpu_summary()]


def log(lines: list[str]) -> None:
  """Writes set_up's lines to the absl log."""
  for line in lines:
    logging.info(line)
