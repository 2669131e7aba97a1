"""PPO for language models: KL-penalised rewards, whitening, GAE, PPO and A2C losses, the KL controller."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.core import _F32, Metrics, _f32, masked_mean
from rlhf_jax.models import transformer

# ----------------------------------------------------------------------------------------------------------
# PPO rewards, whitening and advantages.


def kl_penalized_rewards(
    score_b: jax.Array,
    logp_bt: jax.Array,
    ref_logp_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    beta: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Per-token PPO rewards (Ziegler et al. 2019, eq. 2; lm-human-preferences `compute_rewards`).

      kl_t = log pi(y_t) - log pi_ref(y_t)           (a one-sample estimate of the per-token KL)
      r_t  = -beta * kl_t + [t == last real token] * score

  Args:
    score_b: [b] reward-model scores (already normalised / penalised for not stopping).
    logp_bt: [b, t] policy log-probs of the sampled response tokens (temperature applied).
    ref_logp_bt: [b, t] reference-policy log-probs of the same tokens.
    mask_bt: [b, t] 1 on response tokens up to and including EOS; rows are right-padded. An all-zero row gets
      no reward at all.
    beta: KL coefficient (a Python float or a traced scalar, e.g. from the adaptive controller).

  Returns:
    (rewards_bt, kl_bt), both zero outside the mask.
  """
  mask_bt = _f32(mask_bt)
  kl_bt = (_f32(logp_bt) - _f32(ref_logp_bt)) * mask_bt
  last_b = transformer.last_token_index(mask_bt)  # -1 for an empty row, which matches no position below
  at_last_bt = jnp.arange(mask_bt.shape[1])[None, :] == last_b[:, None]
  rewards_bt = -_f32(beta) * kl_bt + jnp.where(at_last_bt, _f32(score_b)[:, None], 0.0)
  return rewards_bt, kl_bt


def check_whitenable(n: int, *, min_elements: int = 8) -> None:
  """Raises ValueError when a whitening batch of n elements is too small for a meaningful mean and variance.

  Call it outside jit on the static count (e.g. minibatch_size * response_length for per-minibatch advantage
  whitening). With fewer than ~8 elements the variance estimate is so noisy that whitening mostly injects
  noise (and with 1 element it divides by ~sqrt(1e-8)); arXiv 2403.17031 asserts on the same thing.
  """
  n = int(n)
  if n < min_elements:
    raise ValueError(
        f"whitening needs at least {min_elements} elements, got {n}; raise the minibatch size "
        "(ppo.minibatch_size) or turn whitening off")


def whiten(
    x: jax.Array, mask: jax.Array | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
  """Masked whitening  (x - mean) / sqrt(var + eps), statistics over masked entries only.

  The variance is the biased one (divide by n), as in lm-human-preferences. shift_mean=False adds the mean
  back: the scale is normalised but the sign of the rewards is kept (reward whitening "without mean shift",
  arXiv 2403.17031). Entries outside the mask are set to 0. An empty mask returns zeros, not NaN.
  """
  x = _f32(x)
  mask = jnp.ones_like(x) if mask is None else _f32(mask)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, 0.0)


def _gae_step(carry, xs, *, gamma, lam):
  """One reverse step of GAE. carry = (value, advantage) of the next real token, (0, 0) after the last."""
  next_value, next_adv = carry
  reward_b, value_b, mask_b = xs
  delta_b = reward_b + gamma * next_value - value_b
  adv_b = delta_b + gamma * lam * next_adv
  real_b = mask_b > 0
  # Positions outside the mask are not part of the episode: the carry passes through them unchanged.
  new_carry = (jnp.where(real_b, value_b, next_value), jnp.where(real_b, adv_b, next_adv))
  return new_carry, jnp.where(real_b, adv_b, 0.0)


