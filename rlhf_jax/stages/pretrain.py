"""Pretraining: next-token prediction on the task suite's corpus.

Builds the tokenizer, the data and a fresh model (or the one `init.hf_path` imports), then runs the shared next-token loop (rlhf_jax.training):
WORKDIR/<pretrain.stage_dir>/{checkpoints,params,export.json,metrics.jsonl,summary.json}. The summary carries
the held-out loss and perplexity beside the unigram entropy of the data, the loss of the best model that
ignores context.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from rlhf_jax import runtime, sharding, training
from rlhf_jax.data import sources
from rlhf_jax.evals import lm as lm_evals
from rlhf_jax.models import hf


def check(config: ml_collections.ConfigDict) -> None:
  runtime.check_lm_block(config, "pretrain", allow_zero_steps=bool(config.init.hf_path))
  if not config.model.get("causal", True):
    raise ValueError("model.causal=False in the pretrain stage: next-token prediction needs a causal decoder; the "
                     "bidirectional encoder is trained by the mlm stage")
  if sources.on_user_data(config) and not config.files.pretrain and config.pretrain.train.steps:
    raise ValueError(f"pretrain.train.steps={config.pretrain.train.steps} on a user's files without files.pretrain: "
                     "expected pretrain.train.steps=0 (import only) or a files.pretrain file of {\"text\"} documents")


def _has_text(config) -> bool:
  """Whether there is pretraining text: the suite's corpus, or on a user's files, files.pretrain."""
  return not sources.on_user_data(config) or bool(config.files.pretrain)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  pc = config.pretrain
  tok = sources.tokenizer(config, workdir)
  model_cfg = runtime.policy_config(config, tok.vocab_size)
  runtime.check_seq_len(pc.train.seq_len, model_cfg, "pretrain.train.seq_len")
  train_iter_fn, eval_iter_fn = sources.pretrain_iters(config, workdir, tok) if _has_text(config) else (None, None)
  entropy = lm_evals.unigram_entropy(eval_iter_fn()) if eval_iter_fn else float("nan")
  mesh, rules = runtime.mesh_and_rules(config)
  init_params = None
  if config.init.hf_path:  # continue pretraining the imported model (a resumed run restores its checkpoint)
    init_params, _ = hf.load_hf(config.init.hf_path, mesh, rules, dtype=model_cfg.param_dtype)
    if pc.train.steps == 0:  # no pretraining: the stage only imports, for SFT to start from
      return _import_only(config, workdir, init_params, model_cfg, tok, eval_iter_fn, mesh, rules, entropy)
  summary, _ = training.train_lm(
      stage="pretrain", stage_dir=runtime.stage_dir(config, workdir, "pretrain"), model_cfg=model_cfg,
      train_cfg=pc.train, optimizer_cfg=pc.optimizer, checkpoint_cfg=config.checkpoint, guard_cfg=config.guard,
      seed=config.seed, mesh=mesh, rules=rules,
      train_iter=train_iter_fn(jax.process_index(), jax.process_count()), eval_iter_fn=eval_iter_fn,
      tokenizer=tok, init_params=init_params, extra_summary={"unigram_entropy": entropy})
  return summary


def _import_only(config, workdir, params, model_cfg, tok, eval_iter_fn, mesh, rules, entropy) -> dict[str, Any]:
  t0 = time.time()
  stage_dir = runtime.stage_dir(config, workdir, "pretrain")
  eval_step = jax.jit(lm_evals.make_eval_step(model_cfg))
  held_out = {}
  if eval_iter_fn is not None:  # a user's run without pretraining text has no held-out LM loss
    with sharding.activate(mesh, rules):
      held_out = lm_evals.evaluate(eval_step, params, eval_iter_fn(), mesh, rules, config.pretrain.train.eval_batches)
  training.export_params(stage_dir, params, model_cfg=model_cfg, tokenizer=tok)
  summary = {"step": 0, "imported_from": os.path.abspath(config.init.hf_path), **held_out,
             "wall_s": time.time() - t0, "num_params": model_cfg.num_params(), "devices": jax.device_count(),
             "unigram_entropy": entropy}
  training.write_summary(stage_dir, summary)
  return summary
