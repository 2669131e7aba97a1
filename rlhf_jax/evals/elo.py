"""A cross-model Elo table: policies play pairwise games judged by the simulated labelers on held-out prompts.

For m policies (snapshots) with one response each to the same n prompt slots, every pair (a, b) of policies plays
one game per slot: a random labeler of the pool ranks the two responses (Plackett-Luce around the gold score,
rlhf_jax.tasks.labelers.LabelerPool.rank_responses), and identical responses are a draw (no game). The games are
rated by Elo, applied once in a seeded random order (the chess update, `labelers.elo_ratings`), and by the
Bradley-Terry maximum-likelihood fit of the same games (`labelers.bradley_terry`), which does not depend on the
order; `bt_elo` puts the latter on Elo's scale (1000 + 400 / ln 10 per unit of log-strength). Everything is a
function of texts, gold scores and the pool, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks import labelers

ELO_PER_LOG_STRENGTH = 400.0 / np.log(10.0)


def play_games(gold_mn: np.ndarray, texts_mn: Sequence[Sequence[str]], pool: labelers.LabelerPool,
               rng: np.random.Generator) -> tuple[list[tuple[int, int]], int]:
  """(games as (winner, loser) policy indices, number of draws) of every pair a < b on every slot.

  gold_mn: [m, n] gold scores of policy i's response in slot p; texts_mn: the responses, m lists of n texts.
  """
  gold_mn = np.asarray(gold_mn, np.float64)
  m, n = gold_mn.shape
  if len(texts_mn) != m or any(len(t) != n for t in texts_mn):
    raise ValueError(f"play_games: gold scores of shape {(m, n)} but texts of {[len(t) for t in texts_mn]}")
  games, draws = [], 0
  for p in range(n):
    for a in range(m):
      for b in range(a + 1, m):
        labeler = int(rng.integers(pool.n_labelers))
        ranks = pool.rank_responses(gold_mn[[a, b], p], [texts_mn[a][p], texts_mn[b][p]], labeler, rng)
        if ranks[0] == ranks[1]:
          draws += 1
        else:
          games.append((a, b) if ranks[0] < ranks[1] else (b, a))
  return games, draws


def rate(games: Sequence[tuple[int, int]], m: int, *, k_factor: float,
         rng: np.random.Generator) -> dict[str, np.ndarray]:
  """{"elo": [m], "bt_elo": [m], "win_rate": [m]} of m players from (winner, loser) games. A player without a
  game keeps 1000 and a win rate of NaN."""
  order = rng.permutation(len(games))
  elo = labelers.elo_ratings([games[i] for i in order], k=k_factor)
  # MM creeps when a player (the pretrained model) nearly always loses: 5x the default steps (~1 s for 2400 games).
  bt = labelers.bradley_terry(list(games), n_iter=5000) if games else {}
  wins, played = np.zeros(m), np.zeros(m)
  for w, l in games:
    wins[w] += 1
    played[w] += 1
    played[l] += 1
  return {"elo": np.array([elo.get(i, 1000.0) for i in range(m)]),
          "bt_elo": np.array([1000.0 + ELO_PER_LOG_STRENGTH * bt.get(i, 0.0) for i in range(m)]),
          "win_rate": np.where(played > 0, wins / np.maximum(played, 1), np.nan)}
