"""Tests of the evaluation helpers that every policy report uses (win rate, padding, per-family breakdown)."""

import collections
import itertools

import numpy as np
import pytest

from rlhf_jax.data import batching
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, World


def test_win_rate_counts_ties_half():
  a = np.array([1.0, 0.0, 0.5, -1.0, 2.0])
  b = np.array([0.0, 0.0, 1.0, -1.0, 1.0])
  wins = sum(float(x > y) + 0.5 * float(x == y) for x, y in zip(a, b))
  assert policy_evals.win_rate(a, b) == pytest.approx(wins / len(a))


def test_win_rate_over_several_samples_per_prompt_against_a_loop():
  rng = np.random.default_rng(1)
  n = 30
  a = rng.integers(-2, 3, size=(4, n)).astype(float)  # coarse scores, so ties are common
  b = rng.integers(-2, 3, size=(3, n)).astype(float)
  per_prompt = []
  for i in range(n):
    pairs = [float(x > y) + 0.5 * float(x == y) for x in a[:, i] for y in b[:, i]]
    per_prompt.append(sum(pairs) / len(pairs))
  np.testing.assert_allclose(policy_evals.per_prompt_win_rates(a, b), per_prompt)
  assert policy_evals.win_rate(a, b) == pytest.approx(np.mean(per_prompt))
  mean = sum(per_prompt) / n
  sd = (sum((w - mean) ** 2 for w in per_prompt) / (n - 1)) ** 0.5
  assert policy_evals.win_rate_se(a, b) == pytest.approx(sd / n ** 0.5)
  # One sample per prompt on either side is the plain pairwise rate.
  assert policy_evals.win_rate(a[0], b[0]) == pytest.approx(policy_evals.win_rate(a[:1], b[0]))
  assert policy_evals.win_rate(a[0], b) == pytest.approx(np.mean([np.mean([float(a[0, i] > y) + 0.5 * float(
      a[0, i] == y) for y in b[:, i]]) for i in range(n)]))
  with pytest.raises(ValueError, match="30 prompts against 29"):
    policy_evals.win_rate(a, b[:, :29])


def test_left_pad_puts_tokens_at_the_end_and_rejects_long_prompts():
  tokens, mask = batching.left_pad([[5, 6, 7], [8]], pad_id=0, length=4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="prompt 0 has 3 tokens"):
    batching.left_pad([[1, 2, 3]], pad_id=0, length=2)


def test_response_breakdown_matches_a_per_family_loop():
  world = World.generate(0)
  gold = GoldScorer(world)
  prompts, responses = [], []
  for fam in FAMILIES:
    for (prompt, task), answer in zip(itertools.islice(world.prompt_space(fam), 4),
                                      ["I don't know.", "I can't help with that.", None, "It is blue."]):
      prompts.append(prompt)
      responses.append(task.reference if answer is None else answer)
  scores = gold.score_batch(prompts, responses)
  got = policy_evals.response_breakdown(gold, prompts, responses, scores, prefix="p_")

  by_family = collections.defaultdict(list)
  for p, r, s in zip(prompts, responses, scores):
    by_family[world.parse(p).family].append((s, gold.is_correct(p, r)))
  assert set(by_family) == set(FAMILIES)
  for fam, rows in by_family.items():
    assert got[f"p_{fam}.gold_score"] == pytest.approx(np.mean([s for s, _ in rows]))
    assert got[f"p_{fam}.correct_frac"] == pytest.approx(np.mean([c for _, c in rows]))
  # Every reference is correct, so each family has at least one correct response in four.
  assert all(got[f"p_{fam}.correct_frac"] >= 0.25 for fam in FAMILIES)
  # "I don't know." is given to every family and is also the unanswerable family's reference.
  n_idk = sum(r == "I don't know." for r in responses)
  assert n_idk == len(FAMILIES) + 1
  assert got["p_top_response_frac"] == pytest.approx(n_idk / len(responses))
  assert got["p_gold_correct_frac"] == pytest.approx(np.mean([gold.is_correct(p, r)
                                                              for p, r in zip(prompts, responses)]))


def test_oracle_gain_share_and_its_standard_error_against_a_bootstrap():
  rng = np.random.default_rng(1)
  n, p = 8, 400
  gold = rng.normal(size=(n, p))
  rm = gold + rng.normal(scale=1.5, size=(n, p))  # a noisy proxy: it captures part of the oracle's gain
  got = policy_evals.oracle_gain_share(rm, gold)
  pick = gold[rm.argmax(axis=0), np.arange(p)]
  first, best = gold[0], gold.max(axis=0)
  share = lambda i: (pick[i].mean() - first[i].mean()) / (best[i].mean() - first[i].mean())  # noqa: E731
  assert got["share"] == pytest.approx(share(np.arange(p)))
  assert 0.1 < got["share"] < 0.9
  boot = [share(rng.integers(0, p, size=p)) for _ in range(4000)]  # resampling prompts, picks paired
  assert got["share_se"] == pytest.approx(np.std(boot), rel=0.1)
  assert np.isnan(policy_evals.oracle_gain_share(rm[:1], gold[:1])["share"])  # best-of-1: no oracle gain


