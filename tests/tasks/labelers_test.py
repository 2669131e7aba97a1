"""Tests of the simulated labelers: Plackett-Luce sampling, agreement, gold ceiling, Elo and Bradley-Terry."""

import itertools

import numpy as np
import pytest
from scipy import optimize, stats as sps

from rlhf_jax.data import comparisons
from rlhf_jax.tasks import labelers as lab
from rlhf_jax.tasks import suite

from helpers import experiments

data_experiment = experiments.module("data")


def _small(**overrides):
  cfg = {**data_experiment.get_config("small").data.to_dict(), "n_pretrain_docs": 5, "n_pretrain_val_docs": 5}
  return suite.DataConfig.from_config({**cfg, **overrides})


def test_plackett_luce_probability_by_hand():
  u = np.array([0.3, -1.0, 2.0])
  e = np.exp(u)
  # order (2, 0, 1): e2 / (e0 + e1 + e2) * e0 / (e0 + e1) * 1
  assert lab.plackett_luce_probability(u, [2, 0, 1]) == pytest.approx(e[2] / e.sum() * e[0] / (e[0] + e[1]))
  total = sum(lab.plackett_luce_probability(u, o) for o in itertools.permutations(range(4 - 1)))
  assert total == pytest.approx(1.0)


def test_plackett_luce_sampling_matches_the_analytic_probabilities():
  u = np.array([1.0, 0.2, -0.7])
  rng = np.random.default_rng(0)
  n = 30_000
  orders = list(itertools.permutations(range(3)))
  counts = dict.fromkeys(orders, 0)
  for _ in range(n):
    counts[tuple(lab.sample_plackett_luce(u, rng).tolist())] += 1
  observed = np.array([counts[o] for o in orders])
  expected = np.array([lab.plackett_luce_probability(u, o) for o in orders]) * n
  chi2 = sps.chisquare(observed, expected)
  assert chi2.pvalue > 1e-3, (observed, expected)
  np.testing.assert_allclose(observed / n, expected / n, atol=0.012)


def test_rank_returns_a_permutation_favouring_high_gold():
  pool = lab.LabelerPool(n_labelers=4, noise=0.3, length_bias=0.0, seed=1)
  rng = np.random.default_rng(1)
  gold = np.array([-1.0, 1.0, 0.0, 0.5])
  firsts = np.zeros(4)
  for _ in range(2000):
    ranks = pool.rank(gold, 2, rng)
    assert sorted(ranks.tolist()) == [0, 1, 2, 3]
    firsts[int(np.argmin(ranks))] += 1
  # P(first) = softmax(gold / T) for that labeler's temperature.
  t = pool.temperatures[2]
  p = np.exp(gold / t) / np.exp(gold / t).sum()
  np.testing.assert_allclose(firsts / 2000, p, atol=0.03)
  with pytest.raises(ValueError, match="labeler_id=4"):
    pool.rank(gold, 4, rng)


def test_rank_responses_ties_identical_texts_and_ranks_distinct_ones_like_rank():
  pool = lab.LabelerPool(n_labelers=4, noise=0.3, length_bias=0.1, seed=1)
  responses = ["It is blue.", "I don't know.", " It is blue. ", "It is red.", "I don't know."]
  gold = np.array([1.1, -0.2, 1.1, -0.9, -0.2])
  for seed in range(50):
    ranks = pool.rank_responses(gold, responses, 1, np.random.default_rng(seed))
    assert ranks[0] == ranks[2] and ranks[1] == ranks[4]
    assert sorted({int(r) for r in ranks}) == [0, 1, 2]
    # The three distinct responses are ranked exactly as `rank` ranks them with the same draws.
    expected = pool.rank(gold[[0, 1, 3]], 1, np.random.default_rng(seed),
                         lengths=np.array([len("It is blue."), len("I don't know."), len("It is red.")]))
    np.testing.assert_array_equal(ranks[[0, 1, 3]], expected)
  assert comparisons.num_strict_pairs([0, 1, 0, 2, 1]) == 8  # 5 responses, 2 tied pairs: C(5,2) - 2


