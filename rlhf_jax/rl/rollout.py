"""The RL rollout shared by every RL algorithm: sample responses, score them, recompute log-probs and values.

One jitted function per iteration (`make_rollout`): left-padded prompts are sampled with the KV cache at the
RL temperature; the reward model scores each response at its last real token (a response that never emits EOS
gets `no_eos_penalty` instead); the policy's and the frozen reference's log-probs are recomputed by a full
forward pass at the sampling temperature (RLHF_NOTES PPO 4 and 5); the value model estimates each state; then
the per-token rewards (-beta * KL + the score at the last token) and advantages come from
`rewards_and_advantages` (whitening without mean shift, GAE).

Shapes: b episodes, p prompt length, n response length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import losses, sampling
from rlhf_jax.models import heads, lora, transformer

Params = dict[str, Any]


class Rollout(NamedTuple):
  """One batch of episodes; every array has the batch on its leading axis (b episodes, p prompt, n response)."""

  prompt_bp: jax.Array
  prompt_mask_bp: jax.Array
  response_bn: jax.Array
  response_mask_bn: jax.Array
  old_logp_bn: jax.Array
  ref_logp_bn: jax.Array
  old_values_bn: jax.Array
  rewards_bn: jax.Array
  advantages_bn: jax.Array
  returns_bn: jax.Array


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """The static hyperparameters of the jitted functions (from config.ppo)."""

  sampling: sampling.SamplingConfig
  eos_id: int
  pad_id: int
  no_eos_penalty: float
  whiten_rewards: bool
  gamma: float
  lam: float
  clip_eps: float
  vf_clip_eps: float
  vf_coef: float
  entropy_coef: float
  ptx_coef: float
  epochs: int
  n_minibatches: int
  algorithm: str
  min_whiten: int
  inject_nan_at_step: int = -1  # plants a NaN in the advantages at this iteration (tests the guard)
  skip_nonfinite: bool = False  # a non-finite iteration keeps the old policy and value (else the stage stops)
  group_size: int = 1  # samples per prompt, consecutive rows of the batch (GRPO's G, RLOO's k)
  kl_in_loss: bool = False  # the KL is a k3 loss term (GRPO) instead of a per-token penalty in the reward
  scale_rewards: bool = True  # GRPO divides by the group's std; False is Dr. GRPO
  aggregation: str = "token"  # how the policy loss reduces its tokens (losses.aggregate)
  # "recompute": the old log-probs are a forward pass of the policy over the rollout; "sampler": the sampler's
  # own (the same function of the same weights, one pass fewer; they differ by float32 rounding only).
  old_logp: str = "recompute"
  # LoRA (ppo.lora): the trained policy is adapters on a frozen base and the value model adapters plus a head on
  # a frozen backbone (`with_frozen`); None trains every weight.
  lora: lora.LoraConfig | None = None

  @property
  def uses_critic(self) -> bool:
    """PPO and A2C learn a value model; GRPO and RLOO take their baselines from the other samples of a prompt."""
    return self.algorithm in ("ppo", "a2c")


def with_frozen(trainable: Params, frozen: Params | None, lcfg: lora.LoraConfig | None, *,
                attach: bool = False) -> Params:
  """The full policy (and value) parameters of the trained ones: `trainable` itself without LoRA (frozen None);
  with it, {"policy": adapters, "value": {"adapters", "head"}} merged into the frozen {"policy": base, "value":
  backbone} inside the jitted caller, so the gradient reaches the adapters and the value head only. attach: the
  adapters beside the base weights instead (lora.attach: no merged weights or their gradient), what the rollout
  and the learner pass; sampling.generate merges attached adapters per layer before decoding."""
  if frozen is None:
    return trainable
  combine = lora.attach if attach else lora.merge
  out = {"policy": combine(frozen["policy"], trainable["policy"], lcfg)}
  if trainable.get("value") is not None:
    out["value"] = {"backbone": combine(frozen["value"], trainable["value"]["adapters"], lcfg),
                    "head": trainable["value"]["head"]}
  return out


def policy_logprobs(params, rollout_like, cfg, temperature: float, *, with_entropy: bool = False):
  """log pi(response token) at the sampling temperature [b, n] (and the mean entropy over the response)."""
  h_bnd = transformer.response_hidden(params, rollout_like.prompt_bp, rollout_like.prompt_mask_bp,
                                      rollout_like.response_bn, rollout_like.response_mask_bn, cfg)
  logits_bnv = transformer.unembed(params, h_bnd, cfg)
  logp_bn = transformer.token_logprobs(logits_bnv, rollout_like.response_bn, temperature)
  logp_bn = jnp.where(rollout_like.response_mask_bn, logp_bn, 0.0)
  if not with_entropy:
    return logp_bn
  entropy = losses.entropy_from_logits(logits_bnv, rollout_like.response_mask_bn, temperature=temperature)
  return logp_bn, entropy


def value_estimates(value_params, rollout_like, cfg):
  """V(state before each response token) [b, n] of the value model (rlhf_jax.models.heads.value_estimates)."""
  return heads.value_estimates(value_params, rollout_like.prompt_bp, rollout_like.prompt_mask_bp,
                               rollout_like.response_bn, rollout_like.response_mask_bn, cfg)


def rewards_and_advantages(score_b, old_logp_bn, ref_logp_bn, values_bn, mask_bn, beta, s: PPOSettings):
  """Per-token rewards (KL penalty + score at the last real token) and advantages; (rewards, kl, advantages,
  returns), each [b, n].

  PPO and A2C: the rewards, optionally whitened without mean shift, then GAE with the value model's estimates.
  GRPO and RLOO: one sequence reward per response (the score, minus beta times its summed KL unless the KL is a
  loss term), its advantage against the other samples of the same prompt (group-normalised, or leave-one-out)
  given to every token of the response; no returns (there is no critic)."""
  rewards_bn, kl_bn = losses.kl_penalized_rewards(score_b, old_logp_bn, ref_logp_bn, mask_bn, beta=beta)
  if not s.uses_critic:
    seq_b = score_b if s.kl_in_loss else score_b - beta * kl_bn.sum(axis=1)
    if s.algorithm == "grpo":
      adv_b = losses.group_advantages(seq_b, s.group_size, scale=s.scale_rewards)
    else:
      adv_b = losses.leave_one_out_advantages(seq_b, s.group_size)
    advantages_bn = jnp.where(mask_bn, adv_b[:, None], 0.0)
    return rewards_bn, kl_bn, advantages_bn, jnp.zeros_like(advantages_bn)
  if s.whiten_rewards:
    rewards_bn = losses.whiten(rewards_bn, mask_bn, shift_mean=False)
  advantages_bn, returns_bn = losses.compute_gae(rewards_bn, values_bn, mask_bn, gamma=s.gamma, lam=s.lam)
  return rewards_bn, kl_bn, advantages_bn, returns_bn


def make_rollout(policy_cfg, rm_cfg, s: PPOSettings):
  """rollout(policy, value, ref, rm, prompts, prompt_mask, rng, beta, frozen=None) -> (Rollout, scores, stats);
  `value` is None for the critic-free algorithms. With LoRA (s.lora), `policy` and `value` are the trained
  adapters (and head) and `frozen` the base weights they adapt (`with_frozen`)."""

  def rollout_fn(policy, value, ref, rm, prompt_bp, prompt_mask_bp, rng, beta, frozen=None):
    if frozen is not None:
      # Adapters attached (lora.attach), as the learner's: the sampler merges them layer by layer as it unstacks
      # the weights for decoding (transformer.unstack_layers), and the passes below add x @ A @ B, so no stacked
      # merged model is ever formed and the old log-probs are the learner's own function.
      full = with_frozen({"policy": policy, "value": value}, frozen, s.lora, attach=True)
      policy, value = full["policy"], full.get("value")
    out = sampling.generate(policy, prompt_bp, prompt_mask_bp, rng, policy_cfg, s.sampling, eos_id=s.eos_id,
                            pad_id=s.pad_id)
    temp = s.sampling.logprob_temperature
    partial = Rollout(prompt_bp, prompt_mask_bp, out.tokens_bn, out.mask_bn, *([None] * 6))
    if s.old_logp == "sampler":
      old_logp_bn = out.logprobs_bn  # 0 where the mask is, as policy_logprobs
    else:
      old_logp_bn = policy_logprobs(policy, partial, policy_cfg, temp)
    ref_logp_bn = policy_logprobs(ref, partial, policy_cfg, temp)
    values_bn = value_estimates(value, partial, policy_cfg) if s.uses_critic else jnp.zeros_like(old_logp_bn)
    rm_b = heads.response_scores(rm, prompt_bp, prompt_mask_bp, out.tokens_bn, out.mask_bn, rm_cfg)
    score_b = jnp.where(out.ended_b, rm_b, s.no_eos_penalty)  # a response that never stops gets a fixed score
    rewards_bn, kl_bn, advantages_bn, returns_bn = rewards_and_advantages(
        score_b, old_logp_bn, ref_logp_bn, values_bn, out.mask_bn, beta, s)
    ro = Rollout(prompt_bp, prompt_mask_bp, out.tokens_bn, out.mask_bn, old_logp_bn, ref_logp_bn, values_bn,
                 rewards_bn, advantages_bn, returns_bn)
    kl_b = kl_bn.sum(axis=1)
    stats = {
        "kl_seq": kl_b.mean(),  # nats per sequence: what the KL target refers to
        "kl_token": losses.masked_mean(kl_bn, out.mask_bn),
        "rm_score": rm_b.mean(),
        "score": score_b.mean(),
        "ended_frac": out.ended_b.mean(),
        "response_len": out.lengths_b.mean(),
    }
    if s.old_logp == "recompute":  # with "sampler" the update measures it (first_logratio_absmax)
      stats["sampler_logp_maxdiff"] = jnp.max(jnp.abs(jnp.where(out.mask_bn, out.logprobs_bn - old_logp_bn, 0.0)))
    return ro, rm_b, stats

  return rollout_fn
