"""RL from human feedback (InstructGPT step 3): PPO, PPO-ptx and A2C against the reward model.

Objective (InstructGPT eq. 2):  E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi(x)].

Four parameter sets: the policy (from SFT) and the value model (from the RM, or from SFT with a zero head) are
trained; the reference (SFT) and the reward model are frozen. One iteration, read top to bottom in `run`:
  1. rollout: left-padded prompts, jitted KV-cache sampling at `ppo.temperature`;
  2. score: the RM (with its stored normalisation) at the last real token; responses that never emit EOS get
     the fixed `ppo.no_eos_penalty` instead; old policy and reference log-probs recomputed by a full forward
     pass at the sampling temperature (RLHF_NOTES PPO 4 and 5); values;
  3. rewards: -beta * (logp - logp_ref) on every response token plus the score on the last real token;
     optional whitening without mean shift; GAE (gamma, lambda) by a reverse scan;
  4. update: `ppo.epochs` passes over shuffled minibatches inside one jit (a `lax.scan` over epochs of a
     `lax.scan` over minibatches): clipped policy loss on per-minibatch-whitened advantages, clipped value loss,
     optional entropy bonus, and for PPO-ptx gamma * the next-token loss on pretraining text;
  5. the adaptive KL controller updates beta from the measured KL (Ziegler et al. sec 2.2), or beta stays fixed.
A2C (`ppo.algorithm = "a2c"`, as DeepMind used) is the same loop with unclipped losses and one pass.

Checkpoints hold the policy, value, optimizer state, step, rng, beta and the prompt iterator's position; the
frozen reference and reward model are re-read from their stages' exports.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import checkpoint, configs, losses, metrics, model, optim, pretrain, reward, sampling, sharding

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


# ----------------------------------------------------------------------------------------------------------
# Forward passes over prompt + response.


def response_hidden(params: Params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, cfg: model.ModelConfig):
  """Hidden states [b, n, d] at the positions that predict each response token (position p - 1 + i)."""
  p, n = prompt_bp.shape[1], response_bn.shape[1]
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  h_bsd, _ = model.backbone(params, tokens_bs, cfg, mask_bt=mask_bs)
  return h_bsd[:, p - 1:p - 1 + n]


def policy_logprobs(params, rollout_like, cfg, temperature: float, *, with_entropy: bool = False):
  """log pi(response token) at the sampling temperature [b, n] (and the mean entropy over the response)."""
  h_bnd = response_hidden(params, rollout_like.prompt_bp, rollout_like.prompt_mask_bp, rollout_like.response_bn,
                          rollout_like.response_mask_bn, cfg)
  logits_bnv = model.unembed(params, h_bnd, cfg)
  logp_bn = model.token_logprobs(logits_bnv, rollout_like.response_bn, temperature)
  logp_bn = jnp.where(rollout_like.response_mask_bn, logp_bn, 0.0)
  if not with_entropy:
    return logp_bn
  entropy = losses.entropy_from_logits(logits_bnv, rollout_like.response_mask_bn, temperature=temperature)
  return logp_bn, entropy


def value_estimates(value_params, rollout_like, cfg):
  """V(state before each response token) [b, n] from the value model's backbone and head."""
  h_bnd = response_hidden(value_params["backbone"], rollout_like.prompt_bp, rollout_like.prompt_mask_bp,
                          rollout_like.response_bn, rollout_like.response_mask_bn, cfg)
  return jnp.where(rollout_like.response_mask_bn, model.scalar_head(value_params["head"], h_bnd), 0.0)


def rm_scores(rm_params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, rm_cfg) -> jax.Array:
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  return reward.scores(rm_params, tokens_bs, mask_bs, rm_cfg)


# ----------------------------------------------------------------------------------------------------------
# Rollout and scoring (jitted as one function).


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


