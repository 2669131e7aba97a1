"""The shared supervised training loop: state, resume, the non-finite guard, metrics, export.

Read top to bottom: `make_train_step` turns a loss into one pure jitted step; `fit` runs steps from the latest
checkpoint to the last, logging, evaluating and saving as it goes; `train_lm` is the whole next-token stage
body (pretraining and SFT call it with different data and starting parameters); `export_params` and
`load_params` hand a stage's final parameters to the next stage.

Nothing here reads an experiment config or a workdir: the stages (rlhf_jax/stages/) pass the settings, the
data iterators and the directory to write in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import checkpoint, losses, metrics, optim, preemption, sharding, tokenizers
from rlhf_jax.evals import lm as lm_evals
from rlhf_jax.models import heads, lora, transformer

Batch = dict[str, Any]
# loss_fn(params, batch, rng) -> (scalar loss, {name: scalar}); rng is fold_in(state rng, step).
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

NonFiniteError = checkpoint.NonFiniteError


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, inject_nan_at_step: int = -1,
                    skip_nonfinite: bool = False) -> Callable:
  """train_step(state, batch, frozen=None) -> (state, metrics): one optimizer step on `loss_fn`. Pure.

  metrics: "loss", what loss_fn reports beside it, "grad_norm" and "finite". With skip_nonfinite a step whose
  loss or gradient is not finite keeps the old parameters and optimizer state. inject_nan_at_step >= 0 plants a
  NaN in the loss at that step (to test the guard). `frozen`, when given, is passed to the loss after the batch
  and rng and never differentiated (the base weights of LoRA adapters, `lora_loss_fn`).
  """

  def train_step(state, batch, frozen=None):
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)  # a resumed run draws the same numbers

    def wrapped(params):
      loss, aux = loss_fn(params, batch, rng) if frozen is None else loss_fn(params, batch, rng, frozen)
      if inject_nan_at_step >= 0:
        loss = jnp.where(step == inject_nan_at_step, jnp.nan, loss)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(wrapped, has_aux=True)(state["params"])
    grads, grad_norm = optim.settled_gradient(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, state["params"])
      opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state["opt_state"])
    new_state = {**state, "params": params, "opt_state": opt_state, "step": step + 1}
    return new_state, {"loss": loss, **aux, "grad_norm": grad_norm, "finite": finite}

  return train_step


def lm_loss_fn(model_cfg: transformer.ModelConfig) -> LossFn:
  """The next-token loss as a `make_train_step` loss (dropout drawn from the step's rng when enabled)."""

  def loss_fn(params, batch, rng):
    loss, n_tokens = losses.lm_loss(params, batch, model_cfg, rng if model_cfg.dropout_rate > 0 else None)
    return loss, {"n_tokens": n_tokens}

  return loss_fn


def lora_loss_fn(loss_fn: LossFn, lcfg: lora.LoraConfig) -> Callable:
  """`loss_fn` of the full weights as a loss of LoRA adapters: (adapters, batch, rng, base) -> loss_fn(base
  with the adapters attached (lora.attach: never merged), batch, rng); with `make_train_step`, only the adapters
  are trained."""

  def adapted(adapters, batch, rng, base):
    return loss_fn(lora.attach(base, adapters, lcfg), batch, rng)

  return adapted


def make_checkpointer(checkpoint_cfg, stage_dir: str) -> checkpoint.Checkpointer:
  """The stage's checkpoints under STAGE_DIR/checkpoints (checkpoint_cfg: save_every, max_to_keep, async_save)."""
  cc = checkpoint_cfg
  return checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"), save_every=cc.save_every,
                                 max_to_keep=cc.max_to_keep, async_save=cc.async_save)


def resume(ckpt: checkpoint.Checkpointer, state, state_sh, meta: dict, batches, *, stage: str):
  """(state, first step): from the latest checkpoint if there is one, with the data iterator moved to where it
  was (`batches.set_state`); else the given state and 0."""
  state, data_state, start = checkpoint.resume(ckpt, state, state_sh, meta, stage=stage)
  if start:
    batches.set_state(data_state)
  return state, start


