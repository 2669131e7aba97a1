"""One PPO iteration of the InstructGPT recipe, split into timed phases, for the benchmarks.

It composes the same functions rlhf_jax.ppo uses: `sampling.generate` for the rollout, `model.backbone` with
`model.scalar_head` for the reward and value models, `sampling.sequence_logprobs` for the reference policy,
`losses.kl_penalized_rewards`, `losses.compute_gae`, `losses.whiten`, `losses.ppo_policy_loss` and
`losses.ppo_value_loss` for the update. The phase functions live here, in one place, so they can be swapped
for the PPO stage's own once it exists without touching the timing code.

The four parameter sets are separate pytrees, as in a real run: the policy and its frozen reference copy (both
from the SFT model), the value model (backbone plus a zero-initialised head, trained with the policy) and
the reward model (backbone plus head, frozen).

Phases (each ends with `block_until_ready`, so its time is its own):
  rollout    B prompts -> N sampled tokens with the KV cache; the sampler's log-probs are the old log-probs.
  score      reward model at the last real token; a fixed penalty for responses that never emitted EOS.
  reference  reference-policy log-probs of the sampled tokens (one full forward pass).
  value      value-model estimates of every response position (one full forward pass).
  advantage  KL-penalised per-token rewards, then GAE (a reverse scan).
  update     E epochs x M minibatches of the clipped policy + value loss, one Adam step per minibatch,
             the whole loop one jitted call (scans over epochs and minibatches).

TRL's PPOTrainer (the peer in bench/peers.py) does the same work in the same order with the same settings:
policy log-probs taken from the sampler, no extra policy pass.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, model, sampling

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """Static settings of one iteration; the hyperparameters are TRL's PPOConfig defaults unless noted."""

  batch: int = 64
  prompt_len: int = 64
  response_len: int = 64
  epochs: int = 4
  minibatches: int = 4
  temperature: float = 1.0
  kl_coef: float = 0.05
  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  vf_clip_eps: float = 0.2
  vf_coef: float = 0.1
  lr: float = 3e-6
  missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS (RLHF_NOTES PPO 7)
  eos_id: int = 2
  pad_id: int = 0

  def __post_init__(self):
    if self.batch % self.minibatches:
      raise ValueError(f"ppo batch {self.batch} must be a multiple of minibatches {self.minibatches}")
    losses.check_whitenable(self.batch // self.minibatches * self.response_len)


def init_models(rng: jax.Array, model_cfg: model.ModelConfig) -> dict[str, Params]:
  """The four parameter sets. The reference is a real copy (its own buffers), as after loading SFT twice."""
  k_policy, k_value, k_reward, k_head = jax.random.split(rng, 4)
  policy = model.init(k_policy, model_cfg)
  reference = jax.tree.map(lambda x: jnp.array(x, copy=True), policy)
  value = {"backbone": model.init(k_value, model_cfg), "head": model.init_scalar_head(k_value, model_cfg, zero=True)}
  reward = {"backbone": model.init(k_reward, model_cfg), "head": model.init_scalar_head(k_head, model_cfg)}
  return {"policy": policy, "reference": reference, "value": value, "reward": reward}


def param_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_optimizer(s: PPOSettings) -> optax.GradientTransformation:
  # One Adam over policy and value together, like TRL's PolicyAndValueWrapper (torch AdamW, no weight decay).
  return optax.adamw(s.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------------------
# Phase functions. Shapes: b batch, p prompt length, n response length, s = p + n.


def _sequence(prompt_bp, prompt_mask_bp, response_bn, response_mask_bn):
  return (jnp.concatenate([prompt_bp, response_bn], axis=1),
          jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1))


@functools.partial(jax.jit, static_argnames=("model_cfg", "s"))
def score(reward: Params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, ended_b, *,
          model_cfg: model.ModelConfig, s: PPOSettings) -> jax.Array:
  """Reward-model score [b] read at the last real token; responses that never stopped are penalised."""
  tokens_bs, mask_bs = _sequence(prompt_bp, prompt_mask_bp, response_bn, response_mask_bn)
  h_bsd, _ = model.backbone(reward["backbone"], tokens_bs, model_cfg, mask_bt=mask_bs)
  last_b = model.last_token_index(mask_bs)
  h_bd = jnp.take_along_axis(h_bsd, last_b[:, None, None], axis=1)[:, 0]
  score_b = model.scalar_head(reward["head"], h_bd[:, None])[:, 0]
  return jnp.where(ended_b, score_b, score_b - s.missing_eos_penalty)


def reference_logprobs(reference: Params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, *,
                       model_cfg: model.ModelConfig, s: PPOSettings) -> jax.Array:
  return sampling.sequence_logprobs(reference, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn,
                                    model_cfg, temperature=s.temperature)


def _values(value: Params, tokens_bs, mask_bs, p: int, n: int, model_cfg) -> jax.Array:
  """V before each response token: the value head at positions p - 1 ... p + n - 2."""
  h_bsd, _ = model.backbone(value["backbone"], tokens_bs, model_cfg, mask_bt=mask_bs)
  return model.scalar_head(value["head"], h_bsd[:, p - 1:p - 1 + n])


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def values(value: Params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, *,
           model_cfg: model.ModelConfig) -> jax.Array:
  tokens_bs, mask_bs = _sequence(prompt_bp, prompt_mask_bp, response_bn, response_mask_bn)
  v_bn = _values(value, tokens_bs, mask_bs, prompt_bp.shape[1], response_bn.shape[1], model_cfg)
  return jnp.where(response_mask_bn, v_bn, 0.0)


@functools.partial(jax.jit, static_argnames=("s",))
def advantages(score_b, logp_bn, ref_logp_bn, values_bn, mask_bn, *, s: PPOSettings):
  """(advantages, returns, mean KL per episode)."""
  rewards_bn, kl_bn = losses.kl_penalized_rewards(score_b, logp_bn, ref_logp_bn, mask_bn, beta=s.kl_coef)
  adv_bn, ret_bn = losses.compute_gae(rewards_bn, values_bn, mask_bn, gamma=s.gamma, lam=s.lam)
  return adv_bn, ret_bn, kl_bn.sum(axis=1).mean()


def ppo_loss(trainable: Params, mb: dict[str, jax.Array], *, model_cfg, s: PPOSettings):
  """Clipped policy loss + vf_coef * clipped value loss on one minibatch; advantages whitened per minibatch."""
  tokens_bs, mask_bs = _sequence(mb["prompt"], mb["prompt_mask"], mb["response"], mb["response_mask"])
  p, n = mb["prompt"].shape[1], mb["response"].shape[1]
  h_bsd, _ = model.backbone(trainable["policy"], tokens_bs, model_cfg, mask_bt=mask_bs)
  logits_bnv = model.unembed(trainable["policy"], h_bsd[:, p - 1:p - 1 + n], model_cfg)
  logp_bn = model.token_logprobs(logits_bnv, mb["response"], s.temperature)
  v_bn = _values(trainable["value"], tokens_bs, mask_bs, p, n, model_cfg)
  adv_bn = losses.whiten(mb["advantages"], mb["response_mask"])
  pg_loss, pg_metrics = losses.ppo_policy_loss(logp_bn, mb["old_logp"], adv_bn, mb["response_mask"],
                                               clip_eps=s.clip_eps)
  vf_loss, vf_metrics = losses.ppo_value_loss(v_bn, mb["old_values"], mb["returns"], mb["response_mask"],
                                              clip_eps=s.vf_clip_eps)
  return pg_loss + s.vf_coef * vf_loss, {**pg_metrics, **vf_metrics}


def ppo_minibatch_step(carry, mb, *, optimizer, model_cfg, s: PPOSettings):
  trainable, opt_state = carry
  (_, metrics), grads = jax.value_and_grad(ppo_loss, has_aux=True)(trainable, mb, model_cfg=model_cfg, s=s)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return (optax.apply_updates(trainable, updates), opt_state), metrics


def ppo_epoch(carry, rng, *, rollout, optimizer, model_cfg, s: PPOSettings):
  """One pass over the rollout in a fresh random order, M minibatches (a scan)."""
  perm_b = jax.random.permutation(rng, s.batch)
  mbs = jax.tree.map(lambda x: x[perm_b].reshape(s.minibatches, s.batch // s.minibatches, *x.shape[1:]), rollout)
  step = functools.partial(ppo_minibatch_step, optimizer=optimizer, model_cfg=model_cfg, s=s)
  return jax.lax.scan(step, carry, mbs)


@functools.partial(jax.jit, static_argnames=("optimizer", "model_cfg", "s"), donate_argnums=(0, 1))
def ppo_update(trainable, opt_state, rollout, rng, *, optimizer, model_cfg, s: PPOSettings):
  """E epochs (a scan) of `ppo_epoch`; returns the new trainable parameters, optimizer state and metrics."""
  epoch = functools.partial(ppo_epoch, rollout=rollout, optimizer=optimizer, model_cfg=model_cfg, s=s)
  (trainable, opt_state), metrics = jax.lax.scan(epoch, (trainable, opt_state), jax.random.split(rng, s.epochs))
  return trainable, opt_state, jax.tree.map(jnp.mean, metrics)


# ----------------------------------------------------------------------------------------------------------
# The iteration, timed phase by phase.


class Iteration:
  """Holds the four models and the optimizer state; `run(rng)` does one timed PPO iteration."""

  def __init__(self, model_cfg: model.ModelConfig, s: PPOSettings, seed: int = 0):
    self.model_cfg, self.s = model_cfg, s
    rng = jax.random.PRNGKey(seed)
    models = init_models(rng, model_cfg)
    self.reference, self.reward = models["reference"], models["reward"]
    self.trainable = {"policy": models["policy"], "value": models["value"]}
    self.optimizer = make_optimizer(s)
    self.opt_state = self.optimizer.init(self.trainable)
    # Full-length prompts of ordinary tokens (ids above the specials), no padding: TRL gets the same ones.
    prompts = np.random.default_rng(seed).integers(6, model_cfg.vocab_size, (s.batch, s.prompt_len))
    self.prompt_bp = jnp.asarray(prompts, jnp.int32)
    self.prompt_mask_bp = jnp.ones((s.batch, s.prompt_len), jnp.bool_)
    self.sampling_cfg = sampling.SamplingConfig(max_new_tokens=s.response_len, temperature=s.temperature)

  def param_bytes(self) -> dict[str, int]:
    return {"policy": param_bytes(self.trainable["policy"]), "reference": param_bytes(self.reference),
            "value": param_bytes(self.trainable["value"]), "reward": param_bytes(self.reward),
            "optimizer_state": param_bytes(self.opt_state)}

  def run(self, rng: jax.Array) -> tuple[dict[str, float], dict[str, float]]:
    """One iteration; returns (seconds per phase, a few metrics)."""
    s, cfg = self.s, self.model_cfg
    times: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      times[name] = time.perf_counter() - t0
      return out

    rollout_rng, update_rng = jax.random.split(rng)
    sample = timed("rollout", sampling.generate, self.trainable["policy"], self.prompt_bp, self.prompt_mask_bp,
                   rollout_rng, cfg, self.sampling_cfg, eos_id=s.eos_id, pad_id=s.pad_id)
    seq = (self.prompt_bp, self.prompt_mask_bp, sample.tokens_bn, sample.mask_bn)
    score_b = timed("score", score, self.reward, *seq, sample.ended_b, model_cfg=cfg, s=s)
    ref_logp_bn = timed("reference", reference_logprobs, self.reference, *seq, model_cfg=cfg, s=s)
    values_bn = timed("value", values, self.trainable["value"], *seq, model_cfg=cfg)
    adv_bn, ret_bn, kl = timed("advantage", advantages, score_b, sample.logprobs_bn, ref_logp_bn, values_bn,
                               sample.mask_bn, s=s)
    rollout = {"prompt": self.prompt_bp, "prompt_mask": self.prompt_mask_bp, "response": sample.tokens_bn,
               "response_mask": sample.mask_bn, "old_logp": sample.logprobs_bn, "old_values": values_bn,
               "advantages": adv_bn, "returns": ret_bn}
    self.trainable, self.opt_state, metrics = timed(
        "update", ppo_update, self.trainable, self.opt_state, rollout, update_rng, optimizer=self.optimizer,
        model_cfg=cfg, s=s)
    times["total"] = sum(times.values())
    info = {"kl": float(kl), "mean_response_len": float(sample.lengths_b.mean()),
            "ratio_mean": float(metrics["ratio_mean"]), "policy_loss": float(metrics["policy_loss"])}
    return times, info