def rewards_and_advantages(score_b, old_logp_bn, ref_logp_bn, values_bn, mask_bn, beta, s: PPOSettings):
  """Per-token rewards (KL penalty + score at the last real token), optionally whitened without mean shift, then
  GAE. Returns (rewards, kl, advantages, returns), each [b, n]."""
  rewards_bn, kl_bn = losses.kl_penalized_rewards(score_b, old_logp_bn, ref_logp_bn, mask_bn, beta=beta)
  if s.whiten_rewards:
    rewards_bn = losses.whiten(rewards_bn, mask_bn, shift_mean=False)
  advantages_bn, returns_bn = losses.compute_gae(rewards_bn, values_bn, mask_bn, gamma=s.gamma, lam=s.lam)
  return rewards_bn, kl_bn, advantages_bn, returns_bn


def make_rollout(policy_cfg, rm_cfg, s: PPOSettings):
  """rollout(policy, value, ref, rm, prompts, prompt_mask, rng, beta) -> (Rollout, scores, stats)."""

  def rollout_fn(policy, value, ref, rm, prompt_bp, prompt_mask_bp, rng, beta):
    out = sampling.generate(policy, prompt_bp, prompt_mask_bp, rng, policy_cfg, s.sampling, eos_id=s.eos_id,
                            pad_id=s.pad_id)
    temp = s.sampling.logprob_temperature
    partial = Rollout(prompt_bp, prompt_mask_bp, out.tokens_bn, out.mask_bn, *([None] * 6))
    old_logp_bn = policy_logprobs(policy, partial, policy_cfg, temp)
    ref_logp_bn = policy_logprobs(ref, partial, policy_cfg, temp)
    values_bn = value_estimates(value, partial, policy_cfg)
    rm_b = rm_scores(rm, prompt_bp, prompt_mask_bp, out.tokens_bn, out.mask_bn, rm_cfg)
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
        "sampler_logp_maxdiff": jnp.max(jnp.abs(jnp.where(out.mask_bn, out.logprobs_bn - old_logp_bn, 0.0))),
    }
    return ro, rm_b, stats

  return rollout_fn


# ----------------------------------------------------------------------------------------------------------
# The update: epochs x minibatches inside one jit.


def ppo_loss(trainable: Params, mb: Rollout, ptx_batch, policy_cfg, s: PPOSettings):
  """Policy + value (+ entropy, + ptx) loss of one minibatch, and its metrics."""
  temp = s.sampling.logprob_temperature
  logp_bn, entropy = policy_logprobs(trainable["policy"], mb, policy_cfg, temp, with_entropy=True)
  values_bn = value_estimates(trainable["value"], mb, policy_cfg)
  # Whiten advantages per minibatch (RLHF_NOTES PPO 6).
  adv_bn = losses.whiten(mb.advantages_bn, mb.response_mask_bn)
  if s.algorithm == "ppo":
    pg_loss, pg_m = losses.ppo_policy_loss(logp_bn, mb.old_logp_bn, adv_bn, mb.response_mask_bn,
                                           clip_eps=s.clip_eps)
    vf_loss, vf_m = losses.ppo_value_loss(values_bn, mb.old_values_bn, mb.returns_bn, mb.response_mask_bn,
                                          clip_eps=s.vf_clip_eps)
  else:
    pg_loss, pg_m = losses.a2c_policy_loss(logp_bn, adv_bn, mb.response_mask_bn)
    vf_loss, vf_m = losses.a2c_value_loss(values_bn, mb.returns_bn, mb.response_mask_bn)
  loss = pg_loss + s.vf_coef * vf_loss - s.entropy_coef * entropy
  m = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, **pg_m, **vf_m,
       "explained_variance": losses.explained_variance(values_bn, mb.returns_bn, mb.response_mask_bn)}
  if s.ptx_coef > 0:
    ptx, _ = pretrain.lm_loss(trainable["policy"], ptx_batch, policy_cfg)
    loss = loss + s.ptx_coef * ptx
    m["ptx_loss"] = ptx
  m["loss"] = loss
  return loss, m


