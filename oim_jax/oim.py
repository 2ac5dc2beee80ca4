"""Online Instance Matching (OIM) loss and its lookup-table / queue state.

Xiao et al., "Joint Detection and Identification Feature Learning for Person
Search", CVPR 2017. Every RoI embedding `x` (L2-normalised, [K, D]) carries a
label: `pid >= 0` a labeled identity (a row of the lookup table), `-1` an
unlabeled person, `-2` ignore (background RoI, padding).

* Loss: logits `scalar * x @ [lut; queue].T` ([K, L+Q]); softmax cross-entropy
  over the L+Q classes, averaged over the labeled entries only. The tables are
  not parameters: the gradient flows to `x` only. `chunk_size` streams over
  the tables instead of materialising the [K, L+Q] logits (for huge L+Q).
* Update (after the loss), in entry order, one entry at a time: labeled
  `lut[pid] = m * lut[pid] + (1 - m) * x`, then re-normalised to unit length
  (`normalize=False` skips this, as in the original Caffe code); unlabeled
  `queue[pointer] = x; pointer = (pointer + 1) % Q`; ignored: nothing.

Implementation of the update (exact, jit-able, static shapes, no scatter with
duplicate indices):

* Queue: the i-th unlabeled entry of the batch (0-based rank r_i from a
  cumulative count) goes to slot `(pointer + r_i) % Q`. If more than Q
  unlabeled entries arrive, a sequential loop overwrites the earlier ones, so
  only the last Q of them are kept; their slots are then pairwise distinct and
  one scatter writes them all (the others are sent out of bounds and dropped).
* LUT: a pid may occur several times in one batch, and the re-normalisation
  makes the sequential result depend on every intermediate value (there is no
  closed form). Occurrence k of a pid (k = number of earlier entries with the
  same pid, from a [K, K] comparison) is applied in round k; within one round
  all pids are distinct, so a gather / update / scatter per round is exact and
  deterministic. The rounds run in a `lax.while_loop` whose trip count is the
  largest multiplicity in the batch (data dependent, shapes static), so the
  sequential depth is max-multiplicity instead of K. `lut_method="scan"`
  selects the plain one-entry-at-a-time `lax.scan` (same numbers; kept as the
  readable reference and for benchmarking).

Multi-device (data parallel): the state is replicated. Each device computes
`oim_loss` of its local entries against its (identical) copy of the state; the
train step `pmean`s the gradients, so the effective loss is the mean of the
per-device means. `update_state_across` all-gathers embeddings and pids along
the named axis (tiled, device order) and applies the concatenated batch with
`update_state` on every replica: the same updates in the same global order, so
replicas stay bit-identical and equal a single-device run on the concatenated
batch.

The softmax baseline of the paper (a learned classifier over the L labeled
identities) is `SoftmaxClassifier` + `softmax_loss`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# pid >= 0: LUT row; UNLABELED: to the queue; others (pids.IGNORE): no update.
from oim_jax.pids import UNLABELED


class OIMState(NamedTuple):
  """OIM tables (a pytree; not trained by the optimizer).

  Attributes:
    lut: [L, D] float32, one row per labeled identity.
    queue: [Q, D] float32, circular queue of unlabeled embeddings.
    pointer: [] int32, next queue slot to write.
  """
  lut: jax.Array
  queue: jax.Array
  pointer: jax.Array


def init_state(num_labeled: int, queue_size: int, dim: int,
               dtype=jnp.float32) -> OIMState:
  """All-zero state: lut [num_labeled, dim], queue [queue_size, dim]."""
  if num_labeled < 0 or queue_size < 0 or dim <= 0:
    raise ValueError(
        f"oim.init_state: need num_labeled >= 0, queue_size >= 0, dim > 0; "
        f"got num_labeled={num_labeled}, queue_size={queue_size}, dim={dim} "
        "(check config.oim.num_labeled / queue_size and model.embedding_dim)")
  return OIMState(lut=jnp.zeros((num_labeled, dim), dtype),
                  queue=jnp.zeros((queue_size, dim), dtype),
                  pointer=jnp.zeros((), jnp.int32))


def _check_batch(state: OIMState, x: jax.Array, pids: jax.Array, where: str):
  if x.ndim != 2 or pids.ndim != 1 or x.shape[0] != pids.shape[0]:
    raise ValueError(f"oim.{where}: expected x [K, D] and pids [K], got "
                     f"x {x.shape} and pids {pids.shape}")
  if x.shape[1] != state.lut.shape[1]:
    raise ValueError(
        f"oim.{where}: embedding dim {x.shape[1]} != OIM state dim "
        f"{state.lut.shape[1]} (model.embedding_dim vs the OIM state)")


def _labeled_mask(pids: jax.Array, num_labeled: int) -> jax.Array:
  # pids >= L cannot be checked inside jit; they are treated as ignored, the
  # training setup checks config.oim.num_labeled against the dataset.
  return (pids >= 0) & (pids < num_labeled)


def oim_logits(state: OIMState, x: jax.Array,
               scalar: float = 30.0) -> jax.Array:
  """[K, D] -> [K, L+Q] logits `scalar * x @ [lut; queue].T` (float32)."""
  table = jax.lax.stop_gradient(
      jnp.concatenate([state.lut, state.queue], axis=0)).astype(jnp.float32)
  return scalar * (x.astype(jnp.float32) @ table.T)


def _masked_cross_entropy(logits: jax.Array, pids: jax.Array,
                          labeled: jax.Array) -> jax.Array:
  """Mean over `labeled` of -log softmax(logits)[pid]; 0 if none labeled."""
  target = jnp.where(labeled, pids, 0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
  nll = jnp.where(labeled, logz - picked, 0.0)
  count = jnp.sum(labeled)
  return jnp.sum(nll) / jnp.maximum(count, 1).astype(nll.dtype)


def oim_loss(state: OIMState, x: jax.Array, pids: jax.Array,
             scalar: float = 30.0, chunk_size: int | None = None) -> jax.Array:
  """OIM loss: mean softmax cross-entropy over the labeled entries.

  Args:
    state: OIMState (lut [L, D], queue [Q, D]); treated as a constant.
    x: [K, D] embeddings (L2-normalised by the model).
    pids: [K] int, >= 0 labeled (class index into the LUT), -1 unlabeled,
      -2 ignored. Unlabeled and ignored entries add no loss term.
    scalar: inverse temperature (30 in the PyTorch ports, 10 in Caffe).
    chunk_size: None: materialise the [K, L+Q] logits (fastest for tables of
      a few 10k rows). An int C: stream over the tables C rows at a time
      (online log-sum-exp forward, recomputed softmax in a custom backward),
      so memory is O(K * C) instead of O(K * (L+Q)); same numbers up to
      float rounding. For very large L+Q (see bench/results/oim.md).

  Returns:
    [] float32 loss; 0 (with zero gradient) when no entry is labeled.
  """
  _check_batch(state, x, pids, "oim_loss")
  labeled = _labeled_mask(pids, state.lut.shape[0])
  if chunk_size is None:
    return _masked_cross_entropy(oim_logits(state, x, scalar), pids, labeled)
  if chunk_size <= 0:
    raise ValueError(f"oim.oim_loss: chunk_size must be None or > 0, got "
                     f"{chunk_size}")
  lut = jax.lax.stop_gradient(state.lut).astype(jnp.float32)
  queue = jax.lax.stop_gradient(state.queue).astype(jnp.float32)
  target = jnp.where(labeled, pids, 0)
  weight = labeled.astype(jnp.float32) / jnp.maximum(
      jnp.sum(labeled), 1).astype(jnp.float32)
  return _chunked_loss(float(scalar), int(chunk_size), x.astype(jnp.float32),
                       lut, queue, target, weight)


def _chunks(table: jax.Array, chunk: int):
  """Static chunking of [N, D] rows: (size, count) with the last chunk
  shifted back to end at N (its rows already seen are masked)."""
  n = table.shape[0]
  size = min(chunk, n)
  return size, -(-n // size)


def _chunk(table, size, i):
  n = table.shape[0]
  start = jnp.minimum(i * size, n - size)
  rows = jax.lax.dynamic_slice_in_dim(table, start, size, axis=0)
  # Rows before i * size were covered by the previous chunk.
  fresh = start + jnp.arange(size) >= i * size
  return rows, fresh


def _lse_scan(x, table, chunk, scalar, carry):
  """Online log-sum-exp of scalar * x @ table.T, chunk by chunk."""
  if table.shape[0] == 0:
    return carry
  size, count = _chunks(table, chunk)

  def body(carry, i):
    m, s = carry
    rows, fresh = _chunk(table, size, i)
    logits = jnp.where(fresh[None, :], scalar * (x @ rows.T), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]),
                                         axis=1)
    return (m_new, s), None

  carry, _ = jax.lax.scan(body, carry, jnp.arange(count))
  return carry


def _softmax_matmul_scan(x, table, chunk, scalar, logz, acc):
  """acc + softmax(scalar * x @ table.T - logz) @ table, chunk by chunk."""
  if table.shape[0] == 0:
    return acc
  size, count = _chunks(table, chunk)

  def body(acc, i):
    rows, fresh = _chunk(table, size, i)
    p = jnp.where(fresh[None, :],
                  jnp.exp(scalar * (x @ rows.T) - logz[:, None]), 0.0)
    return acc + p @ rows, None

  acc, _ = jax.lax.scan(body, acc, jnp.arange(count))
  return acc


def _chunked_forward(scalar, chunk, x, lut, queue, target, weight):
  k = x.shape[0]
  carry = (jnp.full((k,), -jnp.inf, jnp.float32), jnp.zeros((k,), jnp.float32))
  carry = _lse_scan(x, lut, chunk, scalar, carry)
  m, s = _lse_scan(x, queue, chunk, scalar, carry)
  logz = m + jnp.log(s)
  target_rows = jnp.take(lut, target, axis=0)
  picked = scalar * jnp.sum(x * target_rows, axis=1)
  loss = jnp.sum(weight * (logz - picked))
  return loss, (x, lut, queue, target_rows, weight, logz)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_loss(scalar, chunk, x, lut, queue, target, weight):
  return _chunked_forward(scalar, chunk, x, lut, queue, target, weight)[0]


def _chunked_loss_bwd(scalar, chunk, res, g):
  x, lut, queue, target_rows, weight, logz = res
  # d/dx [logz - picked] = scalar * (softmax @ table - table[target]).
  acc = jnp.zeros_like(x)
  acc = _softmax_matmul_scan(x, lut, chunk, scalar, logz, acc)
  acc = _softmax_matmul_scan(x, queue, chunk, scalar, logz, acc)
  grad_x = (g * scalar * weight)[:, None] * (acc - target_rows)
  return grad_x, None, None, None, None


_chunked_loss.defvjp(_chunked_forward, _chunked_loss_bwd)


def _normalize_rows(v: jax.Array) -> jax.Array:
  # A zero row (zero LUT row updated by a zero vector) stays zero, no NaN.
  norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
  return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), v)


def _update_queue(queue, pointer, x, unlabeled):
  """Vectorised circular-queue writes (see module docstring)."""
  q = queue.shape[0]
  count = jnp.sum(unlabeled, dtype=jnp.int32)
  if q == 0:
    return queue, pointer
  rank = jnp.cumsum(unlabeled, dtype=jnp.int32) - 1
  keep = unlabeled & (rank >= count - q)  # only the last Q writers survive
  slot = jnp.where(keep, (pointer + rank) % q, q)  # q: out of bounds, dropped
  queue = queue.at[slot].set(x.astype(queue.dtype), mode="drop")
  return queue, (pointer + count) % q


def _occurrence_index(pids: jax.Array, labeled: jax.Array) -> jax.Array:
  """[K] number of earlier labeled entries with the same pid."""
  k = pids.shape[0]
  same = (pids[:, None] == pids[None, :]) & labeled[None, :]
  earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]
  return jnp.sum(same & earlier, axis=1, dtype=jnp.int32)


def _update_lut_rounds(lut, x, pids, labeled, momentum, normalize):
  num_labeled = lut.shape[0]
  occ = jnp.where(labeled, _occurrence_index(pids, labeled), -1)
  rounds = jnp.max(occ, initial=-1) + 1
  x = x.astype(lut.dtype)

  def body(carry):
    r, lut = carry
    active = occ == r  # pids pairwise distinct among active entries
    idx = jnp.where(active, pids, num_labeled)
    rows = jnp.take(lut, idx, axis=0, mode="clip")
    new = momentum * rows + (1.0 - momentum) * x
    if normalize:
      new = _normalize_rows(new)
    return r + 1, lut.at[idx].set(new, mode="drop")

  _, lut = jax.lax.while_loop(lambda c: c[0] < rounds, body,
                              (jnp.int32(0), lut))
  return lut


def _update_lut_scan(lut, x, pids, labeled, momentum, normalize):
  x = x.astype(lut.dtype)

  def step(lut, inputs):
    xi, pid, lab = inputs
    row = jax.lax.dynamic_index_in_dim(lut, pid, keepdims=False)
    new = momentum * row + (1.0 - momentum) * xi
    if normalize:
      new = _normalize_rows(new)
    new = jnp.where(lab, new, row)
    return jax.lax.dynamic_update_index_in_dim(lut, new, pid, 0), None

  safe = jnp.where(labeled, pids, 0)
  lut, _ = jax.lax.scan(step, lut, (x, safe, labeled))
  return lut


def update_state(state: OIMState, x: jax.Array, pids: jax.Array,
                 momentum: float = 0.5, normalize: bool = True,
                 lut_method: str = "rounds") -> OIMState:
  """Applies one batch of entries to the state, sequentially in entry order.

  Args:
    state: OIMState.
    x: [K, D] embeddings (no gradient flows through the update).
    pids: [K] int labels (>= 0 labeled, -1 unlabeled, -2 ignored).
    momentum: LUT momentum m (0.5 in the paper).
    normalize: re-normalise updated LUT rows to unit length (default on; the
      Caffe original does not).
    lut_method: "rounds" (default, one vectorised round per occurrence rank)
      or "scan" (one entry per step); identical results.

  Returns:
    The new OIMState (same shapes and dtypes).
  """
  _check_batch(state, x, pids, "update_state")
  x = jax.lax.stop_gradient(x)
  pids = pids.astype(jnp.int32)
  labeled = _labeled_mask(pids, state.lut.shape[0])
  if lut_method == "rounds":
    lut = _update_lut_rounds(state.lut, x, pids, labeled, momentum, normalize)
  elif lut_method == "scan":
    lut = _update_lut_scan(state.lut, x, pids, labeled, momentum, normalize)
  else:
    raise ValueError(f"oim.update_state: lut_method must be 'rounds' or "
                     f"'scan', got {lut_method!r}")
  queue, pointer = _update_queue(state.queue, state.pointer, x,
                                 pids == UNLABELED)
  return OIMState(lut=lut, queue=queue, pointer=pointer.astype(jnp.int32))


def update_state_across(state: OIMState, x: jax.Array, pids: jax.Array,
                        momentum: float = 0.5, normalize: bool = True,
                        axis_name: str = "data",
                        lut_method: str = "rounds") -> OIMState:
  """`update_state` with the entries of all devices along `axis_name`.

  Call inside shard_map / pmap with the state replicated. Embeddings and
  pids are all-gathered (tiled, in device order: device 0's entries first),
  so every replica applies the same global sequence and stays identical.

  Args:
    state: replicated OIMState.
    x: [K, D] this device's embeddings.
    pids: [K] this device's labels.
    momentum, normalize, lut_method: as in `update_state`.
    axis_name: the mapped axis name (e.g. "data").

  Returns:
    The new replicated OIMState.
  """
  # to="invarying": the gathered batch is the same on every device, so the
  # updated state is (and is typed, under shard_map's check_vma) replicated.
  x = jax.lax.all_gather(jax.lax.stop_gradient(x), axis_name, tiled=True,
                         to="invarying")
  pids = jax.lax.all_gather(pids, axis_name, tiled=True, to="invarying")
  return update_state(state, x, pids, momentum=momentum, normalize=normalize,
                      lut_method=lut_method)


class SoftmaxClassifier(nn.Module):
  """Paper baseline: a learned linear classifier over the L labeled ids.

  Attributes:
    num_classes: L, the number of labeled training identities.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[K, D] -> [K, num_classes] float32 logits."""
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(0.01),
                    name="classifier")(x.astype(jnp.float32))


def softmax_loss(logits: jax.Array, pids: jax.Array) -> jax.Array:
  """Cross-entropy over the labeled entries (mean), 0 when none.

  Args:
    logits: [K, L] classifier logits.
    pids: [K] int, >= 0 labeled; -1 / -2 entries add no loss term.

  Returns:
    [] float32 loss.
  """
  if logits.ndim != 2 or pids.shape != logits.shape[:1]:
    raise ValueError(f"oim.softmax_loss: expected logits [K, L] and pids [K], "
                     f"got {logits.shape} and {pids.shape}")
  labeled = _labeled_mask(pids, logits.shape[1])
  return _masked_cross_entropy(logits.astype(jnp.float32), pids, labeled)
