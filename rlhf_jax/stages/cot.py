"""Chain of thought and scale: direct against step-by-step answers to multi-step questions, for several models.

Every model of `cot.pretrained` (stage directories of pretrained decoders, e.g. one per model size) answers the
held-out multi-step items (rlhf_jax/tasks/multistep.py) few-shot: `cot.shots` training items of the same kind
as demonstrations, answered directly ("direct") or with worked steps ("worked"), and every one-step
sub-question of the same items after the same items' sub-questions ("one_step"). Every model of `cot.sft` (SFT
stage directories, trained on `data.n_multistep_sft` step-by-step demonstrations) answers the same items
zero-shot as a user turn, with and without "Think step by step.". Answers are greedy and read by
`multistep.final_answer`; accuracy is exact match (rlhf_jax/evals/cot.py).

WORKDIR/<cot.stage_dir>/{cot.jsonl (one row per query: model, setting, group, kind, response, parsed answer),
summary.json (<model>.<group>.<kind> accuracies, <model>.num_params), report_section.md, cot.png}. Not in any
default pipeline (experiments/cot).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import runtime, training
from rlhf_jax.data import sources
from rlhf_jax.evals import cot as cot_evals
from rlhf_jax.tasks import multistep, suite

GROUPS = ("one_step", "all_steps", "direct", "worked")


def check(config: ml_collections.ConfigDict) -> None:
  cc = config.cot
  if not cc.pretrained and not cc.sft:
    raise ValueError("cot.pretrained and cot.sft are both empty: expected the stage directories of the models to "
                     "evaluate (e.g. cot.pretrained=('pretrain',))")
  names = list(cc.pretrained) + list(cc.sft)
  if len(set(names)) != len(names):
    raise ValueError(f"cot.pretrained + cot.sft = {names}: a model is named twice")
  for field, low in (("n_items", 1), ("shots", 0), ("max_new_tokens", 1), ("max_new_tokens_direct", 1),
                     ("batch_size", 1)):
    if cc[field] < low:
      raise ValueError(f"cot.{field}={cc[field]}: expected >= {low}")
  runtime.check_choice(cc.too_long, "cot.too_long", ("error", "truncate"))
  if sources.on_user_data(config):
    raise ValueError("the cot stage asks about the task suite's world; a run on a user's files (config.files) has "
                     "none")


def _fit(queries, model_cfg, new_tokens: dict[str, int], name: str, too_long: str) -> int:
  """How many prompts do not fit model.max_len with their new tokens; an error unless cot.too_long='truncate'."""
  over = [q for q in queries if len(q.ids) + new_tokens[q.group] > model_cfg.max_len]
  if over and too_long == "error":
    worst = max(over, key=lambda q: len(q.ids))
    raise ValueError(f"cot: {len(over)} prompts for {name} do not fit its model.max_len={model_cfg.max_len} (the "
                     f"longest: {len(worst.ids)} tokens + {new_tokens[worst.group]} new, a {worst.group} "
                     f"{worst.kind} prompt); lower cot.shots or cot.max_new_tokens, or set cot.too_long='truncate'")
  return len(over)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  cc = config.cot
  stage_dir = runtime.stage_dir(config, workdir, "cot")
  os.makedirs(stage_dir, exist_ok=True)
  tok = sources.tokenizer(config, workdir)
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  mesh, rules = runtime.mesh_and_rules(config)
  new_tokens = {"direct": cc.max_new_tokens_direct, "one_step": cc.max_new_tokens_direct,
                "worked": cc.max_new_tokens}
  settings = {"few_shot": cot_evals.few_shot_queries(tok, world, n_items=cc.n_items, shots=cc.shots, seed=config.seed),
              "zero_shot": cot_evals.zero_shot_queries(tok, world, n_items=cc.n_items)}
  models = [(name, "few_shot") for name in cc.pretrained] + [(name, "zero_shot") for name in cc.sft]
  # Every model's size and every prompt's length first: a prompt that does not fit fails before any decoding.
  model_cfgs = {name: training.read_manifest(os.path.join(workdir, name))["model"] for name, _ in models}
  n_truncated = {name: _fit(settings[setting], model_cfgs[name], new_tokens, name, cc.too_long)
                 for name, setting in models}
  summary: dict[str, Any] = {"n_items_per_kind": min(cc.n_items, *(len(multistep.split(world, k)[1])
                                                                  for k in multistep.KINDS)),
                             "shots": cc.shots}
  rows_all = []
  for name, setting in models:
    t_model = time.time()
    params, model_cfg = runtime.load_policy(workdir, name, mesh, rules, field=f"cot models ({name})")
    rows = cot_evals.answer_queries(params, model_cfg, tok, settings[setting], world.entities,
                                    max_new_tokens=new_tokens, batch_size=cc.batch_size, mesh=mesh, rules=rules)
    acc = cot_evals.accuracies(rows)
    summary.update({f"{name}.{k}": v for k, v in acc.items()})
    summary[f"{name}.num_params"] = model_cfg.num_params()
    summary[f"{name}.setting"] = setting
    summary[f"{name}.n_truncated"] = n_truncated[name]
    rows_all += [{"model": name, "setting": setting, **r} for r in rows]
    logging.info("cot: %s (%s, %d parameters) in %.0f s: %s", name, setting, model_cfg.num_params(),
                 time.time() - t_model, {k: round(v, 3) for k, v in acc.items() if k.endswith(".all")})
    del params
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "cot.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows_all)
    _write_section(stage_dir, summary, models, cc.shots)
  summary["wall_s"] = time.time() - t0
  training.write_summary(stage_dir, summary)
  return summary


def _table(summary: dict[str, Any], models, kinds) -> list[str]:
  lines = ["| model | setting | parameters | kind | one-step | all steps | direct | step-by-step |",
           "|---|---|---|---|---|---|---|---|"]
  for name, setting in models:
    for kind in kinds:
      cells = [f"{summary.get(f'{name}.{g}.{kind}', float('nan')):.3f}" for g in GROUPS]
      lines.append(f"| {name} | {setting} | {summary[f'{name}.num_params']:,} | {kind} | " + " | ".join(cells) + " |")
  return lines


def _plot(path: str, summary: dict[str, Any], models, kinds) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only for the figure
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), sharey=True)
  x = np.arange(len(models))
  for ax, kind in zip(np.atleast_1d(axes), kinds):
    for j, (group, label) in enumerate((("all_steps", "all one-step parts"), ("direct", "direct"),
                                        ("worked", "step-by-step"))):
      ax.bar(x + (j - 1) * 0.27, [summary.get(f"{n}.{group}.{kind}", np.nan) for n, _ in models], 0.27, label=label)
    ax.set_xticks(x, [f"{n}\n{summary[f'{n}.num_params'] / 1e6:.2f}M" for n, _ in models], fontsize=7)
    ax.set_title(kind)
    ax.set_ylim(0, 1)
  np.atleast_1d(axes)[0].set_ylabel("exact-match accuracy")
  np.atleast_1d(axes)[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _write_section(stage_dir: str, summary: dict[str, Any], models, shots: int) -> None:
  kinds = list(multistep.KINDS) + ["all"]
  lines = ["## Chain of thought and scale", "",
           f"Greedy exact-match accuracy on {summary['n_items_per_kind']} held-out items of each multi-step kind "
           f"(rlhf_jax/tasks/multistep.py). Pretrained models few-shot ({shots} demonstrations of the same kind, "
           "answered directly or with worked steps); SFT models zero-shot (the question, or the question and "
           "\"Think step by step.\"). One-step: the items' sub-questions; all steps: items whose every "
           "sub-question is answered right.", ""]
  lines += _table(summary, models, kinds)
  _plot(os.path.join(stage_dir, "cot.png"), summary, models, kinds[:-1])
  lines += ["", "![direct and step-by-step accuracy by model](cot.png)"]
  with open(os.path.join(stage_dir, "report_section.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