def test_best_of_n_weights_are_the_chance_of_each_rank_being_the_best_of_a_subset():
  for n_cands in (1, 5, 9):
    for n in range(1, n_cands + 1):
      subsets = list(itertools.combinations(range(n_cands), n))
      want = np.bincount([max(c) for c in subsets], minlength=n_cands) / len(subsets)
      np.testing.assert_allclose(policy_evals.best_of_n_weights(n, n_cands), want, rtol=1e-12)
  w = policy_evals.best_of_n_weights(64, 256)  # big binomials: still a distribution
  assert w.sum() == pytest.approx(1.0) and w[:63].sum() == 0 and w[-1] == pytest.approx(64 / 256)
  with pytest.raises(ValueError, match="best-of-5 from 4 candidates"):
    policy_evals.best_of_n_weights(5, 4)


def test_best_of_n_expected_against_every_subset():
  # Gao et al.'s estimator against the plain average over every n-subset of the candidates of each prompt, each
  # subset's pick read by best_of_n_summary on that subset alone.
  rng = np.random.default_rng(2)
  n_cands, p = 7, 30
  gold = rng.integers(-2, 3, size=(n_cands, p)).astype(float)  # coarse: the oracle's picks tie often
  rm = gold + rng.normal(scale=1.0, size=(n_cands, p))
  base = rng.integers(-2, 3, size=(2, p)).astype(float)  # two SFT samples a prompt as the win-rate baseline
  for n in (1, 3, 7):
    got = policy_evals.best_of_n_expected(rm, gold, base, n)
    subsets = [list(c) for c in itertools.combinations(range(n_cands), n)]
    per = [policy_evals.best_of_n_summary(rm[c], gold[c], base) for c in subsets]
    for k in ("gold_score", "rm_score", "oracle_gold_score", "win_rate_vs_sft", "oracle_win_rate_vs_sft"):
      assert got[k] == pytest.approx(np.mean([r[k] for r in per]), abs=1e-12), (n, k)
    assert got["n"] == n and got["n_candidates"] == n_cands
    assert got["kl_to_sft"] == pytest.approx(np.log(n) - (n - 1) / n)
    # The share: (pick - best-of-1) / (oracle - best-of-1), best-of-1 being the mean of the candidates.
    b1 = gold.mean()
    if n == 1:
      assert np.isnan(got["share"])
    else:
      assert got["share"] == pytest.approx((got["gold_score"] - b1) / (got["oracle_gold_score"] - b1))
  # At n = N there is one subset: the plain best-of-N, as the "first" estimator reads it.
  full = policy_evals.best_of_n_summary(rm, gold, base)
  assert got["gold_score"] == pytest.approx(full["gold_score"]) and got["win_rate_vs_sft"] == full["win_rate_vs_sft"]


def test_best_of_n_expected_share_error_against_redrawn_candidates():
  # The share's standard error over prompts against its spread over independent redraws of the whole candidate
  # pool (the estimator's real sampling error), and smaller than the first-n estimator's spread on the same draws.
  rng = np.random.default_rng(3)
  p, n_cands, n = 300, 32, 8
  scale = rng.uniform(0.2, 1.5, size=p)  # prompts differ in how much their candidates spread

  def draw():
    gold = rng.normal(size=(n_cands, p)) * scale
    return gold + rng.normal(scale=1.5, size=(n_cands, p)), gold

  sub, first, ses = [], [], []
  for _ in range(300):
    rm, gold = draw()
    got = policy_evals.best_of_n_expected(rm, gold, gold[:1], n)
    sub.append(got["share"])
    ses.append(got["share_se"])
    first.append(policy_evals.oracle_gain_share(rm[:n], gold[:n])["share"])
  assert np.mean(ses) == pytest.approx(np.std(sub), rel=0.15)
  assert np.std(sub) < 0.7 * np.std(first)
  assert np.mean(sub) == pytest.approx(np.mean(first), abs=3 * np.std(first) / np.sqrt(300))