def minibatch_step(carry, mb_and_ptx, *, optimizer, policy_cfg, s: PPOSettings):
  trainable, opt_state = carry
  mb, ptx_batch = mb_and_ptx
  (_, m), grads = jax.value_and_grad(ppo_loss, has_aux=True)(trainable, mb, ptx_batch, policy_cfg, s)
  m["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return (optax.apply_updates(trainable, updates), opt_state), m


def ppo_epoch(carry, epoch_rng, *, rollout: Rollout, ptx, optimizer, policy_cfg, s: PPOSettings):
  """One pass over the rollout in shuffled minibatches."""
  b = rollout.prompt_bp.shape[0]
  perm = jax.random.permutation(epoch_rng, b).reshape(s.n_minibatches, b // s.n_minibatches)
  minibatches = jax.tree.map(lambda x: x[perm], rollout)  # [n_minibatches, mb, ...]
  step = functools.partial(minibatch_step, optimizer=optimizer, policy_cfg=policy_cfg, s=s)
  carry, m = jax.lax.scan(step, carry, (minibatches, ptx))
  return carry, jax.tree.map(jnp.mean, m)


def make_update(optimizer, policy_cfg, s: PPOSettings):
  """update(state, rollout, ptx_batches) -> (state, metrics); ptx_batches is [n_minibatches, ...] or None."""

  def update_fn(state, rollout: Rollout, ptx):
    rng = jax.random.fold_in(state["rng"], state["step"])
    epoch_rngs = jax.random.split(rng, s.epochs)
    if s.inject_nan_at_step >= 0:
      rollout = rollout._replace(advantages_bn=jnp.where(state["step"] == s.inject_nan_at_step, jnp.nan,
                                                         rollout.advantages_bn))
    epoch = functools.partial(ppo_epoch, rollout=rollout, ptx=ptx, optimizer=optimizer, policy_cfg=policy_cfg, s=s)
    (trainable, opt_state), m = jax.lax.scan(epoch, (state["params"], state["opt_state"]), epoch_rngs)
    finite = jnp.all(jnp.isfinite(m["loss"])) & jnp.all(jnp.isfinite(m["grad_norm"]))
    if s.skip_nonfinite:
      trainable = jax.tree.map(lambda a, b: jnp.where(finite, a, b), trainable, state["params"])
      opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state, state["opt_state"])
    m = jax.tree.map(lambda x: x[-1], m)  # metrics of the last epoch
    m["finite"] = finite
    return {**state, "params": trainable, "opt_state": opt_state, "step": state["step"] + 1}, m

  return update_fn


# ----------------------------------------------------------------------------------------------------------
# The stage.


def settings_from_config(pc, tok, guard=None) -> PPOSettings:
  if pc.algorithm not in ("ppo", "a2c"):
    raise ValueError(f"ppo.algorithm must be 'ppo' or 'a2c', got {pc.algorithm!r}")
  if pc.batch_size % pc.n_minibatches:
    raise ValueError(f"ppo.batch_size={pc.batch_size} must divide into ppo.n_minibatches={pc.n_minibatches}")
  mb = pc.batch_size // pc.n_minibatches
  losses.check_whitenable(mb, min_elements=pc.min_whiten)
  return PPOSettings(
      sampling=sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature,
                                       top_k=pc.top_k, top_p=pc.top_p),
      eos_id=tok.eos_id, pad_id=tok.pad_id, no_eos_penalty=pc.no_eos_penalty, whiten_rewards=pc.whiten_rewards,
      gamma=pc.gamma, lam=pc.lam, clip_eps=pc.clip_eps, vf_clip_eps=pc.vf_clip_eps, vf_coef=pc.vf_coef,
      entropy_coef=pc.entropy_coef, ptx_coef=pc.ptx.coef, epochs=pc.epochs if pc.algorithm == "ppo" else 1,
      n_minibatches=pc.n_minibatches, algorithm=pc.algorithm, min_whiten=pc.min_whiten,
      inject_nan_at_step=guard.inject_nan_at_step if guard is not None else -1,
      skip_nonfinite=guard is not None and guard.on_nonfinite == "skip")


