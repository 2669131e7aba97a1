"""In-context learning (GPT-3, arXiv 2005.14165) and the held-out-family test of instruction tuning (FLAN, arXiv
2109.01652): k-shot accuracy of every policy in `icl.policies`, prompt- and instruction-style.

For each family of `icl.families`, the first `icl.n_items` items of rlhf_jax/tasks/icl.py (seeded by `icl.seed`)
are posed with k shots for every k of `icl.ks`, in each style of `icl.styles`, to each policy present in the
workdir (a listed stage directory without an export is skipped and named in the section), and answered greedily
(rlhf_jax/evals/icl.py). A row whose prompt does not fit the model (prompt + icl.max_new_tokens > model.max_len)
is not run; the table counts the rows that were. Prompts longer than the pretraining rows (pretrain.train.seq_len
+ 1) run at positions the model never trained on; the section gives the mean prompt length per (style, k).

Held-out family: with `icl.held_out_from` naming an SFT trained without `icl.held_out_family`
(sft.exclude_families, experiments/icl), the section compares its zero-shot instruction-style accuracy on that
family with the full SFT's (`icl.sft_from`) and with the pretrained model's (`icl.pretrained_from`) best few-shot
accuracy.

WORKDIR/<icl.stage_dir>/{icl.jsonl (every row), icl_accuracy.png, report_section.md, summary.json}; summary keys
"<policy>.<style>.<family>.k<k>" (gold-correct fraction) and the same with ".exact" (exact match).
"""

from __future__ import annotations

import collections
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
from rlhf_jax.evals import icl as icl_evals
from rlhf_jax.tasks import icl, suite
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES


def check(config: ml_collections.ConfigDict) -> None:
  ic = config.icl
  runtime.check_shared(config)
  if sources.on_user_data(config):
    raise ValueError("icl: the in-context items are the task suite's world; a run on a user's files (config.files) "
                     "has none")
  ks = list(ic.ks)
  if not ks or any(not isinstance(k, int) or k < 0 for k in ks) or len(set(ks)) != len(ks):
    raise ValueError(f"icl.ks={tuple(ks)}: expected distinct shot counts >= 0, e.g. (0, 1, 2, 4, 8)")
  for field, allowed in (("styles", icl.STYLES), ("families", FAMILIES)):
    values = list(ic[field])
    if not values or set(values) - set(allowed):
      raise ValueError(f"icl.{field}={tuple(values)}: expected some of {allowed}")
  for field in ("n_items", "batch_size", "max_new_tokens"):
    if ic[field] < 1:
      raise ValueError(f"icl.{field}={ic[field]}: expected >= 1")
  if not list(ic.policies):
    raise ValueError("icl.policies is empty: expected the stage directories of the policies to evaluate")
  if ic.held_out_from:
    if ic.held_out_family not in ic.families:
      raise ValueError(f"icl.held_out_family={ic.held_out_family!r}: expected one of icl.families="
                       f"{tuple(ic.families)}")
    if ic.held_out_from not in ic.policies:
      raise ValueError(f"icl.held_out_from={ic.held_out_from!r}: expected one of icl.policies={tuple(ic.policies)}")


