"""The conventions train.py, eval.py and search.py share as command lines.

  if __name__ == "__main__":
    cli.run(main)

- The log shows this project's lines and every library's warnings; the
  libraries' INFO lines (Orbax's dozens per checkpoint save, JAX's backend
  probing) come back with --verbosity=1.
- A bad input (missing dataset, bad annotation, bad config value, no
  checkpoint: the FileNotFoundError / ValueError our code raises with a message
  saying what and where) ends with that message and exit code 1; its traceback
  only with --verbosity=1. Other exceptions keep their traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from oim_jax import config_defaults
from oim_jax import cpu_host
from oim_jax import launch

# Errors that carry a message for the user rather than a bug report.
# FloatingPointError: train_lib's non-finite-loss stop.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError,
               FloatingPointError)
EXIT_USER_ERROR = 1

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LibraryInfoFilter(std_logging.Filter):
  """Passes warnings and errors, and INFO/DEBUG lines from our own files only.

  Ours: files under oim_jax/ and the files beside the entry-point script
  (train.py, eval.py, search.py).
  """

  def __init__(self, script_dir: str | None = None):
    super().__init__()
    self._dirs = (_PACKAGE_DIR + os.sep,)
    self._script_dir = script_dir

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    if path.startswith(self._dirs):
      return True
    return (self._script_dir is not None
            and os.path.dirname(path) == self._script_dir)


def _script_dir() -> str | None:
  main = sys.modules.get("__main__")
  path = getattr(main, "__file__", None)
  return os.path.dirname(os.path.abspath(path)) if path else None


def quiet_library_logs() -> LibraryInfoFilter | None:
  """Installs LibraryInfoFilter on absl's handler unless --verbosity >= 1.

  Returns the filter (None when verbose), so that callers can remove it.
  """
  if flags.FLAGS.verbosity >= 1:
    return None
  log_filter = LibraryInfoFilter(_script_dir())
  logging.get_absl_handler().addFilter(log_filter)
  return log_filter


def _main_with_conventions(main: Callable[[Sequence[str]], None]):
  def wrapped(argv: Sequence[str]) -> None:
    quiet_library_logs()
    try:
      main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.verbosity >= 1:
        raise
      logging.flush()
      print(f"\nerror: {e}\n(the traceback: rerun with --verbosity=1)",
            file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)
  return wrapped


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`app.run(main)` with JAX's absl flags and the conventions above."""
  jax.config.config_with_absl()
  app.run(_main_with_conventions(main))


def start(config: ml_collections.ConfigDict, cpu_host_lines: list[str]) -> None:
  """The start of train.py's and eval.py's main: check, connect, log.

  The config is validated before JAX starts (a bad value costs no device
  start-up), then jax.distributed is initialised where configured, then the
  host lines (cpu_host.set_up) and the JAX processes and devices are logged.
  """
  config_defaults.validate(config)
  launch.start(config)  # before anything else starts JAX's devices
  cpu_host.log(cpu_host_lines)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