def compute_gae(
    rewards_bt: jax.Array,
    values_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. arXiv 1506.02438, eq. 16) over masked tokens.

      delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = sum_{l >= 0} (gamma * lam)^l delta_{t+l}

  computed with a reverse `lax.scan` over time. The episode is the masked tokens of a row in order; the value
  after its last token is 0 (the episode ends there, no bootstrap). Unmasked positions are skipped, so
  left offsets (prompt tokens) and right padding are both handled, and their values never leak in.

  Args:
    rewards_bt: [b, t] per-token rewards (e.g. from `kl_penalized_rewards`).
    values_bt: [b, t] value estimates V(s_t).
    mask_bt: [b, t] 1 on the episode's tokens.
    gamma: discount (1 in InstructGPT / lm-human-preferences).
    lam: GAE lambda (0.95).

  Returns:
    (advantages_bt, returns_bt) with returns = advantages + values; both 0 outside the mask.
  """
  rewards_tb, values_tb, mask_tb = (_f32(a).T for a in (rewards_bt, values_bt, mask_bt))
  zeros_b = jnp.zeros(rewards_tb.shape[1], _F32)

  def step(carry, xs):
    return _gae_step(carry, xs, gamma=_f32(gamma), lam=_f32(lam))

  _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (rewards_tb, values_tb, mask_tb), reverse=True)
  advantages_bt = adv_tb.T
  returns_bt = jnp.where(_f32(mask_bt) > 0, advantages_bt + _f32(values_bt), 0.0)
  return advantages_bt, returns_bt


# ----------------------------------------------------------------------------------------------------------
# Policy and value losses.


AGGREGATIONS = ("token", "sequence", "constant")


def aggregate(x_bt: jax.Array, mask_bt: jax.Array, how: str = "token") -> jax.Array:
  """A per-token loss reduced to a scalar: "token" the mean over every response token of the batch (PPO);
  "sequence" the mean over responses of each response's token mean (GRPO, DeepSeekMath eq. 3); "constant" the
  mean over responses of each response's token sum divided by the token budget t (Dr. GRPO, arXiv 2503.20783,
  which removes GRPO's length normalisation)."""
  if how == "token":
    return masked_mean(x_bt, mask_bt)
  mask_bt = _f32(mask_bt)
  sum_b = jnp.sum(_f32(x_bt) * mask_bt, axis=1)
  if how == "sequence":
    return jnp.mean(sum_b / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0))
  if how == "constant":
    return jnp.mean(sum_b / x_bt.shape[1])
  raise ValueError(f"aggregation={how!r}: expected one of {AGGREGATIONS}")


def ppo_policy_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    clip_eps: float | jax.Array,
    aggregation: str = "token",
) -> tuple[jax.Array, Metrics]:
  """PPO clipped surrogate (Schulman et al. arXiv 1707.06347, eq. 7), as a loss to minimise.

      ratio_t = exp(logp_t - old_logp_t)
      loss = aggregate( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) )

  Args:
    logp_bt: [b, t] log-probs under the current policy (differentiated).
    old_logp_bt: [b, t] log-probs recorded at rollout time (constants).
    advantages_bt: [b, t] advantages (constants; usually whitened per minibatch).
    mask_bt: [b, t] response tokens.
    clip_eps: clipping range eps (0.2).
    aggregation: how token terms become the loss (`aggregate`): "token" (PPO), "sequence" (GRPO), "constant"
      (Dr. GRPO).

  Returns:
    (loss, metrics). metrics:
      clip_frac: fraction of tokens where the clipped term is the active (larger) one.
      approx_kl: masked mean of 0.5 * (logp - old_logp)^2, the estimator of lm-human-preferences and TRL.
      approx_kl_k3: masked mean of (ratio - 1) - log ratio, Schulman's unbiased, always >= 0 "k3" estimator
        of KL(old || new) from samples of the old policy.
      ratio_mean: masked mean of the ratio (exactly 1 on the first minibatch of an epoch without dropout).
  """
  log_ratio_bt = _f32(logp_bt) - jax.lax.stop_gradient(_f32(old_logp_bt))
  ratio_bt = jnp.exp(log_ratio_bt)
  adv_bt = jax.lax.stop_gradient(_f32(advantages_bt))
  pg_unclipped_bt = -adv_bt * ratio_bt
  pg_clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(pg_unclipped_bt, pg_clipped_bt), mask_bt, aggregation)
  log_ratio_bt = jax.lax.stop_gradient(log_ratio_bt)
  ratio_bt = jax.lax.stop_gradient(ratio_bt)
  metrics = {
      "policy_loss": loss,
      "clip_frac": masked_mean(pg_clipped_bt > pg_unclipped_bt, mask_bt),
      "approx_kl": masked_mean(0.5 * jnp.square(log_ratio_bt), mask_bt),
      "approx_kl_k3": masked_mean((ratio_bt - 1.0) - log_ratio_bt, mask_bt),
      "ratio_mean": masked_mean(ratio_bt, mask_bt),
  }
  return loss, metrics


