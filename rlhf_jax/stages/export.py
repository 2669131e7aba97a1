"""Export: the trained policy and reward model as Hugging Face folders, WORKDIR/<export.stage_dir>/{policy,reward}.

The policy (the export of the stage `export.policy_from`, PPO's by default) becomes a *ForCausalLM folder and the
reward model (`export.rm_from`) a *ForSequenceClassification folder with its normalisation folded in
(rlhf_jax.models.hf.save_hf), both loadable by transformers' `from_pretrained`; the tokenizer files of the
imported model (`init.hf_path`) travel with them. Only a model of a Hugging Face family can be exported: a run
must start from an imported model (`--experiment.init.hf_path`).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from rlhf_jax import runtime, training
from rlhf_jax.data import sources
from rlhf_jax.models import hf


def check(config: ml_collections.ConfigDict) -> None:
  policy = runtime.check_shared(config)
  if policy.family not in hf.families():
    raise ValueError(f"export: the policy's architecture (model.family={policy.family!r}) has no Hugging Face "
                     f"class; start the run from an imported model (--experiment.init.hf_path, one of "
                     f"{hf.families()})")
  if config.rm.model_size:
    raise ValueError(f"export: rm.model_size={config.rm.model_size!r} gives the reward model a preset "
                     "architecture, which has no Hugging Face class; leave it empty to export the reward model")


def _save(stage_dir: str, name: str, **kwargs) -> str:
  """save_hf into STAGE_DIR/<name>, through a temporary folder: a crash leaves no half-written export."""
  final, partial = os.path.join(stage_dir, name), os.path.join(stage_dir, f"{name}.partial")
  shutil.rmtree(partial, ignore_errors=True)
  shutil.rmtree(final, ignore_errors=True)  # the stage is incomplete (no summary.json): redo it whole
  hf.save_hf(path=partial, **kwargs)
  os.replace(partial, final)
  return final


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ec = config.export
  stage_dir = runtime.stage_dir(config, workdir, "export")
  os.makedirs(stage_dir, exist_ok=True)
  tok = sources.tokenizer(config, workdir)
  mesh, rules = runtime.mesh_and_rules(config)
  cfg = runtime.policy_config(config, tok.vocab_size)
  source = config.init.hf_path or None
  ids = dict(pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
  summary: dict[str, Any] = {}
  if ec.policy_from:
    policy, _ = runtime.load_policy(workdir, ec.policy_from, mesh, rules, expect=cfg, field="export.policy_from")
    summary["policy"] = _save(stage_dir, "policy", params=policy, cfg=cfg, source=source,
                              max_shard_bytes=ec.max_shard_bytes, **ids)
  if ec.rm_from:
    rm_params, rm_cfg, _ = training.load_export(os.path.join(workdir, ec.rm_from), mesh, rules)
    summary["reward"] = _save(stage_dir, "reward", params=rm_params, cfg=rm_cfg, kind="reward", source=source,
                              max_shard_bytes=ec.max_shard_bytes, **ids)
  training.write_summary(stage_dir, summary)
  return summary
