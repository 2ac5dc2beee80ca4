"""Tests for oim_jax/launch.py and parallel.initialize_distributed.

jax.distributed.initialize is replaced by a recorder: these tests check which
arguments reach it (flags first, then the environment, else None for JAX to
detect the cluster). tests/test_multiprocess.py runs the real thing.
"""

from absl import flags
from absl.testing import flagsaver
import jax
import ml_collections
import pytest

from oim_jax import launch
from oim_jax import parallel

_ENV = (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES,
        parallel.ENV_PROCESS_ID)


@pytest.fixture
def calls(monkeypatch):
  """The kwargs of every jax.distributed.initialize call."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  for name in _ENV:
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(made))
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: made.append(kwargs))
  return made


def _config(distributed):
  return ml_collections.ConfigDict({"distributed": distributed})


def test_not_distributed_starts_nothing(calls):
  launch.start(_config(False))
  launch.start(ml_collections.ConfigDict())  # configs without the field
  assert calls == []


def test_process_flags_without_distributed_are_an_error(calls):
  with flagsaver.flagsaver(num_processes=2, process_id=1):
    with pytest.raises(ValueError, match=r"--num_processes, --process_id "
                       r"given without --config.distributed=True"):
      launch.start(_config(False))
  assert calls == []


def test_flags_reach_initialize(calls):
  with flagsaver.flagsaver(coordinator_address="10.0.0.2:1234",
                           num_processes=4, process_id=3):
    launch.start(_config(True))
    launch.start(_config(True))  # idempotent: already initialised
  assert calls == [{"coordinator_address": "10.0.0.2:1234",
                    "num_processes": 4, "process_id": 3}]


def test_environment_fills_what_flags_leave_out(calls, monkeypatch):
  monkeypatch.setenv(parallel.ENV_COORDINATOR, "127.0.0.1:9999")
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(parallel.ENV_PROCESS_ID, "0")
  with flagsaver.flagsaver(process_id=1):
    launch.start(_config(True))
  assert calls == [{"coordinator_address": "127.0.0.1:9999",
                    "num_processes": 2, "process_id": 1}]


def test_nothing_given_lets_jax_detect_the_cluster(calls):
  # Cloud TPU VMs, SLURM, Open MPI: JAX finds the values itself.
  assert parallel.initialize_distributed()
  assert calls == [{"coordinator_address": None, "num_processes": None,
                    "process_id": None}]
  assert not parallel.initialize_distributed()


def test_bad_environment_value_names_the_variable(calls, monkeypatch):
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two'"):
    parallel.initialize_distributed()
  assert calls == []