def test_curves_from_scores_per_family_against_numpy():
  # Two models' picks over 16 candidates of prompts in three families: each family's share is the ratio of the
  # mean gains over its own prompts, by either estimator; the overall share is the same function's.
  rng = np.random.default_rng(4)
  n_cands, p = 16, 90
  fams = np.array(["fact", "arithmetic", "string"])[rng.integers(0, 3, size=p)]
  gold = rng.normal(size=(n_cands, p)) * np.where(fams == "fact", 1.0, 0.3)
  rm = np.stack([gold + rng.normal(scale=s, size=(n_cands, p)) for s in (0.5, 3.0)])
  correct = gold > 0.5
  scores = {"rm": rm, "gold": gold, "gold_sft": gold[:2], "family": fams, "correct": correct}
  for est in ("first", "subsets"):
    curves = policy_evals.curves_from_scores(scores, [1, 4, 16], est)
    assert len(curves) == 2
    for m, curve in enumerate(curves):
      for n in (4, 16):
        if est == "first":
          i_rm, i_or = rm[m, :n].argmax(axis=0), gold[:n].argmax(axis=0)
          pick = gold[i_rm, np.arange(p)] - gold[0]
          best = gold[:n].max(axis=0) - gold[0]
          ok = correct[i_rm, np.arange(p)], correct[i_or, np.arange(p)], correct[0]
          assert curve[n]["gold_score"] == policy_evals.best_of_n_summary(rm[m, :n], gold[:n], gold[:2])["gold_score"]
        else:
          w = policy_evals.best_of_n_weights(n, n_cands)
          pick = np.array([w @ gold[np.argsort(rm[m, :, j]), j] for j in range(p)]) - gold.mean(axis=0)
          best = np.array([w @ np.sort(gold[:, j]) for j in range(p)]) - gold.mean(axis=0)
          ok = (np.array([w @ correct[np.argsort(rm[m, :, j]), j] for j in range(p)]),
                np.array([w @ correct[np.argsort(gold[:, j]), j] for j in range(p)]), correct.mean(axis=0))
        assert curve[n]["share"] == pytest.approx(pick.mean() / best.mean())
        for f in ("fact", "arithmetic", "string"):
          i = fams == f
          assert curve[n][f"{f}.share"] == pytest.approx(pick[i].mean() / best[i].mean()), (est, m, n, f)
          assert curve[n][f"{f}.oracle_gain"] == pytest.approx(best[i].mean())
          assert curve[n][f"{f}.n_prompts"] == i.sum()
          assert curve[n][f"{f}.share_se"] > 0
          for k, v in zip(("correct_frac", "oracle_correct_frac", "best_of_1_correct_frac"), ok):
            assert curve[n][f"{f}.{k}"] == pytest.approx(v[i].mean()), (est, n, f, k)
    assert curves[0][16]["share"] > curves[1][16]["share"]  # the less noisy model picks better
  with pytest.raises(ValueError, match=r"best-of-n sizes \[1, 32\]: expected sizes from 1 to the 16 candidates"):
    policy_evals.curves_from_scores(scores, [1, 32], "subsets")


def test_best_of_n_summary_against_a_loop():
  rng = np.random.default_rng(0)
  n, p = 5, 40
  rm = rng.normal(size=(n, p))
  gold = rng.integers(-2, 3, size=(n, p)).astype(float)  # coarse, so picks and the baseline tie often
  base = rng.integers(-2, 3, size=p).astype(float)
  got = policy_evals.best_of_n_summary(rm, gold, base)
  picked = [gold[max(range(n), key=lambda i: rm[i, j]), j] for j in range(p)]
  best = [max(gold[i, j] for i in range(n)) for j in range(p)]
  win = lambda xs: np.mean([float(x > y) + 0.5 * float(x == y) for x, y in zip(xs, base)])  # noqa: E731
  assert got["gold_score"] == pytest.approx(np.mean(picked))
  assert got["oracle_gold_score"] == pytest.approx(np.mean(best))
  assert got["win_rate_vs_sft"] == pytest.approx(win(picked))
  assert got["oracle_win_rate_vs_sft"] == pytest.approx(win(best))
  assert got["rm_score"] == pytest.approx(np.mean([max(rm[:, j]) for j in range(p)]))
  assert got["kl_to_sft"] == pytest.approx(np.log(n) - (n - 1) / n)
  assert got["oracle_gold_score"] >= got["gold_score"]
  # Several SFT samples per prompt: each pick is compared with every sample of its prompt.
  bases = rng.integers(-2, 3, size=(3, p)).astype(float)
  got_k = policy_evals.best_of_n_summary(rm, gold, bases)
  win_k = np.mean([np.mean([float(picked[j] > y) + 0.5 * float(picked[j] == y) for y in bases[:, j]])
                   for j in range(p)])
  assert got_k["win_rate_vs_sft"] == pytest.approx(win_k)
  assert got_k["gold_score"] == got["gold_score"]
