"""The pipeline's report: WORKDIR/report.md with learning curves, reward and gold score against KL, and samples.

Reads only what the stages wrote (summary.json, each stage's metrics.jsonl and PPO's samples.jsonl), so it can
be regenerated at any time: `python run.py --experiment=experiments/instructgpt/config.py --experiment.stage=report`.
Every PPO variant found in the workdir (ppo, ppo_ptx, ppo_kl0, ...) is drawn on the same axes.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import jax

from rlhf_jax import metrics
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.tasks.world import FAMILIES


def _rows(workdir: str, stage_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, stage_dir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def _rl_dirs(workdir: str) -> list[str]:
  """Stage directories written by the RL stage (ppo, ppo_ptx, grpo, rloo, ...): their metrics have kl_seq."""
  found = []
  for path in glob.glob(os.path.join(workdir, "*", "metrics.jsonl")):
    rows = metrics.read_jsonl(path)
    if rows and "kl_seq" in rows[0]:
      found.append(os.path.basename(os.path.dirname(path)))
  return sorted(found)


def _policy_dirs(summary: dict[str, Any]) -> list[str]:
  """Every stage evaluated against SFT (RL variants, DPO, IPO, ...), by its summary keys."""
  return sorted({k.split(".")[0] for k in summary if k.count(".") == 1 and k.endswith(".win_rate_vs_sft")})


def _series(rows, key):
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


def learning_curves(workdir: str, path: str) -> bool:
  import matplotlib  # lazy: a heavy plotting library, needed only when the report is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  panels = [("pretrain", ["loss", "val_loss"]), ("sft", ["loss", "val_loss"]), ("rm", ["loss", "val_accuracy"])]
  panels += [(d, ["rm_score", "gold_score"]) for d in _rl_dirs(workdir)]
  panels = [(d, keys) for d, keys in panels if _rows(workdir, d)]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
  for ax, (d, keys) in zip(axes[0], panels):
    rows = _rows(workdir, d)
    for k in keys:
      xs, ys = _series(rows, k)
      if xs:
        ax.plot(xs, ys, marker=".", label=k)
    ax.set_title(d)
    ax.set_xlabel("iteration" if d.startswith("ppo") else "step")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def reward_vs_kl(workdir: str, summary: dict[str, Any], path: str) -> bool:
  """RM score (the proxy) and gold score (the truth) against KL to SFT, per PPO variant, plus best-of-n."""
  import matplotlib  # lazy: a heavy plotting library, needed only when the report is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  dirs = _rl_dirs(workdir)
  if not dirs:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for d in dirs:
    rows = _rows(workdir, d)
    kl = [r.get("kl_seq") for r in rows]
    for ax, key in zip(axes, ("rm_score", "gold_score")):
      pts = [(k, r.get(key)) for k, r in zip(kl, rows) if isinstance(k, (int, float)) and
             isinstance(r.get(key), (int, float))]
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=d)
  for key, ax in zip(("rm_score", "gold_score"), axes):
    bon = sorted((v, k) for k, v in summary.items() if k.startswith("ppo.bon") and k.endswith(".kl_to_sft"))
    xs = [v for v, _ in bon]
    ys = [summary.get(k.replace(".kl_to_sft", f".{key}")) for _, k in bon]
    if xs and all(isinstance(y, (int, float)) for y in ys):
      ax.plot(xs, ys, marker="s", linestyle="--", label="best-of-n (SFT)")
    oracle = [summary.get(k.replace(".kl_to_sft", ".oracle_gold_score")) for _, k in bon]
    if key == "gold_score" and xs and all(isinstance(y, (int, float)) for y in oracle):
      ax.plot(xs, oracle, marker="^", linestyle=":", color="gray", label="best-of-n, gold picks")
    # Linear up to 1 nat, logarithmic beyond: the KL-penalised runs and a penalty-free one on the same axes.
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
  axes[0].set_title("proxy: reward model")
  axes[1].set_title("truth: gold scorer")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def best_of_n_table(summary: dict[str, Any]) -> str:
  """Best-of-n with the RM choosing against best-of-n with the gold scorer choosing (the oracle), by KL, and
  the reference answers' win rate: how much of the attainable gain the RM (and PPO) get."""
  ns = sorted(int(k[len("ppo.bon"):-len(".kl_to_sft")]) for k in summary
              if k.startswith("ppo.bon") and k.endswith(".kl_to_sft"))
  if not ns:
    return ""
  row = lambda name, kl, gold, win: f"| {name} | {kl:.2f} | {gold:+.2f} | {win:.2f} |"  # noqa: E731
  lines = ["| policy | KL to SFT | gold score | win rate vs SFT |", "|---|---|---|---|"]
  for d in _policy_dirs(summary):
    lines.append(row(d, summary[f"{d}.kl_to_sft"], summary[f"{d}.gold_score"], summary[f"{d}.win_rate_vs_sft"]))
  for n in ns:
    pre = f"ppo.bon{n}."
    kl = summary[pre + "kl_to_sft"]
    lines.append(row(f"best-of-{n}, RM picks", kl, summary[pre + "gold_score"], summary[pre + "win_rate_vs_sft"]))
    if pre + "oracle_gold_score" in summary:
      lines.append(row(f"best-of-{n}, gold picks (oracle)", kl, summary[pre + "oracle_gold_score"],
                       summary[pre + "oracle_win_rate_vs_sft"]))
  if "ppo.reference_win_rate_vs_sft" in summary:
    lines.append(f"| the reference answer to every prompt | - | - | {summary['ppo.reference_win_rate_vs_sft']:.2f} |")
  return "\n".join(lines)


