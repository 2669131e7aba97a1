"""RL from human feedback (InstructGPT step 3): PPO, PPO-ptx and A2C against the reward model.

Objective (InstructGPT eq. 2):  E[r(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi(x)].

Four parameter sets: the policy (from `ppo.init_from`, SFT) and the value model (from the RM, or from SFT with a
zero head) are trained; the reference (SFT) and the reward model (`ppo.rm_from`) are frozen. One iteration, read
top to bottom in `run`:
  1. rollout (rlhf_jax.rl.rollout): sampling at `ppo.temperature`, RM scores (a fixed `ppo.no_eos_penalty` for
     responses that never stop), old log-probs (a policy pass, or the sampler's own with ppo.old_logp="sampler";
     the update logs their distance from its training pass, first_logratio_absmax) and reference log-probs,
     values, KL-penalised rewards and GAE advantages;
  2. update (rlhf_jax.rl.learner): `ppo.epochs` passes over shuffled minibatches inside one jit, the policy loss
     of `ppo.algorithm` ("ppo" clipped, "a2c" unclipped with one pass), and for PPO-ptx gamma * the next-token
     loss on pretraining text;
  3. the adaptive KL controller updates beta from the measured KL (Ziegler et al. sec 2.2), or beta stays fixed.
Then the policy is evaluated on held-out prompts against SFT and best-of-n (rlhf_jax.evals.policy).

Checkpoints hold the policy, value, optimizer state, step, rng, beta and the prompt iterator's position; the
frozen reference and reward model are re-read from their stages' exports. The stage writes
WORKDIR/<ppo.stage_dir> (ppo, or a variant's ppo_ptx, ppo_kl0, ...).

With LoRA (`ppo.lora.rank` > 0, rlhf_jax/models/lora.py) the policy is adapters on the frozen SFT weights, which
are also the reference (one copy), and the value model is adapters plus a head on the frozen backbone of
`ppo.value_init` (the reward model's or SFT's, shared with it): the four roles cost the SFT and RM weights plus
adapters and a head. Checkpoints then hold the adapters and the head; the export holds the merged policy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import checkpoint, configs, losses, metrics, optim, preemption, runtime, sampling, sharding, training
from rlhf_jax.data import sources
from rlhf_jax.data.batching import decode_responses
from rlhf_jax.models import heads, lora, transformer
from rlhf_jax.rl import learner
from rlhf_jax.rl.rollout import PPOSettings, make_rollout


def sampling_config(pc) -> sampling.SamplingConfig:
  """How the RL stage samples (checked by SamplingConfig)."""
  return sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, top_k=pc.top_k,
                                 top_p=pc.top_p)


def check_settings(pc) -> None:
  """What config.ppo must satisfy before anything is built: a known algorithm, minibatches that divide the batch
  (and are large enough to whiten, with a critic), groups of samples per prompt for the critic-free algorithms,
  a non-negative KL coefficient, valid sampling settings."""
  runtime.check_choice(pc.algorithm, "ppo.algorithm", tuple(learner.ALGORITHMS))
  if pc.n_minibatches < 1 or pc.batch_size % pc.n_minibatches:
    raise ValueError(f"ppo.batch_size={pc.batch_size} must divide into ppo.n_minibatches={pc.n_minibatches}")
  if pc.algorithm in ("ppo", "a2c"):
    losses.check_whitenable(pc.batch_size // pc.n_minibatches, min_elements=pc.min_whiten)
  if pc.group_size < 1 or pc.batch_size % pc.group_size:
    raise ValueError(f"ppo.group_size={pc.group_size}: expected a number of samples per prompt that divides "
                     f"ppo.batch_size={pc.batch_size}")
  if pc.algorithm in ("grpo", "rloo") and pc.group_size < 2:
    raise ValueError(f"ppo.algorithm={pc.algorithm!r} needs ppo.group_size >= 2 samples per prompt (its baseline "
                     f"is the prompt's other samples), got {pc.group_size}")
  if pc.kl.init_beta < 0:
    raise ValueError(f"ppo.kl.init_beta={pc.kl.init_beta}: expected a KL coefficient >= 0")
  runtime.check_choice(pc.kl.mode, "ppo.kl.mode", ("reward", "loss"))
  if pc.kl.mode == "loss" and pc.algorithm != "grpo":
    raise ValueError(f"ppo.kl.mode='loss' (GRPO's k3 KL term) needs ppo.algorithm='grpo', got {pc.algorithm!r}")
  sampling_config(pc)
  runtime.check_choice(pc.old_logp, "ppo.old_logp", ("recompute", "sampler"))
  lora_config(pc)


def lora_config(pc) -> lora.LoraConfig | None:
  """config.ppo.lora as a LoraConfig, or None when LoRA is off (rank 0)."""
  lcfg = configs.to_lora_config(pc.lora, "ppo.lora")
  return lcfg if lcfg.enabled else None


def settings_from_config(pc, tok, guard=None) -> PPOSettings:
  """The jitted functions' static settings from config.ppo (and config.guard)."""
  check_settings(pc)
  return PPOSettings(
      sampling=sampling_config(pc),
      eos_id=tok.eos_id, pad_id=tok.pad_id, no_eos_penalty=pc.no_eos_penalty, whiten_rewards=pc.whiten_rewards,
      gamma=pc.gamma, lam=pc.lam, clip_eps=pc.clip_eps, vf_clip_eps=pc.vf_clip_eps, vf_coef=pc.vf_coef,
      entropy_coef=pc.entropy_coef, ptx_coef=pc.ptx.coef, epochs=pc.epochs if pc.algorithm == "ppo" else 1,
      n_minibatches=pc.n_minibatches, algorithm=pc.algorithm, min_whiten=pc.min_whiten,
      inject_nan_at_step=guard.inject_nan_at_step if guard is not None else -1,
      skip_nonfinite=guard is not None and guard.on_nonfinite == "skip",
      group_size=pc.group_size, kl_in_loss=pc.kl.mode == "loss", scale_rewards=pc.grpo.scale_rewards,
      # GRPO averages each response's tokens (Dr. GRPO: sums over the token budget); PPO, A2C, RLOO every token.
      aggregation=("sequence" if pc.grpo.length_norm else "constant") if pc.algorithm == "grpo" else "token",
      lora=lora_config(pc), old_logp=pc.old_logp)


