"""DPO, conservative DPO and IPO on ragged K-way rankings, jitted, against a NumPy loop over the pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _reference(logp, ref, ranks, valid, beta, kind, eps, pairs, weights):
  """Mean over prompts (weighted) of the mean over the prompt's counted pairs, by loops."""
  per_prompt, w_sum, all_d = [], 0.0, []
  for b in range(logp.shape[0]):
    idx = [i for i in range(logp.shape[1]) if valid[b, i]]
    best = min(ranks[b, i] for i in idx)
    terms = []
    for i in idx:
      for j in idx:
        if ranks[b, i] < ranks[b, j] and (pairs == "all" or ranks[b, i] == best):
          d = (logp[b, i] - ref[b, i]) - (logp[b, j] - ref[b, j])
          all_d.append(d)
          if kind == "dpo":
            terms.append(-(1 - eps) * _log_sigmoid(beta * d) - eps * _log_sigmoid(-beta * d))
          else:
            terms.append((d - 1 / (2 * beta)) ** 2)
    if terms:
      per_prompt.append(weights[b] * np.mean(terms))
      w_sum += weights[b]
  return sum(per_prompt) / w_sum, np.array(all_d)


def _ragged(seed):
  rng = np.random.default_rng(seed)
  b, k = 5, 6
  logp = rng.normal(-20, 5, (b, k))
  ref = logp + rng.normal(0, 1, (b, k))
  ranks = rng.integers(0, 4, (b, k))  # ties included
  valid = np.ones((b, k), bool)
  for row, n in enumerate([2, 6, 3, 4, 1]):  # ragged K; the last prompt has no pair at all
    valid[row, n:] = False
  ranks[1, :] = [0, 1, 1, 2, 3, 3]
  weights = rng.uniform(0.5, 2.0, b)
  return logp, ref, ranks, valid, weights


@pytest.mark.parametrize("kind, eps, pairs", [("dpo", 0.0, "all"), ("dpo", 0.1, "all"), ("ipo", 0.0, "all"),
                                              ("dpo", 0.0, "best_vs_rest"), ("ipo", 0.0, "best_vs_rest")])
def test_preference_loss_against_numpy(kind, eps, pairs):
  logp, ref, ranks, valid, weights = _ragged(0)
  beta = 0.3
  fn = jax.jit(lambda lp: losses.preference_loss(lp, ref, ranks, valid, beta=beta, kind=kind, label_smoothing=eps,
                                                 pairs=pairs, weights_b=weights))
  loss, m = fn(jnp.asarray(logp, jnp.float32))
  expected, d = _reference(logp, ref, ranks, valid, beta, kind, eps, pairs, weights)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  assert int(m["num_pairs"]) == len(d)
  np.testing.assert_allclose(float(m["reward_accuracy"]), np.mean(d > 0), rtol=1e-6)
  np.testing.assert_allclose(float(m["reward_margin"]), np.mean(beta * d), rtol=1e-4, atol=1e-6)


def test_dpo_gradient_against_its_closed_form():
  """d/d logp_w of -log sigmoid(beta * d) is -beta * sigmoid(-beta * d): one prompt, one pair."""
  logp = jnp.asarray([[-3.0, -5.0]])
  ref = jnp.asarray([[-4.0, -4.5]])
  ranks, valid = jnp.asarray([[0, 1]]), jnp.ones((1, 2), bool)
  beta = 0.5
  g = jax.grad(lambda lp: losses.preference_loss(lp, ref, ranks, valid, beta=beta)[0])(logp)
  d = (-3.0 + 4.0) - (-5.0 + 4.5)
  s = 1 / (1 + np.exp(beta * d))
  np.testing.assert_allclose(np.asarray(g), [[-beta * s, beta * s]], rtol=1e-5)


def test_k2_pairs_reduce_to_plain_dpo_and_ties_give_no_pair():
  logp = jnp.asarray([[-1.0, -2.0], [-1.0, -1.5]])
  ref = jnp.zeros((2, 2))
  loss, m = losses.preference_loss(logp, ref, jnp.asarray([[0, 1], [1, 1]]), jnp.ones((2, 2), bool), beta=1.0)
  np.testing.assert_allclose(float(loss), -_log_sigmoid(1.0), rtol=1e-6)  # only the first prompt has a pair
  assert int(m["num_pairs"]) == 1


def test_bad_kind_and_pairs_are_errors():
  args = (jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.asarray([[0, 1]]), jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match="kind='kto'"):
    losses.preference_loss(*args, beta=0.1, kind="kto")
  with pytest.raises(ValueError, match="pairs='worst'"):
    losses.preference_loss(*args, beta=0.1, pairs="worst")
