"""Runs one stage or a pipeline of stages, composed by config: the one registry of stages.

`config.stage` names one stage (a key of STAGES) or "pipeline", in which case `config.stages` lists them in
order. An entry "stage:variant" runs the stage once more with the overrides of `config.variants.<variant>` (a
partial config: `variants.grpo.ppo.algorithm = "grpo"`, with its own `stage_dir`), so one pipeline can train PPO,
GRPO and RLOO from the same SFT model and reward model. Every stage is a module with `check(config)` (its
preflight, from the config alone) and `run(config, workdir) -> summary dict`, and keeps its files in WORKDIR/<config.<block>.stage_dir>/; a stage
whose `summary.json` exists is complete and is skipped, so a re-run of a pipeline resumes in the first
unfinished stage (and that stage resumes from its own latest checkpoint). Every stage that will run is checked
before the first one starts.

Adding a stage: a module under rlhf_jax/stages/, a config block in rlhf_jax/configs.py (with its `stage_dir`)
and one line in STAGES.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from rlhf_jax import checkpoint, preemption, training
from rlhf_jax.stages import collect, cot, data, dpo, elo, export, icl, mlm, papers, pretrain, report, rl, rm, sft


@dataclasses.dataclass(frozen=True)
class Stage:
  module: types.ModuleType  # has check(config) and run(config, workdir)
  block: str | None = None  # its config block (which holds stage_dir); None: no stage directory of its own
  always_run: bool = False  # never skipped as complete (data keeps its own cache; the report is rewritten)
  # is_current(config, workdir) -> None if the finished run still answers this config, else why not (the stage
  # is redone): for a stage that reads the others' files under settings a rerun may change (papers).
  is_current: Callable[[Any, str], str | None] | None = None


STAGES: dict[str, Stage] = {
    "data": Stage(data, always_run=True),
    "pretrain": Stage(pretrain, "pretrain"),
    "mlm": Stage(mlm, "mlm"),
    "cot": Stage(cot, "cot"),  # direct against step-by-step answers, by model size (experiments/cot)
    "sft": Stage(sft, "sft"),
    "rm": Stage(rm, "rm"),
    "ppo": Stage(rl, "ppo"),
    "dpo": Stage(dpo, "dpo"),
    "collect": Stage(collect, "collect"),  # online rounds: the current policy's samples ranked by the labelers
    "elo": Stage(elo, "elo"),  # a cross-model Elo table of policy snapshots
    "export": Stage(export, "export"),
    # A paper's ablation from the other stages' files (experiments/papers/), redone when its settings change.
    "papers": Stage(papers, "papers", is_current=papers.is_current),
    "icl": Stage(icl, "icl"),  # k-shot accuracy, prompt- and instruction-style, and the held-out family
    "report": Stage(report, always_run=True),
}


def stage_dir_name(config, stage: str) -> str:
  """Where a stage keeps its files under WORKDIR (and the prefix of its summary keys)."""
  block = STAGES[stage].block
  return config[block].stage_dir if block else stage


def _merge(config, overrides, path: str) -> None:
  for key, value in overrides.items():
    where = f"{path}.{key}"
    if key not in config or key == "variants":
      raise ValueError(f"{where}: the config has no field {key!r} to override")
    if hasattr(value, "items") and hasattr(config[key], "items"):
      _merge(config[key], value, where)
    else:
      try:
        config[key] = value
      except TypeError as e:
        raise ValueError(f"{where}={value!r}: {e}") from None


def resolve(config, entry: str):
  """(stage name, the config it runs with) of a stages entry "stage" or "stage:variant"."""
  stage, _, variant = entry.partition(":")
  if not variant:
    return stage, config
  variants = config.get("variants") or {}
  if variant not in variants:
    raise ValueError(f"stages entry {entry!r}: no variant {variant!r} in experiment.variants; expected one of "
                     f"{sorted(variants) or 'none defined'}")
  variant_config = copy.deepcopy(config)
  _merge(variant_config, variants[variant], f"variants.{variant}")
  return stage, variant_config


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


def settings_changed(config, stage: str, summary: dict) -> list[str]:
  """'block.field: X there, Y here' for each setting a finished stage recorded in its summary (the rm stage
  records score_at, lm_coef, loglik_coef, labels, ...) that this config's block sets otherwise."""
  block = STAGES[stage].block
  if not block:
    return []
  out = []
  for key, there in summary.items():
    here = config[block].get(key)
    if isinstance(here, (str, int, float)) and isinstance(there, (str, int, float)) and here != there:
      out.append(f"{block}.{key}: {there!r} there, {here!r} here")
  return out


