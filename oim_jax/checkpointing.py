"""Orbax checkpoints of the training state, one item per part.

Items: "params", "opt_state", "oim" (LUT, queue, pointer) as array pytrees,
"ema" (moving average of the model variables, only when training keeps one)
and "meta" (step, seed, input-pipeline position) as JSON. Keeping them apart lets
evaluation restore the parameters alone. Arrays are saved unreplicated (the
training state is replicated over devices), so a checkpoint written on one
device count restores on any other; restored arrays land directly in the
sharding the caller asks for (e.g. replicated over the step's mesh), on
every process of a multi-host run. Workdirs are local paths or URIs such as
gs://bucket/run (etils.epath; Orbax writes arrays through tensorstore).
"""

from __future__ import annotations

from typing import Any, Optional

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from oim_jax import parallel

ARRAY_ITEMS = ("params", "opt_state", "oim")
EMA_ITEM = "ema"  # optional: saved when config.train.ema_decay > 0


def workdir_path(workdir) -> epath.Path:
  """The workdir as an epath.Path: a URI stays one, a local path is made
  absolute (Orbax wants absolute directories)."""
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.resolve()


def manager(workdir, max_to_keep: int = 3,
            async_saves: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager on `workdir/checkpoints`."""
  directory = workdir_path(workdir) / "checkpoints"
  # Read-only: the values Orbax would force anyway (it warns when it does).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only,
      read_only=read_only, enable_async_checkpointing=async_saves,
      **({"save_interval_steps": 0} if read_only else {}))
  return ocp.CheckpointManager(
      directory, options=options,
      item_names=ARRAY_ITEMS + (EMA_ITEM, "meta"))


def save(mgr: ocp.CheckpointManager, step: int, items: dict[str, Any],
         meta: dict[str, Any], force: bool = False) -> bool:
  """Saves array items and JSON meta at `step` (asynchronously if enabled)."""
  args = {k: ocp.args.StandardSave(
      jax.tree.map(parallel.to_host, v)) for k, v in items.items()}
  args["meta"] = ocp.args.JsonSave(meta)
  return mgr.save(step, args=ocp.args.Composite(**args), force=force)


def restore(mgr: ocp.CheckpointManager, templates: dict[str, Any],
            step: Optional[int] = None,
            sharding: Optional[jax.sharding.Sharding] = None
            ) -> tuple[int, dict[str, Any],
                                                  dict[str, Any]]:
  """Restores the items named in `templates` (and meta) at `step` or latest.

  Args:
    mgr: the manager.
    templates: {item: pytree of arrays (or ShapeDtypeStructs)} giving the
      structure, shapes and dtypes to restore.
    step: which step; None = latest.
    sharding: where every restored array goes, e.g.
      NamedSharding(mesh, P()) to get the step's replicated state directly
      (each process reads what its devices hold); None = this process's
      first CPU device.

  Returns:
    (step, {item: pytree}, meta dict).
  """
  if step is None:
    step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {mgr.directory}.")
  if step not in mgr.all_steps():
    raise FileNotFoundError(
        f"No checkpoint for step {step} under {mgr.directory}; available "
        f"steps: {list(mgr.all_steps())}.")
  args = {k: ocp.args.StandardRestore(_abstract(v, sharding))
          for k, v in templates.items()}
  args["meta"] = ocp.args.JsonRestore()
  restored = mgr.restore(step, args=ocp.args.Composite(**args))
  items = {k: restored[k] for k in templates}
  return step, items, dict(restored["meta"])


def has_item(mgr: ocp.CheckpointManager, step: int, item: str) -> bool:
  """Whether the checkpoint at `step` holds `item` (e.g. the optional "ema")."""
  return (epath.Path(mgr.directory) / str(step) / item).is_dir()


def _abstract(tree, sharding=None):
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(
        jax.local_devices(backend="cpu")[0])

  def leaf(x):
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def restore_raw(mgr: ocp.CheckpointManager, step: Optional[int] = None,
                items: tuple[str, ...] = ARRAY_ITEMS) -> dict[str, Any]:
  """Restores items as saved (nested dicts/lists of arrays), no template."""
  step = mgr.latest_step() if step is None else step
  args = {k: ocp.args.StandardRestore() for k in items}
  restored = mgr.restore(step, args=ocp.args.Composite(**args))
  return {k: restored[k] for k in items}
