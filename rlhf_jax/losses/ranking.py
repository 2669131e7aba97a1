"""Reward model losses (InstructGPT eq. 1) and calibration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.core import _F32, Metrics, _f32

# ----------------------------------------------------------------------------------------------------------
# Reward model.


def _better_bkk(ranks_bk: jax.Array, valid_bk: jax.Array) -> jax.Array:
  """better[b, i, j] is True when response i is strictly preferred to response j (both valid)."""
  valid_bk = jnp.asarray(valid_bk, bool)
  # Lower rank is better; equal ranks are ties and give no comparison.
  strictly_better = ranks_bk[:, :, None] < ranks_bk[:, None, :]
  return strictly_better & valid_bk[:, :, None] & valid_bk[:, None, :]


def ranking_loss(
    rewards_bk: jax.Array,
    ranks_bk: jax.Array,
    valid_bk: jax.Array,
    *,
    weights_b: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Reward-model loss on K-way rankings, all pairs of a prompt in one batch element (InstructGPT eq. 1).

      loss(prompt) = -1/P * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l)

  where P is the prompt's number of strict pairs, C(K, 2) when there are no ties. The batch loss is the mean
  of loss(prompt) over prompts that have at least one pair (weighted by weights_b when given); a prompt with
  no pair (K < 2 or all tied) contributes nothing.

  Args:
    rewards_bk: [b, k] scalar rewards of the k responses of each prompt (k padded to a maximum).
    ranks_bk: [b, k] int ranks, lower is better; equal ranks are ties.
    valid_bk: [b, k] bool, False for padding responses (ragged K).
    weights_b: optional [b] per-prompt weights.

  Returns:
    (loss, metrics) with metrics accuracy (fraction of all pairs with r_w > r_l), num_pairs, and
    mean_margin (mean r_w - r_l over pairs).
  """
  rewards_bk = _f32(rewards_bk)
  better_bkk = _f32(_better_bkk(ranks_bk, valid_bk))
  margin_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]  # r_i - r_j
  num_pairs_b = jnp.sum(better_bkk, axis=(1, 2))
  nll_b = -jnp.sum(better_bkk * jax.nn.log_sigmoid(margin_bkk), axis=(1, 2))
  loss_b = nll_b / jnp.maximum(num_pairs_b, 1.0)
  prompt_w_b = _f32(num_pairs_b > 0)
  if weights_b is not None:
    prompt_w_b = prompt_w_b * _f32(weights_b)
  loss = jnp.sum(prompt_w_b * loss_b) / jnp.maximum(jnp.sum(prompt_w_b), 1e-12)
  num_pairs = jnp.sum(num_pairs_b)
  metrics = {
      "accuracy": jnp.sum(better_bkk * (margin_bkk > 0)) / jnp.maximum(num_pairs, 1.0),
      "num_pairs": num_pairs,
      "mean_margin": jnp.sum(better_bkk * margin_bkk) / jnp.maximum(num_pairs, 1.0),
  }
  return loss, metrics


def rating_regression_loss(
    rewards_bk: jax.Array,
    targets_bk: jax.Array,
    ranks_bk: jax.Array,
    valid_bk: jax.Array,
    *,
    weights_b: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """Reward-model regression onto per-prompt ratings of its responses (the Elo ratings of the ranking's pairwise
  outcomes, normalised per prompt; rlhf_jax.data.comparisons.rating_targets).

      loss(prompt) = 1/K * sum_i (r_i - mean_j r_j - t_i)^2

  over the prompt's K valid responses. The rewards are centred per prompt because a reward model's score is only
  defined up to a per-prompt shift (the K-way loss of `ranking_loss` does not see it either) and the targets have
  mean 0. The batch loss is the mean of loss(prompt) over prompts with at least two valid responses (weighted by
  weights_b when given).

  Args:
    rewards_bk: [b, k] scalar rewards (k padded to a maximum).
    targets_bk: [b, k] the normalised ratings of the responses.
    ranks_bk: [b, k] int ranks (lower is better), for the pair accuracy metric only.
    valid_bk: [b, k] bool, False for padding responses.
    weights_b: optional [b] per-prompt weights.

  Returns:
    (loss, metrics) with accuracy (fraction of strictly ranked pairs with r_w > r_l, as `ranking_loss`) and
    num_pairs.
  """
  rewards_bk, targets_bk = _f32(rewards_bk), _f32(targets_bk)
  v_bk = _f32(jnp.asarray(valid_bk, bool))
  n_b = jnp.sum(v_bk, axis=1)
  mean_b = jnp.sum(v_bk * rewards_bk, axis=1) / jnp.maximum(n_b, 1.0)
  sq_bk = v_bk * jnp.square(rewards_bk - mean_b[:, None] - targets_bk)
  loss_b = jnp.sum(sq_bk, axis=1) / jnp.maximum(n_b, 1.0)
  prompt_w_b = _f32(n_b >= 2)
  if weights_b is not None:
    prompt_w_b = prompt_w_b * _f32(weights_b)
  loss = jnp.sum(prompt_w_b * loss_b) / jnp.maximum(jnp.sum(prompt_w_b), 1e-12)
  better_bkk = _f32(_better_bkk(ranks_bk, valid_bk))
  margin_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]
  num_pairs = jnp.sum(better_bkk)
  metrics = {"accuracy": jnp.sum(better_bkk * (margin_bkk > 0)) / jnp.maximum(num_pairs, 1.0),
             "num_pairs": num_pairs}
  return loss, metrics