def _present(workdir: str, names) -> tuple[list[str], list[str]]:
  have = [n for n in names if os.path.exists(os.path.join(workdir, n, training.EXPORT_MANIFEST))]
  return have, [n for n in names if n not in have]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  ic = config.icl
  stage_dir = runtime.stage_dir(config, workdir, "icl")
  os.makedirs(stage_dir, exist_ok=True)
  tok = sources.tokenizer(config, workdir)
  model_cfg = runtime.policy_config(config, tok.vocab_size)
  mesh, rules = runtime.mesh_and_rules(config)
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  gold = GoldScorer(world)
  pools = {f: icl.family_items(world, f, ic.seed) for f in ic.families}
  items = {f: pool[:ic.n_items] for f, pool in pools.items()}
  ks = sorted(ic.ks)
  queries = icl.queries(items, pools, ks, list(ic.styles), ic.seed)
  lengths = [len(icl_evals.encode(tok, q)) for q in queries]
  limit = model_cfg.max_len - ic.max_new_tokens
  fit = [q for q, n in zip(queries, lengths) if n <= limit]
  mean_len = collections.defaultdict(list)
  for q, n in zip(queries, lengths):
    mean_len[(q.style, q.k)].append(n)
  policies, missing = _present(workdir, ic.policies)
  if not policies:
    raise ValueError(f"icl.policies={tuple(ic.policies)}: none of them has an export in {workdir}; run the stages "
                     "that train them first")
  if missing:
    logging.warning("icl: no export for %s in %s; skipped", missing, workdir)

  rows: list[dict[str, Any]] = []
  for name in policies:
    params, _ = runtime.load_policy(workdir, name, mesh, rules, expect=model_cfg, field="icl.policies")
    for r in icl_evals.evaluate(params, model_cfg, tok, fit, gold, max_new_tokens=ic.max_new_tokens,
                                batch_size=ic.batch_size, mesh=mesh, rules=rules):
      rows.append({"policy": name, **r})
  tables = {name: icl.accuracy_table([r for r in rows if r["policy"] == name]) for name in policies}

  summary: dict[str, Any] = {"n_queries": len(queries), "n_run": len(fit), "n_too_long": len(queries) - len(fit),
                             "policies": ",".join(policies), "missing": ",".join(missing)}
  for name, table in tables.items():
    for (family, style, k), acc in table.items():
      summary[f"{name}.{style}.{family}.k{k}"] = acc["correct"]
      summary[f"{name}.{style}.{family}.k{k}.exact"] = acc["exact"]
  held = held_out(tables, ic) if ic.held_out_from in tables else {}
  summary.update({f"held_out.{k}": v for k, v in held.items()})
  if jax.process_index() == 0:
    with open(os.path.join(stage_dir, "icl.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    has_plot = plot(tables, ks, list(ic.styles), list(ic.families), os.path.join(stage_dir, "icl_accuracy.png"))
    lengths_by = {key: (float(np.mean(v)), int(np.max(v))) for key, v in mean_len.items()}
    with open(os.path.join(stage_dir, "report_section.md"), "w") as f:
      f.write(section(tables, ks, list(ic.styles), list(ic.families), lengths_by, held, missing, config,
                      has_plot))
  summary["wall_s"] = time.time() - t0
  training.write_summary(stage_dir, summary)
  return summary


def held_out(tables, ic) -> dict[str, float]:
  """The FLAN comparison on icl.held_out_family: the held-out SFT's zero-shot instruction-style accuracy against
  the full SFT's and the pretrained model's best few-shot (prompt-style, k > 0) accuracy."""
  fam = ic.held_out_family
  get = lambda name, style, k: tables.get(name, {}).get((fam, style, k), {}).get("correct", float("nan"))  # noqa: E731
  out = {"zero_shot": get(ic.held_out_from, "instruction", 0), "zero_shot_prompt": get(ic.held_out_from, "prompt", 0),
         "sft_zero_shot": get(ic.sft_from, "instruction", 0)}
  few = {k: a["correct"] for (f, style, k), a in tables.get(ic.pretrained_from, {}).items()
         if f == fam and style == "prompt" and k > 0}
  if few:
    best = max(few, key=lambda k: few[k])
    out.update({"pretrained_best_few_shot": few[best], "pretrained_best_k": float(best)})
  out["pretrained_zero_shot"] = get(ic.pretrained_from, "prompt", 0)
  return out


def plot(tables, ks, styles, families, path: str) -> bool:
  """Accuracy (gold-correct) against k: a row of panels per style, a panel per family, a colour per policy."""
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, axes = plt.subplots(len(styles), len(families), figsize=(2.8 * len(families), 2.6 * len(styles)),
                           squeeze=False, sharey=True)
  for row, style in zip(axes, styles):
    for ax, fam in zip(row, families):
      for c, (name, table) in enumerate(tables.items()):
        pts = [(i, table[(fam, style, k)]["correct"]) for i, k in enumerate(ks) if (fam, style, k) in table]
        if pts:
          ax.plot(*zip(*pts), "-", marker="o", ms=3, color=f"C{c}", label=name)
      ax.set_xticks(range(len(ks)), [str(k) for k in ks])
      ax.set_ylim(-0.03, 1.03)
      ax.set_title(f"{fam}, {style}", fontsize=9)
    row[0].set_ylabel("correct fraction")
  for ax in axes[-1]:
    ax.set_xlabel("shots k")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def section(tables, ks, styles, families, lengths_by, held, missing, config, has_plot: bool) -> str:
  ic = config.icl
  pt_len = config.pretrain.train.seq_len + 1
  lines = ["## In-context learning: accuracy against the number of shots", "",
           f"{ic.n_items} items per family (rlhf_jax/tasks/icl.py), greedy answers; each cell is the gold scorer's "
           "correct fraction with the exact-match fraction in brackets. Prompt-style: the corpus's \"Q: ...\\nA:\" "
           "completion; instruction-style: a chat turn with four options (none for harmful). Unanswerable and "
           "harmful answer with a fixed phrase, so their shots show the answer: there the number is whether the "
           "policy takes the behaviour up from the shots.", ""]
  if has_plot:
    lines += ["![accuracy against k](icl_accuracy.png)", ""]
  head = "| policy | style | family | " + " | ".join(f"k={k}" for k in ks) + " |"
  lines += [head, "|---|---|---|" + "---|" * len(ks)]
  for name, table in tables.items():
    for style in styles:
      for fam in families:
        cells = []
        for k in ks:
          a = table.get((fam, style, k))
          cells.append("-" if a is None else f"{a['correct']:.2f} ({a['exact']:.2f})")
        lines.append(f"| {name} | {style} | {fam} | " + " | ".join(cells) + " |")
  lines += ["", f"Mean (max) prompt length in tokens; the pretraining rows were {pt_len} tokens and model.max_len is "
            f"{runtime.policy_config(config, 1).max_len} (rows that do not fit with icl.max_new_tokens="
            f"{ic.max_new_tokens} are not run, \"-\" above):", "",
            "| style | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
  for style in styles:
    lines.append(f"| {style} | " + " | ".join(
        f"{lengths_by[(style, k)][0]:.0f} ({lengths_by[(style, k)][1]})" for k in ks) + " |")
  if held:
    fam = ic.held_out_family
    lines += ["", f"### Held-out family (FLAN): {fam}", "",
              f"WORKDIR/{ic.held_out_from} is SFT without any {fam} demonstration (sft.exclude_families).", "",
              "| model | setting | correct |", "|---|---|---|",
              f"| {ic.held_out_from} | zero-shot, instruction | {held['zero_shot']:.3f} |",
              f"| {ic.held_out_from} | zero-shot, prompt | {held['zero_shot_prompt']:.3f} |",
              f"| {ic.sft_from} | zero-shot, instruction | {held['sft_zero_shot']:.3f} |",
              f"| {ic.pretrained_from} | zero-shot, prompt | {held['pretrained_zero_shot']:.3f} |"]
    if "pretrained_best_few_shot" in held:
      lines.append(f"| {ic.pretrained_from} | best few-shot (k={int(held['pretrained_best_k'])}), prompt | "
                   f"{held['pretrained_best_few_shot']:.3f} |")
  if missing:
    lines += ["", f"Not evaluated (no export in the workdir): {', '.join(missing)}."]
  return "\n".join(lines) + "\n"
