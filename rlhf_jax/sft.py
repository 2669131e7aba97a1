"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

The pretrained model is fine-tuned on chat-formatted demonstrations; the loss counts assistant tokens only
(`tokenizers.encode_chat` builds that mask). Optionally a fraction of each batch is pretraining text
(`sft.pretrain_mix`), as InstructGPT did for its PPO initialisation. The loop is `pretrain.train_lm`: the same
jitted next-token step, sharding, checkpointing and metrics. At the end (and every `sft.gold_eval_every` steps)
responses sampled on held-out prompts are scored by the task suite's gold scorer.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from rlhf_jax import configs, pretrain


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from rlhf_jax import data_sources, evaluation  # pylint: disable=g-import-not-at-top

  stage_dir = os.path.join(workdir, "sft")
  tok = data_sources.tokenizer(config, workdir)
  model_cfg = configs.to_model_config(config.model, tok.vocab_size)
  train_iter_fn, eval_iter_fn = data_sources.sft_iters(config, workdir, tok)
  init_params = pretrain.load_stage_params(config, workdir, "pretrain", model_cfg)
  pretrain.check_seq_len(config.sft.train.seq_len, model_cfg, "sft.train.seq_len")
  summary = pretrain.train_lm(config, config.sft, stage_dir, stage="sft", model_cfg=model_cfg,
                              train_iter_fn=train_iter_fn, eval_iter_fn=eval_iter_fn, init_params=init_params,
                              write_summary=False)
  gold = evaluation.gold_eval_stage(config, workdir, "sft", model_cfg, tok)
  summary.update(gold)
  # The same held-out prompts answered by the pretrained model: what SFT adds.
  base = evaluation.gold_eval_stage(config, workdir, "pretrain", model_cfg, tok)
  summary.update({f"pretrain_{k}": v for k, v in base.items()})
  pretrain.rewrite_summary(stage_dir, summary)
  return summary