def check(config: ml_collections.ConfigDict) -> None:
  pc = config.ppo
  policy = runtime.check_shared(config)
  mesh, rules = runtime.mesh_and_rules(config)
  check_settings(pc)
  if lora_config(pc) is not None:
    lora.check(lora_config(pc), policy, "ppo.lora")
  runtime.check_choice(pc.value_init, "ppo.value_init", ("rm", "sft"))
  if not all(isinstance(name, str) and name for name in pc.rm_ensemble):
    raise ValueError(f"ppo.rm_ensemble={tuple(pc.rm_ensemble)}: expected reward-model stage directories (with "
                     "ppo.rm_from, the members of a mean ensemble), or () for rm_from alone")
  sharding.check_batch(pc.batch_size, mesh, rules, field="ppo.batch_size")
  sharding.check_batch(pc.batch_size // pc.n_minibatches, mesh, rules, field="ppo minibatch size")
  runtime.check_seq_len(pc.max_prompt_len + pc.max_new_tokens, policy, "ppo.max_prompt_len + ppo.max_new_tokens",
                        extra=0)
  if pc.ptx.coef > 0 and sources.on_user_data(config) and not config.files.pretrain:
    raise ValueError(f"ppo.ptx.coef={pc.ptx.coef} on a user's files: PPO-ptx needs pretraining text; set "
                     "files.pretrain to a file of {\"text\"} documents")
  # The evaluation runs after training: its settings are checked now, not after the PPO iterations.
  if config.eval.samples_per_prompt < 1:
    raise ValueError(f"eval.samples_per_prompt={config.eval.samples_per_prompt}: expected at least 1 sample per "
                     "held-out prompt")


def init_value_params(value_init: str, policy_cfg, rm_cfg, rm_params, sft_params):
  """The value model: the RM's backbone (and head) when it has the policy's size and value_init="rm",
  else the SFT backbone with a zero head (first value estimates exactly 0)."""
  runtime.check_choice(value_init, "ppo.value_init", ("rm", "sft"))
  if value_init == "rm" and dataclasses.asdict(rm_cfg) == dataclasses.asdict(policy_cfg):
    return {"backbone": rm_params["backbone"], "head": dict(rm_params["head"])}
  return heads.init_value_params(jax.random.PRNGKey(0), policy_cfg, sft_params)


def lora_trainable(full: dict[str, Any], policy_cfg, lcfg: lora.LoraConfig, rng: jax.Array):
  """(trainable, axes, frozen) of a LoRA run from the full-parameter roles {"policy", "value"?}: fresh adapters
  for the policy and the value backbone (B = 0, so both start as the models they adapt) and the value head; the
  full weights become the frozen arguments (the same buffers, no copy)."""
  k_policy, k_value = jax.random.split(rng)
  trainable = {"policy": lora.init_adapters(k_policy, policy_cfg, lcfg)}
  axes = {"policy": lora.adapter_axes(policy_cfg, lcfg)}
  frozen = {"policy": full["policy"]}
  if "value" in full:
    trainable["value"] = {"adapters": lora.init_adapters(k_value, policy_cfg, lcfg), "head": full["value"]["head"]}
    axes["value"] = {"adapters": lora.adapter_axes(policy_cfg, lcfg), "head": heads.scalar_head_axes()}
    frozen["value"] = full["value"]["backbone"]
  return trainable, axes, frozen


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  pc = config.ppo
  stage_dir = runtime.stage_dir(config, workdir, "ppo")
  tok = sources.tokenizer(config, workdir)
  policy_cfg = runtime.policy_config(config, tok.vocab_size)
  mesh, rules = runtime.mesh_and_rules(config)
  sharding.check_batch(pc.batch_size, mesh, rules, field="ppo.batch_size")
  sharding.check_batch(pc.batch_size // pc.n_minibatches, mesh, rules, field="ppo minibatch size")
  s = settings_from_config(pc, tok, config.guard)

  # Four parameter sets, all on the mesh with the same rules.
  sft_params, _ = runtime.load_policy(workdir, pc.init_from, mesh, rules, expect=policy_cfg, field="ppo.init_from")
  ref_params = sft_params  # frozen; jax arrays are immutable, so sharing the buffers is safe
  if pc.ref_from:  # online rounds: start from the last round's policy, keep the KL (and the evaluation) to SFT's
    ref_params, _ = runtime.load_policy(workdir, pc.ref_from, mesh, rules, expect=policy_cfg, field="ppo.ref_from")
  # ppo.rm_ensemble: the reward is the mean of those models' and rm_from's normalised scores; the value model
  # still starts from rm_from's.
  rm_params, rm_cfg, first_rm = runtime.load_reward_models(workdir, [pc.rm_from, *pc.rm_ensemble], mesh, rules,
                                                           field="ppo.rm_from / ppo.rm_ensemble")
  trainable = {"policy": sft_params}
  axes = {"policy": transformer.param_axes(policy_cfg)}
  if s.uses_critic:  # GRPO and RLOO have no value model
    trainable["value"] = init_value_params(pc.value_init, policy_cfg, rm_cfg, first_rm, sft_params)
    axes["value"] = heads.value_axes(policy_cfg)
  frozen = None
  if s.lora is not None:  # train adapters (and the value head) on frozen backbones shared with SFT / the RM
    trainable, axes, frozen = lora_trainable(trainable, policy_cfg, s.lora, jax.random.PRNGKey(config.seed + 4))
  optimizer = optim.make_optimizer(pc.optimizer, pc.iterations * s.epochs * s.n_minibatches,
                                   optim.decay_mask_from_axes(axes))
  state, state_sh = optim.state_from_params(trainable, axes, optimizer, jax.random.PRNGKey(config.seed + 2), mesh,
                                            rules)
  state_sh["kl_beta"] = sharding.replicated(mesh)
  # Committed to its sharding from the start: an uncommitted scalar changes the jitted functions' input signature
  # once the update or the controller returns a placed one, and the rollout and update then compile twice.
  state["kl_beta"] = jax.device_put(jnp.asarray(pc.kl.init_beta, jnp.float32), state_sh["kl_beta"])

  prompts = sources.rl_prompts(config, workdir, tok, which="train")
  # batch_size episodes: batch_size / group_size prompts, each sampled group_size times (consecutive rows).
  prompt_it = sources.PromptIterator(prompts, batch_size=pc.batch_size // pc.group_size, pad_id=tok.pad_id,
                                     seed=config.seed, max_len=pc.max_prompt_len)
  ptx_it = sources.ptx_iter(config, workdir, tok) if s.ptx_coef > 0 else None
  data = sources.NamedIterators({"prompts": prompt_it, **({"ptx": ptx_it} if ptx_it is not None else {})})

  ckpt = training.make_checkpointer(config.checkpoint, stage_dir)
  meta = {"model": dataclasses.asdict(policy_cfg), "stage": "ppo"}
  if s.lora is not None:  # a checkpoint of adapters resumes only with the same adapters
    meta["model"]["lora"] = dataclasses.asdict(s.lora) | {"targets": list(s.lora.targets)}
  label = pc.stage_dir  # progress lines and messages name the variant: [ppo], [grpo], ...
  state, start = training.resume(ckpt, state, state_sh, meta, data, stage=label)

  gold = runtime.judge(config, workdir, tok, mesh, rules)  # the gold scorer, or a held-out RM on a user's data
  writer = metrics.MetricsWriter(stage_dir, stage=label, total_steps=pc.iterations, start_step=start,
                                 tokens_per_step=pc.batch_size * pc.max_new_tokens)
  with sharding.activate(mesh, rules):
    rollout_fn = jax.jit(make_rollout(policy_cfg, rm_cfg, s))
    update_fn = jax.jit(learner.make_update(optimizer, policy_cfg, s), donate_argnums=0)
    for it in range(start, pc.iterations):
      t_it = time.time()
      prompt_bp, prompt_mask_bp, prompt_texts = next(prompt_it)
      if pc.group_size > 1:
        prompt_bp, prompt_mask_bp = (np.repeat(x, pc.group_size, axis=0) for x in (prompt_bp, prompt_mask_bp))
        prompt_texts = [t for t in prompt_texts for _ in range(pc.group_size)]
      rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), 1)
      ro, _, stats = rollout_fn(state["params"]["policy"], state["params"].get("value"), ref_params, rm_params,
                                *sharding.put_batch({"p": prompt_bp, "m": prompt_mask_bp}, mesh, rules).values(),
                                rng, state["kl_beta"], frozen)
      jax.block_until_ready(ro)  # dispatch is asynchronous: time the rollout itself
      t_roll = time.time() - t_it
      ptx = None
      if ptx_it is not None:
        # Each process holds its own pretraining rows; numpy passed to jit would be taken as the global value.
        ptx = sharding.put_minibatches(sources.ptx_minibatches(ptx_it, s.n_minibatches), mesh, rules)
      state, m = update_fn(state, ro, ptx, frozen)
      checkpoint.guard_nonfinite(m, step=it, stage=label, on_nonfinite=config.guard.on_nonfinite, ckpt=ckpt)
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
        texts = decode_responses(tok, sharding.local_batch(ro.response_bn, mesh, rules),
                                 sharding.local_batch(ro.response_mask_bn, mesh, rules))
        gold_b = gold.score_batch(prompt_texts, texts)
        row = {**{k: float(v) for k, v in stats.items()}, **{k: float(v) for k, v in jax.device_get(m).items()},
               "gold_score": float(np.mean(gold_b)), "beta": float(state["kl_beta"]),
               "rollout_s": t_roll, "iteration_s": time.time() - t_it}
        writer.log(done, row)
      ckpt.save(done, state, data_state=data.get_state(), meta=meta, force=done == pc.iterations)
      if done < pc.iterations and preemption.should_stop(done):
        training.stop_for_preemption(ckpt, done, state, data.get_state(), meta, label)
    ckpt.wait()
    policy = state["params"]["policy"]
    if s.lora is not None:  # adapters merged into the weights: the export is an ordinary policy
      policy = jax.jit(lambda base, adapters: lora.merge(base, adapters, s.lora))(frozen["policy"], policy)
  training.export_params(stage_dir, policy, model_cfg=policy_cfg, tokenizer=tok)
  summary = {"step": pc.iterations, "final_beta": float(state["kl_beta"]), "rm_members": 1 + len(pc.rm_ensemble),
             "wall_s": time.time() - t0}
  if s.lora is not None:
    summary["lora_params"] = lora.num_params(policy_cfg, s.lora)
  summary.update(runtime.evaluate_policy(config, workdir, tok, policy_cfg, policy, ref_params,
                                         rm_params, rm_cfg, mesh, rules, stage_dir=stage_dir, best_of_n=True))
  summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary
