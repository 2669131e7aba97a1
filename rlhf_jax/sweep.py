"""Several draws of one experiment: run it once per seed, then the mean and spread of every summary number.

One run of the pipeline is one draw of the world, the data and the initialisation, and the `small` preset's
outcome varies a lot between draws (README.md: the reward model's clear-pair accuracy spans 0.66-0.87 over five
seeds). A sweep runs the same experiment with `seed` set to each seed, each into WORKDIR/seed_<n> (stages resume
there as usual, so an interrupted sweep picks up where it stopped), then writes
  WORKDIR/sweep.json  every number the runs' summary.json files share: per-seed values, mean, sample standard
                      deviation, min and max;
  WORKDIR/sweep.md    the headline keys as a table, one column per seed; with experiments/papers' sections,
                      each verdict held on how many seeds and rm_proxy's table over seeds (papers.over_seeds).

  python run.py --seeds=0-4 --workdir=workdirs/sweep_small                 # 5 full runs, ~1 hour on 2 cores
  python run.py --seeds=0,1 --experiment.stages=data --experiment.stages=pretrain ...  # any stages, overrides
  python -m rlhf_jax.sweep OUT_DIR WORKDIR [WORKDIR ...]                   # aggregate finished runs only
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from rlhf_jax import checkpoint, pipeline
from rlhf_jax.stages import papers

# The rows of sweep.md, in order, when present (sweep.json has every shared number).
HEADLINE = (
    "pretrain.val_loss", "sft.val_loss", "sft.gold_score", "sft.pretrain_gold_score", "rm.val_accuracy",
    "rm.gold_ceiling_accuracy", "rm.val_gold_accuracy_clear", "rm.val_policy_logprob_gold_accuracy_clear",
    "ppo.gold_score", "ppo.sft_gold_score", "ppo.rm_score", "ppo.win_rate_vs_sft", "ppo.win_rate_vs_sft_se",
    "ppo.kl_to_sft",
    "ppo.final_beta", "ppo.pretrain_val_loss", "ppo.sft_pretrain_val_loss", "ppo.bon16.win_rate_vs_sft",
    "ppo.bon16.oracle_win_rate_vs_sft", "ppo.reference_win_rate_vs_sft", "pretrain.wall_s", "sft.wall_s",
    "rm.wall_s", "ppo.wall_s",
)


def parse_seeds(text: str) -> list[int]:
  """'0,1,5' or '0-4' (inclusive) or a mix ('0-2,7'); distinct non-negative integers, in the order given."""
  seeds: list[int] = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    lo, dash, hi = part.partition("-")
    try:
      vals = list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
    except ValueError:
      raise ValueError(f"--seeds={text!r}: {part!r} is not an integer or a range a-b; "
                       "expected e.g. 0,1,2 or 0-4") from None
    if dash and int(hi) < int(lo):
      raise ValueError(f"--seeds={text!r}: the range {part!r} is empty; expected a-b with a <= b")
    seeds += vals
  if not seeds:
    raise ValueError(f"--seeds={text!r}: no seeds; expected e.g. 0,1,2 or 0-4")
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={text!r}: expected distinct non-negative seeds, got {seeds}")
  return seeds


def seed_workdir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def aggregate(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{label: summary} -> {"runs": labels, "keys": {key: {values, mean, sd, min, max, n}}, "missing": {...}}.

  A key is aggregated over the runs that have it as a finite number; `n` says how many, and "missing" lists the
  runs that lack a key some other run has (a stage that did not run, a variant). sd is the sample standard
  deviation (n - 1 in the denominator; None for a single run).
  """
  labels = list(summaries)
  if not labels:
    raise ValueError("aggregate: no runs to aggregate")
  numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
  all_keys = sorted({k for s in summaries.values() for k, v in s.items() if numeric(v)})
  keys, missing = {}, {}
  for k in all_keys:
    have = [(lab, float(summaries[lab][k])) for lab in labels if numeric(summaries[lab].get(k))]
    if len(have) < len(labels):
      missing[k] = [lab for lab in labels if lab not in dict(have)]
    vals = [v for _, v in have]
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    keys[k] = {"values": dict(have), "mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "n": n}
  return {"runs": labels, "keys": keys, "missing": missing}


def _fmt(v: float | None) -> str:
  if v is None:
    return "-"
  return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


# Per policy evaluated against SFT (the RL variants, DPO, ...), beside HEADLINE's ppo.* rows.
POLICY_KEYS = ("gold_score", "win_rate_vs_sft", "win_rate_vs_sft_se", "kl_to_sft", "rm_score", "wall_s")


def markdown(agg: Mapping[str, Any], *, headline: Sequence[str] = HEADLINE, title: str = "Seed sweep") -> str:
  runs = agg["runs"]
  rows = [k for k in headline if k in agg["keys"]] or sorted(agg["keys"])
  others = sorted({k.split(".")[0] for k in agg["keys"] if k.count(".") == 1 and k.endswith(".win_rate_vs_sft")}
                  - {"ppo"})
  rows += [f"{d}.{k}" for d in others for k in POLICY_KEYS if f"{d}.{k}" in agg["keys"] and f"{d}.{k}" not in rows]
  lines = [f"# {title}", "", f"{len(runs)} runs: " + ", ".join(runs) + ". Mean and sample standard deviation "
           "over the runs that have the key (n); sweep.json has every shared number.", "",
           "| key | " + " | ".join(runs) + " | mean | sd | n |", "|---" * (len(runs) + 4) + "|"]
  for k in rows:
    e = agg["keys"][k]
    cells = [_fmt(e["values"].get(r)) for r in runs]
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {_fmt(e['mean'])} | {_fmt(e['sd'])} | {e['n']} |")
  extra = papers.over_seeds(dict(agg))  # the papers sections' verdicts and rm_proxy's table, where present
  return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def read_summaries(workdirs: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  out = {}
  for i, wd in enumerate(workdirs):
    path = os.path.join(wd, "summary.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no summary.json in {wd}: run the experiment there first")
    with open(path) as f:
      try:
        summary = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected the flat object a run writes") from None
    if not isinstance(summary, dict):
      raise ValueError(f"{path}: expected a flat JSON object of summary numbers, got {type(summary).__name__}")
    label = labels[i] if labels else os.path.basename(os.path.normpath(wd))
    if label in out:
      raise ValueError(f"two runs are both labelled {label!r} ({wd}); give distinct workdirs")
    out[label] = summary
  return out


def write(out_dir: str, agg: Mapping[str, Any]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.write_json_atomic(os.path.join(out_dir, "sweep.json"), agg)
  checkpoint.write_text_atomic(os.path.join(out_dir, "sweep.md"), markdown(agg))


def run(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int]) -> dict[str, Any] | None:
  """Runs `config` once per seed into WORKDIR/seed_<n>, then aggregates the runs into WORKDIR/sweep.*.

  Every process runs every seed (the stages are multi-host); process 0, which writes the summaries, aggregates
  and returns the aggregate, the others return None.
  """
  if config.stage != "pipeline":
    raise ValueError(f"--seeds sweeps a pipeline; experiment.stage={config.stage!r} runs one stage. Set "
                     "--experiment.stage=pipeline and choose stages with --experiment.stages")
  for seed in seeds:
    c = copy.deepcopy(config)
    c.seed = seed
    pipeline.run(c, seed_workdir(workdir, seed))
  if jax.process_index() != 0:
    return None
  agg = aggregate(read_summaries([seed_workdir(workdir, s) for s in seeds], [f"seed {s}" for s in seeds]))
  write(workdir, agg)
  return agg


def main(argv: Sequence[str]) -> None:
  if len(argv) < 3:
    sys.exit("usage: python -m rlhf_jax.sweep OUT_DIR WORKDIR [WORKDIR ...]")
  agg = aggregate(read_summaries(argv[2:]))
  write(argv[1], agg)
  print(markdown(agg))


if __name__ == "__main__":
  main(sys.argv)
