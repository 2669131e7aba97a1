"""Pretraining: next-token prediction on the task suite's corpus (or any text dataset).

Read top to bottom: build the tokenizer, data, mesh and sharded state; restore the latest checkpoint if there
is one; run one jitted train step per batch; evaluate held-out loss and perplexity; save; write the summary.

`train_lm` is the same loop for any next-token objective: SFT (rlhf_jax/sft.py) calls it with chat batches whose
loss mask covers assistant tokens only, starting from the pretrained parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import checkpoint, configs, losses, metrics, model, optim, sharding

Batch = dict[str, Any]


def lm_loss(params, batch: Batch, model_cfg: model.ModelConfig, dropout_rng=None):
  """Mean next-token cross-entropy over `loss_mask` targets. Batches hold [b, t+1] tokens."""
  inputs_bt = batch["tokens"][:, :-1]
  targets_bt = batch["tokens"][:, 1:]
  logits_btv, _ = model.forward(params, inputs_bt, model_cfg, mask_bt=batch["mask"][:, :-1],
                                dropout_rng=dropout_rng)
  loss, n_tokens = losses.next_token_loss(logits_btv, targets_bt, batch["loss_mask"][:, 1:])
  return loss, n_tokens


def make_train_step(model_cfg: model.ModelConfig, optimizer, *, inject_nan_at_step: int = -1,
                    skip_nonfinite: bool = False) -> Callable:
  """train_step(state, batch) -> (state, metrics). Pure; the dropout rng is fold_in(rng, step)."""

  def train_step(state, batch):
    step = state["step"]
    dropout_rng = jax.random.fold_in(state["rng"], step) if model_cfg.dropout_rate > 0 else None

    def loss_fn(params):
      loss, n_tokens = lm_loss(params, batch, model_cfg, dropout_rng)
      if inject_nan_at_step >= 0:  # a planted NaN, to exercise the non-finite guard
        loss = jnp.where(step == inject_nan_at_step, jnp.nan, loss)
      return loss, n_tokens

    (loss, n_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old parameters and optimizer state for a non-finite step
      params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, state["params"])
      opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state["opt_state"])
    new_state = {**state, "params": params, "opt_state": opt_state, "step": step + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "n_tokens": n_tokens, "finite": finite}

  return train_step


def make_eval_step(model_cfg: model.ModelConfig) -> Callable:
  def eval_step(params, batch):
    loss, n_tokens = lm_loss(params, batch, model_cfg)
    return loss * n_tokens, n_tokens
  return eval_step


def evaluate(eval_step, params, batches: Iterator[Batch], mesh, rules, max_batches: int = 0) -> dict[str, float]:
  """Token-weighted held-out loss and perplexity."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    s, n = eval_step(params, sharding.put_batch(_lm_fields(batch), mesh, rules))
    total += float(s)
    count += float(n)
  loss = total / max(count, 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


NonFiniteError = checkpoint.NonFiniteError


def train_lm(
    config: ml_collections.ConfigDict,
    stage_cfg: ml_collections.ConfigDict,
    stage_dir: str,
    *,
    stage: str,
    model_cfg: model.ModelConfig,
    train_iter_fn: Callable[[int, int], Any],
    eval_iter_fn: Callable[[], Iterator[Batch]],
    init_params: Any = None,
    extra_summary: dict[str, Any] | None = None,
    write_summary: bool = True,
) -> dict[str, Any]:
  """The next-token training loop shared by pretraining and SFT.

  config holds what every stage shares (seed, mesh, checkpoint, guard); stage_cfg (config.pretrain or
  config.sft) holds this stage's `train` and `optimizer` settings.

  train_iter_fn(shard_index, shard_count) returns an iterator with get_state()/set_state();
  eval_iter_fn() returns a fresh finite iterator over held-out batches;
  init_params: starting parameters (e.g. the pretrained ones for SFT); default a fresh `model.init`.
  write_summary=False leaves summary.json (the stage's "complete" mark) to the caller, which has more to do.
  """
  t0 = time.time()
  tc = stage_cfg.train
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_batch(tc.batch_size, mesh, rules, field="train.batch_size")
  axes = model.param_axes(model_cfg)
  optimizer = optim.make_optimizer(stage_cfg.optimizer, tc.steps, optim.decay_mask_from_axes(axes))
  rng = jax.random.PRNGKey(config.seed)
  if init_params is None:
    state, state_sh = optim.create_state(lambda k: model.init(k, model_cfg), axes, optimizer, rng, mesh, rules)
  else:
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)

  ckpt = make_checkpointer(config, stage_dir)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": stage}
  train_iter = train_iter_fn(jax.process_index(), jax.process_count())
  state, data_state, start = checkpoint.resume(ckpt, state, state_sh, meta, stage=stage)
  if start:
    train_iter.set_state(data_state)

  guard = config.guard
  step_fn = make_train_step(model_cfg, optimizer, inject_nan_at_step=guard.inject_nan_at_step,
                            skip_nonfinite=guard.on_nonfinite == "skip")
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in ("tokens", "mask", "loss_mask")}
  with sharding.activate(mesh, rules):
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model_cfg), in_shardings=(state_sh["params"], batch_sh))

  tokens_per_step = tc.batch_size * tc.seq_len
  writer = metrics.MetricsWriter(stage_dir, stage=stage, total_steps=tc.steps, start_step=start,
                                 tokens_per_step=tokens_per_step)
  last = {}
  with sharding.activate(mesh, rules):
    for step in range(start, tc.steps):
      batch = next(train_iter)
      state, m = train_step(state, sharding.put_batch(_lm_fields(batch), mesh, rules))
      done = step + 1
      checkpoint.guard_nonfinite(m, step=step, stage=stage, on_nonfinite=guard.on_nonfinite, ckpt=ckpt)
      if done % tc.log_every == 0 or done == tc.steps:
        row = {"loss": m["loss"], "grad_norm": m["grad_norm"],
               "lr": optim.learning_rate_schedule(stage_cfg.optimizer, tc.steps)(done)}
        if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
          row.update(evaluate(eval_step, state["params"], eval_iter_fn(), mesh, rules, tc.eval_batches))
        last = writer.log(done, row)
      ckpt.save(done, state, data_state=train_iter.get_state(), meta=meta, force=done == tc.steps)
  ckpt.wait()

  final_eval = evaluate(eval_step, state["params"], eval_iter_fn(), mesh, rules, tc.eval_batches)
  export_params(stage_dir, state["params"])
  if not last and os.path.exists(writer.jsonl_path):  # resumed after the last step: report the logged loss
    rows = metrics.read_jsonl(writer.jsonl_path)
    last = rows[-1] if rows else {}
  summary = {"step": tc.steps, "train_loss": last.get("loss"), **final_eval, "wall_s": time.time() - t0,
             "num_params": model_cfg.num_params(), "tokens_per_step": tokens_per_step,
             "devices": jax.device_count(), **(extra_summary or {})}
  if write_summary:
    summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary


def _lm_fields(batch: Batch) -> Batch:
  return {k: np.asarray(batch[k]) for k in ("tokens", "mask", "loss_mask")}


def make_checkpointer(config, stage_dir: str) -> checkpoint.Checkpointer:
  cc = config.checkpoint
  return checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), save_every=cc.save_every,
                                 max_to_keep=cc.max_to_keep, async_save=cc.async_save)


def export_params(stage_dir: str, params) -> None:
  """The stage's final parameters, for the next stage to start from (`load_params`)."""
  path = os.path.join(os.path.abspath(stage_dir), "params")
  ckptr = checkpoint.ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()


def load_params(stage_dir: str, abstract_params, shardings) -> Any:
  path = os.path.join(os.path.abspath(stage_dir), "params")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no exported parameters at {path}: run the stage that writes {stage_dir} first")
  target = optim.abstract_with_shardings(abstract_params, shardings)
  return checkpoint.ocp.StandardCheckpointer().restore(path, target)


def check_seq_len(seq_len: int, model_cfg: model.ModelConfig, field: str) -> None:
  if seq_len + 1 > model_cfg.max_len:
    raise ValueError(f"{field}={seq_len} (+1 for the shifted target) exceeds model.max_len={model_cfg.max_len}")


def load_stage_params(config, workdir: str, stage: str, model_cfg: model.ModelConfig) -> Any:
  """The exported parameters of an earlier stage, laid out on this run's mesh."""
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)
  abstract = jax.eval_shape(lambda k: model.init(k, model_cfg), jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(model.param_axes(model_cfg), abstract, mesh, rules)
  return load_params(os.path.join(workdir, stage), abstract, shardings)


def rewrite_summary(stage_dir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(stage_dir, "summary.json"), summary)


def unigram_entropy(token_batches: Iterator[Batch], max_batches: int = 20) -> float:
  """Entropy (nats) of the token frequencies over loss-masked targets: the loss of the best
  context-free model, a yardstick for the held-out loss."""
  counts: dict[int, int] = {}
  for i, batch in enumerate(token_batches):
    if i >= max_batches:
      break
    toks = np.asarray(batch["tokens"])[np.asarray(batch["loss_mask"]).astype(bool)]
    ids, c = np.unique(toks, return_counts=True)
    for a, b in zip(ids.tolist(), c.tolist()):
      counts[a] = counts.get(a, 0) + b
  p = np.array(list(counts.values()), dtype=np.float64)
  p /= p.sum()
  return float(-(p * np.log(p)).sum())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The pretraining stage: WORKDIR/pretrain/{checkpoints,params,metrics.jsonl,summary.json}."""
  from rlhf_jax import data_sources  # pylint: disable=g-import-not-at-top

  stage_dir = os.path.join(workdir, "pretrain")
  tok = data_sources.tokenizer(config, workdir)
  model_cfg = configs.to_model_config(config.model, tok.vocab_size)
  check_seq_len(config.pretrain.train.seq_len, model_cfg, "pretrain.train.seq_len")
  train_iter_fn, eval_iter_fn = data_sources.pretrain_iters(config, workdir, tok)
  entropy = unigram_entropy(eval_iter_fn())
  return train_lm(config, config.pretrain, stage_dir, stage="pretrain", model_cfg=model_cfg, train_iter_fn=train_iter_fn,
                  eval_iter_fn=eval_iter_fn, extra_summary={"unigram_entropy": entropy})
