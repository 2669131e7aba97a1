"""Simulated labelers: Plackett-Luce rankings around the gold score, agreement statistics, Elo and Bradley-Terry.

A labeler l shown K responses with gold scores g_i and lengths n_i (characters) perceives utilities

    u_i = (g_i + length_bias_l * n_i / 100) / temperature_l

and returns a ranking drawn from the Plackett-Luce model: the best response is response i with probability
exp(u_i) / sum_j exp(u_j), the second is drawn the same way from the rest, and so on. Sampling uses the
Gumbel-max trick (sort u_i + Gumbel noise), which draws exactly that distribution. For K = 2 this is the
Bradley-Terry model: P(i preferred to j) = sigmoid(u_i - u_j).

Labelers differ: temperature_l = noise * exp(noise_spread * z_l) and length_bias_l = length_bias * z'_l with
z, z' standard normal draws fixed by the pool's seed (some labelers are noisier, some like long answers and
some short ones). `noise` sets the agreement of two labelers. On the default comparisons data (responses of
demonstrators of varying skill, the `small` preset of experiments/data/config.py; mean of seeds 0, 1, 2, whose
values spread by about +-0.01) the measured pairwise agreement and gold ceiling are:

    noise            0.25   0.5    0.65   0.75   1.0    1.5
    agreement        0.85   0.77   0.73   0.71   0.66   0.60   (InstructGPT: about 0.73; default noise 0.65)
    gold ceiling     0.88   0.83   0.80   0.78   0.74   0.68

Even noiseless labelers would agree on only about 0.9 of the pairs: pairs of equally good responses (two
correct answers within the reference length) have equal gold scores, and labelers split them at random.

Agreement depends on the responses being ranked: two labelers agree more on pairs whose gold scores differ
more, so the same noise gives a different agreement on, say, samples of an SFT policy. The RM stage can
re-measure it with `pair_agreement` on its own comparisons.

The gold ceiling (`gold_accuracy`): how often the gold ordering of a pair matches a labeler's ranking. No
learned reward model can beat it on average, as no model can beat the noise it is trained on.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

DEFAULT_NOISE = 0.65
LENGTH_UNIT = 100.0  # length_bias is in gold-score units per 100 characters


def sample_plackett_luce(utilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A Plackett-Luce draw: the indices of the items from best to worst."""
  u = np.asarray(utilities, dtype=np.float64)
  return np.argsort(-(u + rng.gumbel(size=u.shape)), kind="stable")


def plackett_luce_probability(utilities: np.ndarray, order: Sequence[int]) -> float:
  """P(order) under Plackett-Luce: prod_j exp(u_{o_j}) / sum_{m >= j} exp(u_{o_m})."""
  u = np.asarray(utilities, dtype=np.float64)[list(order)]
  u = u - u.max()
  e = np.exp(u)
  tails = np.cumsum(e[::-1])[::-1]
  return float(np.prod(e / tails))


def order_to_ranks(order: np.ndarray) -> np.ndarray:
  """ranks[i] = position of item i in `order` (0 = best)."""
  ranks = np.empty(len(order), dtype=np.int64)
  ranks[np.asarray(order)] = np.arange(len(order))
  return ranks


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
  """All C(K, 2) (winner, loser) index pairs implied by a ranking (0 = best)."""
  r = list(ranks)
  return [(i, j) if r[i] < r[j] else (j, i) for i in range(len(r)) for j in range(i + 1, len(r))]


