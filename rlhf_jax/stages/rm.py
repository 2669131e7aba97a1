"""Reward model (InstructGPT step 2): a scalar head on a Transformer backbone, trained on K-way rankings.

Data (rlhf_jax.feedback, shared with DPO): for each prompt, K responses (K from rm.k_min to rm.k_max) sampled
from the SFT policy and ranked by the task suite's simulated labelers (`rm.source = "policy"`, what InstructGPT
did), or the suite's offline comparisons (`"offline"`), both (`"policy+offline"`: validation on the SFT
samples), or a user's K-way rankings (`"file"`: a .jsonl, or a folder prepared by `rlhf_jax.data.real`).

Loss (InstructGPT eq. 1): -1/C(K,2) * sum over ranked pairs of log sigmoid(r_w - r_l), with all C(K,2) pairs of
one prompt in ONE batch element (K forward passes per prompt; `rm.grouping = "prompt"`). The ablation InstructGPT
reports as overfitting, every pair an independent shuffled example, is `rm.grouping = "pairs"`; with
`rm.pair_weighting = "per_prompt"` it weights each pair by 1/num_pairs(prompt) and then optimises exactly the
grouped objective. Both arrangements are groups of responses with ranks (rlhf_jax.data.comparisons), so one
train step serves both.

After training a gain and bias make the scores of SFT-policy samples mean 0, std 1 (`norm` in the exported
parameters), so PPO's KL coefficient keeps its meaning.

Evaluation on held-out comparisons (rlhf_jax.evals.rm): accuracy against the labelers, against the gold
ordering on clearly different pairs, the gold scorer's own accuracy on the labels (the ceiling), calibration, and
the same pairs ranked by the sampling policy's log-likelihood (`val_policy_logprob_*`), the baseline the RM
should beat. Batches are cut to their longest sequence, rounded up to `rm.length_bucket` tokens.

Where the score is read (`rm.score_at`, rlhf_jax.models.heads.read_weights): at the last real token, the EOS of
a finished response ("eos", InstructGPT's and the default), at the token before it ("last") or as the mean over
the response ("mean"). `rm.lm_coef` adds an auxiliary next-token loss on the responses.

Exported (`WORKDIR/rm/params`, kind "reward_model"): {"backbone": model params, "head": {"w", "b"},
"norm": {"gain", "bias"}, "read": the readout weights}.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import configs, feedback, losses, metrics, optim, runtime, sharding, training
from rlhf_jax.data import comparisons, sources
from rlhf_jax.evals import rm as rm_evals
from rlhf_jax.models import heads, transformer

def check(config: ml_collections.ConfigDict) -> None:
  rc = config.rm
  policy = runtime.check_shared(config)
  mesh, rules = runtime.mesh_and_rules(config)
  rm_cfg = configs.to_model_config(configs.model_config(rc.model_size), 1) if rc.model_size else policy
  sharding.check_batch(rc.train.batch_size, mesh, rules, field="rm.train.batch_size")
  runtime.check_seq_len(rc.seq_len, rm_cfg, "rm.seq_len", extra=0)
  runtime.check_choice(rc.grouping, "rm.grouping", ("prompt", "pairs"))
  runtime.check_choice(rc.pair_weighting, "rm.pair_weighting", ("uniform", "per_prompt"))
  runtime.check_choice(rc.backbone, "rm.backbone", ("decoder", "encoder"))
  if rc.loglik_coef < 0 or (rc.loglik_coef and rc.backbone == "encoder"):
    raise ValueError(f"rm.loglik_coef={rc.loglik_coef}: expected >= 0, and 0 with rm.backbone='encoder' (a "
                     "bidirectional encoder has no next-token likelihood)")
  if rc.backbone_from and (rc.backbone == "encoder" or rc.finetune_from):
    raise ValueError(f"rm.backbone_from={rc.backbone_from!r} starts a decoder RM's backbone; it cannot be combined "
                     f"with rm.backbone='encoder' (rm.encoder_from) or rm.finetune_from={rc.finetune_from!r}")
  if rc.backbone == "encoder" and (rc.model_size or not rc.encoder_from):
    raise ValueError(f"rm.backbone='encoder' starts from the mlm stage's encoder in WORKDIR/<rm.encoder_from> (the "
                     f"policy's size): set rm.encoder_from (got {rc.encoder_from!r}) and leave rm.model_size empty "
                     f"(got {rc.model_size!r})")
  runtime.check_choice(rc.target, "rm.target", ("rankings", *comparisons.RATING_TARGETS))
  runtime.check_choice(rc.score_at, "rm.score_at", heads.SCORE_AT)
  runtime.check_choice(rc.labels, "rm.labels", ("labelers", "gold"))
  if rc.labels == "gold" and sources.on_user_data(config):
    raise ValueError("rm.labels='gold' re-ranks by the task suite's gold scorer; a user's comparison file has none")
  if not isinstance(rc.max_train_prompts, int) or rc.max_train_prompts < 0:
    raise ValueError(f"rm.max_train_prompts must be an int >= 0 (0 = every comparison), got {rc.max_train_prompts!r}")
  if not isinstance(rc.seed_offset, int) or rc.seed_offset < 0:
    raise ValueError(f"rm.seed_offset must be an int >= 0, got {rc.seed_offset!r}")
  if not isinstance(rc.lm_coef, (int, float)) or rc.lm_coef < 0:
    raise ValueError(f"rm.lm_coef must be a number >= 0 (0 = off), got {rc.lm_coef!r}")
  if rc.lm_coef > 0 and rc.backbone == "encoder":
    raise ValueError("rm.lm_coef > 0 needs a causal backbone (the next-token loss); rm.backbone='encoder' is a "
                     "bidirectional encoder")
  feedback.check(config)


def rm_model_config(config, vocab_size: int) -> transformer.ModelConfig:
  """The reward model's size: the policy's unless rm.model_size names a preset (models/presets.py: "tiny",
  "small", "medium", "base")."""
  if config.rm.backbone == "encoder":  # the policy's architecture with bidirectional attention (stages/mlm.py)
    return dataclasses.replace(runtime.policy_config(config, vocab_size), causal=False)
  if not config.rm.model_size:
    return runtime.policy_config(config, vocab_size)
  return configs.to_model_config(configs.model_config(config.rm.model_size), vocab_size)


def ranking_loss_fn(model_cfg: transformer.ModelConfig, target: str = "rankings",
                    lm_coef: float = 0.0) -> training.LossFn:
  """The K-way ranking loss of a group batch (or with target "elo", the regression onto the batch's
  "target" ratings) as a `training.make_train_step` loss. The normalisation is set after training; the loss does
  not read it, so its gradient is zero. lm_coef > 0 adds lm_coef x the backbone's next-token loss on the response
  tokens of every response in the batch (an auxiliary LM loss, as in Askell et al. 2021's preference models):
  the backbone keeps modelling the responses it scores."""

  def loss_fn(params, batch, rng):
    del rng
    rewards_bk, h_btd = heads.group_rewards(params, batch, model_cfg, with_hidden=True)
    if target == "rankings":
      loss, m = losses.ranking_loss(rewards_bk, batch["ranks"], batch["valid"], weights_b=batch["weight"])
    else:
      loss, m = losses.rating_regression_loss(rewards_bk, batch["target"], batch["ranks"], batch["valid"],
                                              weights_b=batch["weight"])
    out = {"accuracy": m["accuracy"]}
    if lm_coef > 0:
      b, k, t = batch["tokens"].shape
      tokens_bt, mask_bt = batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t)
      response_bt = jnp.arange(t)[None, :] >= batch["prompt_len"].reshape(b * k, 1)
      counted_bt = (mask_bt.astype(bool) & response_bt & batch["valid"].reshape(b * k, 1))[:, 1:]
      logits_btv = transformer.unembed(params["backbone"], h_btd[:, :-1], model_cfg)
      lm, _ = losses.next_token_loss(logits_btv, tokens_bt[:, 1:], counted_bt)
      loss = loss + lm_coef * lm
      out["lm_loss"] = lm
    return loss, out

  return loss_fn


def val_ranking_loss(comps, rewards) -> float:
  """InstructGPT eq. 1 on held-out comparisons: the mean over prompts of -1/P sum log sigmoid(r_w - r_l) over
  a prompt's P strict pairs, whatever arrangement trained the RM (so grouped and shuffled pairs compare)."""
  per_prompt = []
  for c, r in zip(comps, rewards):
    nll = [np.logaddexp(0.0, -(r[w] - r[l])) for w in range(len(c.ranks)) for l in range(len(c.ranks))
           if c.ranks[w] < c.ranks[l]]
    if nll:
      per_prompt.append(np.mean(nll))
  return float(np.mean(per_prompt)) if per_prompt else float("nan")


def training_comparisons(train: list, rc) -> list:
  """The comparisons the RM trains on: the first rm.max_train_prompts (0: all; Gao et al.'s comparison-set
  sizes), re-ranked by the gold scorer with rm.labels="gold" (the same prompts and responses, noiseless labels),
  with rating targets for rm.target != "rankings"."""
  if rc.max_train_prompts:
    if rc.max_train_prompts > len(train):
      raise ValueError(f"rm.max_train_prompts={rc.max_train_prompts}: only {len(train)} training comparisons exist "
                       "(rm.n_prompts, or the file's records)")
    train = train[:rc.max_train_prompts]
  if rc.labels == "gold":
    comparisons.relabel_by_gold(train)
    if not any(comparisons.num_strict_pairs(c.ranks) for c in train):
      raise ValueError(f"rm.labels='gold': the gold scorer ties every response of all {len(train)} training "
                       "comparisons, so there is no pair to train on; expected responses of different quality")
  if rc.target != "rankings":
    comparisons.set_rating_targets(train, rc.target)
  return train


# ----------------------------------------------------------------------------------------------------------
# The stage.


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  rc = config.rm
  tc = rc.train
  stage_dir = runtime.stage_dir(config, workdir, "rm")
  tok = sources.tokenizer(config, workdir)
  model_cfg = rm_model_config(config, tok.vocab_size)
  policy_cfg = runtime.policy_config(config, tok.vocab_size)
  mesh, rules = runtime.mesh_and_rules(config)
  sharding.check_batch(tc.batch_size, mesh, rules, field="rm.train.batch_size")
  if rc.seq_len > model_cfg.max_len:
    raise ValueError(f"rm.seq_len={rc.seq_len} exceeds the reward model's max_len={model_cfg.max_len}")

  train, val, n_truncated, _, val_records = feedback.tokenized(config, workdir, tok)
  train = training_comparisons(train, rc)
  k = max(len(c.ranks) for c in train + val)
  groups = comparisons.make_groups(train, grouping=rc.grouping, pair_weighting=rc.pair_weighting)
  group_k = k if rc.grouping == "prompt" else 2
  steps = tc.steps or max(1, int(tc.epochs * len(groups)) // tc.batch_size)
  # evals_per_epoch > 0: evaluation points at fixed fractions of an epoch, with the validation ranking loss and
  # the epoch in their rows (the per-epoch curves of experiments/papers/rm_batching.py); off by default.
  per_epoch = tc.get("evals_per_epoch", 0)
  eval_every = max(1, len(groups) // tc.batch_size // per_epoch) if per_epoch > 0 else tc.eval_every
  logging.info("[rm] %d train comparisons (%d groups, %s), %d validation; %d steps", len(train), len(groups),
               rc.grouping, len(val), steps)

  # Backbone: rm.backbone_from's model if set; else the SFT (policy) parameters when the RM has the policy's size,
  # a fresh init otherwise.
  axes = heads.rm_param_axes(model_cfg, loglik=bool(rc.loglik_coef))
  optimizer = optim.make_optimizer(rc.optimizer, steps, optim.decay_mask_from_axes(axes))
  # rm.seed_offset: another head initialisation and data order on the same comparisons (an ensemble's members).
  rng = jax.random.PRNGKey(config.seed + 1 + 7919 * rc.seed_offset)
  if rc.finetune_from:  # an earlier reward model's backbone and head (online rounds); its normalisation reset
    prev, prev_cfg, manifest = training.load_export(os.path.join(workdir, rc.finetune_from), mesh, rules)
    if manifest["kind"] != "reward_model" or prev_cfg != model_cfg:
      raise ValueError(f"rm.finetune_from={rc.finetune_from!r}: expected a reward model of this run's RM config, "
                       f"found a {manifest['kind']} (same config: {prev_cfg == model_cfg})")
    init_params = {**prev, "norm": heads.init_rm_params(rng, model_cfg, prev["backbone"])["norm"],
                   "read": heads.read_weights(rc.score_at, rc.loglik_coef)}
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)
  elif rc.backbone == "encoder":  # the masked-LM encoder (rlhf_jax/stages/mlm.py), a fresh head on it
    backbone, _ = runtime.load_policy(workdir, rc.encoder_from, mesh, rules, expect=model_cfg,
                                      field="rm.encoder_from")
    init_params = heads.init_rm_params(rng, model_cfg, backbone, rc.score_at)  # rm.check: no loglik on an encoder
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)
  elif rc.backbone_from:  # e.g. a pretrain/SFT variant of rm.model_size's size: the RM's own config
    backbone, _ = runtime.load_policy(workdir, rc.backbone_from, mesh, rules, expect=model_cfg,
                                      field="rm.backbone_from")
    init_params = heads.init_rm_params(rng, model_cfg, backbone, rc.score_at, rc.loglik_coef)
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)
  elif dataclasses.asdict(model_cfg) == dataclasses.asdict(policy_cfg) and rc.init_from:
    backbone, _ = runtime.load_policy(workdir, rc.init_from, mesh, rules, expect=policy_cfg, field="rm.init_from")
    init_params = heads.init_rm_params(rng, model_cfg, backbone, rc.score_at, rc.loglik_coef)
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)
  else:
    logging.warning("[rm] reward model size differs from the policy's and rm.backbone_from is empty: its backbone "
                    "starts from scratch")
    def init(key):
      return heads.init_rm_params(key, model_cfg, score_at=rc.score_at, loglik_coef=rc.loglik_coef)
    state, state_sh = optim.create_state(init, axes, optimizer, rng, mesh, rules)

  it = comparisons.GroupIterator(train, groups, batch_size=tc.batch_size, k=group_k, seq_len=rc.seq_len,
                                 pad_id=tok.pad_id, seed=config.seed + 7919 * rc.seed_offset,
                                 shard_index=jax.process_index(),
                                 shard_count=jax.process_count(), length_bucket=rc.length_bucket)
  ckpt = training.make_checkpointer(config.checkpoint, stage_dir)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": "rm"}
  state, start = training.resume(ckpt, state, state_sh, meta, it, stage="rm")

  guard = config.guard
  step_fn = training.make_train_step(ranking_loss_fn(model_cfg, rc.target, rc.lm_coef), optimizer,
                                     inject_nan_at_step=guard.inject_nan_at_step,
                                     skip_nonfinite=guard.on_nonfinite == "skip")
  bsh = comparisons.batch_shardings(mesh, rules, with_target=rc.target != "rankings")
  # Batches are cut to their longest sequence (rm.length_bucket), so each row logs its own padded length.
  writer = metrics.MetricsWriter(stage_dir, stage="rm", total_steps=steps, start_step=start)
  with sharding.activate(mesh, rules):
    train_step = jax.jit(step_fn, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=0)
    score_fn = jax.jit(lambda p, b: heads.group_rewards(p, b, model_cfg))

    def evaluate(params):
      rewards = rm_evals.score_comparisons(score_fn, params, val, k=k, seq_len=rc.seq_len, pad_id=tok.pad_id,
                                           batch_size=tc.batch_size, mesh=mesh, rules=rules,
                                           length_bucket=rc.length_bucket)
      out = rm_evals.pair_metrics(val, rewards, clear_gold_margin=rc.clear_gold_margin)
      if per_epoch > 0:
        out["val_loss"] = val_ranking_loss(val, rewards)
      return out, rewards

    state, _ = training.fit(
        state, stage="rm", train_step=train_step, batches=it, put=lambda b: sharding.put_batch(b, mesh, rules),
        steps=steps, start=start, eval_every=eval_every,
        # training.fit evaluates on logged steps only: with per_epoch, log on every evaluation point too.
        log_every=math.gcd(tc.log_every, eval_every) if per_epoch > 0 else tc.log_every,
        on_nonfinite=guard.on_nonfinite, ckpt=ckpt, meta=meta, writer=writer,
        evaluate=lambda params: evaluate(params)[0],
        log_row=lambda done, m, batch: {"loss": m["loss"], "train_accuracy": m["accuracy"],
                                        **({"lm_loss": m["lm_loss"]} if "lm_loss" in m else {}),
                                        "grad_norm": m["grad_norm"], "padded_len": batch["tokens"].shape[-1],
                                        **({"epoch": done * tc.batch_size / len(groups)} if per_epoch > 0 else {})})

    final, val_rewards = evaluate(state["params"])
    families = feedback.suite_families(config, workdir, val_records)
    if families is not None:
      final.update(rm_evals.clear_accuracy_by_group(val, val_rewards, families,
                                                    clear_gold_margin=rc.clear_gold_margin))
    if rc.init_from and rc.source.startswith("policy"):
      # The sampling policy's own log-likelihood as a ranker, on the same pairs: what the RM adds to it.
      # (Loaded afresh: the training step donated the buffers the RM's backbone started from.)
      policy_params, _ = runtime.load_policy(workdir, rc.init_from, mesh, rules, expect=policy_cfg)
      lp_fn = jax.jit(lambda p, b: rm_evals.response_logprobs(p, b, policy_cfg, rc.sample_temperature))
      lp = rm_evals.score_comparisons(lp_fn, policy_params, val, k=k, seq_len=rc.seq_len, pad_id=tok.pad_id,
                                      batch_size=tc.batch_size, mesh=mesh, rules=rules,
                                      length_bucket=rc.length_bucket)
      base = rm_evals.pair_metrics(val, lp, clear_gold_margin=rc.clear_gold_margin)
      final["val_policy_logprob_accuracy"] = base["val_accuracy"]
      if "val_gold_accuracy_clear" in base:
        final["val_policy_logprob_gold_accuracy_clear"] = base["val_gold_accuracy_clear"]
      if families is not None:
        by_family = rm_evals.clear_accuracy_by_group(val, lp, families, clear_gold_margin=rc.clear_gold_margin)
        final.update({key.replace("val_gold", "val_policy_logprob_gold"): v for key, v in by_family.items()
                      if key.endswith("accuracy_clear")})
    # Normalise on SFT-policy samples: gain and bias give them mean 0, std 1.
    flat = np.concatenate(val_rewards) if val_rewards else np.zeros((1,))
    mean, std = float(flat.mean()), float(flat.std() + 1e-8)
    params = dict(state["params"])
    params["norm"] = {"gain": jnp.asarray(1.0 / std, jnp.float32), "bias": jnp.asarray(-mean / std, jnp.float32)}
  training.export_params(stage_dir, params, model_cfg=model_cfg, tokenizer=tok, kind="reward_model")
  summary = {"step": steps, **final, "norm_gain": 1.0 / std, "norm_bias": -mean / std, "raw_score_mean": mean,
             "raw_score_std": std, "n_train_comparisons": len(train), "n_train_groups": len(groups),
             "n_truncated": n_truncated, "grouping": rc.grouping, "score_at": rc.score_at, "lm_coef": rc.lm_coef,
             "loglik_coef": rc.loglik_coef,
             "labels": rc.labels, "n_train_pairs": sum(comparisons.num_strict_pairs(c.ranks) for c in train),
             "wall_s": time.time() - t0}
  if rc.target != "rankings":
    summary["target"] = rc.target
  summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary
