"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

The exported model of `sft.init_from` (the pretrained one) is fine-tuned on chat-formatted demonstrations; the
loss counts assistant tokens only (`tokenizers.encode_chat` builds that mask). Optionally a fraction of each
batch is pretraining text (`sft.pretrain_mix`), as InstructGPT did for its PPO initialisation. The loop is the
shared next-token loop (rlhf_jax.training.train_lm). At the end, responses sampled on held-out prompts by the
SFT model and by the model it started from are scored by the task suite's gold scorer: what SFT adds.
With `sft.lora.rank` > 0 only LoRA adapters on the frozen starting model are trained (rlhf_jax/models/lora.py);
the export holds the merged weights.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from rlhf_jax import configs, runtime, sampling, training
from rlhf_jax.data import sources
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.models import lora
from rlhf_jax.tasks.world import FAMILIES


def check(config: ml_collections.ConfigDict) -> None:
  runtime.check_lm_block(config, "sft")
  runtime.check_choice(config.sft.too_long, "sft.too_long", ("truncate", "error"))
  if not 0.0 <= config.sft.pretrain_mix < 1.0:
    raise ValueError(f"sft.pretrain_mix={config.sft.pretrain_mix}: expected a fraction in [0, 1)")
  excluded = tuple(config.sft.exclude_families)
  if excluded and (set(excluded) - set(FAMILIES) or len(set(excluded)) == len(FAMILIES)):
    raise ValueError(f"sft.exclude_families={excluded}: expected some (not all) of {FAMILIES}")
  if excluded and sources.on_user_data(config):
    raise ValueError(f"sft.exclude_families={excluded}: a user's files (config.files) carry no task families; "
                     "it works on the task suite only")
  if config.sft.pretrain_mix > 0 and sources.on_user_data(config) and not config.files.pretrain:
    raise ValueError(f"sft.pretrain_mix={config.sft.pretrain_mix} on a user's files needs pretraining text; set "
                     "files.pretrain to a file of {\"text\"} documents")
  lcfg = configs.to_lora_config(config.sft.lora, "sft.lora")
  if lcfg.enabled:
    lora.check(lcfg, runtime.check_shared(config), "sft.lora")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  sc = config.sft
  stage_dir = runtime.stage_dir(config, workdir, "sft")
  tok = sources.tokenizer(config, workdir)
  model_cfg = runtime.policy_config(config, tok.vocab_size)
  mesh, rules = runtime.mesh_and_rules(config)
  train_iter_fn, eval_iter_fn = sources.sft_iters(config, workdir, tok)
  init_params, _ = runtime.load_policy(workdir, sc.init_from, mesh, rules, expect=model_cfg,
                                       field="sft.init_from")
  runtime.check_seq_len(sc.train.seq_len, model_cfg, "sft.train.seq_len")
  summary, _ = training.train_lm(
      stage="sft", stage_dir=stage_dir, model_cfg=model_cfg, train_cfg=sc.train, optimizer_cfg=sc.optimizer,
      checkpoint_cfg=config.checkpoint, guard_cfg=config.guard, seed=config.seed, mesh=mesh, rules=rules,
      train_iter=train_iter_fn(jax.process_index(), jax.process_count()), eval_iter_fn=eval_iter_fn,
      tokenizer=tok, init_params=init_params, write_summary=False,
      lora_cfg=configs.to_lora_config(sc.lora, "sft.lora"))

  # Gold scores of held-out samples, from the exports (the training step donated the buffers it started from).
  ec = config.eval
  if ec.judge != "gold":  # a held-out reward model judges, and it is trained after SFT: the RL stage compares
    training.write_summary(stage_dir, summary)
    return summary
  prompts = sources.rl_prompts(config, workdir, tok, which="validation")[:ec.n_prompts]
  gold = sources.gold_scorer(config, workdir)
  scfg = sampling.SamplingConfig(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature)

  def gold_eval(name: str) -> dict[str, float]:
    params, _ = runtime.load_policy(workdir, name, mesh, rules, expect=model_cfg)
    return policy_evals.gold_eval(params, model_cfg, tok, prompts, gold, scfg, jax.random.PRNGKey(config.seed + 7),
                                  batch_size=ec.batch_size, mesh=mesh, rules=rules)

  summary.update(gold_eval(os.path.basename(stage_dir)))
  # The same held-out prompts answered by the model SFT started from (the pretrained one): what SFT adds.
  summary.update({f"pretrain_{k}": v for k, v in gold_eval(sc.init_from).items()})
  training.write_summary(stage_dir, summary)
  return summary
