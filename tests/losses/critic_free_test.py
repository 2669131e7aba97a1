"""GRPO's group advantages (with and without the std), RLOO's leave-one-out baseline, the k3 KL term and its
gradient, and the policy-loss aggregations, jitted, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def test_group_advantages_against_numpy():
  rng = np.random.default_rng(0)
  g = 4
  scores = rng.normal(size=12)
  got = jax.jit(lambda s: losses.group_advantages(s, g))(jnp.asarray(scores, jnp.float32))
  got_dr = jax.jit(lambda s: losses.group_advantages(s, g, scale=False))(jnp.asarray(scores, jnp.float32))
  for p in range(3):
    r = scores[p * g:(p + 1) * g]
    np.testing.assert_allclose(np.asarray(got[p * g:(p + 1) * g]), (r - r.mean()) / (r.std(ddof=1) + 1e-4),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_dr[p * g:(p + 1) * g]), r - r.mean(), rtol=1e-5, atol=1e-6)


def test_identical_group_scores_give_zero_advantage():
  got = losses.group_advantages(jnp.asarray([1.0, 1.0, 1.0, 2.0, 3.0, 4.0]), 3)
  np.testing.assert_allclose(np.asarray(got[:3]), 0.0)  # no signal when every sample scored the same


def test_leave_one_out_against_a_loop():
  rng = np.random.default_rng(1)
  k = 3
  scores = rng.normal(size=9)
  got = np.asarray(jax.jit(lambda s: losses.leave_one_out_advantages(s, k))(jnp.asarray(scores, jnp.float32)))
  for i, r in enumerate(scores):
    group = scores[(i // k) * k:(i // k + 1) * k]
    others = [x for j, x in enumerate(group) if (i // k) * k + j != i]
    np.testing.assert_allclose(got[i], r - np.mean(others), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, group", [(6, 1), (7, 2)])
def test_groups_must_have_two_samples_and_divide_the_batch(size, group):
  with pytest.raises(ValueError, match=f"group_size={group}"):
    losses.group_advantages(jnp.zeros(size), group)


def test_k3_kl_and_its_gradient():
  rng = np.random.default_rng(2)
  logp = rng.normal(-2, 0.5, (3, 4))
  ref = logp + rng.normal(0, 0.3, (3, 4))
  k3 = np.asarray(losses.k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
  np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-7)
  assert (k3 >= 0).all()
  # d/d logp of exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp); none flows into the reference.
  g_logp, g_ref = jax.grad(lambda lp, r: losses.k3_kl(lp, r).sum(), argnums=(0, 1))(jnp.asarray(logp),
                                                                                     jnp.asarray(ref))
  np.testing.assert_allclose(np.asarray(g_logp), 1 - np.exp(ref - logp), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_ref), 0.0)


def test_aggregations_against_numpy():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  token = float(losses.aggregate(jnp.asarray(x), jnp.asarray(mask), "token"))
  seq = float(losses.aggregate(jnp.asarray(x), jnp.asarray(mask), "sequence"))
  const = float(losses.aggregate(jnp.asarray(x), jnp.asarray(mask), "constant"))
  assert token == pytest.approx((x * mask).sum() / mask.sum())
  assert seq == pytest.approx(np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in range(3)]))
  assert const == pytest.approx(np.mean((x * mask).sum(axis=1) / 4))
  with pytest.raises(ValueError, match="aggregation='median'"):
    losses.aggregate(jnp.asarray(x), jnp.asarray(mask), "median")


def test_sequence_aggregated_clipped_loss_at_ratio_one_is_minus_mean_advantage():
  """At ratio 1 every response weighs alike under "sequence", whatever its length."""
  adv = np.array([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  logp = jnp.zeros((2, 3))
  loss, m = losses.ppo_policy_loss(logp, logp, jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2,
                                   aggregation="sequence")
  assert float(loss) == pytest.approx(-(2.0 + -1.0) / 2)
  assert float(m["ratio_mean"]) == pytest.approx(1.0)
