"""The papers' ablations as numbers: Gao et al.'s over-optimisation fits and the verdicts of experiments/papers.

Gao, Schulman and Hilton 2022 ("Scaling laws for reward model overoptimization", arXiv 2210.10760) measure the
gold and the proxy reward model's score of a policy against d = sqrt(KL(policy || initial policy)), both as
differences from the initial policy's score, and fit (their eqs. 1-2)

    best-of-n:  R(d) = d (a - b d)         RL:  R(d) = d (a - b log d)

Both are linear in (a, b), so each fit is one least-squares solve (numpy.linalg.lstsq) on the columns
[d, -d^2] or [d, -d log d] (d log d taken as 0 at d = 0, its limit); R^2 is 1 - SS_res / SS_tot about the mean.
A fit with b > 0 peaks at d* = a / (2 b) (best-of-n) or d* = exp(a / b - 1) (RL); KL* = d*^2.

The verdict helpers turn a paper's qualitative claim into a yes/no with the numbers behind it, from arrays
alone: the over-optimisation peak inside the measured range, the peak moving out as the RM grows, the best gold
score at an interior KL coefficient, shuffled RM pairs overfitting after one epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

FORMS = ("best_of_n", "rl")


def _design(d: np.ndarray, form: str) -> np.ndarray:
  """The two columns multiplying (a, b) in R(d) = a * col0 + b * col1."""
  if form == "best_of_n":
    return np.stack([d, -d * d], axis=1)
  if form == "rl":
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -d_log_d], axis=1)
  raise ValueError(f"form={form!r}: expected one of {FORMS}")


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
  """1 - SS_res / SS_tot (SS_tot about the mean of y); nan when y is constant."""
  y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Fit:
  """R(d) = d (a - b d) (best_of_n) or d (a - b log d) (rl), fitted to n points with r2."""
  form: str
  a: float
  b: float
  r2: float
  n: int

  def predict(self, d) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return _design(d.reshape(-1), self.form) @ np.array([self.a, self.b])

  @property
  def peak_d(self) -> float:
    """The d of the fitted maximum; inf when the curve never turns down (b <= 0)."""
    if self.b <= 0:
      return math.inf
    if self.form == "best_of_n":
      return self.a / (2 * self.b)
    return math.exp(min(self.a / self.b - 1.0, 700.0))  # d/dd d(a - b log d) = a - b - b log d = 0

  @property
  def peak_kl(self) -> float:
    return self.peak_d ** 2

  def as_dict(self, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}a": self.a, f"{prefix}b": self.b, f"{prefix}r2": self.r2, f"{prefix}peak_kl": self.peak_kl,
            f"{prefix}n_points": self.n}


def fit(d: Sequence[float], r: Sequence[float], form: str) -> Fit:
  """Least squares of R(d) = a * d - b * (d^2 | d log d) through the origin (Gao et al. eqs. 1-2)."""
  d, r = np.asarray(d, np.float64).reshape(-1), np.asarray(r, np.float64).reshape(-1)
  if d.shape != r.shape or len(d) < 2:
    raise ValueError(f"fit ({form}): expected two or more (d, R) points of the same length, got {len(d)} d and "
                     f"{len(r)} R")
  if np.any(d < 0) or not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))):
    raise ValueError(f"fit ({form}): expected finite points with d = sqrt(KL) >= 0")
  x = _design(d, form)
  (a, b), *_ = np.linalg.lstsq(x, r, rcond=None)
  return Fit(form, float(a), float(b), r_squared(r, x @ np.array([a, b])), len(d))


def sqrt_kl(kl: Sequence[float]) -> np.ndarray:
  """d = sqrt(KL), a slightly negative sampled KL estimate (noise around 0) taken as 0."""
  return np.sqrt(np.maximum(np.asarray(kl, np.float64), 0.0))


# ----------------------------------------------------------------------------------------------------------
# Verdicts: a paper's claim, whether it held here, and the numbers it rests on.


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str
  held: bool
  evidence: str

  def __post_init__(self):
    # A NumPy comparison gives np.bool_, which sums to np.int64 and does not serialise to JSON.
    object.__setattr__(self, "held", bool(self.held))

  def markdown(self) -> str:
    return f"**{'Held' if self.held else 'Not held'}**: {self.claim} ({self.evidence})"


def overoptimisation(gold: Fit, proxy: Fit, max_d: float, *, method: str) -> Verdict:
  """Gao et al.: optimising the proxy, the gold score peaks and falls while the proxy keeps rising. Held when the
  gold fit turns down inside the measured range (b > 0, d* <= max d) and the proxy's fitted peak, if any, lies
  further out than the gold's."""
  held = gold.b > 0 and gold.peak_d <= max_d and proxy.peak_d > gold.peak_d
  evidence = (f"{method}: gold peak at KL {gold.peak_kl:.3g} (a={gold.a:.3g}, b={gold.b:.3g}, R^2={gold.r2:.2f}), "
              f"proxy peak at KL {proxy.peak_kl:.3g} (a={proxy.a:.3g}, b={proxy.b:.3g}, R^2={proxy.r2:.2f}), "
              f"measured up to KL {max_d ** 2:.3g}")
  return Verdict(f"{method}: the gold score peaks and falls within the measured KL while the proxy keeps rising",
                 held, evidence)


