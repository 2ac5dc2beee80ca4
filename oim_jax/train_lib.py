"""Training: state, the data-parallel train step, and the training loop.

The shape of the Flax ImageNet example: `create_train_state`, `train_step`,
`train_and_evaluate(config, workdir)`. The train step is one pure function
`(state, batch, rng) -> (state, metrics)`; the OIM lookup table and queue are
part of `state` and are updated inside it, after the gradient step, with the
embeddings of every device applied in the same global order.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from typing import Any, Callable, Optional

from absl import logging
from clu import metrics as clu_metrics
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from oim_jax import checkpointing
from oim_jax import config_defaults
from oim_jax import ema as ema_lib
from oim_jax import eval_lib
from oim_jax import oim
from oim_jax import optim
from oim_jax import parallel
from oim_jax.data import datasets as data_lib
from oim_jax.data import pipeline
from oim_jax.models import person_search


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # [] int32, optimizer steps taken
  params: Any
  opt_state: Any
  oim: oim.OIMState
  model_state: Any  # non-parameter collections (BN-neck batch_stats) or {}
  # Exponential moving average of all model variables ({"params", and
  # "batch_stats" with the BN neck}) when config.train.ema_decay > 0, else {}.
  ema: Any = flax.struct.field(default_factory=dict)


LOSS_NAMES = ("loss", "rpn_cls", "rpn_reg", "det_cls", "det_reg", "reid")


# clu aggregation of the per-step scalars over a logging window.
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name)
       for name in LOSS_NAMES + ("grad_norm",)})


class NonFiniteLossError(FloatingPointError):
  pass


def create_train_state(params: Any, tx, config: ml_collections.ConfigDict,
                       embedding_dim: int, model_state=None) -> TrainState:
  model_state = dict(model_state or {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params),
      oim=oim.init_state(config.oim.num_labeled, config.oim.queue_size,
                         embedding_dim),
      model_state=model_state,
      ema=(_copy(model_variables(params, model_state))
           if ema_lib.decay(config) > 0 else {}))


def _copy(tree):
  # Own buffers: the train step donates its state, and a buffer shared by
  # two leaves cannot be donated twice.
  return jax.tree.map(jnp.copy, tree)


def model_variables(params: Any, model_state: Any) -> dict[str, Any]:
  """{"params": params, **model_state}: what the model applies and
  checkpoints store as the "params" item."""
  return {"params": params, **model_state}


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], rng,
               *, loss_fn, tx, config: ml_collections.ConfigDict,
               axis_name: Optional[str]):
  """One optimizer step on this device's shard of the global batch.

  Args:
    state: replicated TrainState.
    batch: this device's part of the global batch (interfaces of the
      pipeline), [B_local, ...].
    rng: the step's key, identical on every device (each image's sampling
      key is folded from its index, so the split over devices is irrelevant).
    loss_fn: person_search.loss_fn with model and config bound:
      (params, oim_state, batch, rng, model_state=, axis_name=) ->
      (loss, aux).
    tx: the optax optimizer.
    config: full config (static).
    axis_name: the data-parallel axis, or None on a single device without
      collectives.

  Returns:
    (new state, metrics dict of replicated scalars).
  """
  def loss(params):
    return loss_fn(params, state.oim, batch, rng,
                   model_state=state.model_state, axis_name=axis_name)
  (loss, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  c = config.oim
  if axis_name is not None:
    new_oim = oim.update_state_across(
        state.oim, aux["embeddings"], aux["pids"], momentum=c.momentum,
        normalize=c.normalize, axis_name=axis_name)
  else:
    new_oim = oim.update_state(state.oim, aux["embeddings"], aux["pids"],
                               momentum=c.momentum, normalize=c.normalize)
  values = dict(aux["losses"])
  values["loss"] = loss
  values = {k: jnp.asarray(values.get(k, 0.0), jnp.float32)
            for k in LOSS_NAMES}
  values["grad_norm"] = _global_norm(grads)
  # A finite loss can still produce inf/nan parameters (e.g. a huge step);
  # the loop refuses to checkpoint such a state.
  values["nonfinite_params"] = sum(
      jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(params)
  ).astype(jnp.float32)
  if axis_name is not None:
    values = jax.lax.pmean(values, axis_name)
  ema = state.ema
  if ema_lib.decay(config) > 0:
    ema = ema_lib.update(ema, model_variables(params, aux["model_state"]),
                         state.step, ema_lib.decay(config))
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state, oim=new_oim,
                            model_state=aux["model_state"], ema=ema)
  return new_state, values


def _global_norm(tree):
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves))


# --------------------------------------------------------------------------
# The training loop.


class _Preemption:
  """Turns SIGTERM (Cloud TPU preemption, `kill`) into a flag the loop reads.

  With several processes `requested` is true on all of them as soon as one
  was signalled (they must save the same checkpoint together).
  """

  def __init__(self):
    self._flag = False
    self._previous = None

  @property
  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._flag
    flags = multihost_utils.process_allgather(np.int32(self._flag))
    return bool(np.max(flags))

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _History:
  """Metric rows in DIR/history.jsonl (for curves and resumes).

  Local files are appended to; object stores (gs://...) cannot append, so
  there the whole file is rewritten (it stays small: one row per log line).
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / "history.jsonl"
    self._append = "://" not in str(workdir)

  def append(self, row: dict[str, Any]):
    line = json.dumps(row) + "\n"
    if self._append:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._write(self.read() + [row])

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines()
            if line.strip()]

  def _write(self, rows):
    self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

  def truncate_after(self, step: int):
    """Drops rows logged after `step` (they belong to a run that crashed)."""
    self._write([r for r in self.read() if r.get("step", 0) <= step])


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _TraceCounter:
  """Counts traces of the per-device train step (make_train_step's on_trace)."""

  def __init__(self):
    self.n = 0

  def __call__(self):
    self.n += 1


