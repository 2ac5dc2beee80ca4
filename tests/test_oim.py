"""Tests for oim_jax.oim against NumPy references written here."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oim_jax import oim

D = 8


def _unit(rng, n, d=D):
  v = rng.normal(size=(n, d))
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _random_state(rng, num_labeled, queue_size, pointer, zero_rows=()):
  lut = _unit(rng, num_labeled)
  lut[list(zero_rows)] = 0.0
  return oim.OIMState(lut=jnp.asarray(lut),
                      queue=jnp.asarray(_unit(rng, queue_size)),
                      pointer=jnp.int32(pointer))


# ----------------------------------------------------------------------------
# NumPy references.

def ref_loss_grad(lut, queue, x, pids, scalar):
  """Explicit softmax cross-entropy and its analytic gradient w.r.t. x."""
  lut, queue, x = (np.asarray(a, np.float64) for a in (lut, queue, x))
  table = np.concatenate([lut, queue], 0)
  logits = scalar * x @ table.T
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n = sum(1 for pid in pids if pid >= 0)
  loss, grad = 0.0, np.zeros_like(x)
  for i, pid in enumerate(pids):
    if pid < 0:
      continue
    loss -= np.log(p[i, pid])
    onehot = np.zeros(table.shape[0])
    onehot[pid] = 1.0
    grad[i] = scalar * (p[i] - onehot) @ table
  if n:
    loss, grad = loss / n, grad / n
  return loss, grad


def ref_update(lut, queue, pointer, x, pids, momentum, normalize):
  """The reference semantics: a plain loop over entries."""
  lut = np.array(lut, np.float64)
  queue = np.array(queue, np.float64)
  pointer = int(pointer)
  for xi, pid in zip(np.asarray(x, np.float64), pids):
    if pid >= 0:
      lut[pid] = momentum * lut[pid] + (1 - momentum) * xi
      if normalize:
        lut[pid] /= np.linalg.norm(lut[pid])
    elif pid == -1:
      queue[pointer] = xi
      pointer = (pointer + 1) % len(queue)
  return lut, queue, pointer


# ----------------------------------------------------------------------------
# Cases. One (L, Q, K) shape for most of them keeps the compilations few.
L, Q, K = 6, 5, 12
CASES = {
    # repeated pids (3 x pid 2, 2 x pid 0), unlabeled and ignored mixed in
    "repeated": ([2, -1, 0, 2, -2, 5, 2, -1, 0, -2, 3, -1], 1, ()),
    # only unlabeled / ignored entries: no labeled term; 9 unlabeled > Q=5
    "unlabeled_only": ([-1, -2, -1, -1, -1, -2, -1, -1, -1, -1, -2, -1], 3,
                       ()),
    # more unlabeled than Q in one step, pointer near the end, repeats
    "wrap": ([-1, 4, -1, -1, 4, -1, -1, -1, 4, -1, -1, 1], 4, ()),
    # zero LUT rows (fresh state) hit repeatedly
    "zero_rows": ([1, 1, 3, -1, 1, -2, 3, -2, -2, -2, -2, 1], 0, (1, 3)),
    # everything ignored
    "ignored_only": ([-2] * K, 2, ()),
}


def _case(name, seed=0):
  pids, pointer, zero_rows = CASES[name]
  rng = np.random.default_rng(seed)
  state = _random_state(rng, L, Q, pointer, zero_rows)
  x = _unit(rng, K)
  return state, jnp.asarray(x), jnp.asarray(pids, jnp.int32)


_loss_and_grad = jax.jit(
    jax.value_and_grad(oim.oim_loss, argnums=(0, 1), allow_int=True),
    static_argnames=("scalar", "chunk_size"))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("scalar", [30.0, 10.0])
# None: dense logits; 4: streamed, L=6 and Q=5 rows end in a partial chunk;
# 1: one row at a time.
@pytest.mark.parametrize("chunk_size", [None, 4, 1])
def test_loss_and_grad_match_numpy(name, scalar, chunk_size):
  state, x, pids = _case(name)
  loss, (g_state, g_x) = _loss_and_grad(state, x, pids, scalar=scalar,
                                        chunk_size=chunk_size)
  ref_loss, ref_grad = ref_loss_grad(state.lut, state.queue, x,
                                     np.asarray(pids), scalar)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_x), ref_grad, rtol=1e-4, atol=1e-5)
  # The tables are not parameters.
  for leaf in jax.tree.leaves(g_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert not np.any(np.asarray(leaf))
  if not np.any(np.asarray(pids) >= 0):
    assert float(loss) == 0.0 and not np.any(np.asarray(g_x))


def test_loss_finite_differences():
  state, x, pids = _case("repeated", seed=3)
  f = jax.jit(lambda x: oim.oim_loss(state, x, pids, scalar=10.0))
  g = np.asarray(jax.grad(f)(x))
  rng = np.random.default_rng(1)
  x0 = np.asarray(x, np.float64)
  for _ in range(3):
    d = rng.normal(size=x0.shape)
    eps = 1e-3
    lp = ref_loss_grad(state.lut, state.queue, x0 + eps * d, np.asarray(pids),
                       10.0)[0]
    lm = ref_loss_grad(state.lut, state.queue, x0 - eps * d, np.asarray(pids),
                       10.0)[0]
    np.testing.assert_allclose(np.sum(g * d), (lp - lm) / (2 * eps),
                               rtol=1e-3, atol=1e-4)


def test_loss_hand_computed():
  # L=1, Q=1, D=2: x=(1,0), lut row (1,0), queue row (0,1), scalar s:
  # loss = -log(e^s / (e^s + 1)) = log(1 + e^-s).
  state = oim.OIMState(lut=jnp.array([[1.0, 0.0]]),
                       queue=jnp.array([[0.0, 1.0]]), pointer=jnp.int32(0))
  loss = oim.oim_loss(state, jnp.array([[1.0, 0.0], [0.0, 1.0]]),
                      jnp.array([0, -1]), scalar=2.0)
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-2.0)), rtol=1e-6)


_update = jax.jit(oim.update_state,
                  static_argnames=("momentum", "normalize", "lut_method"))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lut_method", ["rounds", "scan"])
def test_update_matches_loop(name, normalize, lut_method):
  state, x, pids = _case(name, seed=7)
  new = _update(state, x, pids, momentum=0.5, normalize=normalize,
                lut_method=lut_method)
  ref_lut, ref_queue, ref_ptr = ref_update(
      state.lut, state.queue, state.pointer, x, np.asarray(pids), 0.5,
      normalize)
  np.testing.assert_allclose(np.asarray(new.lut), ref_lut, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.queue),
                                ref_queue.astype(np.float32))
  assert int(new.pointer) == ref_ptr
  assert new.pointer.dtype == jnp.int32
  assert new.lut.shape == (L, D) and new.queue.shape == (Q, D)


def test_update_zero_rows_are_unit_after_normalised_update():
  # Property: with re-normalisation every touched row has unit norm, others
  # keep their value.
  state, x, pids = _case("zero_rows")
  new = _update(state, x, pids, momentum=0.5, normalize=True,
                lut_method="rounds")
  norms = np.linalg.norm(np.asarray(new.lut), axis=1)
  np.testing.assert_allclose(norms[[1, 3]], 1.0, rtol=1e-6)
  untouched = [0, 2, 4, 5]
  np.testing.assert_array_equal(np.asarray(new.lut)[untouched],
                                np.asarray(state.lut)[untouched])


def test_update_momentum_and_multiplicity():
  # Many repeats of one pid (more rounds than other pids) with momentum 0.9.
  rng = np.random.default_rng(11)
  state = _random_state(rng, 3, 2, 1)
  pids = np.array([0] * 9 + [2, -1, 1, 0, 0, -1, 2])
  x = _unit(rng, len(pids))
  new = jax.jit(lambda s, x, p: oim.update_state(s, x, p, momentum=0.9))(
      state, x, pids)
  ref_lut, ref_queue, ref_ptr = ref_update(state.lut, state.queue,
                                           state.pointer, x, pids, 0.9, True)
  np.testing.assert_allclose(np.asarray(new.lut), ref_lut, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(new.queue),
                                ref_queue.astype(np.float32))
  assert int(new.pointer) == ref_ptr


def test_bad_shapes_raise():
  state = oim.init_state(4, 3, D)
  with pytest.raises(ValueError, match="embedding dim"):
    oim.oim_loss(state, jnp.zeros((2, D + 1)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="pids"):
    oim.update_state(state, jnp.zeros((2, D)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="num_labeled"):
    oim.init_state(-1, 3, D)


def test_init_state():
  s = oim.init_state(5, 4, D)
  assert s.lut.shape == (5, D) and s.queue.shape == (4, D)
  assert s.pointer.dtype == jnp.int32 and int(s.pointer) == 0
  assert not np.any(np.asarray(s.lut)) and not np.any(np.asarray(s.queue))
  # A pytree: jit round trip keeps the structure.
  out = jax.jit(lambda s: s)(s)
  assert isinstance(out, oim.OIMState)


def test_softmax_baseline():
  rng = np.random.default_rng(5)
  x = _unit(rng, 6)
  pids = np.array([3, -1, 0, 3, -2, 1])
  model = oim.SoftmaxClassifier(num_classes=4)
  params = model.init(jax.random.key(0), x)
  logits = model.apply(params, x)
  assert logits.shape == (6, 4)
  kernel = np.asarray(params["params"]["classifier"]["kernel"], np.float64)
  bias = np.asarray(params["params"]["classifier"]["bias"], np.float64)
  ref_logits = x.astype(np.float64) @ kernel + bias
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5,
                             atol=1e-6)
  loss = oim.softmax_loss(logits, jnp.asarray(pids))
  lab = pids >= 0
  z = ref_logits[lab]
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  ref = -np.mean(logp[np.arange(lab.sum()), pids[lab]])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  # No labeled entry: 0 and a zero (finite) gradient.
  g = jax.grad(lambda lg: oim.softmax_loss(lg, jnp.array([-1] * 6)))(logits)
  assert float(oim.softmax_loss(logits, jnp.array([-1] * 6))) == 0.0
  assert not np.any(np.asarray(g))


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from oim_jax import oim
    assert jax.device_count() == 8, jax.devices()
    d = np.load(sys.argv[1])
    state = oim.OIMState(jnp.asarray(d["lut"]), jnp.asarray(d["queue"]),
                         jnp.int32(d["pointer"]))
    x, pids = jnp.asarray(d["x"]), jnp.asarray(d["pids"])
    mesh = Mesh(np.asarray(jax.devices()), ("data",))

    def per_device(state, x, pids):
      new = oim.update_state_across(state, x, pids, momentum=0.5,
                                    normalize=True, axis_name="data")
      # one copy per device, to check that the replicas agree
      return jax.tree.map(lambda a: a[None], new)

    sm = jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P(), P("data"), P("data")),
                               out_specs=P("data")))(state, x, pids)
    # As the train step runs it: replicated output (with and without the
    # shard_map varying-axis type check).
    def update(state, x, pids):
      return oim.update_state_across(state, x, pids, 0.5, True, "data")
    outs = {}
    for check in (True, False):
      outs[check] = jax.jit(jax.shard_map(
          update, mesh=mesh, in_specs=(P(), P("data"), P("data")),
          out_specs=P(), check_vma=check))(state, x, pids)
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (8,) + a.shape), state)
    pm = jax.pmap(lambda s, x, p: oim.update_state_across(
        s, x, p, 0.5, True, "data"), axis_name="data")(
            rep, x.reshape(8, -1, x.shape[-1]), pids.reshape(8, -1))
    single = jax.jit(oim.update_state)(state, x, pids)
    np.savez(sys.argv[2],
             sm_lut=sm.lut, sm_queue=sm.queue, sm_pointer=sm.pointer,
             pm_lut=pm.lut, pm_queue=pm.queue, pm_pointer=pm.pointer,
             single_lut=single.lut, single_queue=single.queue,
             single_pointer=single.pointer,
             **{f"sm{int(c)}_{k}": getattr(outs[c], k)
                for c in outs for k in ("lut", "queue", "pointer")})
""")


def test_multi_device_update_equals_single_device(tmp_path):
  rng = np.random.default_rng(21)
  num_labeled, queue_size, per_device = 7, 6, 5
  state = _random_state(rng, num_labeled, queue_size, 4)
  # 40 entries: pids repeated within and across devices, 12 unlabeled > Q.
  pids = rng.choice([-2, -1, -1, 0, 1, 2, 3, 3, 6], size=8 * per_device)
  x = _unit(rng, len(pids))
  inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
  np.savez(inp, lut=state.lut, queue=state.queue, pointer=4, x=x, pids=pids)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(inp), str(out)],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = np.load(out)
  ref_lut, ref_queue, ref_ptr = ref_update(state.lut, state.queue, 4, x, pids,
                                           0.5, True)
  assert (pids == -1).sum() > queue_size
  for mode in ("sm", "pm"):
    assert r[f"{mode}_lut"].shape == (8, num_labeled, D)
    for dev in range(8):  # every replica identical to the single-device run
      np.testing.assert_array_equal(r[f"{mode}_lut"][dev], r["single_lut"])
      np.testing.assert_array_equal(r[f"{mode}_queue"][dev],
                                    r["single_queue"])
      assert int(r[f"{mode}_pointer"][dev]) == int(r["single_pointer"])
  for mode in ("sm0", "sm1"):
    for k in ("lut", "queue", "pointer"):
      np.testing.assert_array_equal(r[f"{mode}_{k}"], r[f"single_{k}"])
  np.testing.assert_allclose(r["single_lut"], ref_lut, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(r["single_queue"], ref_queue.astype(np.float32))
  assert int(r["single_pointer"]) == ref_ptr
