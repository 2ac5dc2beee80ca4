"""Tests for oim_jax/cli.py: the log filter and the short error exit."""

import logging
import os
import subprocess
import sys

import pytest

from oim_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "msg", (), None)


@pytest.mark.parametrize("path, level, shown", [
    # Our package and the entry scripts: every level.
    (os.path.join(REPO, "oim_jax", "train_lib.py"), logging.INFO, True),
    (os.path.join(REPO, "oim_jax", "data", "cuhk_sysu.py"), logging.DEBUG,
     True),
    (os.path.join(REPO, "train.py"), logging.INFO, True),
    # A library: warnings and errors only.
    ("/venv/site-packages/orbax/checkpoint/checkpointer.py", logging.INFO,
     False),
    ("/venv/site-packages/jax/_src/xla_bridge.py", logging.INFO, False),
    ("/venv/site-packages/orbax/checkpoint/checkpointer.py", logging.WARNING,
     True),
    ("/venv/site-packages/jax/_src/xla_bridge.py", logging.ERROR, True),
    # A file in a sibling folder of the scripts is not ours.
    (os.path.join(REPO, "bench", "suite_jax.py"), logging.INFO, False),
])
def test_library_info_filter(path, level, shown):
  assert cli.LibraryInfoFilter(REPO).filter(_record(path, level)) is shown


def test_library_info_filter_without_a_script():
  f = cli.LibraryInfoFilter(None)
  assert f.filter(_record(os.path.join(REPO, "oim_jax", "oim.py"),
                          logging.INFO))
  assert not f.filter(_record(os.path.join(REPO, "train.py"), logging.INFO))


def _eval(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "eval.py"),
       "--config=" + os.path.join(REPO, "configs", "synthetic.py"),
       f"--workdir={tmp_path / 'no_checkpoint_here'}"] + args,
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_user_error_exits_1_with_the_message_only(tmp_path):
  done = _eval([], tmp_path)
  assert done.returncode == cli.EXIT_USER_ERROR, done.stderr[-2000:]
  assert "\nerror: " in done.stderr
  assert "no_checkpoint_here" in done.stderr  # names what is missing
  assert "Traceback" not in done.stderr
  assert "--verbosity=1" in done.stderr


def test_user_error_keeps_its_traceback_when_verbose(tmp_path):
  done = _eval(["--verbosity=1"], tmp_path)
  assert done.returncode != 0
  assert "Traceback" in done.stderr
