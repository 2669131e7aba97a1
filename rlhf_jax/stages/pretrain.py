"""Pretraining: next-token prediction on the task suite's corpus.

Builds the tokenizer, the data and a fresh model, then runs the shared next-token loop (rlhf_jax.training):
WORKDIR/<pretrain.stage_dir>/{checkpoints,params,export.json,metrics.jsonl,summary.json}. The summary carries
the held-out loss and perplexity beside the unigram entropy of the data, the loss of the best model that
ignores context.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from rlhf_jax import configs, runtime, training
from rlhf_jax.data import sources
from rlhf_jax.evals import lm as lm_evals


def check(config: ml_collections.ConfigDict) -> None:
  runtime.check_lm_block(config, "pretrain")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  pc = config.pretrain
  tok = sources.tokenizer(config, workdir)
  model_cfg = configs.to_model_config(config.model, tok.vocab_size)
  runtime.check_seq_len(pc.train.seq_len, model_cfg, "pretrain.train.seq_len")
  train_iter_fn, eval_iter_fn = sources.pretrain_iters(config, workdir, tok)
  entropy = lm_evals.unigram_entropy(eval_iter_fn())
  mesh, rules = runtime.mesh_and_rules(config)
  summary, _ = training.train_lm(
      stage="pretrain", stage_dir=runtime.stage_dir(config, workdir, "pretrain"), model_cfg=model_cfg,
      train_cfg=pc.train, optimizer_cfg=pc.optimizer, checkpoint_cfg=config.checkpoint, guard_cfg=config.guard,
      seed=config.seed, mesh=mesh, rules=rules,
      train_iter=train_iter_fn(jax.process_index(), jax.process_count()), eval_iter_fn=eval_iter_fn,
      tokenizer=tok, extra_summary={"unigram_entropy": entropy})
  return summary