def init_value_params(config, workdir: str, policy_cfg, rm_cfg, rm_params, sft_params):
  """The value model: the RM's backbone (and head) when it has the policy's size and value_init="rm",
  else the SFT backbone with a zero head (first value estimates exactly 0)."""
  if config.ppo.value_init == "rm" and dataclasses.asdict(rm_cfg) == dataclasses.asdict(policy_cfg):
    return {"backbone": rm_params["backbone"], "head": dict(rm_params["head"])}
  if config.ppo.value_init not in ("rm", "sft"):
    raise ValueError(f"ppo.value_init must be 'rm' or 'sft', got {config.ppo.value_init!r}")
  return {"backbone": sft_params, "head": model.init_scalar_head(jax.random.PRNGKey(0), policy_cfg, zero=True)}


def value_axes(cfg):
  return {"backbone": model.param_axes(cfg), "head": model.scalar_head_axes()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from rlhf_jax import data_sources, evaluation  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  pc = config.ppo
  stage_dir = os.path.join(workdir, pc.stage_dir)
  tok = data_sources.tokenizer(config, workdir)
  policy_cfg = configs.to_model_config(config.model, tok.vocab_size)
  rm_cfg = reward.rm_model_config(config, tok)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_batch(pc.batch_size, mesh, rules, field="ppo.batch_size")
  sharding.check_batch(pc.batch_size // pc.n_minibatches, mesh, rules, field="ppo minibatch size")
  s = settings_from_config(pc, tok, config.guard)

  # Four parameter sets, all on the mesh with the same rules.
  sft_params = pretrain.load_stage_params(config, workdir, pc.init_from, policy_cfg)
  ref_params = sft_params  # frozen; jax arrays are immutable, so sharing the buffers is safe
  rm_params = reward.load_rm_params(config, workdir, rm_cfg)
  value_params = init_value_params(config, workdir, policy_cfg, rm_cfg, rm_params, sft_params)
  axes = {"policy": model.param_axes(policy_cfg), "value": value_axes(policy_cfg)}
  optimizer = optim.make_optimizer(pc.optimizer, pc.iterations * s.epochs * s.n_minibatches,
                                   optim.decay_mask_from_axes(axes))
  state, state_sh = optim.state_from_params({"policy": sft_params, "value": value_params}, axes, optimizer,
                                            jax.random.PRNGKey(config.seed + 2), mesh, rules)
  state["kl_beta"] = jnp.asarray(pc.kl.init_beta, jnp.float32)
  state_sh["kl_beta"] = sharding.replicated(mesh)

  prompts = data_sources.rl_prompts(config, workdir, tok, which="train")
  prompt_it = data_sources.PromptIterator(prompts, batch_size=pc.batch_size, pad_id=tok.pad_id, seed=config.seed,
                                          max_len=pc.max_prompt_len)
  ptx_it = data_sources.ptx_iter(config, workdir, tok) if s.ptx_coef > 0 else None

  ckpt = pretrain.make_checkpointer(config, stage_dir)
  meta = {"model": dataclasses.asdict(policy_cfg), "stage": "ppo"}
  state, data_state, start = checkpoint.resume(ckpt, state, state_sh, meta, stage="ppo")
  if start:
    prompt_it.set_state(data_state["prompts"])
    if ptx_it is not None:
      ptx_it.set_state(data_state["ptx"])

  gold = data_sources.gold_scorer(config, workdir)
  writer = metrics.MetricsWriter(stage_dir, stage="ppo", total_steps=pc.iterations, start_step=start,
                                 tokens_per_step=pc.batch_size * pc.max_new_tokens)
  with sharding.activate(mesh, rules):
    rollout_fn = jax.jit(make_rollout(policy_cfg, rm_cfg, s))
    update_fn = jax.jit(make_update(optimizer, policy_cfg, s), donate_argnums=0)
    for it in range(start, pc.iterations):
      t_it = time.time()
      prompt_bp, prompt_mask_bp, prompt_texts = next(prompt_it)
      rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), 1)
      ro, rm_b, stats = rollout_fn(state["params"]["policy"], state["params"]["value"], ref_params, rm_params,
                                   *sharding.put_batch({"p": prompt_bp, "m": prompt_mask_bp}, mesh, rules).values(),
                                   rng, state["kl_beta"])
      jax.block_until_ready(ro)  # dispatch is asynchronous: time the rollout itself
      t_roll = time.time() - t_it
      ptx = None
      if ptx_it is not None:
        # Each process holds its own pretraining rows; numpy passed to jit would be taken as the global value.
        ptx = sharding.put_minibatches(data_sources.ptx_minibatches(ptx_it, s.n_minibatches), mesh, rules)
      state, m = update_fn(state, ro, ptx)
      checkpoint.guard_nonfinite(m, step=it, stage="ppo", on_nonfinite=config.guard.on_nonfinite, ckpt=ckpt)
      stats = jax.device_get(stats)
      kl = float(stats["kl_seq"])
      if pc.kl.adaptive:
        # On the state's sharding: an uncommitted array would change the jitted functions' input signature
        # after the first iteration and compile the rollout and the update a second time.
        state["kl_beta"] = jax.device_put(jnp.asarray(losses.update_kl_controller(
            float(state["kl_beta"]), kl, pc.batch_size, target=pc.kl.target, horizon=pc.kl.horizon), jnp.float32),
            state_sh["kl_beta"])
      done = it + 1
      if done % pc.log_every == 0 or done == pc.iterations:
        # This process's rows, matching its prompt_texts (the gold score is process 0's share of the batch).
        texts = evaluation.decode_responses(tok, sharding.local_batch(ro.response_bn, mesh, rules),
                                            sharding.local_batch(ro.response_mask_bn, mesh, rules))
        gold_b = gold.score_batch(prompt_texts, texts)
        row = {**{k: float(v) for k, v in stats.items()}, **{k: float(v) for k, v in jax.device_get(m).items()},
               "gold_score": float(np.mean(gold_b)), "beta": float(state["kl_beta"]),
               "rollout_s": t_roll, "iteration_s": time.time() - t_it}
        writer.log(done, row)
      ckpt.save(done, state, data_state={"prompts": prompt_it.get_state(),
                                         "ptx": ptx_it.get_state() if ptx_it is not None else {}},
                meta=meta, force=done == pc.iterations)
    ckpt.wait()
  pretrain.export_params(stage_dir, state["params"]["policy"])
  summary = {"step": pc.iterations, "final_beta": float(state["kl_beta"]), "wall_s": time.time() - t0}
  summary.update(evaluation.policy_eval(config, workdir, tok, policy_cfg, state["params"]["policy"],
                                        sft_params, rm_params, rm_cfg, mesh, rules,
                                        samples_path=os.path.join(stage_dir, "samples.jsonl")))
  for n in config.eval.best_of_n:  # the cheapest baseline, on the same prompts and RM
    bon = evaluation.best_of_n_eval(config, workdir, tok, policy_cfg, sft_params, rm_params, rm_cfg, mesh, rules, n)
    summary.update({f"bon{n}.{k}": v for k, v in bon.items() if k != "n"})
  summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary


def ppo_config(ptx_coef: float = 0.0) -> ml_collections.ConfigDict:
  """Defaults of the RL stage (InstructGPT / lm-human-preferences values where they carry over)."""
  return ml_collections.ConfigDict(dict(
      stage_dir="ppo", init_from="sft", value_init="rm", algorithm="ppo",
      iterations=100, batch_size=64, n_minibatches=4, epochs=4, min_whiten=8,
      max_prompt_len=64, max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0,
      clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0, gamma=1.0, lam=0.95,
      whiten_rewards=True, no_eos_penalty=-1.0, log_every=5,
      kl=ml_collections.ConfigDict(dict(adaptive=True, init_beta=0.02, target=6.0, horizon=10_000)),
      ptx=ml_collections.ConfigDict(dict(coef=ptx_coef, ratio=1, seq_len=64)),
      optimizer=configs.optimizer_config(lr=1e-5, warmup_steps=0, weight_decay=0.0),
  ))
