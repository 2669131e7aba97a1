"""Tests of the evaluation helpers that every policy report uses (win rate, padding, per-family breakdown)."""

import collections
import itertools

import numpy as np
import pytest

from rlhf_jax import evaluation
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, World


def test_win_rate_counts_ties_half():
  a = np.array([1.0, 0.0, 0.5, -1.0, 2.0])
  b = np.array([0.0, 0.0, 1.0, -1.0, 1.0])
  wins = sum(float(x > y) + 0.5 * float(x == y) for x, y in zip(a, b))
  assert evaluation.win_rate(a, b) == pytest.approx(wins / len(a))


def test_win_rate_over_several_samples_per_prompt_against_a_loop():
  rng = np.random.default_rng(1)
  n = 30
  a = rng.integers(-2, 3, size=(4, n)).astype(float)  # coarse scores, so ties are common
  b = rng.integers(-2, 3, size=(3, n)).astype(float)
  per_prompt = []
  for i in range(n):
    pairs = [float(x > y) + 0.5 * float(x == y) for x in a[:, i] for y in b[:, i]]
    per_prompt.append(sum(pairs) / len(pairs))
  np.testing.assert_allclose(evaluation.per_prompt_win_rates(a, b), per_prompt)
  assert evaluation.win_rate(a, b) == pytest.approx(np.mean(per_prompt))
  mean = sum(per_prompt) / n
  sd = (sum((w - mean) ** 2 for w in per_prompt) / (n - 1)) ** 0.5
  assert evaluation.win_rate_se(a, b) == pytest.approx(sd / n ** 0.5)
  # One sample per prompt on either side is the plain pairwise rate.
  assert evaluation.win_rate(a[0], b[0]) == pytest.approx(evaluation.win_rate(a[:1], b[0]))
  assert evaluation.win_rate(a[0], b) == pytest.approx(np.mean([np.mean([float(a[0, i] > y) + 0.5 * float(
      a[0, i] == y) for y in b[:, i]]) for i in range(n)]))
  with pytest.raises(ValueError, match="30 prompts against 29"):
    evaluation.win_rate(a, b[:, :29])


def test_left_pad_puts_tokens_at_the_end_and_rejects_long_prompts():
  tokens, mask = evaluation.left_pad([[5, 6, 7], [8]], pad_id=0, length=4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="prompt 0 has 3 tokens"):
    evaluation.left_pad([[1, 2, 3]], pad_id=0, length=2)


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
  got = evaluation.response_breakdown(gold, prompts, responses, scores, prefix="p_")

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


def test_report_family_table_lists_each_policy_and_family():
  from rlhf_jax import report  # pylint: disable=g-import-not-at-top
  summary = {}
  for pre, base in [("sft.pretrain_", -1.0), ("sft.", 0.0), ("ppo.sft_", 0.1), ("ppo.", 0.5), ("ppo_ptx.", 0.4)]:
    summary[f"{pre}top_response_frac"] = 0.25
    for i, fam in enumerate(FAMILIES):
      summary[f"{pre}{fam}.gold_score"] = base + i / 10
      summary[f"{pre}{fam}.correct_frac"] = 0.5
  lines = report.family_table(summary).splitlines()
  assert lines[0] == "| family | pretrained | SFT | SFT at the RL temperature | ppo | ppo_ptx |"
  assert len(lines) == 2 + len(FAMILIES) + 1
  second = lines[2 + 1].split(" | ")
  assert second[0] == f"| {FAMILIES[1]}" and second[4] == "+0.60 (50%)"
  assert lines[-1] == "| most common response | 25% | 25% | 25% | 25% | 25% |"


def test_report_rm_family_table_puts_the_likelihood_beside_the_rm():
  from rlhf_jax import report  # pylint: disable=g-import-not-at-top
  summary = {"rm.val_gold_pairs_clear": 30, "rm.val_gold_accuracy_clear": 0.7,
             "rm.val_policy_logprob_gold_accuracy_clear": 0.8,
             "rm.fact.val_gold_pairs_clear": 20, "rm.fact.val_gold_accuracy_clear": 0.75,
             "rm.fact.val_policy_logprob_gold_accuracy_clear": 0.9,
             "rm.unanswerable.val_gold_pairs_clear": 10, "rm.unanswerable.val_gold_accuracy_clear": 0.6}
  rows = report.rm_family_table(summary).splitlines()
  assert rows[0] == "| family | clear pairs | RM | SFT log-likelihood |"
  assert rows[2:] == ["| fact | 20 | 0.75 | 0.90 |", "| unanswerable | 10 | 0.60 | - |", "| all | 30 | 0.70 | 0.80 |"]
  assert report.rm_family_table({"rm.val_gold_pairs_clear": 0}) == ""


def test_best_of_n_summary_against_a_loop():
  rng = np.random.default_rng(0)
  n, p = 5, 40
  rm = rng.normal(size=(n, p))
  gold = rng.integers(-2, 3, size=(n, p)).astype(float)  # coarse, so picks and the baseline tie often
  base = rng.integers(-2, 3, size=p).astype(float)
  got = evaluation.best_of_n_summary(rm, gold, base)
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
  got_k = evaluation.best_of_n_summary(rm, gold, bases)
  win_k = np.mean([np.mean([float(picked[j] > y) + 0.5 * float(picked[j] == y) for y in bases[:, j]])
                   for j in range(p)])
  assert got_k["win_rate_vs_sft"] == pytest.approx(win_k)
  assert got_k["gold_score"] == got["gold_score"]


def test_report_best_of_n_table_puts_the_oracle_beside_the_rm():
  from rlhf_jax import report  # pylint: disable=g-import-not-at-top
  summary = {"ppo.kl_to_sft": 1.2, "ppo.gold_score": 0.4, "ppo.win_rate_vs_sft": 0.57,
             "ppo.bon4.kl_to_sft": float(np.log(4) - 0.75), "ppo.bon4.gold_score": 0.46,
             "ppo.bon4.win_rate_vs_sft": 0.57, "ppo.bon4.oracle_gold_score": 0.63,
             "ppo.bon4.oracle_win_rate_vs_sft": 0.635, "ppo.reference_win_rate_vs_sft": 0.73}
  rows = report.best_of_n_table(summary).splitlines()
  assert rows[2] == "| ppo | 1.20 | +0.40 | 0.57 |"
  assert rows[3] == "| best-of-4, RM picks | 0.64 | +0.46 | 0.57 |"
  assert rows[4] == "| best-of-4, gold picks (oracle) | 0.64 | +0.63 | 0.64 |"
  assert rows[5] == "| the reference answer to every prompt | - | - | 0.73 |"
  assert report.best_of_n_table({"ppo.gold_score": 0.4}) == ""