def fit(state, *, stage: str, train_step: Callable, batches: Iterator[Batch], put: Callable[[Batch], Any],
        steps: int, start: int, log_every: int, eval_every: int, on_nonfinite: str,
        ckpt: checkpoint.Checkpointer, meta: dict, writer: metrics.MetricsWriter,
        log_row: Callable[[int, dict, Batch], dict[str, Any]],
        evaluate: Callable[[Any], dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
  """Steps `start` .. `steps` - 1 of a jitted `train_step`; returns the final state and the last logged row.

  Every `log_every` steps (and at the last) `log_row(done, metrics, batch)` is written, with `evaluate(params)`
  merged in every `eval_every` steps; a checkpoint of the state and the iterator's position is started every
  `ckpt.save_every` steps and at the last, and waited for at the end. A non-finite step stops the stage (the
  last good checkpoint untouched) or is skipped, per `on_nonfinite`. After a preemption notice
  (rlhf_jax.preemption) the step just done is saved and Preempted is raised.
  """
  last: dict[str, Any] = {}
  for step in range(start, steps):
    batch = next(batches)
    state, m = train_step(state, put(batch))
    done = step + 1
    checkpoint.guard_nonfinite(m, step=step, stage=stage, on_nonfinite=on_nonfinite, ckpt=ckpt)
    if done % log_every == 0 or done == steps:
      row = log_row(done, m, batch)
      if evaluate is not None and eval_every and (done % eval_every == 0 or done == steps):
        row.update(evaluate(state["params"]))
      last = writer.log(done, row)
    ckpt.save(done, state, data_state=batches.get_state(), meta=meta, force=done == steps)
    if done < steps and preemption.should_stop(done):
      stop_for_preemption(ckpt, done, state, batches.get_state(), meta, stage)
  ckpt.wait()
  return state, last


def stop_for_preemption(ckpt: checkpoint.Checkpointer, step: int, state, data_state, meta: dict, stage: str):
  """Saves `step` (unless it is saved already), waits for the save to be complete, and raises Preempted."""
  ckpt.save(step, state, data_state=data_state, meta=meta, force=True)
  ckpt.wait()
  raise preemption.Preempted(f"[{stage}] preemption notice: stopped after step {step}, saved in {ckpt.directory}; "
                             "rerun the same command to resume from it")


def train_lm(
    *,
    stage: str,
    stage_dir: str,
    model_cfg: transformer.ModelConfig,
    train_cfg: ml_collections.ConfigDict,
    optimizer_cfg: ml_collections.ConfigDict,
    checkpoint_cfg: ml_collections.ConfigDict,
    guard_cfg: ml_collections.ConfigDict,
    seed: int,
    mesh,
    rules,
    train_iter: Iterator[Batch],
    eval_iter_fn: Callable[[], Iterator[Batch]],
    tokenizer: tokenizers.Tokenizer | None = None,
    init_params: Any = None,
    extra_summary: dict[str, Any] | None = None,
    write_summary: bool = True,
    lora_cfg: lora.LoraConfig | None = None,
) -> tuple[dict[str, Any], Any]:
  """The next-token training loop shared by pretraining and SFT; returns (summary, final parameters).

  train_cfg: steps, batch_size, seq_len, log_every, eval_every, eval_batches; optimizer_cfg: rlhf_jax.optim;
  guard_cfg: on_nonfinite ("stop" or "skip"), inject_nan_at_step.
  train_iter: batches of [b, t+1] tokens, mask and loss_mask with get_state()/set_state();
  eval_iter_fn() returns a fresh finite iterator over held-out batches;
  tokenizer: exported beside the parameters (export_params);
  init_params: starting parameters (e.g. the pretrained ones for SFT); default a fresh `transformer.init`.
  write_summary=False leaves summary.json (the stage's "complete" mark) to the caller, which has more to do.
  lora_cfg (enabled): train LoRA adapters on the frozen init_params instead of every weight; checkpoints hold the
  adapters, the export and the returned parameters the merged weights.
  """
  t0 = time.time()
  tc = train_cfg
  sharding.check_batch(tc.batch_size, mesh, rules, field=f"{stage}.train.batch_size")
  use_lora = lora_cfg is not None and lora_cfg.enabled
  if use_lora and init_params is None:
    raise ValueError(f"{stage}.lora.rank={lora_cfg.rank}: LoRA adapts a trained model; {stage} has no init_from "
                     "model to adapt")
  params_axes = transformer.param_axes(model_cfg)
  axes = lora.adapter_axes(model_cfg, lora_cfg) if use_lora else params_axes
  optimizer = optim.make_optimizer(optimizer_cfg, tc.steps, optim.decay_mask_from_axes(axes))
  rng = jax.random.PRNGKey(seed)
  base = None
  if use_lora:  # the trained state is the adapters; the base is a frozen argument of every step
    base = init_params
    state, state_sh = optim.create_state(lambda k: lora.init_adapters(k, model_cfg, lora_cfg), axes, optimizer,
                                         rng, mesh, rules)
  elif init_params is None:
    state, state_sh = optim.create_state(lambda k: transformer.init(k, model_cfg), axes, optimizer, rng, mesh,
                                         rules)
  else:
    state, state_sh = optim.state_from_params(init_params, axes, optimizer, rng, mesh, rules)

  ckpt = make_checkpointer(checkpoint_cfg, stage_dir)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": stage}
  if use_lora:  # a checkpoint of adapters resumes only with the same adapters
    meta["model"]["lora"] = dataclasses.asdict(lora_cfg) | {"targets": list(lora_cfg.targets)}
  state, start = resume(ckpt, state, state_sh, meta, train_iter, stage=stage)

  loss_fn = lora_loss_fn(lm_loss_fn(model_cfg), lora_cfg) if use_lora else lm_loss_fn(model_cfg)
  step_fn = make_train_step(loss_fn, optimizer, inject_nan_at_step=guard_cfg.inject_nan_at_step,
                            skip_nonfinite=guard_cfg.on_nonfinite == "skip")
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in ("tokens", "mask", "loss_mask")}
  params_sh = sharding.tree_shardings(params_axes, base, mesh, rules) if use_lora else state_sh["params"]
  with sharding.activate(mesh, rules):
    if use_lora:
      lora_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, params_sh), out_shardings=(state_sh, None),
                          donate_argnums=0)
      train_step = lambda state, batch: lora_step(state, batch, base)
      merge = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg), out_shardings=params_sh)
    else:
      train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                           donate_argnums=0)
    eval_step = jax.jit(lm_evals.make_eval_step(model_cfg), in_shardings=(params_sh, batch_sh))

  def full(params):  # the model's weights: the adapters merged into the base with LoRA
    if not use_lora:
      return params
    with sharding.activate(mesh, rules):
      return merge(base, params)

  def evaluate(params):
    # Under the mesh whether called in the loop or after it: a call outside would trace again without the
    # activation sharding constraints and compile a second program.
    with sharding.activate(mesh, rules):
      return lm_evals.evaluate(eval_step, full(params), eval_iter_fn(), mesh, rules, tc.eval_batches)

  schedule = optim.learning_rate_schedule(optimizer_cfg, tc.steps)
  tokens_per_step = tc.batch_size * tc.seq_len
  writer = metrics.MetricsWriter(stage_dir, stage=stage, total_steps=tc.steps, start_step=start,
                                 tokens_per_step=tokens_per_step)
  with sharding.activate(mesh, rules):
    state, last = fit(
        state, stage=stage, train_step=train_step, batches=train_iter,
        put=lambda b: sharding.put_batch(lm_evals.lm_fields(b), mesh, rules), steps=tc.steps, start=start,
        log_every=tc.log_every, eval_every=tc.eval_every, on_nonfinite=guard_cfg.on_nonfinite, ckpt=ckpt,
        meta=meta, writer=writer, evaluate=evaluate,
        log_row=lambda done, m, _: {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": schedule(done)})

  final_eval = evaluate(state["params"])
  final = full(state["params"])
  export_params(stage_dir, final, model_cfg=model_cfg, tokenizer=tokenizer)
  if not last and os.path.exists(writer.jsonl_path):  # resumed after the last step: report the logged loss
    rows = metrics.read_jsonl(writer.jsonl_path)
    last = rows[-1] if rows else {}
  summary = {"step": tc.steps, "train_loss": last.get("loss"), **final_eval, "wall_s": time.time() - t0,
             "num_params": model_cfg.num_params(), "tokens_per_step": tokens_per_step,
             "devices": jax.device_count(), **(extra_summary or {})}
  if use_lora:
    summary["lora_params"] = lora.num_params(model_cfg, lora_cfg)
  if write_summary:
    summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary, final


EXPORT_MANIFEST = "export.json"


def export_params(stage_dir: str, params, *, model_cfg: transformer.ModelConfig | None = None,
                  tokenizer: tokenizers.Tokenizer | None = None, kind: str = "policy",
                  extra: dict[str, Any] | None = None) -> None:
  """The stage's final parameters in STAGE_DIR/params, for the next stage (or the chat command) to load.

  With model_cfg, STAGE_DIR/export.json records what they are: {"kind": "policy" | "reward_model" |
  "value_model", "model": the ModelConfig fields, "tokenizer": how to rebuild the tokenizer (a SentencePiece
  model is copied beside it), and `extra`'s keys (a reward model's "score_at": its params hold "read")}, so a stage
  directory can be loaded without the experiment that wrote it.
  """
  path = os.path.join(os.path.abspath(stage_dir), "params")
  ckptr = checkpoint.ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  checkpoint.write_checksums(path)  # so a damaged export is found before a later stage reads it
  if model_cfg is not None and jax.process_index() == 0:
    manifest = {"kind": kind, "model": dataclasses.asdict(model_cfg), **(extra or {})}
    if kind == "reward_model" and "read" in params:  # which readout its "read" weights select (load_export)
      manifest["score_at"] = max(heads.SCORE_AT, key=lambda m: float(params["read"][m]))
      if "loglik" in params["read"]:
        manifest["loglik_coef"] = float(params["read"]["loglik"])
    if tokenizer is not None:
      manifest["tokenizer"] = tokenizers.save_to_dir(tokenizer, stage_dir)
    checkpoint.write_json_atomic(os.path.join(stage_dir, EXPORT_MANIFEST), manifest)


def load_params(stage_dir: str, abstract_params, shardings) -> Any:
  """Parameters exported by `export_params`, restored onto `shardings` (any mesh)."""
  path = os.path.join(os.path.abspath(stage_dir), "params")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no exported parameters at {path}: run the stage that writes {stage_dir} first")
  damage = export_damage(stage_dir)
  if damage:
    raise ValueError(f"the exported parameters in {path} are damaged ({damage}); rerun the experiment: the pipeline "
                     "redoes that stage from its last checkpoint")
  target = optim.abstract_with_shardings(abstract_params, shardings)
  return checkpoint.ocp.StandardCheckpointer().restore(path, target)


def export_damage(stage_dir: str) -> str | None:
  """Why STAGE_DIR/params differs from what `export_params` recorded (a truncated or altered file), or None."""
  return checkpoint.verify_checksums(os.path.join(os.path.abspath(stage_dir), "params"))


def read_manifest(stage_dir: str) -> dict[str, Any]:
  """STAGE_DIR/export.json, checked: what `export_params` recorded of the exported parameters."""
  path = os.path.join(stage_dir, EXPORT_MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {stage_dir} holds no finished stage's export")
  try:
    with open(path) as f:
      manifest = json.load(f)
    model_cfg = transformer.ModelConfig(**manifest["model"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a valid export manifest ({e}); expected 'kind' and 'model' (ModelConfig "
                     "fields) as written by rlhf_jax.training.export_params") from None
  return {**manifest, "model": model_cfg}


def load_export(stage_dir: str, mesh, rules) -> tuple[Any, transformer.ModelConfig, dict[str, Any]]:
  """(params, model config, manifest) of a stage's export, the parameters laid out on `mesh` by `rules`.
  Reward models come with their head and normalisation, value models with their head."""
  manifest = read_manifest(stage_dir)
  cfg = manifest["model"]
  # A reward model exported before rm.score_at existed has no "read" weights (read at EOS): loaded without them.
  score_at, loglik_coef = manifest.get("score_at"), manifest.get("loglik_coef", 0.0)
  init, axes = {"policy": (transformer.init, transformer.param_axes),
                "reward_model": (lambda k, c: heads.init_rm_params(k, c, score_at=score_at, loglik_coef=loglik_coef),
                                 lambda c: heads.rm_param_axes(c, with_read=score_at is not None,
                                                               loglik=bool(loglik_coef))),
                "value_model": (heads.init_value_params, heads.value_axes)}.get(manifest["kind"], (None, None))
  if init is None:
    raise ValueError(f"{stage_dir}/{EXPORT_MANIFEST}: unknown kind {manifest['kind']!r}; expected 'policy', "
                     "'reward_model' or 'value_model'")
  abstract = jax.eval_shape(lambda k: init(k, cfg), jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(axes(cfg), abstract, mesh, rules)
  return load_params(stage_dir, abstract, shardings), cfg, manifest


def write_summary(stage_dir: str, summary: dict[str, Any]) -> None:
  """STAGE_DIR/summary.json (process 0), atomically: the stage's "complete" mark."""
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(stage_dir, "summary.json"), summary)