def ppo_value_loss(
    values_bt: jax.Array,
    old_values_bt: jax.Array,
    returns_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    clip_eps: float | jax.Array,
) -> tuple[jax.Array, Metrics]:
  """Clipped value loss of lm-human-preferences / OpenAI baselines PPO2.

      v_clip = old_v + clip(v - old_v, -eps, eps)
      loss = 0.5 * masked_mean( max((v - R)^2, (v_clip - R)^2) )

  Args:
    values_bt: [b, t] current value estimates (differentiated).
    old_values_bt: [b, t] values recorded at rollout time.
    returns_bt: [b, t] GAE returns (constants).
    mask_bt: [b, t] response tokens.
    clip_eps: value clipping range (0.2 in lm-human-preferences; on the scale of the returns).

  Returns:
    (loss, metrics) with vf_clip_frac, the fraction of tokens where the clipped error is the larger one.
  """
  values_bt = _f32(values_bt)
  old_values_bt = jax.lax.stop_gradient(_f32(old_values_bt))
  returns_bt = jax.lax.stop_gradient(_f32(returns_bt))
  v_clipped_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip_eps, clip_eps)
  err_bt = jnp.square(values_bt - returns_bt)
  err_clipped_bt = jnp.square(v_clipped_bt - returns_bt)
  loss = 0.5 * masked_mean(jnp.maximum(err_bt, err_clipped_bt), mask_bt)
  metrics = {
      "value_loss": loss,
      "vf_clip_frac": masked_mean(err_clipped_bt > err_bt, mask_bt),
  }
  return loss, metrics


