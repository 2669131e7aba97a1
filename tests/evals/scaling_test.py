"""Gao et al.'s two fits against NumPy on synthetic points with known coefficients, and the verdict helpers."""

import json
import math

import numpy as np
import pytest

from rlhf_jax.evals import scaling


def _columns(d, form):
  # Written out independently of scaling._design: d log d is 0 at d = 0.
  d = np.asarray(d, np.float64)
  second = d ** 2 if form == "best_of_n" else np.array([x * math.log(x) if x > 0 else 0.0 for x in d])
  return np.stack([d, -second], axis=1)


@pytest.mark.parametrize("form,a,b", [("best_of_n", 0.8, 0.15), ("rl", 0.6, 0.2), ("rl", 1.1, -0.05)])
def test_fit_recovers_known_coefficients_exactly(form, a, b):
  d = np.sqrt(np.array([0.0, 0.31, 0.64, 1.2, 2.0, 2.9, 3.5, 4.2]))  # KL -> d, as the experiments pass it
  r = _columns(d, form) @ np.array([a, b])
  f = scaling.fit(d, r, form)
  assert f.a == pytest.approx(a, abs=1e-10) and f.b == pytest.approx(b, abs=1e-10)
  assert f.r2 == pytest.approx(1.0, abs=1e-12) and f.n == len(d)
  np.testing.assert_allclose(f.predict(d), r, atol=1e-12)


@pytest.mark.parametrize("form", scaling.FORMS)
def test_noisy_fit_matches_the_normal_equations_and_r_squared(form):
  rng = np.random.default_rng(0)
  d = np.sort(rng.uniform(0, 3, size=40))
  r = _columns(d, form) @ np.array([0.7, 0.25]) + rng.normal(0, 0.05, size=40)
  x = _columns(d, form)
  a, b = np.linalg.solve(x.T @ x, x.T @ r)  # the normal equations, not lstsq
  res = r - x @ np.array([a, b])
  r2 = 1 - np.sum(res ** 2) / np.sum((r - r.mean()) ** 2)
  f = scaling.fit(d, r, form)
  np.testing.assert_allclose([f.a, f.b, f.r2], [a, b, r2], rtol=1e-9)
  assert 0.5 < f.r2 < 1.0  # the noise costs some of the fit, not all of it
  assert scaling.r_squared(r, r) == 1.0 and math.isnan(scaling.r_squared(np.ones(3), np.zeros(3)))


@pytest.mark.parametrize("form,a,b", [("best_of_n", 0.8, 0.15), ("rl", 0.6, 0.2)])
def test_peak_is_the_maximum_of_the_fitted_curve(form, a, b):
  f = scaling.Fit(form, a, b, 1.0, 5)
  grid = np.linspace(1e-6, 20, 400_001)
  d_best = grid[np.argmax(f.predict(grid))]
  assert f.peak_d == pytest.approx(d_best, abs=1e-3)
  assert f.peak_kl == pytest.approx(f.peak_d ** 2)
  assert scaling.Fit(form, a, -0.1, 1.0, 5).peak_d == math.inf  # never turns down


def test_fit_rejects_too_few_or_bad_points():
  with pytest.raises(ValueError, match="two or more"):
    scaling.fit([0.5], [0.1], "rl")
  with pytest.raises(ValueError, match="sqrt\\(KL\\) >= 0"):
    scaling.fit([-0.1, 0.5], [0.0, 0.1], "best_of_n")
  with pytest.raises(ValueError, match="form='x'"):
    scaling.fit([0.1, 0.5], [0.0, 0.1], "x")
  np.testing.assert_array_equal(scaling.sqrt_kl([-0.01, 4.0]), [0.0, 2.0])


def test_overoptimisation_verdict():
  gold = scaling.Fit("best_of_n", 0.8, 0.4, 0.9, 7)     # peak at d = 1 (KL 1)
  proxy = scaling.Fit("best_of_n", 1.0, 0.05, 0.99, 7)  # peak at d = 10
  v = scaling.overoptimisation(gold, proxy, max_d=2.0, method="best-of-n")
  assert v.held and "KL 1" in v.evidence and v.markdown().startswith("**Held**")
  assert not scaling.overoptimisation(gold, proxy, max_d=0.5, method="best-of-n").held  # peak not reached
  assert not scaling.overoptimisation(proxy, gold, max_d=20.0, method="rl").held  # the proxy turns first