def pairwise_loss(
    r_chosen_b: jax.Array, r_rejected_b: jax.Array, *, weights_b: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """Bradley-Terry loss on independent pairs: weighted mean of -log sigmoid(r_w - r_l).

  Args:
    r_chosen_b: [b] rewards of the preferred responses.
    r_rejected_b: [b] rewards of the rejected responses.
    weights_b: optional [b] per-pair weights (0 for padding pairs); the loss is sum(w * nll) / sum(w), and 0
      when all weights are 0. With `grouped_pair_weights` this equals `ranking_loss` on the same rankings.

  Returns:
    (loss, metrics) with metrics accuracy (weighted fraction of pairs with r_w > r_l), num_pairs (pairs with a
    nonzero weight) and mean_margin (weighted).
  """
  margin_b = _f32(r_chosen_b) - _f32(r_rejected_b)
  w_b = jnp.ones_like(margin_b) if weights_b is None else _f32(weights_b)
  total_w = jnp.maximum(jnp.sum(w_b), 1e-12)
  loss = -jnp.sum(w_b * jax.nn.log_sigmoid(margin_b)) / total_w
  metrics = {
      "accuracy": jnp.sum(w_b * (margin_b > 0)) / total_w,
      "num_pairs": jnp.sum(_f32(w_b != 0)),
      "mean_margin": jnp.sum(w_b * margin_b) / total_w,
  }
  return loss, metrics


def expand_pairs(
    ranks_bk: jax.Array, valid_bk: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """All unordered pairs of each prompt's responses, oriented winner first, in a static shape.

  Pair p of prompt b is the p-th pair (i < j) of `np.triu_indices(k, 1)`; it is valid when both responses are
  valid and their ranks differ. Flatten the [b, p] outputs to use the pairs as independent examples.

  Args:
    ranks_bk: [b, k] int ranks, lower is better.
    valid_bk: [b, k] bool.

  Returns:
    idx_w_bp: [b, p] int32 index (into k) of the preferred response of each pair.
    idx_l_bp: [b, p] int32 index of the rejected response.
    prompt_idx_bp: [b, p] int32 prompt index b.
    pair_valid_bp: [b, p] bool.
    with p = k*(k-1)/2.
  """
  ranks_bk = jnp.asarray(ranks_bk)
  valid_bk = jnp.asarray(valid_bk, bool)
  b, k = ranks_bk.shape
  i_p, j_p = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(k, 1))
  rank_i_bp, rank_j_bp = ranks_bk[:, i_p], ranks_bk[:, j_p]
  i_wins_bp = rank_i_bp < rank_j_bp
  idx_w_bp = jnp.where(i_wins_bp, i_p[None, :], j_p[None, :])
  idx_l_bp = jnp.where(i_wins_bp, j_p[None, :], i_p[None, :])
  pair_valid_bp = valid_bk[:, i_p] & valid_bk[:, j_p] & (rank_i_bp != rank_j_bp)
  prompt_idx_bp = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], idx_w_bp.shape)
  return idx_w_bp.astype(jnp.int32), idx_l_bp.astype(jnp.int32), prompt_idx_bp, pair_valid_bp


def grouped_pair_weights(pair_valid_bp: jax.Array) -> jax.Array:
  """Weights [b, p] = valid / (number of valid pairs of the prompt).

  Each prompt with pairs then sums to weight 1, so `pairwise_loss` with these weights reproduces the
  per-prompt 1/C(K,2) normalisation and the mean over prompts of `ranking_loss`.
  """
  valid_bp = _f32(pair_valid_bp)
  return valid_bp / jnp.maximum(jnp.sum(valid_bp, axis=1, keepdims=True), 1.0)


def rm_calibration(
    margins_n: jax.Array, labels_n: jax.Array, n_bins: int = 10, *, mask_n: jax.Array | None = None
) -> jax.Array:
  """Expected calibration error of the reward model's preference probability p = sigmoid(r_a - r_b).

      ECE = sum_bins (n_bin / n) * |mean_{bin}(p) - mean_{bin}(label)|

  with n_bins equal-width bins of p on [0, 1]. This is the reliability-diagram form for a binary probability,
  so it is sensitive to which response is called "a": feed both orientations (or random ones) of each pair.

  Args:
    margins_n: [n] r_a - r_b.
    labels_n: [n] 1 when a was preferred, 0 otherwise.
    n_bins: number of bins (static under jit).
    mask_n: optional [n] validity mask.
  """
  p_n = jax.nn.sigmoid(_f32(margins_n))
  w_n = jnp.ones_like(p_n) if mask_n is None else _f32(mask_n)
  bin_n = jnp.clip(jnp.floor(p_n * n_bins).astype(jnp.int32), 0, n_bins - 1)
  onehot_nm = jax.nn.one_hot(bin_n, n_bins, dtype=_F32) * w_n[:, None]
  count_m = jnp.sum(onehot_nm, axis=0)
  # |sum p - sum y| over a bin equals n_bin * |mean p - mean y|, so empty bins need no special case.
  gap_m = jnp.abs(onehot_nm.T @ p_n - onehot_nm.T @ _f32(labels_n))
  return jnp.sum(gap_m) / jnp.maximum(jnp.sum(count_m), 1.0)