def a2c_policy_loss(
    logp_bt: jax.Array, advantages_bt: jax.Array, mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
  """Advantage actor-critic policy loss  -masked_mean(logp_t * stop_gradient(A_t)).

  The on-policy alternative to PPO used by DeepMind for Gopher/Sparrow: one gradient step per rollout, no
  ratio and no clipping.
  """
  adv_bt = jax.lax.stop_gradient(_f32(advantages_bt))
  loss = -masked_mean(_f32(logp_bt) * adv_bt, mask_bt)
  return loss, {"policy_loss": loss}


def a2c_value_loss(
    values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array
) -> tuple[jax.Array, Metrics]:
  """Unclipped value loss  0.5 * masked_mean((v - R)^2)."""
  err_bt = jnp.square(_f32(values_bt) - jax.lax.stop_gradient(_f32(returns_bt)))
  loss = 0.5 * masked_mean(err_bt, mask_bt)
  return loss, {"value_loss": loss}


# ----------------------------------------------------------------------------------------------------------
# Critic-free advantages from groups of samples of one prompt (GRPO, RLOO) and the k3 KL term.


def _groups(x_b: jax.Array, group_size: int) -> jax.Array:
  if group_size < 2 or x_b.shape[0] % group_size:
    raise ValueError(f"group_size={group_size}: expected at least 2 samples per prompt, dividing the batch of "
                     f"{x_b.shape[0]}")
  return _f32(x_b).reshape(-1, group_size)


def group_advantages(score_b: jax.Array, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
  """GRPO's outcome advantages (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2): rows [g * G, (g + 1) * G) are the G
  samples of one prompt, and A_i = (r_i - mean_g) / (std_g + eps) with the sample standard deviation (TRL's and
  DeepSeekMath's); scale=False drops the division (Dr. GRPO). Returns [b]."""
  r_gk = _groups(score_b, group_size)
  centred_gk = r_gk - jnp.mean(r_gk, axis=1, keepdims=True)
  if scale:
    centred_gk = centred_gk / (jnp.std(r_gk, axis=1, keepdims=True, ddof=1) + eps)
  return centred_gk.reshape(-1)


def leave_one_out_advantages(score_b: jax.Array, group_size: int) -> jax.Array:
  """RLOO (Ahmadian et al., arXiv 2402.14740, eq. 5): A_i = r_i - 1/(k-1) sum_{j != i} r_j over the k samples of
  one prompt (rows grouped as in `group_advantages`). Returns [b]."""
  r_gk = _groups(score_b, group_size)
  k = group_size
  return (r_gk - (jnp.sum(r_gk, axis=1, keepdims=True) - r_gk) / (k - 1)).reshape(-1)


def k3_kl(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
  """Per-token k3 estimator of KL(pi || ref) from samples of pi (Schulman's; DeepSeekMath eq. 4):
  exp(ref - logp) - (ref - logp) - 1 >= 0, differentiable in logp. [b, t]."""
  diff_bt = jax.lax.stop_gradient(_f32(ref_logp_bt)) - _f32(logp_bt)
  return jnp.exp(diff_bt) - diff_bt - 1.0


def entropy_from_logits(logits_btv: jax.Array, mask_bt: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Masked mean over tokens of the entropy  -sum_v p_v log p_v  of softmax(logits / temperature)."""
  logp_btv = jax.nn.log_softmax(_f32(logits_btv) / temperature, axis=-1)
  entropy_bt = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
  return masked_mean(entropy_bt, mask_bt)


# ----------------------------------------------------------------------------------------------------------
# KL control and diagnostics.


class KLControllerState(NamedTuple):
  """State of the KL coefficient. A fixed-beta run keeps it constant by never calling update_kl_controller."""

  beta: jax.Array | float


def update_kl_controller(
    beta: jax.Array | float,
    kl: jax.Array | float,
    n_steps: jax.Array | int,
    *,
    target: float,
    horizon: float,
) -> jax.Array:
  """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2; lm-human-preferences AdaptiveKLController).

      e = clip((KL - target) / target, -0.2, 0.2)
      beta <- beta * (1 + e * n_steps / horizon)

  Args:
    beta: current coefficient.
    kl: measured KL of the last batch (mean over episodes of the summed per-token KL, in nats).
    n_steps: episodes in that batch.
    target: KL target in nats (6 in the paper).
    horizon: episodes over which beta can change by ~exp(0.2) at most (10,000 in the paper).
  """
  e = jnp.clip((_f32(kl) - target) / target, -0.2, 0.2)
  return _f32(beta) * (1.0 + e * _f32(n_steps) / horizon)


def explained_variance(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """1 - Var[target - pred] / Var[target] over masked entries (1 is perfect, 0 is no better than a constant).

  Returns 0 (not NaN) when the target has zero variance or the mask is empty.
  """
  pred, target = _f32(pred), _f32(target)
  mask = jnp.ones_like(target) if mask is None else _f32(mask)

  def var(x):
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)

  var_target = var(target)
  ev = 1.0 - var(target - pred) / jnp.where(var_target > 0, var_target, 1.0)
  return jnp.where(var_target > 0, ev, 0.0)


def best_of_n_kl(n: int | float | jax.Array) -> jax.Array | float:
  """KL(best-of-n || base) = log n - (n - 1) / n  (Stiennon et al. arXiv 2009.01325; Hilton).

  Exact when the score is continuous with no ties; for a discrete base policy it is an upper bound (Beirami et
  al. arXiv 2401.01879), approached as every output's probability goes to 0."""
  if isinstance(n, (int, float)):
    return math.log(n) - (n - 1) / n
  n = _f32(n)
  return jnp.log(n) - (n - 1.0) / n