class LabelerPool:
  """A fixed set of simulated labelers with per-labeler noise temperature and length bias."""

  def __init__(self, n_labelers: int = 8, noise: float = DEFAULT_NOISE, noise_spread: float = 0.2,
               length_bias: float = 0.1, seed: int = 0):
    if n_labelers < 2:
      raise ValueError(f"data.n_labelers={n_labelers}: expected at least 2 (agreement needs two labelers)")
    if noise <= 0:
      raise ValueError(f"data.labeler_noise={noise}: expected a positive temperature")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    self.n_labelers = n_labelers
    self.noise = float(noise)
    self.temperatures = noise * np.exp(noise_spread * rng.standard_normal(n_labelers))
    self.length_bias = length_bias * rng.standard_normal(n_labelers)

  def utilities(self, gold_scores: np.ndarray, labeler_id: int, lengths: np.ndarray | None = None) -> np.ndarray:
    if not 0 <= labeler_id < self.n_labelers:
      raise ValueError(f"labeler_id={labeler_id}: expected 0..{self.n_labelers - 1}")
    g = np.asarray(gold_scores, dtype=np.float64)
    if lengths is not None:
      g = g + self.length_bias[labeler_id] * np.asarray(lengths, dtype=np.float64) / LENGTH_UNIT
    return g / self.temperatures[labeler_id]

  def rank(self, gold_scores: np.ndarray, labeler_id: int, rng: np.random.Generator,
           lengths: np.ndarray | None = None) -> np.ndarray:
    """ranks[K] (0 = best) drawn by labeler `labeler_id` from Plackett-Luce around the gold scores."""
    order = sample_plackett_luce(self.utilities(gold_scores, labeler_id, lengths), rng)
    return order_to_ranks(order)

  def rank_responses(self, gold_scores: np.ndarray, responses: Sequence[str], labeler_id: int,
                     rng: np.random.Generator) -> np.ndarray:
    """`rank` with the lengths taken from the response texts. Identical responses (after stripping
    whitespace) are one response to the labeler: they share a rank, a tie that makes no training pair. Without
    this, the K samples of a confident policy (often the same text several times) would be ordered by noise
    alone and fill the data with pairs no reward model can get right."""
    keys = [str(r).strip() for r in responses]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
      first.setdefault(key, i)
    distinct = list(first.values())
    gold = np.asarray(gold_scores, dtype=np.float64)
    ranks = self.rank(gold[distinct], labeler_id, rng, lengths=np.array([len(keys[i]) for i in distinct]))
    slot = {key: n for n, key in enumerate(first)}
    return np.array([ranks[slot[key]] for key in keys], dtype=ranks.dtype)

  def pair_agreement(self, gold_score_sets: Sequence[np.ndarray], rng: np.random.Generator,
                     length_sets: Sequence[np.ndarray] | None = None) -> float:
    """Fraction of pairs on which two different random labelers, ranking the same K responses, agree."""
    agree, total = 0, 0
    for n, gold in enumerate(gold_score_sets):
      a, b = rng.choice(self.n_labelers, size=2, replace=False)
      lengths = None if length_sets is None else length_sets[n]
      ra, rb = self.rank(gold, int(a), rng, lengths), self.rank(gold, int(b), rng, lengths)
      i, j = np.triu_indices(len(gold), k=1)
      agree += int(np.sum(np.sign(ra[i] - ra[j]) == np.sign(rb[i] - rb[j])))
      total += len(i)
    return agree / max(total, 1)


def gold_accuracy(gold_score_sets: Sequence[np.ndarray], rank_sets: Sequence[np.ndarray]) -> float:
  """How often the gold ordering of a pair matches the labeler's ranking; gold ties count one half."""
  hits, total = 0.0, 0
  for gold, ranks in zip(gold_score_sets, rank_sets):
    g, r = np.asarray(gold, dtype=np.float64), np.asarray(ranks)
    i, j = np.triu_indices(len(g), k=1)
    gold_sign = np.sign(g[i] - g[j])  # + : i better
    label_sign = np.sign(r[j] - r[i])  # + : i ranked better (smaller rank)
    hits += float(np.sum(np.where(gold_sign == 0, 0.5, gold_sign == label_sign)))
    total += len(i)
  return hits / max(total, 1)


def elo_ratings(outcomes: Sequence[tuple[Hashable, Hashable]], k: float = 32.0, initial: float = 1000.0,
                scale: float = 400.0, passes: int = 1) -> dict[Hashable, float]:
  """Elo ratings from (winner, loser) outcomes, applied in order (`passes` times).

  The expected score of A against B is 1 / (1 + 10 ** ((R_B - R_A) / scale)); after a game the winner gains
  k * (1 - expected) and the loser loses as much. Sequential, so the order of games matters a little; more
  passes over the same games move the ratings towards the Bradley-Terry fit.
  """
  ratings: dict[Hashable, float] = {}
  for _ in range(passes):
    for winner, loser in outcomes:
      rw, rl = ratings.setdefault(winner, initial), ratings.setdefault(loser, initial)
      expected = 1.0 / (1.0 + 10.0 ** ((rl - rw) / scale))
      ratings[winner], ratings[loser] = rw + k * (1.0 - expected), rl - k * (1.0 - expected)
  return ratings


def bradley_terry(outcomes: Sequence[tuple[Hashable, Hashable]], n_iter: int = 1000, prior: float = 0.01,
                  tol: float = 1e-10) -> dict[Hashable, float]:
  """Maximum-likelihood Bradley-Terry log-strengths (mean 0) from (winner, loser) outcomes.

  P(i beats j) = p_i / (p_i + p_j). Fitted with Hunter's MM iteration (2004):
  p_i <- W_i / sum_j n_ij / (p_i + p_j). `prior` adds that many virtual wins and losses of every player
  against a player of strength 1, which keeps the estimate finite when a player never wins or never loses.
  """
  players = sorted({p for o in outcomes for p in o}, key=repr)
  index = {p: n for n, p in enumerate(players)}
  m = len(players)
  wins = np.zeros((m, m))
  for w, l in outcomes:
    wins[index[w], index[l]] += 1
  games = wins + wins.T
  total_wins = wins.sum(1) + prior
  p = np.ones(m)
  for _ in range(n_iter):
    denom = (games / (p[:, None] + p[None, :])).sum(1) + 2 * prior / (p + 1.0)
    new = total_wins / denom
    if prior == 0:  # without the virtual player the scale is free; pin it
      new /= np.exp(np.mean(np.log(new)))
    if np.max(np.abs(np.log(new) - np.log(p))) < tol:
      p = new
      break
    p = new
  logp = np.log(p)
  logp -= logp.mean()
  return {pl: float(logp[index[pl]]) for pl in players}