def family_table(summary: dict[str, Any]) -> str:
  """Gold score and correct fraction per task family for pretrained, SFT and every PPO variant, plus the
  share of the most common response (1.0 = the policy says one thing to every prompt)."""
  # The SFT stage samples at eval.temperature; PPO's evaluation samples the policy and SFT at ppo.temperature.
  dirs = _policy_dirs(summary)
  columns = [("pretrained", "sft.pretrain_"), ("SFT", "sft.")]
  columns += [("SFT at the RL temperature", f"{dirs[0]}.sft_")] if dirs else []
  columns += [(d, f"{d}.") for d in dirs]
  columns = [(name, pre) for name, pre in columns if f"{pre}top_response_frac" in summary]
  if not any(f"{pre}{fam}.gold_score" in summary for _, pre in columns for fam in FAMILIES):
    return ""  # no task families: a run on a user's data
  fmt = lambda v: f"{v:+.2f}" if isinstance(v, (int, float)) else "-"
  lines = ["| family | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for fam in FAMILIES:
    cells = [f"{fmt(summary.get(f'{pre}{fam}.gold_score'))} ({summary.get(f'{pre}{fam}.correct_frac', 0):.0%})"
             for _, pre in columns]
    lines.append(f"| {fam} | " + " | ".join(cells) + " |")
  lines.append("| most common response | " + " | ".join(f"{summary[f'{pre}top_response_frac']:.0%}"
                                                         for _, pre in columns) + " |")
  return "\n".join(lines)


def rm_family_table(summary: dict[str, Any]) -> str:
  """The reward model's accuracy against the gold ordering on clearly different held-out pairs, per task family,
  beside the SFT policy's own log-likelihood on the same pairs (rlhf_jax.evals.rm.clear_accuracy_by_group)."""
  fams = [f for f in FAMILIES if f"rm.{f}.val_gold_pairs_clear" in summary]
  if not fams:
    return ""
  pct = lambda key: f"{summary[key]:.2f}" if key in summary else "-"  # noqa: E731
  lines = ["| family | clear pairs | RM | SFT log-likelihood |", "|---|---|---|---|"]
  for f in fams + ["all"]:
    pre = "rm." if f == "all" else f"rm.{f}."
    lines.append(f"| {f} | {summary[pre + 'val_gold_pairs_clear']} | {pct(pre + 'val_gold_accuracy_clear')} | "
                 f"{pct(pre + 'val_policy_logprob_gold_accuracy_clear')} |")
  return "\n".join(lines)


def policies_table(summary: dict[str, Any]) -> str:
  """One row per policy evaluated against SFT, beside SFT itself and best-of-n: gold score, win rate with its
  standard error, KL to SFT, RM score, held-out pretraining loss, the most common response's share, wall time."""
  dirs = _policy_dirs(summary)
  if not dirs:
    return ""
  f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"  # noqa: E731
  lines = ["| policy | gold score | win rate vs SFT | KL to SFT | RM score | pretraining loss | most common "
           "response | wall time |", "|---|---|---|---|---|---|---|---|"]
  first = dirs[0]
  if "sft.pretrain_gold_score" in summary:  # the SFT stage's own samples of both, at eval.temperature
    lines.append(f"| pretrained (eval.temperature) | {f(summary['sft.pretrain_gold_score'], '+.2f')} | - | - | - | - | "
                 f"{f(summary.get('sft.pretrain_top_response_frac'), '.0%')} | - |")
  if f"{first}.sft_gold_score" in summary:  # SFT at the same sampling settings (the same samples for every row)
    lines.append(f"| SFT | {f(summary[f'{first}.sft_gold_score'], '+.2f')} | 0.50 | 0 | - | "
                 f"{f(summary.get(f'{first}.sft_pretrain_val_loss'), '.3f')} | "
                 f"{f(summary.get(f'{first}.sft_top_response_frac'), '.0%')} | - |")
  for d in dirs:
    g = lambda k: summary.get(f"{d}.{k}")  # noqa: E731
    lines.append(f"| {d} | {f(g('gold_score'), '+.2f')} | {f(g('win_rate_vs_sft'), '.3f')} +- "
                 f"{f(g('win_rate_vs_sft_se'), '.3f')} | {f(g('kl_to_sft'), '.2f')} | {f(g('rm_score'), '+.2f')} | "
                 f"{f(g('pretrain_val_loss'), '.3f')} | {f(g('top_response_frac'), '.0%')} | "
                 f"{f(g('wall_s'), '.0f')} s |")
  for key in sorted(k for k in summary if ".bon" in k and k.endswith(".kl_to_sft")):
    pre = key[:-len("kl_to_sft")]
    name = pre.split(".")[1].replace("bon", "best-of-")
    lines.append(f"| {name} (RM picks) | {f(summary.get(pre + 'gold_score'), '+.2f')} | "
                 f"{f(summary.get(pre + 'win_rate_vs_sft'), '.3f')} | {f(summary[key], '.2f')} | "
                 f"{f(summary.get(pre + 'rm_score'), '+.2f')} | - | - | - |")
  return "\n".join(lines)


def policies_vs_kl(summary: dict[str, Any], path: str) -> bool:
  """Gold score against KL to SFT of every evaluated policy, with best-of-n of SFT and its oracle."""
  import matplotlib  # lazy: a heavy plotting library, needed only when the report is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  dirs = [d for d in _policy_dirs(summary) if isinstance(summary.get(f"{d}.kl_to_sft"), (int, float))]
  if not dirs:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  sft = summary.get(f"{dirs[0]}.sft_gold_score")
  if isinstance(sft, (int, float)):
    ax.scatter([0.0], [sft], marker="o", color="black", label="SFT")
  for d in dirs:
    ax.scatter([summary[f"{d}.kl_to_sft"]], [summary[f"{d}.gold_score"]], marker="D", label=d)
  bon = sorted((summary[k], k[:-len("kl_to_sft")]) for k in summary if ".bon" in k and k.endswith(".kl_to_sft"))
  if bon:
    ax.plot([kl for kl, _ in bon], [summary.get(p + "gold_score") for _, p in bon], "s--", label="best-of-n (RM)")
    if all(p + "oracle_gold_score" in summary for _, p in bon):
      ax.plot([kl for kl, _ in bon], [summary[p + "oracle_gold_score"] for _, p in bon], "^:", color="gray",
              label="best-of-n (gold picks)")
  ax.set_xlabel("KL(policy || SFT), nats per response")
  ax.set_ylabel("gold score")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


SECTION_FILE = "report_section.md"


def stage_sections(workdir: str) -> list[str]:
  """The sections stages wrote for the report: WORKDIR/<stage dir>/report_section.md, in directory order.

  A stage with results of its own (an ablation's verdict, an Elo table) writes its markdown there, with figures
  beside it named relative to its own directory; links are rewritten to point from WORKDIR. The section starts
  with its own "## " heading.
  """
  out = []
  for d in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    path = os.path.join(workdir, d, SECTION_FILE)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      text = f.read().strip()
    if text:
      out += ["", re.sub(r"(!?\[[^\]]*\]\()(?![a-z]+://|/)([^)]+\))", lambda m: f"{m.group(1)}{d}/{m.group(2)}",
                         text)]
  return out


def check(config) -> None:
  del config  # reads only what the other stages wrote


def run(config, workdir: str) -> dict[str, Any]:
  del config
  if jax.process_index() != 0:
    return {}
  summary_path = os.path.join(workdir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  lines = ["# rlhf_jax report", "", f"Workdir: `{workdir}`", ""]
  judges = sorted({v for k, v in summary.items() if k.endswith(".judge") and str(v).startswith("rm:")})
  if judges:  # a run on a user's data: no simulated humans
    lines += [f"Every \"gold score\" below is the judge's: the held-out reward model in WORKDIR/"
              f"{', '.join(j[3:] for j in judges)} (eval.judge='rm'), trained on other comparisons, standing in for "
              "human labelers as in Gao et al. 2022; it is a proxy, not the simulated humans of the task suite.", ""]
  keys = ["pretrain.val_loss", "pretrain.unigram_entropy", "sft.val_loss", "sft.gold_score",
          "sft.pretrain_gold_score", "rm.val_accuracy",
          "rm.gold_ceiling_accuracy", "rm.val_gold_accuracy_clear"]
  for d in _policy_dirs(summary):
    keys += [f"{d}.{k}" for k in ("gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "win_rate_vs_sft_se",
                                  "pretrain_val_loss", "benchmark_accuracy", "final_beta")]
  lines += ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {summary[k]:.4g} |" if isinstance(summary[k], float) else f"| {k} | {summary[k]} |"
            for k in keys if k in summary]
  table = policies_table(summary)
  if table:
    lines += ["", "## Every policy against SFT", "",
              "On the same held-out prompts, sampled at the RL temperature; the win rate (ties half) is against the "
              "same SFT samples for every row, with its standard error over prompts. KL to SFT is measured on each "
              "policy's own samples; best-of-n's is log n - (n - 1) / n.", "", table]
  if policies_vs_kl(summary, os.path.join(workdir, "policies_vs_kl.png")):
    lines += ["", "![gold score against KL for every policy](policies_vs_kl.png)"]
  table = family_table(summary)
  if table:
    lines += ["", "## Gold score by task family (correct fraction in brackets)", "",
              "On held-out prompts; pretrained and SFT sampled at eval.temperature, the rest at ppo.temperature. "
              "A policy that answers every prompt the same way "
              "(\"I don't know.\") shows it in the last row.", "", table]
  table = rm_family_table(summary)
  if table:
    lines += ["", "## The reward model on clearly different pairs, by task family", "",
              "Held-out SFT samples whose gold scores differ by more than rm.clear_gold_margin, ranked by the RM "
              "and by the SFT policy's own log-likelihood. A family where the RM is far below the likelihood is "
              "one PPO can exploit (refusals preferred to \"I don't know\" on unanswerable questions, say).", "",
              table]
  table = best_of_n_table(summary)
  if table:
    lines += ["", "## Against best-of-n and the ceilings", "",
              "On the same held-out prompts and SFT samples. \"Gold picks\" is best-of-n with the gold scorer "
              "choosing among the same candidates: what a perfect reward model would buy at that KL. Ties count "
              "half, so where SFT is already right the best a policy can do is tie.", "", table]
  if learning_curves(workdir, os.path.join(workdir, "learning_curves.png")):
    lines += ["", "## Learning curves", "", "![learning curves](learning_curves.png)"]
  if reward_vs_kl(workdir, summary, os.path.join(workdir, "reward_vs_kl.png")):
    lines += ["", "## Reward and gold score against KL", "",
              "The reward model is a proxy trained on noisy labels; the gold scorer is the simulated humans' "
              "hidden preference. Over-optimisation shows as the proxy rising while the gold score falls.", "",
              "![reward vs KL](reward_vs_kl.png)"]
  lines += stage_sections(workdir)
  for d in _policy_dirs(summary):
    table = policy_evals.samples_markdown(os.path.join(workdir, d, "samples.jsonl"))
    if table:
      lines += ["", f"## Samples on held-out prompts: {d} against SFT", "", table]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return {"report": os.path.join(workdir, "report.md")}
