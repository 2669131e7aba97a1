"""rlhf_jax.optim: stochastic rounding of bfloat16 parameters (optimizer.param_rounding) against NumPy's
expectation, against float32 parameters over many small Adam steps, and its determinism across a resume."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import configs, optim, sharding


def _bf16_neighbours(x: np.ndarray):
  """The bfloat16 values below and above float32 x (by magnitude: truncation and one spacing up)."""
  bits = x.astype(np.float32).view(np.uint32)
  down = (bits & np.uint32(0xFFFF0000)).view(np.float32)
  up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
  return down, up


def test_stochastic_round_is_unbiased_and_lands_on_a_neighbour():
  """1 + 1e-4 lies between the bfloat16 values 1 and 1 + 2^-7: rounding to nearest always gives 1, stochastic
  rounding gives 1 + 2^-7 with probability (x - 1) / 2^-7 (NumPy, from the float32 bits), so the mean is x."""
  n = 200_000
  x = np.full(n, 1.0 + 1e-4, np.float32)
  got = np.asarray(optim.stochastic_round(jnp.asarray(x), jax.random.PRNGKey(3)))
  down, up = _bf16_neighbours(x)
  assert np.all((got == down) | (got == up))
  assert np.all(got.astype(ml_dtypes.bfloat16).astype(np.float32) == got)  # bfloat16 values
  p_up = float((x[0] - down[0]) / (up[0] - down[0]))
  assert p_up == pytest.approx(1e-4 / 2 ** -7, rel=1e-3)
  se = np.sqrt(p_up * (1 - p_up) / n)
  assert abs(np.mean(got == up) - p_up) < 5 * se
  # Negative values, and values spread over binades: the mean error is zero within its standard error.
  y = np.random.default_rng(0).normal(size=n).astype(np.float32) * 1e-2
  got_y = np.asarray(optim.stochastic_round(jnp.asarray(y), jax.random.PRNGKey(4)), np.float64)
  d, u = _bf16_neighbours(y)
  assert np.all((got_y == d) | (got_y == u))
  err = got_y - y.astype(np.float64)
  assert abs(err.mean()) < 5 * err.std() / np.sqrt(n)
  nearest = y.astype(ml_dtypes.bfloat16).astype(np.float64)
  assert np.abs(err).mean() > np.abs(nearest - y).mean()  # noisier than nearest, but unbiased
  inf = np.array([np.inf, -np.inf, np.nan], np.float32)
  np.testing.assert_array_equal(np.asarray(optim.stochastic_round(jnp.asarray(inf), jax.random.PRNGKey(0))), inf)


def _run(rounding: str, dtype, steps: int, lr: float = 1e-5, state=None, w=None):
  oc = configs.optimizer_config(lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
  oc.schedule = "constant"
  oc.param_rounding = rounding
  opt = optim.make_optimizer(oc, 1000)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(256, 256)).astype(np.float32) * 0.02
  g = {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32), "b": jnp.ones((256,), jnp.float32)}
  params = {"w": jnp.asarray(w0, dtype), "b": jnp.zeros((256,), jnp.float32)} if w is None else w
  state = opt.init(params) if state is None else state
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, w0


def test_bfloat16_adam_steps_follow_float32_only_with_stochastic_rounding():
  """50 Adam steps of lr 1e-5 (each about 1e-5 in size, under half a bfloat16 spacing of most weights of 0.02):
  rounded to nearest, most bfloat16 weights never move; rounded stochastically, their mean displacement is the
  float32 run's, and the float32 leaf beside them is exactly what float32 rounding gives."""
  p32, _, w0 = _run("nearest", jnp.float32, 50)
  near, _, _ = _run("nearest", jnp.bfloat16, 50)
  sto, state, _ = _run("stochastic", jnp.bfloat16, 50)
  assert near["w"].dtype == sto["w"].dtype == jnp.bfloat16
  start = w0.astype(ml_dtypes.bfloat16).astype(np.float64)
  moved32 = np.asarray(p32["w"], np.float64) - w0
  moved_near = np.asarray(near["w"], np.float64) - start
  moved_sto = np.asarray(sto["w"], np.float64) - start
  assert np.mean(moved_near == 0) > 0.7
  assert np.mean(moved_sto == 0) < 0.2
  # Adam's steps are -lr * sign(g) here (a constant gradient): 50 of them move each weight by 5e-4.
  np.testing.assert_allclose(np.mean(np.abs(moved32)), 5e-4, rtol=1e-3)
  assert np.mean(moved_sto * np.sign(moved32)) == pytest.approx(5e-4, rel=0.02)
  assert abs(np.mean(moved_near * np.sign(moved32))) < 2.5e-4
  np.testing.assert_array_equal(np.asarray(sto["b"]), np.asarray(p32["b"]))  # a float32 leaf: not rounded
  assert int(optim._step_count(state)) == 50


def test_stochastic_rounding_resumes_bit_identically():
  """The draws come from the optimizer's step count in its state: 6 steps equal 3 steps, then 3 more from the
  saved params and state; float32 parameters are unaffected by the option."""
  whole, _, _ = _run("stochastic", jnp.bfloat16, 6)
  half, state, _ = _run("stochastic", jnp.bfloat16, 3)
  resumed, _, _ = _run("stochastic", jnp.bfloat16, 3, state=state, w=half)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), whole, resumed)
  f_sto, _, _ = _run("stochastic", jnp.float32, 3, lr=1e-3)
  f_near, _, _ = _run("nearest", jnp.float32, 3, lr=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), f_sto, f_near)
  with pytest.raises(ValueError, match="optimizer.param_rounding must be"):
    oc = configs.optimizer_config()
    oc.param_rounding = "up"
    optim.make_optimizer(oc, 10)


def test_stochastic_rounding_draws_the_same_bits_on_a_sharded_array():
  """A parameter split over 8 devices is rounded exactly as on one device (JAX's partitionable Threefry), so
  sharded bfloat16 training keeps matching one device."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 128)), jnp.float32) * 1e-2
  key = jax.random.PRNGKey(7)
  one = np.asarray(jax.jit(optim.stochastic_round)(x, key))
  mesh = sharding.make_mesh(2, 2, 2)
  split = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
  many = jax.jit(optim.stochastic_round)(split, key)
  assert len(many.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(many), one)