class _Evaluator:
  """Evaluation during and after training: one Inference, compiled once.

  With config.train.ema_decay > 0 the moving average is what is evaluated
  (here and by eval.py).
  """

  def __init__(self, config, workdir, dataset, mesh, mode, use_ema, log,
               history):
    self.config, self.workdir, self.dataset = config, workdir, dataset
    self.mesh, self.mode, self.use_ema = mesh, mode, use_ema
    self.log, self.history = log, history
    self.inference = None

  def __call__(self, state, step: int) -> dict[str, Any]:
    variables = parallel.unreplicate(
        state.ema if self.use_ema
        else model_variables(state.params, state.model_state), self.mode)
    if self.inference is None:
      self.inference = eval_lib.Inference(self.config, variables, self.mesh)
    metrics = eval_lib.evaluate(self.config, self.workdir, params=variables,
                                dataset=self.dataset, step=step,
                                inference=self.inference)
    if jax.process_index() == 0:
      self.log.scalars("eval", metrics, step)
      self.history.append({"step": step,
                           **{f"eval_{k}": v for k, v in metrics.items()}})
    return metrics


def _save(ckpt, step: int, state, loader, config, mode: str, use_ema: bool):
  """A checkpoint of `state` at `step`, with the input pipeline's position."""
  meta = {"step": step, "seed": config.seed, "pipeline": loader.get_state()}
  checkpointing.save(ckpt, step, checkpoint_items(state, mode, use_ema), meta,
                     force=True)