def peak_moves_out(sizes: Sequence[float], peak_kls: Sequence[float], *, what: str = "reward model") -> Verdict:
  """Gao et al.: the gold curve's peak moves to larger KL as the reward model grows. Held when the peaks,
  ordered by size, never decrease and the largest is above the smallest."""
  order = np.argsort(np.asarray(sizes, np.float64))
  peaks = np.asarray(peak_kls, np.float64)[order]
  held = len(peaks) >= 2 and bool(np.all(np.diff(peaks) >= 0)) and peaks[-1] > peaks[0]
  evidence = ", ".join(f"{np.asarray(sizes)[i]:g}: KL* {p:.3g}" for i, p in zip(order, peaks))
  return Verdict(f"the gold score's peak moves to larger KL as the {what} grows", held, evidence)


def interior_optimum(betas: Sequence[float], gold: Sequence[float], kls: Sequence[float] | None = None) -> Verdict:
  """Ziegler et al. 2019 / Stiennon et al. 2020: the best gold score lies at an interior KL coefficient (too
  small a beta over-optimises the RM, too large a beta stays at SFT). Held when, of three or more fixed betas,
  the best gold score is at neither the smallest nor the largest."""
  betas, gold = np.asarray(betas, np.float64), np.asarray(gold, np.float64)
  order = np.argsort(betas)
  best = int(np.argmax(gold[order]))
  held = len(betas) >= 3 and 0 < best < len(betas) - 1
  parts = [f"beta {betas[i]:g}: gold {gold[i]:+.3f}" + (f" at KL {kls[i]:.2f}" if kls is not None else "")
           for i in order]
  return Verdict("the best gold score lies at an interior KL coefficient", held,
                 "; ".join(parts) + f"; best: beta {betas[order[best]]:g}")


def overfits_after_one_epoch(epochs: Sequence[float], val_loss: Sequence[float], *,
                             other_epochs: Sequence[float] | None = None,
                             other_val_loss: Sequence[float] | None = None) -> Verdict:
  """InstructGPT (sec 3.5): every comparison pair as its own shuffled example overfits after one epoch. Held
  when the validation loss is lowest at or before epoch 1 and higher at the last evaluation; with the grouped
  arrangement's curve as `other_*`, also when the grouped loss rose less from epoch 1 to its end."""
  e, v = np.asarray(epochs, np.float64), np.asarray(val_loss, np.float64)
  if len(e) < 2:
    raise ValueError("overfits_after_one_epoch: expected validation losses at two or more epochs")
  at1 = v[np.argmin(np.abs(e - 1.0))]
  rise = float(v[-1] - at1)
  held = float(e[int(np.argmin(v))]) <= 1.0 + 1e-9 and v[-1] > v.min()
  evidence = (f"shuffled pairs: lowest validation loss {v.min():.4f} at epoch {e[int(np.argmin(v))]:.2f}, "
              f"{at1:.4f} at epoch 1, {v[-1]:.4f} at epoch {e[-1]:.2f} (rise {rise:+.4f})")
  if other_epochs is not None and other_val_loss is not None:
    oe, ov = np.asarray(other_epochs, np.float64), np.asarray(other_val_loss, np.float64)
    other_rise = float(ov[-1] - ov[np.argmin(np.abs(oe - 1.0))])
    held = held and other_rise < rise
    evidence += f"; grouped by prompt: {ov.min():.4f} lowest, rise {other_rise:+.4f} from epoch 1 to {oe[-1]:.2f}"
  return Verdict("shuffled comparison pairs overfit after one epoch (all pairs of a prompt in one batch element "
                 "overfit less)", held, evidence)


