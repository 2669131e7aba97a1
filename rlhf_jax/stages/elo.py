"""Elo: a cross-model table of every policy snapshot so far, from labeler pairwise games on held-out prompts.

Every stage directory in `elo.snapshots` (the pretrained model, SFT, each online round's PPO policy, ...) answers
the first `elo.n_prompts` held-out prompts `elo.samples_per_prompt` times at the RL sampling settings
(ppo.temperature, ppo.max_new_tokens, as every policy evaluation). A snapshot's samples depend only on its name
and the seed, so the same policy gives the same responses in every round's table. Every pair of snapshots then
plays one game per (prompt, sample) slot, judged by a random simulated labeler (rlhf_jax.evals.elo), and the
games are rated by Elo and by Bradley-Terry, beside each snapshot's mean gold score.

Writes WORKDIR/<elo.stage_dir>/elo.json (the table), elo.png (Elo and gold score per snapshot) and
report_section.md (the report stage includes it); summary keys "<snapshot>.elo", ".bt_elo", ".gold_score",
".win_rate".
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import checkpoint, runtime, sampling, training
from rlhf_jax.data import sources
from rlhf_jax.data.batching import decode_responses
from rlhf_jax.evals import elo as elo_evals
from rlhf_jax.evals import policy as policy_evals


def check(config: ml_collections.ConfigDict) -> None:
  ec = config.elo
  runtime.check_shared(config)
  snaps = list(ec.snapshots)
  if len(snaps) < 2 or len(set(snaps)) != len(snaps):
    raise ValueError(f"elo.snapshots={tuple(snaps)}: expected at least 2 distinct stage directories of policies")
  if ec.n_prompts < 1 or ec.samples_per_prompt < 1:
    raise ValueError(f"elo.n_prompts={ec.n_prompts}, elo.samples_per_prompt={ec.samples_per_prompt}: expected "
                     "at least 1 each")
  if ec.k_factor <= 0:
    raise ValueError(f"elo.k_factor={ec.k_factor}: expected a positive Elo K-factor")


def _snapshot_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed + 43), zlib.crc32(name.encode()) % (2**31))


def figure(names, table, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the figure is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  x = np.arange(len(names))
  fig, (ax_elo, ax_gold) = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(names) * 2), 3.4))
  ax_elo.plot(x, [table[n]["elo"] for n in names], marker="o", label="Elo")
  ax_elo.plot(x, [table[n]["bt_elo"] for n in names], marker="s", ls="--", label="Bradley-Terry (Elo scale)")
  ax_elo.set_ylabel("rating")
  ax_elo.legend(fontsize=8)
  ax_gold.plot(x, [table[n]["gold_score"] for n in names], marker="o", color="tab:green")
  ax_gold.set_ylabel("mean gold score")
  for ax, title in ((ax_elo, "labeler Elo"), (ax_gold, "gold score")):
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def section(stage_name: str, names, table, n_games: int, n_draws: int, n_prompts: int, samples: int) -> str:
  lines = [f"## Elo of every snapshot ({stage_name})", "",
           f"{n_games} labeler games ({n_draws} draws left out) on {n_prompts} held-out prompts x {samples} samples "
           "per snapshot pair.", "",
           "| snapshot | Elo | Bradley-Terry (Elo scale) | win rate | gold score |", "|---|---|---|---|---|"]
  lines += [f"| {n} | {table[n]['elo']:.0f} | {table[n]['bt_elo']:.0f} | {table[n]['win_rate']:.3f} | "
            f"{table[n]['gold_score']:.3f} |" for n in names]
  lines += ["", "![Elo and gold score per snapshot](elo.png)"]
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  ec, pc = config.elo, config.ppo
  stage_dir = runtime.stage_dir(config, workdir, "elo")
  os.makedirs(stage_dir, exist_ok=True)
  tok = sources.tokenizer(config, workdir)
  mesh, rules = runtime.mesh_and_rules(config)
  expect = runtime.policy_config(config, tok.vocab_size)
  prompts = sources.rl_prompts(config, workdir, tok, which="validation")[:ec.n_prompts]
  gold = sources.gold_scorer(config, workdir)
  scfg = sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature)
  s = ec.samples_per_prompt
  ids = [p["ids"] for p in prompts] * s  # slot j * n + i: sample j of prompt i
  texts_p = [p["prompt"] for p in prompts] * s
  names = list(ec.snapshots)
  texts, golds = [], []
  for name in names:
    params, cfg = runtime.load_policy(workdir, name, mesh, rules, expect=expect, field="elo.snapshots")
    out = policy_evals.sample(params, cfg, ids, tok, scfg, _snapshot_key(config.seed, name),
                              batch_size=config.eval.batch_size, mesh=mesh, rules=rules)
    texts.append(decode_responses(tok, out["response_bn"], out["response_mask_bn"]))
    golds.append(gold.score_batch(texts_p, texts[-1]))
    del params
  rng = np.random.default_rng([config.seed, 47])
  games, draws = elo_evals.play_games(np.stack(golds), texts, sources.labelers(config), rng)
  ratings = elo_evals.rate(games, len(names), k_factor=ec.k_factor, rng=rng)
  table = {n: {"elo": float(ratings["elo"][i]), "bt_elo": float(ratings["bt_elo"][i]),
               "win_rate": float(ratings["win_rate"][i]), "gold_score": float(np.mean(golds[i]))}
           for i, n in enumerate(names)}
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(stage_dir, "elo.json"),
                                 {"snapshots": names, "table": table, "n_games": len(games), "n_draws": draws})
    figure(names, table, os.path.join(stage_dir, "elo.png"))
    checkpoint.write_text_atomic(os.path.join(stage_dir, "report_section.md"),
                                 section(ec.stage_dir, names, table, len(games), draws, len(prompts), s))
  summary: dict[str, Any] = {f"{n}.{k}": v for n in names for k, v in table[n].items()}
  summary.update({"n_games": len(games), "n_draws": draws, "snapshots": names, "wall_s": time.time() - t0})
  training.write_summary(stage_dir, summary)
  return summary