class _CompileCounter:
  """Counts XLA compilations (jax.monitoring events) while registered."""

  def __init__(self):
    self.n = 0

  def _listener(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.n += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def create_model_and_state(config: ml_collections.ConfigDict,
                           steps_per_epoch: int, init_rng, *,
                           platform: Optional[str] = None,
                           pretrained: bool = True):
  """The model, its optimizer and a fresh train state (on the host).

  Returns:
    (model, tx, schedule (step -> lr), TrainState at step 0).
  """
  model = person_search.create_model(config, axis_name=parallel.AXIS,
                                     platform=platform)
  params, model_state = person_search.split_variables(
      person_search.init_variables(model, config, init_rng,
                                   pretrained=pretrained))
  tx, schedule = optim.create_optimizer(
      config.train, steps_per_epoch,
      person_search.trainable_mask(params, config))
  state = create_train_state(params, tx, config, config.model.embedding_dim,
                             model_state)
  return model, tx, schedule, state


def make_train_step(model, config: ml_collections.ConfigDict, tx,
                    mesh: jax.sharding.Mesh, mode: str, *,
                    donate_state: bool = True,
                    on_trace: Optional[Callable[[], None]] = None):
  """`train_step` of `model`, jit-compiled and data-parallel over `mesh`.

  Returns (state, global batch, rng) -> (state, metrics), in the layout of
  `mode` (parallel.data_parallel). `on_trace` is called at every trace of
  the per-device step (recompilation counts).
  """
  loss_fn = functools.partial(person_search.loss_fn, model, config)

  def per_device(st, batch, rng):
    if on_trace is not None:
      on_trace()
    return train_step(st, batch, rng, loss_fn=loss_fn, tx=tx, config=config,
                      axis_name=parallel.AXIS)
  return parallel.data_parallel(per_device, mode, mesh,
                                donate_state=donate_state)


def checkpoint_items(state: TrainState, mode: str,
                     use_ema: bool) -> dict[str, Any]:
  """The Orbax items of a (replicated) train state, on the host.

  "params" holds all model variables: what evaluation restores.
  """
  items = {
      "params": parallel.unreplicate(
          model_variables(state.params, state.model_state), mode),
      "opt_state": parallel.unreplicate(state.opt_state, mode),
      "oim": parallel.unreplicate(state.oim, mode)}
  if use_ema:
    items[checkpointing.EMA_ITEM] = parallel.unreplicate(state.ema, mode)
  return items


def restore_train_state(ckpt, state: TrainState, mesh: jax.sharding.Mesh,
                        use_ema: bool):
  """The latest checkpoint of `ckpt`, shaped like the fresh `state`.

  Restored straight into the replicated layout of `mesh` (every process
  reads the values of its own devices).

  Returns:
    (TrainState, step, checkpoint metadata).
  """
  latest = ckpt.latest_step()
  templates = {"params": model_variables(state.params, state.model_state),
               "opt_state": state.opt_state, "oim": state.oim}
  has_ema = checkpointing.has_item(ckpt, latest, checkpointing.EMA_ITEM)
  if use_ema and has_ema:
    templates[checkpointing.EMA_ITEM] = state.ema
  step, items, meta = checkpointing.restore(
      ckpt, templates, latest, sharding=parallel.replicated_sharding(mesh))
  params, model_state = person_search.split_variables(items["params"])
  ema = {}
  if use_ema:
    if has_ema:
      ema = items[checkpointing.EMA_ITEM]
    else:
      logging.warning("The checkpoint at step %d has no moving average "
                      "(trained with ema_decay=0): it starts from the "
                      "restored weights.", step)
      ema = _copy(model_variables(params, model_state))
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                     opt_state=items["opt_state"], oim=items["oim"],
                     model_state=model_state, ema=ema)
  return state, step, meta


def _check_num_labeled(config, dataset):
  if config.oim.num_labeled != dataset.num_train_ids:
    raise ValueError(
        f"config.oim.num_labeled={config.oim.num_labeled} but the "
        f"{dataset.name} train split at {dataset.root} has "
        f"{dataset.num_train_ids} labeled identities: set "
        f"--config.oim.num_labeled={dataset.num_train_ids}.")