def frontier_envelope(kls: Sequence[float], gold: Sequence[float], at: Sequence[float]) -> np.ndarray:
  """The best gold score reachable at or below each KL of `at`, from the points (kls, gold) joined by straight
  lines in KL order: a point at KL x is compared with the better of the interpolated curve and every point at
  smaller KL (one can always spend less KL than the budget). nan past the largest measured KL."""
  k, g = np.asarray(kls, np.float64), np.asarray(gold, np.float64)
  order = np.argsort(k)
  k, g = k[order], g[order]
  out = []
  for x in np.asarray(at, np.float64):
    if x > k[-1] or x < k[0]:
      out.append(np.nan)
      continue
    out.append(max(float(np.interp(x, k, g)), float(g[k <= x].max())))
  return np.asarray(out)


def frontier_dominates(kls: Sequence[float], gold: Sequence[float], other_kls: Sequence[float],
                       other_gold: Sequence[float], *, method: str = "DPO", other: str = "PPO") -> Verdict:
  """The DPO paper (Rafailov et al. 2023, Fig. 2): DPO's reward-KL frontier dominates PPO's. Held when every
  point of `method` inside the KL range `other` measured lies at or above `other`'s frontier_envelope there
  (and at least one point is in range). Both point sets should hold the shared start (SFT at KL 0)."""
  k, g = np.asarray(kls, np.float64), np.asarray(gold, np.float64)
  env = frontier_envelope(other_kls, other_gold, k)
  inside = np.isfinite(env)
  margins = g[inside] - env[inside]
  held = bool(inside.any()) and bool(np.all(margins >= 0))
  parts = [f"KL {x:.2f}: {method} {y:+.3f} vs {other} {e:+.3f}" for x, y, e in zip(k[inside], g[inside], env[inside])]
  if (~inside).any():
    parts.append(f"{int((~inside).sum())} point(s) outside {other}'s KL range [{min(other_kls):.2f}, "
                 f"{max(other_kls):.2f}]")
  return Verdict(f"{method}'s gold-KL frontier dominates {other}'s (every {method} point at or above {other}'s "
                 "best at that KL)", held, "; ".join(parts))


def alignment_tax(coefs: Sequence[float], lm_loss: Sequence[float], skill: Sequence[float],
                  win_rate: Sequence[float], win_rate_se: Sequence[float], sft_lm_loss: float) -> list[Verdict]:
  """InstructGPT (sec 4.2, Fig. 28-29): PPO pays an alignment tax and PPO-ptx recovers it. Three verdicts:
  the run without pretraining gradients (coef 0) ends with a held-out pretraining loss above SFT's; the loss
  falls as the coefficient grows (never rises from one coefficient to the next, and the largest is below coef
  0's) and the benchmark skill of the largest coefficient is at least coef 0's; the largest coefficient keeps
  the gold win rate within two standard errors of coef 0's (the tax recovered without giving up alignment)."""
  c = np.asarray(coefs, np.float64)
  order = np.argsort(c)
  c, lo, sk = c[order], np.asarray(lm_loss, np.float64)[order], np.asarray(skill, np.float64)[order]
  wr, se = np.asarray(win_rate, np.float64)[order], np.asarray(win_rate_se, np.float64)[order]
  if len(c) < 2 or c[0] != 0:
    raise ValueError(f"alignment_tax: coefficients {tuple(c)}; expected 0 (plain PPO) and at least one more")
  table = "; ".join(f"coef {x:g}: LM loss {l:.3f}, skill {s:.3f}, win rate {w:.3f}" for x, l, s, w in
                    zip(c, lo, sk, wr))
  tax = Verdict("PPO without pretraining gradients pays an alignment tax (held-out pretraining loss above SFT's)",
                bool(lo[0] > sft_lm_loss), f"SFT {sft_lm_loss:.3f}, PPO {lo[0]:.3f}")
  recovered = Verdict("PPO-ptx recovers it: the pretraining loss falls as the ptx coefficient grows, and the "
                      "benchmark skill does not fall", bool(np.all(np.diff(lo) <= 0) and lo[-1] < lo[0]
                                                            and sk[-1] >= sk[0]), table)
  gap = float(wr[-1] - wr[0])
  kept = Verdict("at the largest ptx coefficient the gold win rate stays within 2 standard errors of PPO's",
                 bool(abs(gap) <= 2 * math.hypot(se[0], se[-1]) or gap > 0),
                 f"win rate {wr[-1]:.3f} +- {se[-1]:.3f} at coef {c[-1]:g} against {wr[0]:.3f} +- {se[0]:.3f}")
  return [tax, recovered, kept]
