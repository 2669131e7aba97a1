"""The RL update: epochs x shuffled minibatches inside one jit (a `lax.scan` over epochs of a `lax.scan` over
minibatches), the losses chosen by `PPOSettings.algorithm` from one table.

"ppo": clipped policy loss on per-minibatch-whitened advantages and a clipped value loss (InstructGPT,
lm-human-preferences); "a2c": the same objective without clipping, one pass (DeepMind's choice for Gopher);
"grpo": the clipped loss on group-normalised advantages, each response's tokens averaged before the responses
(DeepSeekMath; Dr. GRPO sums them over a constant budget), no critic, and the KL to the reference as a k3 loss
term when `kl_in_loss`; "rloo": the clipped loss on leave-one-out advantages, no critic. All add an optional
entropy bonus and, for PPO-ptx, gamma * the next-token loss on pretraining text.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, optim
from rlhf_jax.rl.rollout import PPOSettings, Rollout, policy_logprobs, value_estimates, with_frozen

Params = dict[str, Any]

def _clipped(logp, mb, adv, s):
  return losses.ppo_policy_loss(logp, mb.old_logp_bn, adv, mb.response_mask_bn, clip_eps=s.clip_eps,
                                aggregation=s.aggregation)


# algorithm -> (policy loss, value loss or None for critic-free ones): what differs between the algorithms.
ALGORITHMS = {
    "ppo": (_clipped,
            lambda values, mb, s: losses.ppo_value_loss(values, mb.old_values_bn, mb.returns_bn,
                                                        mb.response_mask_bn, clip_eps=s.vf_clip_eps)),
    "a2c": (lambda logp, mb, adv, s: losses.a2c_policy_loss(logp, adv, mb.response_mask_bn),
            lambda values, mb, s: losses.a2c_value_loss(values, mb.returns_bn, mb.response_mask_bn)),
    "grpo": (_clipped, None),
    "rloo": (_clipped, None),
}


def ppo_loss(trainable: Params, mb: Rollout, ptx_batch, policy_cfg, s: PPOSettings, beta=0.0, frozen=None):
  """Policy (+ value, + entropy, + KL, + ptx) loss of one minibatch, and its metrics. `beta` weighs the k3 KL
  term when the KL is a loss term (s.kl_in_loss). With LoRA, `trainable` holds adapters on the `frozen` base
  weights (rollout.with_frozen)."""
  trainable = with_frozen(trainable, frozen, s.lora, attach=True)
  temp = s.sampling.logprob_temperature
  logp_bn, entropy = policy_logprobs(trainable["policy"], mb, policy_cfg, temp, with_entropy=True)
  policy_loss, value_loss = ALGORITHMS[s.algorithm]
  if value_loss is not None:
    values_bn = value_estimates(trainable["value"], mb, policy_cfg)
    # Whiten advantages per minibatch (RLHF_NOTES PPO 6).
    adv_bn = losses.whiten(mb.advantages_bn, mb.response_mask_bn)
    pg_loss, pg_m = policy_loss(logp_bn, mb, adv_bn, s)
    vf_loss, vf_m = value_loss(values_bn, mb, s)
    loss = pg_loss + s.vf_coef * vf_loss - s.entropy_coef * entropy
    m = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, **pg_m, **vf_m,
         "explained_variance": losses.explained_variance(values_bn, mb.returns_bn, mb.response_mask_bn)}
  else:  # the advantages are already relative to the prompt's other samples
    pg_loss, pg_m = policy_loss(logp_bn, mb, mb.advantages_bn, s)
    loss = pg_loss - s.entropy_coef * entropy
    m = {"policy_loss": pg_loss, "entropy": entropy, **pg_m}
  if s.kl_in_loss:
    kl = losses.aggregate(losses.k3_kl(logp_bn, mb.ref_logp_bn), mb.response_mask_bn, s.aggregation)
    loss = loss + beta * kl
    m["kl_k3"] = kl
  if s.ptx_coef > 0:
    ptx, _ = losses.lm_loss(trainable["policy"], ptx_batch, policy_cfg)
    loss = loss + s.ptx_coef * ptx
    m["ptx_loss"] = ptx
  m["loss"] = loss
  # Before any update (the first minibatch of the first epoch) this is how far the training pass is from the
  # old log-probs: float32 rounding with ppo.old_logp="recompute", the sampler's mismatch with "sampler".
  m["logratio_absmax"] = jnp.max(jnp.abs(jnp.where(mb.response_mask_bn, logp_bn - mb.old_logp_bn, 0.0)))
  return loss, m


def minibatch_step(carry, mb_and_ptx, *, optimizer, policy_cfg, s: PPOSettings, beta=0.0, frozen=None):
  trainable, opt_state = carry
  mb, ptx_batch = mb_and_ptx
  (_, m), grads = jax.value_and_grad(ppo_loss, has_aux=True)(trainable, mb, ptx_batch, policy_cfg, s, beta,
                                                             frozen)
  grads, m["grad_norm"] = optim.settled_gradient(grads)  # no change in value; far fewer live temporaries
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return (optax.apply_updates(trainable, updates), opt_state), m


def ppo_epoch(carry, epoch_rng, *, rollout: Rollout, ptx, optimizer, policy_cfg, s: PPOSettings, beta=0.0,
              frozen=None):
  """One pass over the rollout in shuffled minibatches."""
  b = rollout.prompt_bp.shape[0]
  perm = jax.random.permutation(epoch_rng, b).reshape(s.n_minibatches, b // s.n_minibatches)
  minibatches = jax.tree.map(lambda x: x[perm], rollout)  # [n_minibatches, mb, ...]
  step = functools.partial(minibatch_step, optimizer=optimizer, policy_cfg=policy_cfg, s=s, beta=beta,
                           frozen=frozen)
  carry, m = jax.lax.scan(step, carry, (minibatches, ptx))
  first = m["logratio_absmax"][0]
  m = jax.tree.map(jnp.mean, m)
  m["first_logratio_absmax"] = first
  return carry, m


def make_update(optimizer, policy_cfg, s: PPOSettings):
  """update(state, rollout, ptx_batches, frozen=None) -> (state, metrics); ptx_batches is [n_minibatches, ...] or
  None; frozen: with LoRA (s.lora), the base weights the trained adapters adapt (rollout.with_frozen)."""

  def update_fn(state, rollout: Rollout, ptx, frozen=None):
    rng = jax.random.fold_in(state["rng"], state["step"])
    epoch_rngs = jax.random.split(rng, s.epochs)
    if s.inject_nan_at_step >= 0:
      rollout = rollout._replace(advantages_bn=jnp.where(state["step"] == s.inject_nan_at_step, jnp.nan,
                                                         rollout.advantages_bn))
    epoch = functools.partial(ppo_epoch, rollout=rollout, ptx=ptx, optimizer=optimizer, policy_cfg=policy_cfg, s=s,
                              beta=state.get("kl_beta", 0.0), frozen=frozen)
    (trainable, opt_state), m = jax.lax.scan(epoch, (state["params"], state["opt_state"]), epoch_rngs)
    finite = jnp.all(jnp.isfinite(m["loss"])) & jnp.all(jnp.isfinite(m["grad_norm"]))
    if s.skip_nonfinite:
      trainable = jax.tree.map(lambda a, b: jnp.where(finite, a, b), trainable, state["params"])
      opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state, state["opt_state"])
    first = m["first_logratio_absmax"][0]  # the first epoch's first minibatch: before any update
    m = jax.tree.map(lambda x: x[-1], m)  # metrics of the last epoch
    m["first_logratio_absmax"] = first
    m["finite"] = finite
    return {**state, "params": trainable, "opt_state": opt_state, "step": state["step"] + 1}, m

  return update_fn
