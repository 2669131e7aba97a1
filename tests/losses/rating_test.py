"""rm.target = "elo": per-prompt Elo ratings of a ranking and the regression loss, against NumPy."""

import jax
import numpy as np
import pytest

from rlhf_jax import losses, tokenizers
from rlhf_jax.data import comparisons
from rlhf_jax.models import heads, presets
from rlhf_jax.stages import rm as rm_stage


def _elo_numpy(games, k_players, k_factor):
  """Elo by arrays: one pass over the games in order, the chess update on the 400-point scale."""
  r = np.full(k_players, 1000.0)
  for w, l in games:
    e_w = 1.0 / (1.0 + 10.0 ** ((r[l] - r[w]) / 400.0))
    r[w], r[l] = r[w] + k_factor * (1 - e_w), r[l] - k_factor * (1 - e_w)
  return r


def _standardise(x):
  return (x - x.mean()) / x.std()


def _random_ranks(rng, k):
  ranks = rng.integers(0, k, size=k)  # ties allowed
  if len(set(ranks.tolist())) == 1:
    ranks[0] += 1
  return ranks.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_rating_targets_match_a_numpy_elo(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 10))
  ranks = _random_ranks(rng, k)
  games = [(i, j) if ranks[i] < ranks[j] else (j, i) for i in range(k) for j in range(i + 1, k)
           if ranks[i] != ranks[j]]
  elo = comparisons.rating_targets(ranks, "elo")
  np.testing.assert_allclose(elo, _standardise(_elo_numpy(games, k, comparisons.ELO_K)), rtol=1e-5, atol=1e-5)
  assert abs(elo.mean()) < 1e-5 and elo.std() == pytest.approx(1.0, abs=1e-5)
  # The best response has the top rating and the worst the bottom one (one pass of Elo over a ranking's games).
  best, worst = [i for i in range(k) if ranks[i] == min(ranks)], [i for i in range(k) if ranks[i] == max(ranks)]
  assert min(elo[best]) > max(np.delete(elo, best)) and max(elo[worst]) < min(np.delete(elo, worst))


def test_rating_targets_of_an_all_tied_ranking_are_zero_and_bad_methods_name_the_field():
  np.testing.assert_array_equal(comparisons.rating_targets([1, 1, 1], "elo"), np.zeros(3))
  with pytest.raises(ValueError, match="rm.target='kway'"):
    comparisons.rating_targets([0, 1], "kway")


def _regression_reference(r, t, ranks, valid, w):
  num, den = 0.0, 0.0
  for b in range(r.shape[0]):
    idx = [i for i in range(r.shape[1]) if valid[b, i]]
    if len(idx) < 2:
      continue
    c = r[b, idx] - r[b, idx].mean()
    num += w[b] * np.mean((c - t[b, idx]) ** 2)
    den += w[b]
  pairs = [(r[b, i] > r[b, j]) for b in range(r.shape[0]) for i in range(r.shape[1]) for j in range(r.shape[1])
           if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]]
  return num / den, np.mean(pairs)


def test_rating_regression_loss_matches_numpy_and_ignores_a_per_prompt_shift():
  rng = np.random.default_rng(0)
  b, k = 6, 5
  r = rng.normal(size=(b, k)).astype(np.float32)
  t = rng.normal(size=(b, k)).astype(np.float32)
  ranks = rng.integers(0, k, size=(b, k))
  valid = rng.random((b, k)) < 0.8
  valid[0] = [True, False, False, False, False]  # one response: no loss
  w = rng.uniform(0.5, 2.0, size=b).astype(np.float32)
  fn = jax.jit(lambda *a: losses.rating_regression_loss(*a[:4], weights_b=a[4]))
  loss, m = fn(r, t, ranks, valid, w)
  want_loss, want_acc = _regression_reference(r, t, ranks, valid, w)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(m["accuracy"]), want_acc, rtol=1e-6)
  shifted, _ = fn(r + rng.normal(size=(b, 1)).astype(np.float32) * 3, t, ranks, valid, w)
  np.testing.assert_allclose(float(shifted), float(loss), rtol=1e-4)


@pytest.mark.parametrize("grouping", ["prompt", "pairs"])
def test_the_rm_stage_loss_regresses_group_batches_onto_their_prompts_ratings(grouping):
  tok = tokenizers.ByteTokenizer()
  cfg = presets.preset("tiny", vocab_size=264, d_model=16, n_heads=2, n_kv_heads=2, d_ff=32, n_layers=1, max_len=48)
  rng = np.random.default_rng(1)
  recs = [{"prompt_turns": [{"role": "user", "content": f"q{i}?"}],
           "responses": [f"a{i}.{j}" + "!" * j for j in range(k)], "ranks": _random_ranks(rng, k)}
          for i, k in enumerate([4, 3, 5])]
  comps, _ = comparisons.tokenize_comparisons(recs, tok, seq_len=32, too_long="error", source="test")
  comparisons.set_rating_targets(comps, "elo")
  groups = comparisons.make_groups(comps, grouping=grouping, pair_weighting="uniform")
  batch = comparisons.group_batch(comps, groups, k=5 if grouping == "prompt" else 2, seq_len=32, pad_id=tok.pad_id)
  params = jax.jit(lambda key: heads.init_rm_params(key, cfg))(jax.random.PRNGKey(0))
  # One jitted call: eager transformer ops would each compile on their own.
  loss, (aux, r) = jax.jit(lambda p, b: (rm_stage.ranking_loss_fn(cfg, "elo")(p, b, None)[0],
                                          (rm_stage.ranking_loss_fn(cfg, "elo")(p, b, None)[1],
                                           heads.group_rewards(p, b, cfg))))(params, batch)
  r = np.asarray(r)
  # Each row's targets are its prompt's Elo ratings of the responses it holds.
  want_t = np.zeros_like(r)
  for row, (ci, idx, _) in enumerate(groups):
    want_t[row, :len(idx)] = comparisons.rating_targets(comps[ci].ranks, "elo")[idx]
  np.testing.assert_allclose(batch["target"], want_t, rtol=1e-6)
  want_loss, want_acc = _regression_reference(r, want_t, batch["ranks"], batch["valid"], batch["weight"])
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
  np.testing.assert_allclose(float(aux["accuracy"]), want_acc, rtol=1e-6)
  assert "target" not in comparisons.group_batch(comps[:0] + [comparisons.Comparison([1], [[5, 2], [6, 2]], [0, 1])],
                                                 [(0, [0, 1], 1.0)], k=2, seq_len=8, pad_id=0)
