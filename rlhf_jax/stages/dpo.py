"""Direct preference optimisation from SFT on the comparison data: DPO, conservative DPO and IPO.

The policy (from `dpo.init_from`, SFT) learns from the same K-way rankings the reward model learns from
(rlhf_jax.feedback, configured in the `rm` block), without a reward model or sampling: each prompt's K responses
are one batch element, and every strictly ranked pair (or only the best against each other one,
`dpo.pairs="best_vs_rest"`) contributes the loss of `dpo.loss` (rlhf_jax.losses.preference), the pairs of a
prompt averaged before prompts are averaged, as the grouped RM loss weights them.

The reference (the frozen SFT model) scores every response once before training; those log-probs are kept with
the comparisons, so a resumed run recomputes them identically. The loop is the shared supervised loop
(rlhf_jax.training.fit): checkpoints, resume, the non-finite guard, metrics. On the held-out comparisons:
implicit-reward accuracy and margin, and the implicit reward beta * log(pi / ref) as a ranker against the gold
ordering (`val_gold_accuracy_clear`, beside the RM's). At the end the policy is evaluated against SFT like PPO's
(win rate, KL to SFT on its own samples, gold and RM scores, the alignment tax; rlhf_jax.runtime.evaluate_policy).
With `dpo.lora.rank` > 0 the policy is LoRA adapters on the frozen SFT weights, which are also the reference (one
copy); the export holds the merged weights.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import configs, feedback, losses, metrics, optim, runtime, sharding, training
from rlhf_jax.data import comparisons, sources
from rlhf_jax.evals import rm as rm_evals
from rlhf_jax.models import lora, transformer


def check(config: ml_collections.ConfigDict) -> None:
  dc = config.dpo
  policy = runtime.check_shared(config)
  mesh, rules = runtime.mesh_and_rules(config)
  runtime.check_choice(dc.loss, "dpo.loss", losses.preference.KINDS)
  runtime.check_choice(dc.pairs, "dpo.pairs", losses.preference.PAIRS)
  if not dc.beta > 0:
    raise ValueError(f"dpo.beta={dc.beta}: expected a KL strength > 0")
  if not 0.0 <= dc.label_smoothing < 0.5:
    raise ValueError(f"dpo.label_smoothing={dc.label_smoothing}: expected eps in [0, 0.5)")
  if dc.label_smoothing and dc.loss != "dpo":
    raise ValueError(f"dpo.label_smoothing={dc.label_smoothing} applies to dpo.loss='dpo' only, not {dc.loss!r}")
  sharding.check_batch(dc.train.batch_size, mesh, rules, field="dpo.train.batch_size")
  runtime.check_seq_len(config.rm.seq_len, policy, "rm.seq_len (the comparisons' length)", extra=0)
  lcfg = configs.to_lora_config(dc.lora, "dpo.lora")
  if lcfg.enabled:
    lora.check(lcfg, policy, "dpo.lora")
  feedback.check(config)


def preference_loss_fn(model_cfg: transformer.ModelConfig, dc) -> training.LossFn:
  """The preference loss of a group batch (with the reference's log-probs in batch["ref_logp"])."""

  def loss_fn(params, batch, rng):
    del rng
    logp_bk = rm_evals.response_logprobs(params, batch, model_cfg, 1.0)
    loss, m = losses.preference_loss(logp_bk, batch["ref_logp"], batch["ranks"], batch["valid"], beta=dc.beta,
                                     kind=dc.loss, label_smoothing=dc.label_smoothing, pairs=dc.pairs,
                                     weights_b=batch["weight"])
    return loss, {k: m[k] for k in ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")}

  return loss_fn


def _with_logp(comps, values):
  return [dataclasses.replace(c, ref_logp=[float(x) for x in v]) for c, v in zip(comps, values)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  dc, rc = config.dpo, config.rm
  tc = dc.train
  stage_dir = runtime.stage_dir(config, workdir, "dpo")
  tok = sources.tokenizer(config, workdir)
  model_cfg = runtime.policy_config(config, tok.vocab_size)
  mesh, rules = runtime.mesh_and_rules(config)
  sharding.check_batch(tc.batch_size, mesh, rules, field="dpo.train.batch_size")

  train, val, n_truncated, _, _ = feedback.tokenized(config, workdir, tok)
  k = max(len(c.ranks) for c in train + val)
  kw = dict(k=k, seq_len=rc.seq_len, pad_id=tok.pad_id, batch_size=tc.batch_size, mesh=mesh, rules=rules,
            length_bucket=rc.length_bucket)
  lp_fn = jax.jit(lambda p, b: rm_evals.response_logprobs(p, b, model_cfg, 1.0))
  # The frozen reference's log-probs of every response, once (the training step donates the policy's buffers).
  ref_params, _ = runtime.load_policy(workdir, dc.init_from, mesh, rules, expect=model_cfg, field="dpo.init_from")
  with sharding.activate(mesh, rules):
    train = _with_logp(train, rm_evals.score_comparisons(lp_fn, ref_params, train, **kw))
    val = _with_logp(val, rm_evals.score_comparisons(lp_fn, ref_params, val, **kw))
  lcfg = configs.to_lora_config(dc.lora, "dpo.lora")
  base = ref_params if lcfg.enabled else None  # LoRA: the reference is also the frozen base of the adapters
  del ref_params
  groups = comparisons.make_groups(train, grouping="prompt", pair_weighting="uniform")
  steps = tc.steps or max(1, int(tc.epochs * len(groups)) // tc.batch_size)
  logging.info("[%s] %d train comparisons (%d groups), %d validation; %d steps", dc.stage_dir, len(train),
               len(groups), len(val), steps)

  if base is None:
    init_params, _ = runtime.load_policy(workdir, dc.init_from, mesh, rules, expect=model_cfg, field="dpo.init_from")
    axes = transformer.param_axes(model_cfg)
    optimizer = optim.make_optimizer(dc.optimizer, steps, optim.decay_mask_from_axes(axes))
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, jax.random.PRNGKey(config.seed + 3),
                                              mesh, rules)
  else:  # the trained state is the adapters (B = 0: the policy starts as the reference)
    axes = lora.adapter_axes(model_cfg, lcfg)
    optimizer = optim.make_optimizer(dc.optimizer, steps, optim.decay_mask_from_axes(axes))
    state, state_sh = optim.create_state(lambda k: lora.init_adapters(k, model_cfg, lcfg), axes, optimizer,
                                         jax.random.PRNGKey(config.seed + 3), mesh, rules)
  it = comparisons.GroupIterator(train, groups, batch_size=tc.batch_size, k=k, seq_len=rc.seq_len, pad_id=tok.pad_id,
                                 seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
                                 length_bucket=rc.length_bucket)
  ckpt = training.make_checkpointer(config.checkpoint, stage_dir)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": "dpo"}
  if base is not None:  # a checkpoint of adapters resumes only with the same adapters
    meta["model"]["lora"] = dataclasses.asdict(lcfg) | {"targets": list(lcfg.targets)}
  label = dc.stage_dir  # progress lines name the variant: [dpo], [ipo], ...
  state, start = training.resume(ckpt, state, state_sh, meta, it, stage=label)
  guard = config.guard
  loss_fn = preference_loss_fn(model_cfg, dc)
  step_fn = training.make_train_step(loss_fn if base is None else training.lora_loss_fn(loss_fn, lcfg), optimizer,
                                     inject_nan_at_step=guard.inject_nan_at_step,
                                     skip_nonfinite=guard.on_nonfinite == "skip")
  bsh = comparisons.batch_shardings(mesh, rules, with_ref=True)
  writer = metrics.MetricsWriter(stage_dir, stage=label, total_steps=steps, start_step=start)
  if base is not None:
    base_sh = sharding.tree_shardings(transformer.param_axes(model_cfg), base, mesh, rules)
    merge = jax.jit(lambda b, a: lora.merge(b, a, lcfg), out_shardings=base_sh)

  def full(params):  # the policy's weights: the adapters merged into the base with LoRA
    return params if base is None else merge(base, params)

  def evaluate(params) -> dict[str, float]:
    """The implicit reward beta * (log pi - log ref) on the held-out comparisons: against the labels (and its
    margin), and as a ranker against the gold ordering on clearly different pairs (rlhf_jax.evals.rm)."""
    logp = rm_evals.score_comparisons(lp_fn, full(params), val, **kw)
    rewards = [dc.beta * (np.asarray(lp) - np.asarray(c.ref_logp)) for lp, c in zip(logp, val)]
    out = rm_evals.pair_metrics(val, rewards, clear_gold_margin=rc.clear_gold_margin)
    out.pop("val_calibration_ece", None)  # sigmoid(beta * d) is no calibrated probability
    return out

  with sharding.activate(mesh, rules):
    if base is None:
      train_step = jax.jit(step_fn, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=0)
    else:
      lora_step = jax.jit(step_fn, in_shardings=(state_sh, bsh, base_sh), out_shardings=(state_sh, None),
                          donate_argnums=0)
      train_step = lambda state, batch: lora_step(state, batch, base)
    state, _ = training.fit(
        state, stage=label, train_step=train_step, batches=it, put=lambda b: sharding.put_batch(b, mesh, rules),
        steps=steps, start=start, log_every=tc.log_every, eval_every=tc.eval_every,
        on_nonfinite=guard.on_nonfinite, ckpt=ckpt, meta=meta, writer=writer, evaluate=evaluate,
        log_row=lambda done, m, batch: {**{key: m[key] for key in ("loss", "reward_accuracy", "reward_margin",
                                                                    "chosen_logp", "rejected_logp", "grad_norm")},
                                        "padded_len": batch["tokens"].shape[-1]})
    final = evaluate(state["params"])
    policy = full(state["params"])
  training.export_params(stage_dir, policy, model_cfg=model_cfg, tokenizer=tok)
  del policy
  summary = {"step": steps, **final, "n_train_comparisons": len(train), "n_truncated": n_truncated,
             "beta": float(dc.beta), "loss": dc.loss, "train_wall_s": time.time() - t0}
  rm_params = rm_cfg = None
  rm_dir = os.path.join(workdir, dc.rm_from) if dc.rm_from else ""
  if rm_dir and os.path.isfile(os.path.join(rm_dir, training.EXPORT_MANIFEST)):  # the RM's score, for the report
    rm_params, rm_cfg, _ = training.load_export(rm_dir, mesh, rules)
  policy_params, _ = runtime.load_policy(workdir, os.path.basename(stage_dir), mesh, rules, expect=model_cfg)
  sft_params, _ = runtime.load_policy(workdir, dc.init_from, mesh, rules, expect=model_cfg)
  summary.update(runtime.evaluate_policy(config, workdir, tok, model_cfg, policy_params, sft_params, rm_params,
                                         rm_cfg, mesh, rules, stage_dir=stage_dir))
  summary["wall_s"] = time.time() - t0
  summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary
