"""Runs one stage or a pipeline of stages, composed by config.

`config.stage` names one stage ("data", "pretrain", "sft", "rm", "ppo", "eval") or "pipeline", in which case
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
    "eval": "rlhf_jax.evaluation:run",
}

# Where each stage keeps its files (and its summary.json).
STAGE_DIRS = {"data": "data", "pretrain": "pretrain", "sft": "sft", "rm": "rm", "ppo": "ppo", "eval": "eval"}


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


def stage_summary_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, STAGE_DIRS[stage], "summary.json")


def run_stage(config: ml_collections.ConfigDict, workdir: str, stage: str, *, skip_done: bool = True) -> dict:
  path = stage_summary_path(workdir, stage) if stage != "data" else None
  if skip_done and path and os.path.exists(path):
    logging.info("stage %s is complete (%s); skipping", stage, path)
    with open(path) as f:
      return json.load(f)
  logging.info("stage %s: starting", stage)
  return _stage_fn(stage)(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check_workdir(workdir)
  if config.stage != "pipeline":
    return {f"{config.stage}.{k}": v for k, v in run_stage(config, workdir, config.stage, skip_done=False).items()}
  flat: dict[str, Any] = {}
  for stage in config.stages:
    summary = run_stage(config, workdir, stage)
    flat.update({f"{stage}.{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, "summary.json"), flat)
  return flat


def format_summary(summary: dict[str, Any]) -> str:
  lines = ["summary:"]
  for k in sorted(summary):
    v = summary[k]
    lines.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
  return "\n".join(lines)