def test_pair_agreement_matches_bradley_terry_for_two_responses():
  # With K = 2 and no length bias, labeler l prefers the better response with p_l = sigmoid(d / T_l), so two
  # labelers a, b agree with probability p_a p_b + (1 - p_a)(1 - p_b), averaged over the random pair (a, b).
  pool = lab.LabelerPool(n_labelers=3, noise=0.7, noise_spread=0.3, length_bias=0.0, seed=4)
  d = 0.8
  p = 1 / (1 + np.exp(-d / pool.temperatures))
  expected = np.mean([p[a] * p[b] + (1 - p[a]) * (1 - p[b]) for a in range(3) for b in range(3) if a != b])
  sets = [np.array([d, 0.0])] * 20_000  # standard error of the measured rate: 0.0035
  measured = pool.pair_agreement(sets, np.random.default_rng(2))
  assert measured == pytest.approx(expected, abs=0.012)


def test_gold_accuracy_counts_ties_as_half():
  gold = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0])]
  ranks = [np.array([0, 1, 2]), np.array([0, 1])]
  # set 1: pairs (0,1) right, (0,2) right, (1,2) tie -> 2.5 of 3; set 2: pair wrong -> 0 of 1.
  assert lab.gold_accuracy(gold, ranks) == pytest.approx(2.5 / 4)


def test_default_labelers_agree_about_73_percent():
  splits, stats = suite.generate(0, _small())
  print(f"labeler_agreement {stats['labeler_agreement']:.4f} on {stats['comparison_pairs']} pairs, "
        f"gold_ceiling_accuracy {stats['gold_ceiling_accuracy']:.4f}")
  assert stats["comparison_pairs"] > 10_000
  assert 0.70 <= stats["labeler_agreement"] <= 0.76
  assert stats["gold_ceiling_accuracy"] > stats["labeler_agreement"] + 0.02
  # The knob works: less noise, more agreement (and the comparisons themselves are unchanged).
  sharp_splits, sharp = suite.generate(0, _small(labeler_noise=0.25))
  assert sharp["labeler_agreement"] > stats["labeler_agreement"] + 0.05
  assert [c["responses"] for c in sharp_splits["comparisons"]] == [c["responses"] for c in splits["comparisons"]]


def _tournament(strengths, n_games, seed):
  rng = np.random.default_rng(seed)
  outcomes = []
  m = len(strengths)
  for _ in range(n_games):
    i, j = rng.choice(m, size=2, replace=False)
    p_i = 1 / (1 + np.exp(strengths[j] - strengths[i]))
    outcomes.append((f"p{i}", f"p{j}") if rng.random() < p_i else (f"p{j}", f"p{i}"))
  return outcomes


def test_bradley_terry_recovers_strengths_and_matches_a_direct_fit():
  strengths = np.array([1.5, 0.5, 0.0, -0.5, -1.5])
  outcomes = _tournament(strengths, 6000, seed=3)
  fit = lab.bradley_terry(outcomes, prior=0.0)
  est = np.array([fit[f"p{i}"] for i in range(5)])
  np.testing.assert_allclose(est, strengths - strengths.mean(), atol=0.15)

  # The same maximum-likelihood fit by a generic optimiser on the log-likelihood.
  idx = {f"p{i}": i for i in range(5)}
  w = np.array([idx[a] for a, _ in outcomes])
  l = np.array([idx[b] for _, b in outcomes])
  nll = lambda th: np.sum(np.logaddexp(0.0, th[l] - th[w]))  # noqa: E731
  th = optimize.minimize(nll, np.zeros(5), method="BFGS").x
  np.testing.assert_allclose(est, th - th.mean(), atol=1e-3)


def test_elo_ranks_the_strong_player_first_and_agrees_with_bradley_terry():
  strengths = np.array([2.0, 1.0, 0.0, -1.0])
  outcomes = _tournament(strengths, 3000, seed=5)
  elo = lab.elo_ratings(outcomes, k=16)
  bt = lab.bradley_terry(outcomes)
  elo_order = sorted(elo, key=elo.get, reverse=True)
  assert elo_order == ["p0", "p1", "p2", "p3"]
  assert elo_order == sorted(bt, key=bt.get, reverse=True)
  assert sum(elo.values()) == pytest.approx(4 * 1000.0)  # Elo is zero-sum
  # Elo differences estimate log-odds: 400/ln(10) Elo points per unit of Bradley-Terry strength.
  scale = 400 / np.log(10)
  assert (elo["p0"] - elo["p3"]) / scale == pytest.approx(bt["p0"] - bt["p3"], rel=0.3)
  # One game: the winner gains k/2 from equal ratings.
  assert lab.elo_ratings([("a", "b")], k=32) == {"a": 1016.0, "b": 984.0}


