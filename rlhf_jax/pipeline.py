"""Runs one stage or a pipeline of stages, composed by config.

`config.stage` names one stage ("data", "pretrain", "sft", "rm", "ppo", "report") or "pipeline", in which case
`config.stages` lists them in order. Every stage is `run(config, workdir) -> summary dict` and keeps its files in
`WORKDIR/<stage>/`; a stage whose `summary.json` exists is complete and is skipped, so a re-run of a pipeline
resumes in the first unfinished stage (and that stage resumes from its own latest checkpoint).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from rlhf_jax import checkpoint

# stage name -> "module:function", imported on use so a stage's dependencies load only when it runs.
STAGES = {
    "data": "rlhf_jax.tasks.stage:run",
    "pretrain": "rlhf_jax.pretrain:run",
    "sft": "rlhf_jax.sft:run",
    "rm": "rlhf_jax.reward:run",
    "ppo": "rlhf_jax.ppo:run",
    "report": "rlhf_jax.report:run",
}


def stage_dir_name(config, stage: str) -> str:
  """Where a stage keeps its files (and its summary.json); PPO variants use their own (ppo.stage_dir)."""
  if stage == "ppo":
    return config.ppo.stage_dir
  return stage


def _stage_fn(name: str):
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)} or 'pipeline'")
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be written: {e}") from e


def stage_summary_path(config, workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage_dir_name(config, stage), "summary.json")


def run_stage(config: ml_collections.ConfigDict, workdir: str, stage: str, *, skip_done: bool = True) -> dict:
  # The data stage has its own cache (a fingerprint of config.data); the report is always rewritten.
  path = stage_summary_path(config, workdir, stage) if stage not in ("data", "report") else None
  if skip_done and path and os.path.exists(path):
    logging.info("stage %s is complete (%s); skipping", stage, path)
    with open(path) as f:
      return json.load(f)
  logging.info("stage %s: starting", stage)
  return _stage_fn(stage)(config, workdir)


def _stages_to_run(config) -> list[str]:
  stages = [config.stage] if config.stage != "pipeline" else list(config.stages)
  for name in stages:
    if name not in STAGES:
      raise ValueError(f"unknown stage {name!r} in experiment.{'stage' if config.stage != 'pipeline' else 'stages'}"
                       f"; expected one of {sorted(STAGES)} or 'pipeline'")
  return stages


def preflight(config: ml_collections.ConfigDict) -> None:
  """Checks the settings of every stage that will run, before the first one starts.

  A pipeline must not train for an hour and then fail on a bad PPO setting: sizes (heads dividing the width,
  batches dividing the devices, sequences fitting the context) and choices (guard, too_long, sampling) are
  checked here from the config alone, without data or devices beyond the mesh. Each stage still checks what
  only its data can tell (over-long records, bad rankings) when it loads it.
  """
  stages = _stages_to_run(config)
  trained = [s for s in stages if s in ("pretrain", "sft", "rm", "ppo")]
  if not trained:
    return
  from rlhf_jax import configs, evaluation, model, sampling, sharding  # pylint: disable=g-import-not-at-top
  guard = config.get("guard")
  if guard is not None and guard.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"guard.on_nonfinite={guard.on_nonfinite!r}: expected 'stop' or 'skip'")
  # vocab_size 0 means "from the tokenizer"; any positive stand-in checks the other fields.
  policy = configs.to_model_config(config.model, config.model.vocab_size or 1)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config)

  def fits(seq_len: int, field: str, cfg: model.ModelConfig = policy, extra: int = 1) -> None:
    if seq_len + extra > cfg.max_len:
      raise ValueError(f"{field}={seq_len}{' (+1 for the shifted target)' if extra else ''} exceeds "
                       f"model.max_len={cfg.max_len}")

  for name in ("pretrain", "sft"):
    if name in trained:
      tc = config[name].train
      if tc.steps < 1:
        raise ValueError(f"{name}.train.steps={tc.steps}: expected a positive number of steps")
      sharding.check_batch(tc.batch_size, mesh, rules, field=f"{name}.train.batch_size")
      fits(tc.seq_len, f"{name}.train.seq_len")
  if "sft" in trained and config.sft.too_long not in ("truncate", "error"):
    raise ValueError(f"sft.too_long={config.sft.too_long!r}: expected 'truncate' or 'error'")
  if "rm" in trained:
    rc = config.rm
    size = rc.get("model_size", "")
    rm_cfg = configs.to_model_config(configs.model_config(size), 1) if size else policy
    sharding.check_batch(rc.train.batch_size, mesh, rules, field="rm.train.batch_size")
    fits(rc.seq_len, "rm.seq_len", rm_cfg, extra=0)
    if rc.too_long not in ("truncate", "error"):
      raise ValueError(f"rm.too_long={rc.too_long!r}: expected 'truncate' or 'error'")
    if rc.source not in ("policy", "offline", "policy+offline", "file"):
      raise ValueError(f"rm.source={rc.source!r}: expected 'policy', 'offline', 'policy+offline' or 'file'")
    if not 2 <= rc.k_min <= rc.k_max:
      raise ValueError(f"rm.k_min={rc.k_min}, rm.k_max={rc.k_max}: expected 2 <= k_min <= k_max")
  if "ppo" in trained:
    from rlhf_jax import losses  # pylint: disable=g-import-not-at-top
    pc = config.ppo
    sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, top_k=pc.top_k,
                            top_p=pc.top_p)
    if pc.n_minibatches < 1 or pc.batch_size % pc.n_minibatches:
      raise ValueError(f"ppo.batch_size={pc.batch_size} must divide into ppo.n_minibatches={pc.n_minibatches}")
    sharding.check_batch(pc.batch_size, mesh, rules, field="ppo.batch_size")
    sharding.check_batch(pc.batch_size // pc.n_minibatches, mesh, rules, field="ppo minibatch size")
    losses.check_whitenable(pc.batch_size // pc.n_minibatches, min_elements=pc.min_whiten)
    fits(pc.max_prompt_len + pc.max_new_tokens, "ppo.max_prompt_len + ppo.max_new_tokens", extra=0)
    # The evaluation runs after training: its settings are checked now, not after the PPO iterations.
    evaluation.samples_per_prompt(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  preflight(config)
  check_workdir(workdir)
  if config.stage != "pipeline":
    summary = run_stage(config, workdir, config.stage, skip_done=False)
    return {f"{stage_dir_name(config, config.stage)}.{k}": v for k, v in summary.items()}
  flat: dict[str, Any] = {}
  for stage in config.stages:
    if stage == "report":
      continue  # last, after summary.json is written
    summary = run_stage(config, workdir, stage)
    flat.update({f"{stage_dir_name(config, stage)}.{k}": v for k, v in summary.items()
                 if not isinstance(v, (dict, list))})
  if jax.process_index() == 0:
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):  # keep the keys of other variants run in the same workdir (ppo_ptx, ppo_kl0)
      with open(path) as f:
        flat = {**json.load(f), **flat}
    checkpoint.write_json_atomic(path, flat)
    if "report" in config.stages:
      run_stage(config, workdir, "report")
  return flat


def format_summary(summary: dict[str, Any]) -> str:
  lines = ["summary:"]
  for k in sorted(summary):
    v = summary[k]
    lines.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
  return "\n".join(lines)
