"""One PPO iteration of the PPO stage (rlhf_jax/rl.py), split into timed phases, for the benchmarks.

It calls the stage's own functions, so the benchmark measures the code a run executes: `sampling.generate`
for the rollout, `heads.response_scores` (reward model at the last real token, with its normalisation),
`rl_rollout.policy_logprobs` for the old and reference log-probs, `rl_rollout.value_estimates`,
`rl_rollout.rewards_and_advantages` (KL-penalised rewards and GAE) and `learner.make_update` (epochs x
minibatches in one jit). The stage splits the same work into one jitted rollout and one jitted update; here each
phase is jitted on its own so its time is its own.

The four parameter sets are separate pytrees, as in a real run: the policy and its frozen reference copy (both
from the SFT model), the value model (backbone plus a zero-initialised head, trained with the policy) and
the reward model (backbone plus head, frozen). With LoRA (`lora_cfg`, as the PPO stage's `ppo.lora`) the trained
state is adapters: the policy's on the frozen SFT weights, which are the reference too (no copy), and the value
model's on the reward model's frozen backbone (value_init="rm", shared buffers) with its own head; each phase
attaches the adapters (lora.attach) as the stage does; the sampler merges them layer by layer.

Phases (each ends with `block_until_ready`):
  rollout    B prompts -> N sampled tokens with the KV cache.
  policy     the old log-probs recomputed by a full forward pass at the sampling temperature (the stage does
             this so the first PPO ratio matches the training pass; TRL takes the sampler's log-probs instead,
             so this phase is work TRL does not do).
  score      reward model at the last real token; a fixed score for responses that never emitted EOS.
  reference  reference-policy log-probs of the sampled tokens (one full forward pass).
  value      value-model estimates of every response position (one full forward pass).
  advantage  KL-penalised per-token rewards, then GAE (a reverse scan).
  update     E epochs x M minibatches of the clipped policy + value loss, one Adam step per minibatch.

TRL's PPOTrainer (the peer in bench/peers.py) runs the same settings: batch, lengths, epochs, minibatches.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, sampling
from rlhf_jax.models import heads, lora, transformer
from rlhf_jax.rl import learner
from rlhf_jax.rl import rollout as rl_rollout

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
  no_eos_penalty: float = -1.0  # the score of a response that never emitted EOS (RLHF_NOTES PPO 7)
  eos_id: int = 2
  pad_id: int = 0

  def __post_init__(self):
    if self.batch % self.minibatches:
      raise ValueError(f"ppo batch {self.batch} must be a multiple of minibatches {self.minibatches}")
    losses.check_whitenable(self.batch // self.minibatches * self.response_len)

  def stage_settings(self, lora_cfg: lora.LoraConfig | None = None) -> rl_rollout.PPOSettings:
    """The PPO stage's settings object for these values (reward whitening off, as TRL's default)."""
    return rl_rollout.PPOSettings(lora=lora_cfg,
        sampling=sampling.SamplingConfig(max_new_tokens=self.response_len, temperature=self.temperature),
        eos_id=self.eos_id, pad_id=self.pad_id, no_eos_penalty=self.no_eos_penalty, whiten_rewards=False,
        gamma=self.gamma, lam=self.lam, clip_eps=self.clip_eps, vf_clip_eps=self.vf_clip_eps,
        vf_coef=self.vf_coef, entropy_coef=0.0, ptx_coef=0.0, epochs=self.epochs, n_minibatches=self.minibatches,
        algorithm="ppo", min_whiten=8)


def init_models(rng: jax.Array, model_cfg: transformer.ModelConfig, for_lora: bool = False) -> dict[str, Params]:
  """The four parameter sets. The reference is a real copy (its own buffers), as after loading SFT twice. For
  LoRA (for_lora) the reference is the policy's weights themselves and the value model has no backbone of its
  own (the reward model's is shared), so neither is ever allocated."""
  k_policy, k_value, k_reward = jax.random.split(rng, 3)
  policy = transformer.init(k_policy, model_cfg)
  reference = policy if for_lora else jax.tree.map(lambda x: jnp.array(x, copy=True), policy)
  value = {"head": heads.init_scalar_head(k_value, model_cfg, zero=True)}
  if not for_lora:
    value["backbone"] = transformer.init(k_value, model_cfg)
  return {"policy": policy, "reference": reference, "value": value,
          "reward": heads.init_rm_params(k_reward, model_cfg)}


def param_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_optimizer(s: PPOSettings) -> optax.GradientTransformation:
  # One Adam over policy and value together, like TRL's PolicyAndValueWrapper (torch AdamW, no weight decay).
  return optax.adamw(s.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


class Iteration:
  """Holds the four models and the train state; `run(rng)` does one timed PPO iteration."""

  def __init__(self, model_cfg: transformer.ModelConfig, s: PPOSettings, seed: int = 0,
               lora_cfg: lora.LoraConfig | None = None):
    self.model_cfg, self.s = model_cfg, s
    self.settings = s.stage_settings(lora_cfg)
    rng = jax.random.PRNGKey(seed)
    models = init_models(rng, model_cfg, for_lora=lora_cfg is not None)
    self.reference, self.reward = models["reference"], models["reward"]
    trainable = {"policy": models["policy"], "value": models["value"]}
    self.frozen = None
    if lora_cfg is not None:  # as the PPO stage (rlhf_jax.stages.rl.lora_trainable) with value_init="rm"
      k_policy, k_value = jax.random.split(jax.random.fold_in(rng, 1))
      trainable = {"policy": lora.init_adapters(k_policy, model_cfg, lora_cfg),
                   "value": {"adapters": lora.init_adapters(k_value, model_cfg, lora_cfg),
                             "head": models["value"]["head"]}}
      self.frozen = {"policy": models["policy"], "value": self.reward["backbone"]}
    del models
    self.optimizer = make_optimizer(s)
    self.state = {"params": trainable, "opt_state": self.optimizer.init(trainable),
                  "step": jnp.zeros((), jnp.int32), "rng": rng}
    # Full-length prompts of ordinary tokens (ids above the specials), no padding: TRL gets the same ones.
    prompts = np.random.default_rng(seed).integers(6, model_cfg.vocab_size, (s.batch, s.prompt_len))
    self.prompt_bp = jnp.asarray(prompts, jnp.int32)
    self.prompt_mask_bp = jnp.ones((s.batch, s.prompt_len), jnp.bool_)
    cfg, st, temp = model_cfg, self.settings, self.settings.sampling.logprob_temperature
    # The trained roles' weights, adapters attached as the stage passes them (the sampler merges them per layer).
    full = lambda t, f: rl_rollout.with_frozen(t, f, lora_cfg, attach=True)
    self._generate = jax.jit(lambda p, f, *a: sampling.generate(full({"policy": p}, f)["policy"], *a, cfg,
                                                                  st.sampling, eos_id=s.eos_id, pad_id=s.pad_id))
    self._logprobs = jax.jit(lambda p, f, ro: rl_rollout.policy_logprobs(full({"policy": p}, f)["policy"], ro, cfg,
                                                                         temp))
    self._values = jax.jit(lambda p, v, f, ro: rl_rollout.value_estimates(full({"policy": p, "value": v}, f)["value"],
                                                                          ro, cfg))
    self._score = jax.jit(lambda r, ro, ended: jnp.where(ended, heads.response_scores(
        r, ro.prompt_bp, ro.prompt_mask_bp, ro.response_bn, ro.response_mask_bn, cfg), st.no_eos_penalty))
    self._advantages = jax.jit(lambda *a: rl_rollout.rewards_and_advantages(*a, s.kl_coef, st))
    self._update = jax.jit(learner.make_update(self.optimizer, cfg, st), donate_argnums=0)

  def param_bytes(self) -> dict[str, int]:
    """Bytes of each role's own arrays; with LoRA the policy and value are their adapters (and head), the
    reference is the frozen base ("frozen_policy") and the value backbone the reward model's (counted there)."""
    if self.frozen is not None:
      return {"policy_adapters": param_bytes(self.state["params"]["policy"]),
              "frozen_policy (= reference)": param_bytes(self.frozen["policy"]),
              "value_adapters_and_head": param_bytes(self.state["params"]["value"]),
              "reward (backbone = value's)": param_bytes(self.reward),
              "optimizer_state": param_bytes(self.state["opt_state"])}
    return {"policy": param_bytes(self.state["params"]["policy"]), "reference": param_bytes(self.reference),
            "value": param_bytes(self.state["params"]["value"]), "reward": param_bytes(self.reward),
            "optimizer_state": param_bytes(self.state["opt_state"])}

  def run(self, rng: jax.Array) -> tuple[dict[str, float], dict[str, float]]:
    """One iteration; returns (seconds per phase, a few metrics)."""
    s, cfg = self.s, self.model_cfg
    times: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      times[name] = time.perf_counter() - t0
      return out

    policy, value = self.state["params"]["policy"], self.state["params"]["value"]
    sample = timed("rollout", self._generate, policy, self.frozen, self.prompt_bp, self.prompt_mask_bp, rng)
    partial = rl_rollout.Rollout(self.prompt_bp, self.prompt_mask_bp, sample.tokens_bn, sample.mask_bn, *([None] * 6))
    old_logp_bn = timed("policy", self._logprobs, policy, self.frozen, partial)
    score_b = timed("score", self._score, self.reward, partial, sample.ended_b)
    # The reference is the frozen weights with no adapters (LoRA), or its own copy.
    ref_logp_bn = timed("reference", self._logprobs, self.reference, None, partial)
    values_bn = timed("value", self._values, policy, value, self.frozen, partial)
    rewards_bn, kl_bn, adv_bn, ret_bn = timed("advantage", self._advantages, score_b, old_logp_bn, ref_logp_bn,
                                              values_bn, sample.mask_bn)
    ro = rl_rollout.Rollout(self.prompt_bp, self.prompt_mask_bp, sample.tokens_bn, sample.mask_bn, old_logp_bn,
                          ref_logp_bn, values_bn, rewards_bn, adv_bn, ret_bn)
    self.state, metrics = timed("update", self._update, self.state, ro, None, self.frozen)
    times["total"] = sum(times.values())
    info = {"kl": float(kl_bn.sum(axis=1).mean()), "mean_response_len": float(sample.lengths_b.mean()),
            "ratio_mean": float(metrics["ratio_mean"]), "policy_loss": float(metrics["policy_loss"])}
    return times, info
