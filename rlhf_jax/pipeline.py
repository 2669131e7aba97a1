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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
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