def test_peak_moves_out_and_interior_optimum():
  assert scaling.peak_moves_out([3, 1, 2], [5.0, 1.0, 2.0]).held
  assert not scaling.peak_moves_out([1, 2, 3], [1.0, 3.0, 2.0]).held
  assert not scaling.peak_moves_out([1], [1.0]).held
  # Verdicts hold Python bools (from NumPy comparisons too): the papers stage sums them into summary.json.
  v = scaling.peak_moves_out([1, 2], np.array([1.0, 2.0]))
  assert type(v.held) is bool and json.dumps({"n": sum(x.held for x in (v, v))}) == '{"n": 2}'
  v = scaling.interior_optimum([0.1, 0.01, 0.001], [0.2, 0.5, 0.3], kls=[0.5, 2.0, 6.0])
  assert v.held and "best: beta 0.01" in v.evidence and v.evidence.startswith("beta 0.001: gold +0.300 at KL 6.00")
  assert not scaling.interior_optimum([0.1, 0.01, 0.001], [0.2, 0.3, 0.5]).held  # smallest beta best
  assert not scaling.interior_optimum([0.1, 0.01], [0.2, 0.3]).held  # two betas have no interior


def test_overfits_after_one_epoch():
  e = [0.5, 1.0, 2.0, 3.0]
  pairs, grouped = [0.66, 0.62, 0.68, 0.75], [0.67, 0.64, 0.63, 0.64]
  v = scaling.overfits_after_one_epoch(e, pairs, other_epochs=e, other_val_loss=grouped)
  assert v.held and "rise +0.1300" in v.evidence and "rise +0.0000" in v.evidence
  assert not scaling.overfits_after_one_epoch(e, grouped).held  # lowest at epoch 2
  assert not scaling.overfits_after_one_epoch(e, pairs, other_epochs=e, other_val_loss=[0.6, 0.5, 0.7, 0.9]).held
  with pytest.raises(ValueError, match="two or more epochs"):
    scaling.overfits_after_one_epoch([1.0], [0.5])


def _envelope_by_grid(kls, gold, x, n=20001):
  # Independent: the piecewise-linear curve sampled densely up to x, its running maximum read at x.
  order = np.argsort(kls)
  k, g = np.asarray(kls, float)[order], np.asarray(gold, float)[order]
  grid = np.linspace(k[0], x, n)
  return float(np.max(np.interp(grid, k, g)))


def test_frontier_envelope_against_a_dense_grid():
  kls, gold = [0.0, 1.0, 2.5, 6.0, 9.0], [0.1, 0.3, 0.25, 0.45, -0.2]
  at = [0.0, 0.5, 1.7, 2.5, 4.0, 7.5, 9.0]
  env = scaling.frontier_envelope(kls, gold, at)
  for x, e in zip(at, env):
    assert e == pytest.approx(_envelope_by_grid(kls, gold, x), abs=1e-4), x
  assert np.isnan(scaling.frontier_envelope(kls, gold, [9.5])[0])  # beyond what was measured


def test_frontier_dominates():
  ppo_kl, ppo_gold = [0.0, 1.0, 4.0], [0.1, 0.3, 0.2]
  v = scaling.frontier_dominates([0.5, 2.0], [0.25, 0.31], ppo_kl, ppo_gold)
  assert v.held and "KL 0.50: DPO +0.250 vs PPO +0.200" in v.evidence
  # 2.0's envelope is the 0.3 reached at KL 1 (the curve itself is lower there): 0.29 is below it.
  assert not scaling.frontier_dominates([0.5, 2.0], [0.25, 0.29], ppo_kl, ppo_gold).held
  out = scaling.frontier_dominates([0.5, 7.0], [0.25, 9.0], ppo_kl, ppo_gold)
  assert out.held and "1 point(s) outside PPO's KL range" in out.evidence
  assert not scaling.frontier_dominates([7.0], [9.0], ppo_kl, ppo_gold).held  # nothing to compare


def test_alignment_tax_verdicts():
  # coef 0: the loss rises above SFT's 1.0; more ptx lowers it, skill rises, the win rate holds.
  tax, rec, kept = scaling.alignment_tax([1.0, 0.0, 3.0], [0.9, 1.2, 0.7], [0.8, 0.6, 0.85], [0.60, 0.62, 0.58],
                                         [0.02, 0.02, 0.02], sft_lm_loss=1.0)
  assert tax.held and rec.held and kept.held  # |0.58 - 0.62| = 0.04 <= 2 * hypot(0.02, 0.02) = 0.057
  assert rec.evidence.startswith("coef 0: LM loss 1.200, skill 0.600, win rate 0.620")
  _, rec, kept = scaling.alignment_tax([0.0, 1.0, 3.0], [1.2, 0.9, 1.0], [0.6, 0.8, 0.85], [0.62, 0.6, 0.50],
                                       [0.02, 0.02, 0.02], sft_lm_loss=1.0)
  assert not rec.held and not kept.held  # the loss rose from 1 to 3; the win rate fell by 0.12
  assert not scaling.alignment_tax([0.0, 1.0], [0.9, 0.8], [0.5, 0.5], [0.6, 0.6], [0.02, 0.02], 1.0)[0].held
  with pytest.raises(ValueError, match="expected 0"):
    scaling.alignment_tax([0.5, 1.0], [1.0, 0.9], [0.5, 0.5], [0.6, 0.6], [0.02, 0.02], 1.0)