def test_ranking_pairs():
  pairs = lab.ranking_pairs([2, 0, 3, 1])
  assert len(pairs) == 6
  assert set(pairs) == {(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)}
  np.testing.assert_array_equal(lab.order_to_ranks(np.array([1, 3, 0, 2])), [2, 0, 3, 1])


def _elo_reference(games, players, k, initial, scale, passes):
  """Elo by arrays over player indices: the expected score 1 / (1 + 10^((R_l - R_w) / scale)), games in order."""
  idx = {p: n for n, p in enumerate(players)}
  r = np.full(len(players), initial, np.float64)
  for _ in range(passes):
    for w, l in games:
      e = 1.0 / (1.0 + 10.0 ** ((r[idx[l]] - r[idx[w]]) / scale))
      r[idx[w]] += k * (1.0 - e)
      r[idx[l]] -= k * (1.0 - e)
  return {p: r[idx[p]] for p in players}


def test_elo_matches_a_numpy_reference_over_several_passes():
  outcomes = _tournament(np.array([0.8, 0.1, -0.3, -0.6, 0.0]), 400, seed=11)
  players = sorted({p for o in outcomes for p in o})
  for k, passes, scale in ((32.0, 1, 400.0), (10.0, 3, 400.0), (16.0, 2, 200.0)):
    got = lab.elo_ratings(outcomes, k=k, passes=passes, scale=scale)
    want = _elo_reference(outcomes, players, k, 1000.0, scale, passes)
    assert sorted(got) == players
    np.testing.assert_allclose([got[p] for p in players], [want[p] for p in players], rtol=0, atol=1e-9)


def test_bradley_terry_with_a_prior_matches_scipy_when_a_player_never_loses():
  outcomes = [o for o in _tournament(np.array([1.0, 0.0, -1.0]), 300, seed=2) if o[1] != "p0"]
  outcomes += [("p0", "p3")] * 4  # p0 never loses, p3 never wins: the plain MLE is infinite
  prior = 0.5
  # Hunter's MM creeps here (p3's only games are losses to a far stronger p0): at the default n_iter=1000 it stops
  # about 0.4 short of the optimum; it converges (to tol) well within 100_000.
  fit = lab.bradley_terry(outcomes, prior=prior, n_iter=100_000)
  idx = {f"p{i}": i for i in range(4)}
  w = np.array([idx[a] for a, _ in outcomes])
  l = np.array([idx[b] for _, b in outcomes])
  # `prior` virtual wins and losses of every player against a player of strength 1 (log-strength 0).
  nll = lambda th: (np.sum(np.logaddexp(0.0, th[l] - th[w]))  # noqa: E731
                    + prior * np.sum(np.logaddexp(0.0, -th) + np.logaddexp(0.0, th)))
  th = optimize.minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
  np.testing.assert_allclose([fit[f"p{i}"] for i in range(4)], th - th.mean(), atol=1e-4)


def test_elo_and_bradley_terry_order_a_known_bradley_terry_population():
  strengths = np.linspace(1.4, -1.4, 8)  # p0 strongest; neighbours 0.4 apart
  outcomes = _tournament(strengths, 12_000, seed=7)
  truth = [f"p{i}" for i in range(8)]
  bt = lab.bradley_terry(outcomes)
  assert sorted(bt, key=bt.get, reverse=True) == truth
  np.testing.assert_allclose([bt[p] for p in truth], strengths - strengths.mean(), atol=0.1)
  # One sequential pass at a small K-factor: the same order, and differences on the log-odds scale.
  elo = lab.elo_ratings(outcomes, k=4)
  assert sorted(elo, key=elo.get, reverse=True) == truth
  scale = 400 / np.log(10)
  np.testing.assert_allclose((elo["p0"] - elo["p7"]) / scale, strengths[0] - strengths[7], rtol=0.15)