def _check_finite(step: int, m: dict[str, float], ckpt_dir):
  if (not all(math.isfinite(v) for v in m.values())
      or m.get("nonfinite_params", 0.0) > 0):
    raise NonFiniteLossError(
        f"Non-finite training loss or parameters after step {step}: {m}. "
        "Training stopped; no checkpoint of this state was written. Lower "
        "config.train.lr, check the data, or resume from the last "
        f"checkpoint in {ckpt_dir}.")


class _TrainLog:
  """Per-step metrics -> window means -> log line, TensorBoard, history."""

  def __init__(self, workdir, history: _History, *, total_steps: int,
               steps_per_epoch: int, batch_size: int, schedule,
               counts: Callable[[], tuple[int, int]]):
    self.writer = _summary_writer(workdir)
    self.history = history
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.batch_size, self.schedule, self.counts = batch_size, schedule, counts
    self.window, self.last = [], {}
    self.restart_clock()

  def restart_clock(self):
    """Keeps what happened since (evaluation) out of seconds/step."""
    self._start = time.time()

  def add(self, metrics: dict[str, float]):
    self.window.append(metrics)

  def flush(self, step: int):
    """Writes the mean of the window ending at `step` and starts a new one."""
    if not self.window:
      return
    acc = TrainMetrics.empty()
    for m in self.window:
      acc = acc.merge(TrainMetrics.single_from_model_output(**m))
    means = {k: float(v) for k, v in acc.compute().items()}
    sec_per_step = (time.time() - self._start) / len(self.window)
    self.window = []
    self.restart_clock()
    traces, compiles = self.counts()
    means.update(lr=float(self.schedule(step - 1)), sec_per_step=sec_per_step,
                 images_per_sec=self.batch_size / max(sec_per_step, 1e-9),
                 step_compilations=traces, compilations=compiles)
    eta = sec_per_step * (self.total_steps - step)
    if jax.process_index() == 0:
      logging.info(
          "step %d/%d (epoch %.2f) loss %.4f [rpn %.3f/%.3f det %.3f/%.3f "
          "reid %.3f] lr %.2e %.2f s/step %.1f img/s ETA %s compiles %d",
          step, self.total_steps, step / self.steps_per_epoch, means["loss"],
          means["rpn_cls"], means["rpn_reg"], means["det_cls"],
          means["det_reg"], means["reid"], means["lr"], sec_per_step,
          means["images_per_sec"], _fmt_eta(eta), traces)
      self.scalars("train", means, step)
      self.history.append({"step": step, **means})
    self.last = means

  def scalars(self, prefix: str, values: dict[str, float], step: int):
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", v, step)
    self.writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint) and evaluates at the end.

  Returns:
    the final metrics dict (training losses of the last logging window, and
    the evaluation metrics when `config.eval.at_end`).
  """

  if config.get("distributed", False):
    # Before any other JAX call (train.py has usually done it already, with
    # its --coordinator_address flags).
    parallel.initialize_distributed()
  # Fails fast, before any compilation, naming the field and its values.
  config_defaults.validate(config, num_devices=jax.device_count())
  workdir = checkpointing.workdir_path(workdir)
  primary = jax.process_index() == 0
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  dataset = data_lib.load_dataset(config.data)
  _check_num_labeled(config, dataset)
  mesh, mode = parallel.make_mesh(), config.parallelism
  loader = pipeline.TrainIterator(
      pipeline.dataset_source(dataset, "train", config.data),
      batch_size=config.train.batch_size, seed=config.seed,
      options=pipeline.PipelineOptions.from_config(config.data))
  steps_per_epoch = loader.steps_per_epoch
  total_steps = (config.train.num_steps if config.train.num_steps > 0
                 else config.train.epochs * steps_per_epoch)
  init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
  model, tx, schedule, state = create_model_and_state(
      config, steps_per_epoch, init_rng)

  ckpt = checkpointing.manager(workdir, config.train.keep_checkpoints,
                               async_saves=config.train.async_checkpoints)
  history = _History(workdir)
  use_ema = ema_lib.decay(config) > 0
  step = 0
  if ckpt.latest_step() is not None:
    state, step, meta = restore_train_state(ckpt, state, mesh, use_ema)
    loader.set_state(meta["pipeline"])
    if primary:
      history.truncate_after(step)
    logging.info("Resumed from step %d (%s).", step, ckpt.directory)
  state = parallel.put_replicated(state, mesh, mode)

  traces, compiles = _TraceCounter(), _CompileCounter()
  p_step = make_train_step(model, config, tx, mesh, mode, on_trace=traces)
  log = _TrainLog(workdir, history, total_steps=total_steps,
                  steps_per_epoch=steps_per_epoch,
                  batch_size=config.train.batch_size, schedule=schedule,
                  counts=lambda: (traces.n, compiles.n))
  evaluate = _Evaluator(config, workdir, dataset, mesh, mode, use_ema, log,
                        history)

  def take(step_done: int, metrics):
    m = _to_floats(metrics, mode)
    _check_finite(step_done, m, ckpt.directory)
    log.add(m)

  log_every = max(1, config.train.log_every)
  ckpt_every, eval_every = config.train.checkpoint_every, config.eval.every_steps
  pending = None  # (step, metrics) of the step whose metrics are not read
  with _Preemption() as preempt, compiles:
    try:
      while step < total_steps:
        batch = parallel.put_batch(next(loader), mesh, mode)
        state, metrics = p_step(state, batch,
                                jax.random.fold_in(base_rng, step))
        step += 1
        # Read the previous step's metrics while this one runs: keeps the
        # device busy and still stops within one step of a NaN.
        if pending is not None:
          take(*pending)
          if pending[0] % log_every == 0:
            log.flush(pending[0])
        pending = (step, metrics)
        stop = preempt.requested  # read once a step (a collective on pods)
        if (ckpt_every > 0 and step % ckpt_every == 0) or stop or (
            step == total_steps):
          take(*pending)
          pending = None
          log.flush(step)
          _save(ckpt, step, state, loader, config, mode, use_ema)
        if (eval_every > 0 and step % eval_every == 0 and step < total_steps
            and not stop):
          evaluate(state, step)
          log.restart_clock()
        if stop:
          logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.",
                          step)
          ckpt.wait_until_finished()
          log.writer.close()
          return {"preempted": True, "step": step}
    finally:
      ckpt.wait_until_finished()
      loader.close()

  result = dict(log.last)
  if config.eval.at_end:
    result.update(evaluate(state, step))
  log.writer.close()
  if primary:
    plot_curves(history.read(), workdir / "curves.png")
  return result


def _to_floats(metrics, mode) -> dict[str, float]:
  metrics = parallel.unreplicate(metrics, mode)
  return {k: float(parallel.to_host(v)) for k, v in metrics.items()}


def _summary_writer(workdir: str):
  if jax.process_index() != 0:
    return _NullWriter()
  # tensorboardX writes gs:// itself (with google-cloud-storage installed).
  return SummaryWriter(str(epath.Path(workdir) / "tensorboard"))


class _NullWriter:

  def add_scalar(self, *a, **k):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def plot_curves(rows: list[dict[str, Any]], path: str):
  """Loss terms and evaluation metrics over steps, as one PNG."""
  # Imported here: the headless backend must be chosen before pyplot loads.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in LOSS_NAMES:
    xs = [r["step"] for r in train if name in r]
    if xs:
      axes[0].plot(xs, [r[name] for r in train if name in r], label=name)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("loss")
  axes[0].set_yscale("log")
  if axes[0].lines:
    axes[0].legend(fontsize=8)
  axes[0].set_title("training losses")
  for name in ("eval_mAP", "eval_top1", "eval_det_recall"):
    xs = [r["step"] for r in evals if name in r]
    if xs:
      axes[1].plot(xs, [100 * r[name] for r in evals if name in r], "o-",
                   label=name[5:])
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("%")
  axes[1].set_title("evaluation")
  if axes[1].lines:
    axes[1].legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)
