"""Tests for rlhf_jax/losses/: every function jitted and compared with an independent NumPy computation."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-6


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _right_padded_mask(rng, b, t, lengths=None):
  lengths = rng.integers(0, t + 1, size=b) if lengths is None else np.asarray(lengths)
  return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Language modelling.


def test_next_token_loss_matches_numpy():
  rng = np.random.default_rng(0)
  b, t, v = 3, 5, 7
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(b, t))
  mask = (rng.random((b, t)) < 0.6).astype(np.float32)
  mask[0, 0] = 1.0
  loss, n = jax.jit(losses.next_token_loss)(logits, targets, mask)

  total, count = 0.0, 0
  for i, j in itertools.product(range(b), range(t)):
    if mask[i, j]:
      z = logits[i, j].astype(np.float64)
      total += -(z[targets[i, j]] - np.log(np.sum(np.exp(z))))
      count += 1
  np.testing.assert_allclose(loss, total / count, rtol=RTOL)
  assert float(n) == count
  assert losses.ptx_loss is losses.next_token_loss


def test_next_token_loss_empty_mask_is_zero():
  logits = jnp.ones((2, 3, 4)) * 1e3
  loss, n = jax.jit(losses.next_token_loss)(logits, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
  assert float(loss) == 0.0 and float(n) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Reward model.


def _ragged_rankings():
  """Four prompts, K padded to 5: a strict 4-way ranking, a tie, a K=1 prompt (no pair), a full K=5 with a tie."""
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(4, 5)).astype(np.float32) * 2
  ranks = np.array([
      [2, 0, 3, 1, 9],
      [0, 1, 1, 2, 0],
      [0, 5, 5, 5, 5],
      [4, 3, 2, 1, 1],
  ])
  valid = np.array([
      [1, 1, 1, 1, 0],
      [1, 1, 1, 0, 0],
      [1, 0, 0, 0, 0],
      [1, 1, 1, 1, 1],
  ], bool)
  return rewards, ranks, valid


def _np_ranking_loss(rewards, ranks, valid, weights=None):
  per_prompt, prompt_w, n_pairs, n_correct = [], [], 0, 0
  for b in range(rewards.shape[0]):
    terms = []
    for i, j in itertools.permutations(range(rewards.shape[1]), 2):
      if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
        margin = float(rewards[b, i]) - float(rewards[b, j])
        terms.append(-_log_sigmoid(margin))
        n_correct += margin > 0
    n_pairs += len(terms)
    if terms:  # prompts without a pair are left out of the mean
      per_prompt.append(np.mean(terms))
      prompt_w.append(1.0 if weights is None else weights[b])
  loss = np.sum(np.array(per_prompt) * prompt_w) / np.sum(prompt_w)
  return loss, n_pairs, n_correct / n_pairs


@pytest.mark.parametrize("weighted", [False, True])
def test_ranking_loss_ragged_with_ties_matches_numpy(weighted):
  rewards, ranks, valid = _ragged_rankings()
  weights = np.array([0.5, 2.0, 7.0, 1.0], np.float32) if weighted else None
  loss, metrics = jax.jit(losses.ranking_loss)(rewards, ranks, valid, weights_b=weights)
  want_loss, want_pairs, want_acc = _np_ranking_loss(rewards, ranks, valid, weights)
  # strict 4-way: C(4,2)=6; [0,1,1] tie: 2; K=1: 0; [4,3,2,1,1]: C(5,2)-1 = 9
  assert want_pairs == 6 + 2 + 0 + 9
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
  assert float(metrics["num_pairs"]) == want_pairs
  np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=RTOL)


def test_ranking_loss_strict_ranking_is_paper_equation():
  # One prompt, K=4 strict ranks: the loss is exactly -1/C(4,2) * sum over pairs of log sigmoid(r_w - r_l).
  r = np.array([[0.3, -1.2, 2.0, 0.1]], np.float32)
  order = [2, 0, 3, 1]  # best to worst
  ranks = np.argsort(order)[None]
  terms = [_log_sigmoid(r[0, order[a]] - r[0, order[c]]) for a in range(4) for c in range(a + 1, 4)]
  loss, _ = jax.jit(losses.ranking_loss)(r, ranks, np.ones((1, 4), bool))
  np.testing.assert_allclose(loss, -sum(terms) / math.comb(4, 2), rtol=RTOL)


def test_ranking_loss_no_pairs_is_zero_not_nan():
  loss, metrics = jax.jit(losses.ranking_loss)(
      jnp.ones((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.array([[1, 1, 0], [1, 0, 0]], bool))
  assert float(loss) == 0.0 and float(metrics["num_pairs"]) == 0.0 and float(metrics["accuracy"]) == 0.0


def test_expand_pairs_lists_each_strict_pair_once():
  _, ranks, valid = _ragged_rankings()
  idx_w, idx_l, prompt_idx, pair_valid = jax.jit(losses.expand_pairs)(ranks, valid)
  k = ranks.shape[1]
  assert idx_w.shape == (4, k * (k - 1) // 2)
  got = {(int(b), int(w), int(l)) for b, w, l, ok in
         zip(*(np.ravel(a) for a in (prompt_idx, idx_w, idx_l, pair_valid))) if ok}
  want = {(b, i, j) for b in range(4) for i, j in itertools.permutations(range(k), 2)
          if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]}
  assert got == want and len(got) == int(np.sum(pair_valid))


@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_and_shuffled_modes_give_same_loss_when_weighted_alike(weighted):
  rewards, ranks, valid = _ragged_rankings()
  weights_b = np.array([0.5, 2.0, 7.0, 1.0], np.float32) if weighted else np.ones(4, np.float32)
  grouped, grouped_metrics = jax.jit(losses.ranking_loss)(rewards, ranks, valid, weights_b=weights_b)

  @jax.jit
  def shuffled(rewards_bk, perm_n):
    idx_w, idx_l, prompt_idx, pair_valid = losses.expand_pairs(ranks, valid)
    r_w = jnp.take_along_axis(rewards_bk, idx_w, axis=1).ravel()[perm_n]
    r_l = jnp.take_along_axis(rewards_bk, idx_l, axis=1).ravel()[perm_n]
    w = (losses.grouped_pair_weights(pair_valid) * jnp.asarray(weights_b)[prompt_idx]).ravel()[perm_n]
    equal = losses.pairwise_loss(r_w, r_l, weights_b=w)
    plain = losses.pairwise_loss(r_w, r_l, weights_b=pair_valid.ravel()[perm_n])
    return equal, plain

  perm = np.random.default_rng(2).permutation(4 * 10)
  (loss, metrics), (plain_loss, plain_metrics) = shuffled(rewards, perm)
  np.testing.assert_allclose(loss, grouped, rtol=RTOL)
  # Unit weights per pair give every pair equal say, which differs from the per-prompt mean with ragged K.
  assert abs(float(plain_loss) - float(grouped)) > 1e-3
  assert float(plain_metrics["num_pairs"]) == float(grouped_metrics["num_pairs"])
  np.testing.assert_allclose(plain_metrics["accuracy"], grouped_metrics["accuracy"], rtol=RTOL)


def test_pairwise_loss_matches_numpy():
  rng = np.random.default_rng(3)
  r_w, r_l = rng.normal(size=(2, 9)).astype(np.float32) * 3
  w = rng.random(9).astype(np.float32)
  w[:2] = 0.0
  loss, metrics = jax.jit(losses.pairwise_loss)(r_w, r_l, weights_b=w)
  nll = -_log_sigmoid(r_w.astype(np.float64) - r_l)
  np.testing.assert_allclose(loss, np.sum(w * nll) / np.sum(w), rtol=RTOL)
  np.testing.assert_allclose(metrics["accuracy"], np.sum(w * (r_w > r_l)) / np.sum(w), rtol=RTOL)
  assert float(metrics["num_pairs"]) == 7
  unweighted, _ = jax.jit(losses.pairwise_loss)(r_w, r_l)
  np.testing.assert_allclose(unweighted, np.mean(nll), rtol=RTOL)


def test_rm_calibration_matches_numpy_bins():
  rng = np.random.default_rng(4)
  margins = rng.normal(size=200).astype(np.float32) * 2
  labels = (rng.random(200) < 1 / (1 + np.exp(-0.5 * margins))).astype(np.float32)
  ece = jax.jit(losses.rm_calibration, static_argnames="n_bins")(margins, labels, n_bins=5)
  p = 1 / (1 + np.exp(-margins.astype(np.float64)))
  want = 0.0
  for m in range(5):
    in_bin = (p >= m / 5) & (p < (m + 1) / 5)
    if in_bin.any():
      want += in_bin.mean() * abs(p[in_bin].mean() - labels[in_bin].mean())
  np.testing.assert_allclose(ece, want, rtol=1e-4)
  assert want > 0.02  # the labels follow a flatter sigmoid, so the RM is overconfident


# ----------------------------------------------------------------------------------------------------------
# Rewards, whitening, GAE.


def test_kl_penalized_rewards_places_score_at_last_real_token():
  rng = np.random.default_rng(5)
  b, t = 4, 6
  mask = _right_padded_mask(rng, b, t, lengths=[6, 3, 0, 1])
  logp, ref = rng.normal(size=(2, b, t)).astype(np.float32)
  score = np.array([1.5, -2.0, 3.0, 0.7], np.float32)
  rewards, kl = jax.jit(losses.kl_penalized_rewards)(score, logp, ref, mask, beta=jnp.float32(0.1))

  want_kl = (logp - ref) * mask
  want = -0.1 * want_kl
  for i, length in enumerate([6, 3, 0, 1]):
    if length:  # the all-padding row gets no reward at all
      want[i, length - 1] += score[i]
  np.testing.assert_allclose(kl, want_kl, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(rewards, want, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(rewards)[2] == 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
  rng = np.random.default_rng(6)
  x = (rng.normal(size=(4, 7)) * 3 + 2).astype(np.float32)
  mask = _right_padded_mask(rng, 4, 7, lengths=[7, 5, 2, 0])
  out = np.asarray(jax.jit(losses.whiten, static_argnames="shift_mean")(x, mask, shift_mean=shift_mean))

  real = x[mask > 0].astype(np.float64)
  want = (x - real.mean()) / np.sqrt(real.var() + 1e-8) + (0.0 if shift_mean else real.mean())
  np.testing.assert_allclose(out[mask > 0], want[mask > 0], rtol=1e-5, atol=1e-5)
  assert np.all(out[mask == 0] == 0.0)
  np.testing.assert_allclose(out[mask > 0].std(), 1.0, rtol=1e-4)
  np.testing.assert_allclose(out[mask > 0].mean(), 0.0 if shift_mean else real.mean(), atol=1e-5)


def test_whiten_empty_mask_and_check_whitenable():
  out = jax.jit(losses.whiten)(jnp.arange(6.0).reshape(2, 3), jnp.zeros((2, 3)))
  assert np.all(np.asarray(out) == 0.0)
  losses.check_whitenable(8)
  with pytest.raises(ValueError, match="at least 8"):
    losses.check_whitenable(7)
  with pytest.raises(ValueError, match="at least 2"):
    losses.check_whitenable(1, min_elements=2)


def _np_gae(rewards, values, mask, gamma, lam):
  """A_t = sum_l (gamma*lam)^l delta_{t+l} over the masked tokens of each row, value 0 after the last one."""
  adv = np.zeros_like(rewards, np.float64)
  for b in range(rewards.shape[0]):
    steps = np.flatnonzero(mask[b])
    v_next = [values[b, s] for s in steps[1:]] + [0.0]
    deltas = [rewards[b, s] + gamma * vn - values[b, s] for s, vn in zip(steps, v_next)]
    for i, s in enumerate(steps):
      adv[b, s] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(steps) - i))
  return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_compute_gae_matches_numpy_double_loop(gamma, lam):
  rng = np.random.default_rng(7)
  b, t = 6, 9
  mask = _right_padded_mask(rng, b, t, lengths=[9, 5, 1, 0, 7, 3])
  mask[5] = 0.0
  mask[5, 2:6] = 1.0  # a response that starts after a (masked-out) prompt and ends early
  rewards = rng.normal(size=(b, t)).astype(np.float32) * mask
  values = rng.normal(size=(b, t)).astype(np.float32)  # garbage outside the mask must not leak in
  gae = jax.jit(losses.compute_gae)
  adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)

  want = _np_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, (want + values) * mask, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0.0)


# ----------------------------------------------------------------------------------------------------------
# Policy and value losses.


def _np_ppo(logp, old, adv, mask, eps):
  ratio = np.exp(logp.astype(np.float64) - old)
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  m = mask > 0
  return np.maximum(pg1, pg2)[m].mean(), (pg2 > pg1)[m].mean(), ratio


def test_ppo_policy_loss_matches_numpy_and_gradient_vanishes_when_clipped():
  rng = np.random.default_rng(8)
  b, t, eps = 3, 8, 0.2
  mask = _right_padded_mask(rng, b, t, lengths=[8, 6, 3])
  old = rng.normal(size=(b, t)).astype(np.float32) - 2
  logp = old + rng.normal(size=(b, t)).astype(np.float32) * 0.4
  adv = rng.normal(size=(b, t)).astype(np.float32)
  fn = jax.jit(losses.ppo_policy_loss)
  loss, metrics = fn(logp, old, adv, mask, clip_eps=eps)

  want, want_clip, ratio = _np_ppo(logp, old, adv, mask, eps)
  m = mask > 0
  log_ratio = np.log(ratio)
  assert 0.05 < want_clip < 0.95  # both branches are exercised
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  np.testing.assert_allclose(metrics["clip_frac"], want_clip, rtol=RTOL)
  np.testing.assert_allclose(metrics["approx_kl"], np.mean(0.5 * log_ratio[m] ** 2), rtol=1e-4)
  np.testing.assert_allclose(metrics["approx_kl_k3"], np.mean((ratio - 1 - log_ratio)[m]), rtol=1e-4)
  np.testing.assert_allclose(metrics["ratio_mean"], ratio[m].mean(), rtol=RTOL)

  # d loss / d logp = -A * ratio / n where the unclipped term is active, 0 where clipping bites.
  grad = jax.jit(jax.grad(lambda lp: fn(lp, old, adv, mask, clip_eps=eps)[0]))(logp)
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  want_grad = np.where(m & (pg1 >= pg2), -adv * ratio / m.sum(), 0.0)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage():
  rng = np.random.default_rng(9)
  logp = rng.normal(size=(2, 5)).astype(np.float32)
  adv = rng.normal(size=(2, 5)).astype(np.float32)
  mask = _right_padded_mask(rng, 2, 5, lengths=[5, 2])
  loss, metrics = jax.jit(losses.ppo_policy_loss)(logp, logp, adv, mask, clip_eps=0.2)
  np.testing.assert_allclose(loss, -adv[mask > 0].mean(), rtol=RTOL)
  assert float(metrics["clip_frac"]) == 0.0
  assert float(metrics["approx_kl"]) == 0.0 and float(metrics["approx_kl_k3"]) == 0.0
  assert float(metrics["ratio_mean"]) == 1.0


def test_ppo_value_loss_matches_numpy():
  rng = np.random.default_rng(10)
  b, t, eps = 3, 7, 0.2
  mask = _right_padded_mask(rng, b, t, lengths=[7, 4, 2])
  old = rng.normal(size=(b, t)).astype(np.float32)
  values = old + rng.normal(size=(b, t)).astype(np.float32) * 0.5
  returns = rng.normal(size=(b, t)).astype(np.float32)
  loss, metrics = jax.jit(losses.ppo_value_loss)(values, old, returns, mask, clip_eps=eps)

  m = mask > 0
  v_clip = np.clip(values, old - eps, old + eps)
  err, err_clip = (values - returns) ** 2, (v_clip - returns) ** 2
  assert 0.05 < (err_clip > err)[m].mean() < 0.95
  np.testing.assert_allclose(loss, 0.5 * np.maximum(err, err_clip)[m].mean(), rtol=RTOL)
  np.testing.assert_allclose(metrics["vf_clip_frac"], (err_clip > err)[m].mean(), rtol=RTOL)


def test_a2c_losses_match_numpy_and_stop_advantage_gradient():
  rng = np.random.default_rng(11)
  logp, adv, values, returns = rng.normal(size=(4, 2, 6)).astype(np.float32)
  mask = _right_padded_mask(rng, 2, 6, lengths=[6, 3])
  m = mask > 0
  pg, _ = jax.jit(losses.a2c_policy_loss)(logp, adv, mask)
  vf, _ = jax.jit(losses.a2c_value_loss)(values, returns, mask)
  np.testing.assert_allclose(pg, -(logp * adv)[m].mean(), rtol=RTOL)
  np.testing.assert_allclose(vf, 0.5 * ((values - returns) ** 2)[m].mean(), rtol=RTOL)
  grad_adv = jax.grad(lambda a: losses.a2c_policy_loss(logp, a, mask)[0])(adv)
  assert np.all(np.asarray(grad_adv) == 0.0)


def test_entropy_from_logits_matches_numpy():
  rng = np.random.default_rng(12)
  logits = rng.normal(size=(2, 4, 5)).astype(np.float32) * 2
  mask = _right_padded_mask(rng, 2, 4, lengths=[4, 1])
  ent = jax.jit(losses.entropy_from_logits)(logits, mask)
  p = np.exp(logits.astype(np.float64))
  p /= p.sum(-1, keepdims=True)
  want = (-(p * np.log(p)).sum(-1))[mask > 0].mean()
  np.testing.assert_allclose(ent, want, rtol=RTOL)
  uniform = jax.jit(losses.entropy_from_logits)(jnp.zeros((1, 2, 5)), jnp.ones((1, 2)))
  np.testing.assert_allclose(uniform, np.log(5), rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------
# KL control and diagnostics.


@pytest.mark.parametrize("kl,want_e", [(6.6, 0.1), (100.0, 0.2), (0.0, -0.2), (4.8, -0.2), (5.7, -0.05)])
def test_update_kl_controller_formula_and_clipping(kl, want_e):
  update = jax.jit(losses.update_kl_controller, static_argnames=("target", "horizon"))
  state = losses.KLControllerState(beta=jnp.float32(0.05))
  new_beta = update(state.beta, kl, 512, target=6.0, horizon=10_000.0)
  np.testing.assert_allclose(new_beta, 0.05 * (1 + want_e * 512 / 10_000), rtol=1e-6)


def test_explained_variance_matches_numpy():
  rng = np.random.default_rng(13)
  target = rng.normal(size=(3, 5)).astype(np.float32)
  pred = target + rng.normal(size=(3, 5)).astype(np.float32) * 0.5
  mask = _right_padded_mask(rng, 3, 5, lengths=[5, 4, 2])
  m = mask > 0
  ev = jax.jit(losses.explained_variance)(pred, target, mask)
  np.testing.assert_allclose(ev, 1 - np.var((target - pred)[m]) / np.var(target[m]), rtol=1e-5)
  assert float(jax.jit(losses.explained_variance)(pred, jnp.ones((3, 5)), mask)) == 0.0


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_matches_exact_discrete_kl(n):
  # N equiprobable items with distinct scores: the best of n draws is the i-th lowest with probability
  # (i/N)^n - ((i-1)/N)^n, and the exact KL to the uniform base approaches log n - (n-1)/n as N grows.
  big_n = 10_000
  i = np.arange(1, big_n + 1, dtype=np.float64)
  p = (i / big_n) ** n - ((i - 1) / big_n) ** n
  nz = p > 0
  exact = np.sum(p[nz] * np.log(p[nz] * big_n))
  np.testing.assert_allclose(losses.best_of_n_kl(n), exact, atol=1e-2)
  np.testing.assert_allclose(jax.jit(losses.best_of_n_kl)(jnp.float32(n)), math.log(n) - (n - 1) / n, rtol=1e-5,
                             atol=1e-6)
  assert exact <= losses.best_of_n_kl(n) + 1e-12  # the formula is an upper bound for a discrete base


def test_empty_masks_give_finite_zeros():
  z = jnp.zeros((2, 4))
  x = jnp.arange(8.0).reshape(2, 4)
  outs = [
      losses.ppo_policy_loss(x, x - 1, x, z, clip_eps=0.2),
      losses.ppo_value_loss(x, x - 1, x, z, clip_eps=0.2),
      losses.a2c_policy_loss(x, x, z),
      losses.a2c_value_loss(x, x + 1, z),
      losses.compute_gae(x, x, z, gamma=1.0, lam=0.95),
      losses.kl_penalized_rewards(jnp.ones(2), x, x - 1, z, beta=0.1),
      losses.entropy_from_logits(jnp.ones((2, 4, 3)), z),
      losses.explained_variance(x, x + 1, z),
  ]
  for leaf in jax.tree.leaves(outs):
    assert np.all(np.asarray(leaf) == 0.0), leaf
