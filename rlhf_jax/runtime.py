"""What a stage derives from (config, workdir): its directory, the mesh and rules, model configs, the exports
of earlier stages, and the preflight checks several stages share.

This is the one L3 module that reads an experiment config: the shared loops and evaluations
(rlhf_jax.training, rlhf_jax.rl, rlhf_jax.evals) take parameters, data and settings as arguments, and the
stages (rlhf_jax/stages/) use these helpers to build them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from rlhf_jax import configs, sharding, training
from rlhf_jax.models import transformer


def stage_dir(config: ml_collections.ConfigDict, workdir: str, block: str) -> str:
  """WORKDIR/<config.<block>.stage_dir>: where the stage of that config block writes."""
  return os.path.join(workdir, config[block].stage_dir)


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The device mesh of config.mesh and the logical-axis rules of config.sharding_rules."""
  return sharding.mesh_from_config(config.mesh), sharding.rules_from_config(config)


def policy_config(config: ml_collections.ConfigDict, vocab_size: int) -> transformer.ModelConfig:
  """The policy's ModelConfig (config.model, the vocabulary from the tokenizer)."""
  return configs.to_model_config(config.model, vocab_size)


def check_seq_len(seq_len: int, model_cfg: transformer.ModelConfig, field: str, extra: int = 1) -> None:
  """A sequence of seq_len tokens (+ extra, 1 for the shifted target of next-token batches) fits the model."""
  if seq_len + extra > model_cfg.max_len:
    raise ValueError(f"{field}={seq_len}{' (+1 for the shifted target)' if extra else ''} exceeds "
                     f"model.max_len={model_cfg.max_len}")


def check_choice(value: Any, field: str, choices: tuple[Any, ...]) -> None:
  """`value` is one of `choices`, or an error naming the field: "rm.grouping='x': expected 'prompt' or 'pairs'"."""
  if value not in choices:
    names = [repr(c) for c in choices]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"{field}={value!r}: expected {listed}")


def check_shared(config: ml_collections.ConfigDict) -> transformer.ModelConfig:
  """The blocks every trained stage uses (model, mesh, rules, guard), checked from the config alone; returns
  the policy's ModelConfig with a stand-in vocabulary when config.model.vocab_size is 0 (from the tokenizer)."""
  check_choice(config.guard.on_nonfinite, "guard.on_nonfinite", ("stop", "skip"))
  mesh_and_rules(config)
  return configs.to_model_config(config.model, config.model.vocab_size or 1)


def check_lm_block(config: ml_collections.ConfigDict, block: str) -> None:
  """A next-token stage's block (pretrain, sft): positive steps, a batch that divides over the devices and
  sequences that fit the model."""
  policy = check_shared(config)
  mesh, rules = mesh_and_rules(config)
  tc = config[block].train
  if tc.steps < 1:
    raise ValueError(f"{block}.train.steps={tc.steps}: expected a positive number of steps")
  sharding.check_batch(tc.batch_size, mesh, rules, field=f"{block}.train.batch_size")
  check_seq_len(tc.seq_len, policy, f"{block}.train.seq_len")


def load_policy(workdir: str, name: str, mesh, rules, *, expect: transformer.ModelConfig | None = None,
                field: str = "init_from"):
  """The parameters the stage in WORKDIR/<name> exported, on this run's mesh. With `expect`, a model config
  other than the one this run uses is an error naming both (`field` is the config field that chose `name`)."""
  params, cfg, _ = training.load_export(os.path.join(workdir, name), mesh, rules)
  if expect is not None and cfg != expect:
    diffs = {k: (v, getattr(expect, k)) for k, v in dataclasses.asdict(cfg).items() if getattr(expect, k) != v}
    detail = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diffs.items()))
    raise ValueError(f"{field}={name!r}: {os.path.join(workdir, name)} holds a model of another config "
                     f"({detail}); use the same model config or another workdir")
  return params, cfg