def run_stage(config: ml_collections.ConfigDict, workdir: str, stage: str, *, skip_done: bool = True) -> dict:
  """Runs one stage (or returns the summary of its finished run)."""
  path = None if STAGES[stage].always_run else stage_summary_path(config, workdir, stage)
  name = stage_dir_name(config, stage)  # a variant is named by its directory (ppo_ptx, grpo, ...)
  if skip_done and path and os.path.exists(path):
    damage = training.export_damage(os.path.dirname(path))
    stale = STAGES[stage].is_current(config, workdir) if STAGES[stage].is_current and damage is None else None
    if damage is None and stale is None:
      logging.info("stage %s is complete (%s); skipping", name, path)
      with open(path) as f:
        summary = json.load(f)
      changed = settings_changed(config, stage, summary)
      if changed:  # a finished stage is reused by its directory, whatever the settings now say
        logging.warning("stage %s is reused as it ran, with settings this config changes (%s): to run it with "
                        "these, use another --workdir or --experiment.%s.stage_dir", name, "; ".join(changed),
                        STAGES[stage].block)
      return summary
    if stale is not None:
      logging.warning("stage %s: redone, %s", name, stale)
    else:
      # Its summary says done, but what it handed on is damaged: redo it (it resumes from its last checkpoint).
      aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
      if jax.process_index() == 0:
        os.replace(path, aside)
      logging.warning("stage %s: its exported parameters are damaged (%s); %s moved to %s and the stage redone",
                      name, damage, path, aside)
  if jax.process_count() == 1 and preemption.requested():  # the notice came after the last stage's training
    raise preemption.Preempted(f"preemption notice before stage {name}: every finished stage is saved; rerun the "
                               "same command to continue")
  logging.info("stage %s: starting", name)
  return STAGES[stage].module.run(config, workdir)


def stages_to_run(config) -> list[tuple[str, str, ml_collections.ConfigDict]]:
  """(entry, stage, its config) for every stage that will run, in order."""
  entries = [config.stage] if config.stage != "pipeline" else list(config.stages)
  field = "experiment.stage" if config.stage != "pipeline" else "experiment.stages"
  out = []
  for entry in entries:
    name = entry.partition(":")[0]
    if name not in STAGES:
      raise ValueError(f"unknown stage {name!r} in {field}; expected one of {sorted(STAGES)} or 'pipeline'")
    out.append((entry, *resolve(config, entry)))
  dirs = {}
  for entry, name, cfg in out:
    d = stage_dir_name(cfg, name)
    if dirs.setdefault(d, entry) != entry:
      raise ValueError(f"stages {dirs[d]!r} and {entry!r} would both write WORKDIR/{d}; give the variant its own "
                       f"stage_dir")
  return out


def preflight(config: ml_collections.ConfigDict) -> None:
  """Checks the settings of every stage that will run, before the first one starts.

  A pipeline must not train for an hour and then fail on a bad PPO setting: sizes (heads dividing the width,
  batches dividing the devices, sequences fitting the context) and choices (guard, too_long, sampling) are
  checked by each stage's `check` from the config alone, without data or devices beyond the mesh. Each stage
  still checks what only its data can tell (over-long records, bad rankings) when it loads it.
  """
  for _, name, stage_config in stages_to_run(config):
    STAGES[name].module.check(stage_config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  preflight(config)
  check_workdir(workdir)
  planned = stages_to_run(config)
  if config.stage != "pipeline":
    _, name, stage_config = planned[0]
    summary = run_stage(stage_config, workdir, name, skip_done=False)
    return {f"{stage_dir_name(stage_config, name)}.{k}": v for k, v in summary.items()}
  flat: dict[str, Any] = {}
  for _, name, stage_config in planned:
    if name == "report":
      continue  # last, after summary.json is written
    summary = run_stage(stage_config, workdir, name)
    flat.update({f"{stage_dir_name(stage_config, name)}.{k}": v for k, v in summary.items()
                 if not isinstance(v, (dict, list))})
  if jax.process_index() == 0:
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):  # keep the keys of other variants run in the same workdir (ppo_ptx, ppo_kl0)
      with open(path) as f:
        flat = {**json.load(f), **flat}
    checkpoint.write_json_atomic(path, flat)
    if any(name == "report" for _, name, _ in planned):
      run_stage(config, workdir, "report")
  return flat


def format_summary(summary: dict[str, Any]) -> str:
  lines = ["summary:"]
  for k in sorted(summary):
    v = summary[k]
    lines.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
  return "\n".join(lines)
