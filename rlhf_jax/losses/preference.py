"""Direct preference optimisation on K-way rankings: DPO, its conservative (label-smoothed) form, and IPO.

For a response y of prompt x, h(y) = log pi(y|x) - log pi_ref(y|x) (sums over response tokens); DPO's implicit
reward is beta * h(y). Each strictly ranked pair (w better than l) of a prompt contributes, with
d = h(y_w) - h(y_l):

    DPO  (Rafailov et al., arXiv 2305.18290, eq. 7):     -log sigmoid(beta * d)
    cDPO (label smoothing eps, the "conservative" DPO):  -(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d)
    IPO  (Azar et al., arXiv 2310.12036, eq. 17):        (d - 1 / (2 * beta))^2     (beta plays IPO's tau)

and, as in InstructGPT's reward-model loss, the pairs of one prompt are averaged before prompts are averaged
(`pairs="all"`: all C(K, 2) pairs of a K-way ranking, as the grouped RM loss weights them), or only the pairs of
the best response against each other one count (`pairs="best_vs_rest"`). With K = 2 both are plain DPO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.core import Metrics, _f32

KINDS = ("dpo", "ipo")
PAIRS = ("all", "best_vs_rest")


def preference_pairs_bkk(ranks_bk: jax.Array, valid_bk: jax.Array, pairs: str = "all") -> jax.Array:
  """pair[b, i, j] = 1 when response i is strictly preferred to response j and the pair counts (both valid)."""
  if pairs not in PAIRS:
    raise ValueError(f"pairs={pairs!r}: expected 'all' or 'best_vs_rest'")
  valid_bk = jnp.asarray(valid_bk, bool)
  better_bkk = (ranks_bk[:, :, None] < ranks_bk[:, None, :]) & valid_bk[:, :, None] & valid_bk[:, None, :]
  if pairs == "best_vs_rest":
    best_b = jnp.min(jnp.where(valid_bk, ranks_bk, jnp.iinfo(jnp.int32).max), axis=1)
    better_bkk = better_bkk & (ranks_bk == best_b[:, None])[:, :, None]
  return _f32(better_bkk)


def preference_loss(
    logp_bk: jax.Array,
    ref_logp_bk: jax.Array,
    ranks_bk: jax.Array,
    valid_bk: jax.Array,
    *,
    beta: float | jax.Array,
    kind: str = "dpo",
    label_smoothing: float = 0.0,
    pairs: str = "all",
    weights_b: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
  """DPO / cDPO / IPO loss of groups of k ranked responses (module docstring).

  Args:
    logp_bk: [b, k] log pi(y | x) of each response under the trained policy (summed over its tokens).
    ref_logp_bk: [b, k] the same under the frozen reference (constants).
    ranks_bk: [b, k] int ranks, lower is better; equal ranks are ties (no pair).
    valid_bk: [b, k] False for padding responses (ragged K).
    beta: the KL strength (DPO's beta, IPO's tau); > 0.
    kind: "dpo" or "ipo". label_smoothing: cDPO's eps in [0, 0.5) (DPO only).
    pairs: "all" or "best_vs_rest". weights_b: optional [b] per-prompt weights.

  Returns:
    (loss, metrics): the mean over prompts with a pair of the mean over their pairs; metrics reward_accuracy
    (fraction of pairs with d > 0), reward_margin (mean beta * d), chosen_logp / rejected_logp (mean log pi of
    the preferred / dispreferred response of each pair), chosen_reward / rejected_reward (mean beta * h).
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: expected 'dpo' or 'ipo'")
  logp_bk = _f32(logp_bk)
  h_bk = logp_bk - jax.lax.stop_gradient(_f32(ref_logp_bk))
  pair_bkk = preference_pairs_bkk(ranks_bk, valid_bk, pairs)
  d_bkk = h_bk[:, :, None] - h_bk[:, None, :]  # h_i - h_j
  if kind == "dpo":
    per_pair_bkk = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * d_bkk) - label_smoothing * \
        jax.nn.log_sigmoid(-beta * d_bkk)
  else:
    per_pair_bkk = jnp.square(d_bkk - 1.0 / (2.0 * beta))
  num_pairs_b = jnp.sum(pair_bkk, axis=(1, 2))
  loss_b = jnp.sum(pair_bkk * per_pair_bkk, axis=(1, 2)) / jnp.maximum(num_pairs_b, 1.0)
  prompt_w_b = _f32(num_pairs_b > 0) * (1.0 if weights_b is None else _f32(weights_b))
  loss = jnp.sum(prompt_w_b * loss_b) / jnp.maximum(jnp.sum(prompt_w_b), 1e-12)
  n = jnp.maximum(jnp.sum(pair_bkk), 1.0)
  pair_mean = lambda x_bkk: jnp.sum(pair_bkk * jax.lax.stop_gradient(x_bkk)) / n  # noqa: E731
  metrics = {
      "reward_accuracy": pair_mean(_f32(d_bkk > 0)),
      "reward_margin": pair_mean(beta * d_bkk),
      "chosen_logp": pair_mean(jnp.broadcast_to(logp_bk[:, :, None], d_bkk.shape)),
      "rejected_logp": pair_mean(jnp.broadcast_to(logp_bk[:, None, :], d_bkk.shape)),
      "chosen_reward": pair_mean(jnp.broadcast_to(beta * h_bk[:, :, None], d_bkk.shape)),
      "rejected_reward": pair_mean(jnp.broadcast_to(beta * h_bk[:, None, :], d_bkk.shape)),
      "num_pairs": jnp.sum(pair_bkk),
  }
  return loss, metrics
