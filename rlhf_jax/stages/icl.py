"""In-context learning (GPT-3, arXiv 2005.14165) and the held-out-family test of instruction tuning (FLAN, arXiv
2109.01652): k-shot accuracy of every policy in `icl.policies`, prompt-, instruction- and chat-style.

For each family of `icl.families`, the first `icl.n_items` items of rlhf_jax/tasks/icl.py (seeded by `icl.seed`)
are posed with k shots for every k of `icl.ks`, in each style of `icl.styles`, to each policy present in the
workdir (a listed stage directory without an export is skipped and named in the section), and answered greedily
(rlhf_jax/evals/icl.py). A row whose prompt does not fit the model (prompt + icl.max_new_tokens > model.max_len)
is not run; the table counts the rows that were. Prompts longer than the pretraining rows (pretrain.train.seq_len
+ 1) run at positions the model never trained on; the section gives the mean prompt length per (style, k).

Held-out families: `icl.held_out_from[i]` names an SFT trained without the family `icl.held_out_family[i]`
(sft.exclude_families, experiments/icl); for each pair the section compares its zero-shot accuracy on that family,
in every style, with the full SFT's (`icl.sft_from`) and the pretrained model's (`icl.pretrained_from`) zero-shot
accuracy and with the pretrained model's best few-shot accuracy (any style, k > 0).

WORKDIR/<icl.stage_dir>/{icl.jsonl (every row), icl_accuracy.png, report_section.md, summary.json}; summary keys
"<policy>.<style>.<family>.k<k>" (gold-correct fraction) and the same with ".exact" (exact match); the held-out
comparison as "held_out.<family>.<key>" (keys of `held_out`).
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
  held_from, held_family = tuple(ic.held_out_from), tuple(ic.held_out_family)
  if len(held_from) != len(held_family):
    raise ValueError(f"icl.held_out_from={held_from} and icl.held_out_family={held_family}: expected one family per "
                     "held-out SFT (tuples of equal length)")
  for name, fam in zip(held_from, held_family):
    if fam not in ic.families:
      raise ValueError(f"icl.held_out_family={held_family}: {fam!r} is not one of icl.families={tuple(ic.families)}")
    if name not in ic.policies:
      raise ValueError(f"icl.held_out_from={held_from}: {name!r} is not one of icl.policies={tuple(ic.policies)}")


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
  held = {fam: held_out(tables, name, fam, ic) for name, fam in zip(ic.held_out_from, ic.held_out_family)
          if name in tables}
  summary.update({f"held_out.{fam}.{k}": v for fam, h in held.items() for k, v in h.items()})
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


def held_out(tables, name: str, fam: str, ic) -> dict[str, Any]:
  """The FLAN comparison on one family `fam` left out of the SFT `name`: zero-shot accuracy per style of `name`
  ("<style>.zero_shot"), of the full SFT ("<style>.sft_zero_shot") and of the pretrained model
  ("<style>.pretrained_zero_shot"), and the pretrained model's best few-shot accuracy over every style and k > 0
  ("pretrained_best_few_shot", at "pretrained_best_k"; its style is the summary's "pretrained_best_style")."""
  get = lambda policy, style, k: tables.get(policy, {}).get((fam, style, k), {}).get("correct", float("nan"))  # noqa: E731
  out: dict[str, Any] = {}
  for style in ic.styles:
    out[f"{style}.zero_shot"] = get(name, style, 0)
    out[f"{style}.sft_zero_shot"] = get(ic.sft_from, style, 0)
    out[f"{style}.pretrained_zero_shot"] = get(ic.pretrained_from, style, 0)
  few = {(style, k): a["correct"] for (f, style, k), a in tables.get(ic.pretrained_from, {}).items()
         if f == fam and k > 0}
  if few:
    best = max(few, key=lambda sk: few[sk])
    out.update({"pretrained_best_few_shot": few[best], "pretrained_best_k": float(best[1]),
                "pretrained_best_style": best[0]})
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
           "completion; instruction-style: a chat turn with four options (none for harmful); chat-style: the same turn "
           "without options, the SFT demonstrations' own form. Unanswerable and "
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
  held_names = dict(zip(ic.held_out_family, ic.held_out_from))
  for fam, h in held.items():
    name = held_names[fam]
    lines += ["", f"### Held-out family (FLAN): {fam}", "",
              f"WORKDIR/{name} is SFT without any {fam} demonstration (sft.exclude_families); zero-shot, the "
              f"correct fraction on the {fam} items:", "",
              f"| style | {name} | {ic.sft_from} (every family) | {ic.pretrained_from} |", "|---|---|---|---|"]
    lines += [f"| {style} | {h[f'{style}.zero_shot']:.3f} | {h[f'{style}.sft_zero_shot']:.3f} | "
              f"{h[f'{style}.pretrained_zero_shot']:.3f} |" for style in styles]
    if "pretrained_best_few_shot" in h:
      lines += ["", f"{ic.pretrained_from}'s best few-shot: {h['pretrained_best_few_shot']:.3f} "
                f"({h['pretrained_best_style']}, k={int(h['pretrained_best_k'])})."]
  if missing:
    lines += ["", f"Not evaluated (no export in the workdir): {', '.join(missing)}."]
  return "\n".join(lines) + "\n"
