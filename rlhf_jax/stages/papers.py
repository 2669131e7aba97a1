"""A paper's ablation, from what other stages of the same workdir wrote: a report section with a verdict.

`papers.experiment` picks the claim, `papers.runs` the stage directories it reads (experiments/papers/ has one
file per paper, with the variants that produce those directories):
  gao          Gao et al. 2022, reward over-optimisation. Best-of-n of SFT at every n of `papers.best_of_n`
               (sampled here once, max(n) candidates a prompt, each reward model of `papers.rms` choosing;
               KL = log n - (n-1)/n) and the RL runs' rollouts along training (`runs`, one per reward model, read
               from their metrics.jsonl: ppo.log_every=1 so iteration 1, the SFT policy's own rollout, is the
               origin). Gold and proxy score, as differences from SFT's, against d = sqrt(KL), fitted with
               d(a - b d) and d(a - b log d) (rlhf_jax.evals.scaling); with several reward models, whether the gold
               peak moves out as the RM grows (by parameter count).
  kl_frontier  Ziegler 2019 / Stiennon 2020: the RL runs' held-out gold score against KL (their summary.json);
               of the fixed-beta runs, whether the best gold lies at an interior beta.
  rm_batching  InstructGPT sec 3.5: the reward-model runs' validation loss and accuracy per epoch (rows with
               `epoch`, from rm.train.evals_per_epoch); whether shuffled pairs overfit after one epoch where
               prompt-grouped pairs do not.
  alignment_tax  InstructGPT sec 4.2: PPO runs at the PPO-ptx coefficients `papers.ptx_coefs` (0 included):
               held-out pretraining loss and benchmark skill against the gold win rate (their summary.json);
               whether plain PPO pays a tax over SFT and ptx recovers it at little cost in win rate.
  dpo_vs_ppo   The DPO paper, Fig. 2: DPO runs (`papers.dpo_runs`) and PPO runs (`runs`) at several betas, held-
               out gold score against KL to SFT; whether DPO's frontier lies above PPO's.
  rm_proxy     Issue #21 item 6, a better proxy reward model: for each reward model of `papers.rms` (and each
               ensemble of `papers.ensembles`), its clear-pair gold accuracy (its summary), the share of the gold
               scorer's own best-of-n gain over SFT that its best-of-n choice captures (n of `papers.best_of_n`
               beyond 1, on one set of SFT candidates), and the PPO run against it (`runs`, "" = none): whether
               best-of-16 chosen by the RM captures at least half of the oracle's gain.
Writes WORKDIR/<papers.stage_dir>/{report_section.md, <experiment>.png, summary.json}; the report stage includes
the section. Summary keys are flat numbers (fits, verdicts as 1/0), so a --seeds sweep averages them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import checkpoint, losses, metrics, runtime, sampling, training
from rlhf_jax.data import sources
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.evals import scaling

EXPERIMENTS = ("gao", "kl_frontier", "rm_batching", "alignment_tax", "dpo_vs_ppo", "rm_proxy")
SECTION_FILE = "report_section.md"  # the name rlhf_jax/stages/report.py looks for


def check(config: ml_collections.ConfigDict) -> None:
  pc = config.papers
  runtime.check_choice(pc.experiment, "papers.experiment", EXPERIMENTS)
  runtime.check_choice(pc.bon_prompts, "papers.bon_prompts", ("rl", "all_validation"))
  runtime.check_choice(pc.bon_estimator, "papers.bon_estimator", ("first", "subsets"))
  if pc.bon_candidates and (pc.bon_candidates < max(pc.best_of_n, default=1) or pc.bon_estimator == "first"):
    raise ValueError(f"papers.bon_candidates={pc.bon_candidates}: expected 0 (max(papers.best_of_n)), or at least "
                     f"max(papers.best_of_n)={max(pc.best_of_n, default=1)} with papers.bon_estimator='subsets' "
                     "(the 'first' estimator reads only the first max(n))")
  if pc.experiment == "rm_proxy":
    if not pc.rms or not len(pc.rms) <= len(pc.runs) <= len(pc.rms) + len(pc.ensembles):
      raise ValueError(f"papers.rms={tuple(pc.rms)}, papers.runs={tuple(pc.runs)}: rm_proxy expects reward models and "
                       "one PPO run per reward model ('' for none), then optionally one per papers.ensembles entry")
    bad = [e for e in pc.ensembles if len(e) < 2 or any(m not in pc.rms for m in e)]
    if bad:
      raise ValueError(f"papers.ensembles: {bad} expected groups of at least 2 of papers.rms {tuple(pc.rms)}")
    if min(pc.best_of_n) != 1 or len(pc.best_of_n) < 2:
      raise ValueError(f"papers.best_of_n={tuple(pc.best_of_n)}: rm_proxy needs 1 (SFT) and larger sizes")
  elif not pc.runs:
    raise ValueError(f"papers.runs is empty: expected the stage directories the {pc.experiment!r} experiment "
                     "reads (experiments/papers/)")
  if pc.experiment == "gao":
    if pc.rms and len(pc.rms) != len(pc.runs):
      raise ValueError(f"papers.rms={tuple(pc.rms)}: expected one reward-model directory per papers.runs entry "
                       f"({len(pc.runs)}), or none (all 'rm')")
    ns = list(pc.best_of_n)
    if len(ns) < 2 or min(ns) != 1 or len(set(ns)) != len(ns):
      raise ValueError(f"papers.best_of_n={tuple(ns)}: expected distinct sizes including 1 (the origin, SFT "
                       "itself) and at least one more")
  if pc.experiment == "alignment_tax":
    coefs = list(pc.ptx_coefs)
    if len(coefs) != len(pc.runs) or 0 not in coefs or len(set(coefs)) != len(coefs) or min(coefs) < 0:
      raise ValueError(f"papers.ptx_coefs={tuple(coefs)}: expected one distinct non-negative coefficient per "
                       f"papers.runs entry ({len(pc.runs)}), 0 (plain PPO) among them")
  if pc.experiment == "dpo_vs_ppo" and not pc.dpo_runs:
    raise ValueError("papers.dpo_runs is empty: expected the DPO stage directories to set against papers.runs' PPO")
  if pc.experiment == "rm_batching" and len(pc.runs) != 2:
    raise ValueError(f"papers.runs={tuple(pc.runs)}: rm_batching compares two reward-model runs (grouped by "
                     "prompt and shuffled pairs)")


def _read_summary(workdir: str, run: str) -> dict[str, Any]:
  path = os.path.join(workdir, run, "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"papers.runs: {path} does not exist; run the stage that writes WORKDIR/{run} first")
  with open(path) as f:
    return json.load(f)


def _read_rows(workdir: str, run: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
  path = os.path.join(workdir, run, "metrics.jsonl")
  rows = metrics.read_jsonl(path) if os.path.exists(path) else []
  rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)]
  if not rows:
    raise ValueError(f"{path}: no rows with {', '.join(keys)}; expected the metrics of a finished run")
  return rows


def _fmt_peak(kl: float) -> str:
  return "none (no downturn)" if not np.isfinite(kl) else f"{kl:.3g}"


# ----------------------------------------------------------------------------------------------------------
# Gao et al.: best-of-n and RL against sqrt(KL).


def rl_points(rows: list[dict[str, Any]], path: str) -> dict[str, np.ndarray]:
  """d = sqrt(KL) and the gold and proxy gains over the first row, which must be iteration 1 (its rollout is
  the SFT policy's own: KL 0)."""
  if rows[0]["step"] != 1:
    raise ValueError(f"{path}: the RL curve starts at iteration {rows[0]['step']}; expected a row at iteration 1 "
                     "(the SFT policy's own rollout, the origin): run the RL stage with ppo.log_every=1")
  kl = np.array([r["kl_seq"] for r in rows])
  return {"d": scaling.sqrt_kl(kl), "gold": np.array([r["gold_score"] for r in rows]) - rows[0]["gold_score"],
          "proxy": np.array([r["rm_score"] for r in rows]) - rows[0]["rm_score"], "kl": kl}


def bon_points(curve: dict[int, dict[str, float]]) -> dict[str, np.ndarray]:
  ns = sorted(curve)
  kl = np.array([float(losses.best_of_n_kl(n)) for n in ns])
  return {"d": np.sqrt(kl), "kl": kl, "n": np.array(ns),
          "gold": np.array([curve[n]["gold_score"] for n in ns]) - curve[1]["gold_score"],
          "proxy": np.array([curve[n]["rm_score"] for n in ns]) - curve[1]["rm_score"],
          "oracle": np.array([curve[n]["oracle_gold_score"] for n in ns]) - curve[1]["gold_score"]}


def n_candidates(config) -> int:
  """The SFT candidates a prompt best-of-n is read from (papers.bon_candidates, 0 = the largest n)."""
  return config.papers.bon_candidates or max(config.papers.best_of_n)


def bon_method(config) -> str:
  """How the section's best-of-n was estimated, in words."""
  if config.papers.bon_estimator == "first":
    return f"each prompt's first n of one set of {n_candidates(config)} SFT candidates"
  return (f"the expectation over every n-subset of {n_candidates(config)} SFT candidates a prompt (Gao et al.'s "
          "estimator, papers.bon_estimator='subsets'; best-of-1 is their mean)")


SCORES_FILE = "best_of_n_scores.npz"  # what the section's best-of-n was read from, for analyses after it


SFT_LOGPROB = "sft_logprob"  # the picker that is SFT's own log-likelihood, in the curves after the RMs


def _best_of_n_curves(config, workdir: str, rm_dirs: list[str], out_dir: str, ensembles=(),
                      sft_logprob: bool = False) -> tuple[list[dict[int, dict[str, float]]], list[int], int]:
  """Best-of-n of SFT on the held-out prompts (papers.bon_prompts) at every n, each reward model choosing (then
  each ensemble, then with sft_logprob SFT's own log-likelihood and the first RM plus it); each model's parameter
  count (its size, as Gao et al. count it); and the number of prompts. The scores it is read from
  (policy_evals.best_of_n_scores, the pickers in that order, named in "models") are kept in out_dir/SCORES_FILE."""
  ec, pc = config.eval, config.ppo
  tok = sources.tokenizer(config, workdir)
  mesh, rules = runtime.mesh_and_rules(config)
  policy_cfg = runtime.policy_config(config, tok.vocab_size)
  sft, _ = runtime.load_policy(workdir, config.papers.sft_from, mesh, rules, expect=policy_cfg,
                               field="papers.sft_from")
  rms = []
  for d in rm_dirs:
    params, cfg, manifest = training.load_export(os.path.join(workdir, d), mesh, rules)
    if manifest["kind"] != "reward_model":
      raise ValueError(f"papers.rms: {os.path.join(workdir, d)} holds a {manifest['kind']}, not a reward model")
    rms.append((params, cfg))
  ns = sorted(config.papers.best_of_n)
  # The PPO stage's evaluation settings, candidate keys and SFT baseline key: its bon<n> numbers are ours at n.
  prompts = (sources.validation_prompts(config, workdir, tok) if config.papers.bon_prompts == "all_validation"
             else sources.rl_prompts(config, workdir, tok, which="validation")[:ec.n_prompts])
  scores = policy_evals.best_of_n_scores(
      sft, policy_cfg, tok, prompts,
      sources.gold_scorer(config, workdir), rms=rms,
      scfg=sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature),
      candidate_rngs=[jax.random.PRNGKey(config.seed + 100 + i) for i in range(n_candidates(config))],
      samples_per_prompt=ec.samples_per_prompt, sft_rng=runtime._sft_baseline_key(config.seed),
      no_eos_penalty=pc.no_eos_penalty, batch_size=ec.batch_size, mesh=mesh, rules=rules, ensembles=ensembles,
      sft_logprob=sft_logprob)
  names = [*rm_dirs, *("+".join(rm_dirs[i] for i in e) for e in ensembles)]
  if sft_logprob:
    # SFT's own log-likelihood as one more picker after the reward models, then the first RM's score plus it,
    # each standardised over every candidate (equal weights, fixed before any result was seen).
    lp = scores.pop("sft_logprob")
    z = lambda x: (x - x.mean()) / (x.std() + 1e-12)  # noqa: E731
    scores["rm"] = np.concatenate([scores["rm"], lp[None], (z(scores["rm"][0]) + z(lp))[None]])
    names += [SFT_LOGPROB, f"{rm_dirs[0]}+{SFT_LOGPROB}"]
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, SCORES_FILE), "wb") as f:
      np.savez_compressed(f, models=np.array(names), prompts=np.array([p["prompt"] for p in prompts]), **scores)
  curves = policy_evals.curves_from_scores(scores, ns, config.papers.bon_estimator)
  return curves, [int(sum(np.prod(x.shape) for x in jax.tree.leaves(p["backbone"]))) for p, _ in rms], len(prompts)


def peak_verdicts(peaks: list[tuple[str, float]], sizes: dict[str, int], n_comps: dict[str, int]
                  ) -> dict[str, scaling.Verdict]:
  """Gao et al.'s "the peak moves out as the RM grows", along each axis the RMs differ in: parameters (among the
  RMs on the most comparisons) and comparisons (among the RMs of the first RM's size). peaks: (RM, the gold
  fit's peak KL of its RL run), the first RM first."""
  out = {}
  by_size = [(d, p) for d, p in peaks if n_comps[d] == max(n_comps[d] for d, _ in peaks)]
  if len({sizes[d] for d, _ in by_size}) > 1:
    out["rm_size_peak_moves_out_held"] = scaling.peak_moves_out(
        [sizes[d] for d, _ in by_size], [p for _, p in by_size], what="reward model (parameters)")
  by_data = [(d, p) for d, p in peaks if sizes[d] == sizes[peaks[0][0]]]
  if len({n_comps[d] for d, _ in by_data}) > 1:
    out["rm_data_peak_moves_out_held"] = scaling.peak_moves_out(
        [n_comps[d] for d, _ in by_data], [p for _, p in by_data], what="reward model's training set (comparisons)")
  return out


def gao(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  pc = config.papers
  runs = list(pc.runs)
  rm_dirs = list(pc.rms) or ["rm"] * len(runs)
  unique = list(dict.fromkeys(rm_dirs))
  bon, n_params, n_prompts = _best_of_n_curves(config, workdir, unique, out_dir)
  curves, sizes = dict(zip(unique, bon)), dict(zip(unique, n_params))
  summary: dict[str, float] = {}
  table = ["| reward model | method | score | a | b | R^2 | peak KL | points | measured up to KL |",
           "|---|---|---|---|---|---|---|---|---|"]
  verdicts, series, peaks, seen = [], [], [], set()
  for run, rm_dir in zip(runs, rm_dirs):
    path = os.path.join(workdir, run, "metrics.jsonl")
    for method, pts in (("best-of-n", bon_points(curves[rm_dir])),
                        ("RL", rl_points(_read_rows(workdir, run, ("kl_seq", "gold_score", "rm_score")), path))):
      form = "best_of_n" if method == "best-of-n" else "rl"
      fits = {s: scaling.fit(pts["d"], pts[s], form) for s in ("gold", "proxy")}
      max_d = float(pts["d"].max())
      tag = f"{rm_dir}_{'bon' if form == 'best_of_n' else 'rl'}"
      for s, f in fits.items():
        table.append(f"| {rm_dir} | {method} | {s} | {f.a:.3f} | {f.b:.3f} | {f.r2:.2f} | {_fmt_peak(f.peak_kl)} "
                     f"| {f.n} | {max_d ** 2:.2f} |")
        summary.update(f.as_dict(f"{tag}_{s}_"))
      v = scaling.overoptimisation(fits["gold"], fits["proxy"], max_d, method=f"{method} against {rm_dir}")
      verdicts.append(v)
      summary[f"{tag}_overoptimisation_held"] = float(v.held)
      series.append((rm_dir, method, pts, fits))
      if form == "best_of_n" and rm_dir not in seen:
        seen.add(rm_dir)
        summary.update({f"{rm_dir}_bon{n}_{k}": float(curves[rm_dir][n][k]) for n in curves[rm_dir]
                        for k in ("gold_score", "rm_score", "oracle_gold_score", "win_rate_vs_sft", "kl_to_sft")})
      if form == "rl":
        peaks.append((rm_dir, fits["gold"].peak_kl))
  n_comps = {d: int(_read_summary(workdir, d).get("n_train_comparisons", 0)) for d in unique}
  for key, v in peak_verdicts(peaks, sizes, n_comps).items():
    verdicts.append(v)
    summary[key] = float(v.held)
  _plot_gao(series, os.path.join(out_dir, "gao.png"))
  lines = ["## Gao et al. 2022: reward over-optimisation", "",
           "Gold and proxy (reward-model) score gained over SFT against d = sqrt(KL to SFT). Best-of-n: held-out "
           f"prompts ({n_prompts}), n in {sorted(pc.best_of_n)}, {bon_method(config)}, KL = log n - (n-1)/n, fitted "
           "with d(a - b d). RL: the "
           "training rollout of every iteration (ppo.batch_size episodes on training prompts, their sampled KL), "
           "fitted with d(a - b log d). Dotted: best-of-n with the gold scorer picking (the ceiling at that KL).", "",
           "![gold and proxy against sqrt(KL)](gao.png)", "", *table, ""]
  return lines, summary, verdicts


def _plot_gao(series, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  colors = {}
  for rm_dir, method, pts, fits in series:
    ax = axes[0 if method == "best-of-n" else 1]
    c = colors.setdefault(rm_dir, f"C{len(colors)}")
    grid = np.linspace(0, float(pts["d"].max()) * 1.05, 100)
    for s, marker, ls in (("gold", "o", "-"), ("proxy", "x", "--")):
      ax.scatter(pts["d"], pts[s], s=10, marker=marker, color=c, alpha=0.5)
      ax.plot(grid, fits[s].predict(grid), ls, color=c, label=f"{rm_dir} {s} (R^2 {fits[s].r2:.2f})")
    if "oracle" in pts:
      ax.plot(pts["d"], pts["oracle"], ":", color=c, alpha=0.6, label=f"{rm_dir} gold, gold picks")
    ax.set_title(method)
    ax.set_xlabel("d = sqrt(KL to SFT)")
    ax.set_ylabel("score - SFT's")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The KL-penalty frontier.


def kl_frontier(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  pts = []
  for run in config.papers.runs:
    s = _read_summary(workdir, run)
    for key in ("gold_score", "kl_to_sft"):
      if not isinstance(s.get(key), (int, float)):
        raise ValueError(f"{os.path.join(workdir, run, 'summary.json')}: no {key}; expected an RL stage's summary")
    betas = [r["beta"] for r in _read_rows(workdir, run, ("beta",))]
    adaptive = max(betas) > min(betas)
    pts.append({"run": run, "beta": betas[0], "final_beta": s.get("final_beta", betas[-1]), "adaptive": adaptive,
                **{k: s.get(k, float("nan")) for k in ("gold_score", "kl_to_sft", "rm_score", "win_rate_vs_sft",
                                                       "win_rate_vs_sft_se", "sft_gold_score")}})
  fixed = sorted((p for p in pts if not p["adaptive"]), key=lambda p: -p["beta"])
  v = scaling.interior_optimum([p["beta"] for p in fixed], [p["gold_score"] for p in fixed],
                               [p["kl_to_sft"] for p in fixed])
  summary = {"interior_optimum_held": float(v.held), "n_fixed_betas": len(fixed)}
  if fixed:
    summary["best_fixed_beta"] = max(fixed, key=lambda p: p["gold_score"])["beta"]
  table = ["| run | beta | KL to SFT | gold | RM score | win rate vs SFT |", "|---|---|---|---|---|---|"]
  for p in fixed + [p for p in pts if p["adaptive"]]:
    beta = f"adaptive ({p['beta']:.3g} -> {p['final_beta']:.3g})" if p["adaptive"] else f"{p['beta']:g}"
    table.append(f"| {p['run']} | {beta} | {p['kl_to_sft']:.2f} | {p['gold_score']:+.3f} | {p['rm_score']:+.3f} | "
                 f"{p['win_rate_vs_sft']:.3f} +- {p['win_rate_vs_sft_se']:.3f} |")
    summary.update({f"{p['run']}_{k}": float(p[k]) for k in ("gold_score", "kl_to_sft", "win_rate_vs_sft")})
  _plot_frontier(pts, os.path.join(out_dir, "kl_frontier.png"))
  lines = ["## The KL-penalty frontier (Ziegler et al. 2019, Stiennon et al. 2020)", "",
           "Held-out gold score of RL at fixed KL coefficients and under the adaptive controller, against the KL "
           "to SFT each ended at (the SFT policy at KL 0).", "", "![gold against KL](kl_frontier.png)", "",
           *table, ""]
  return lines, summary, [v]


def _plot_frontier(pts, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  fixed = sorted((p for p in pts if not p["adaptive"]), key=lambda p: p["kl_to_sft"])
  sft = [p["sft_gold_score"] for p in pts if np.isfinite(p["sft_gold_score"])]
  xs = ([0.0] if sft else []) + [p["kl_to_sft"] for p in fixed]
  ys = ([float(np.mean(sft))] if sft else []) + [p["gold_score"] for p in fixed]
  ax.plot(xs, ys, "o-", label="fixed beta (and SFT at 0)")
  for p in fixed:
    ax.annotate(f"{p['beta']:g}", (p["kl_to_sft"], p["gold_score"]), fontsize=7)
  ad = [p for p in pts if p["adaptive"]]
  if ad:
    ax.plot([p["kl_to_sft"] for p in ad], [p["gold_score"] for p in ad], "s", label="adaptive controller")
  ax.set_xlabel("KL(policy || SFT), nats per response")
  ax.set_ylabel("gold score (held-out)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# InstructGPT's RM batching.


def rm_batching(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  curves = {}
  for run in config.papers.runs:
    grouping = _read_summary(workdir, run).get("grouping")
    if grouping not in ("prompt", "pairs"):
      raise ValueError(f"{os.path.join(workdir, run, 'summary.json')}: grouping={grouping!r}; expected a reward "
                       "model stage's summary with grouping 'prompt' or 'pairs'")
    rows = _read_rows(workdir, run, ("epoch", "val_loss", "val_accuracy"))
    curves[grouping] = {"run": run, **{k: np.array([r[k] for r in rows]) for k in ("epoch", "val_loss",
                                                                                    "val_accuracy")}}
  if set(curves) != {"prompt", "pairs"}:
    raise ValueError(f"papers.runs={tuple(config.papers.runs)}: expected one reward model grouped by prompt and "
                     f"one of shuffled pairs, got groupings {sorted(curves)}")
  p, g = curves["pairs"], curves["prompt"]
  v = scaling.overfits_after_one_epoch(p["epoch"], p["val_loss"], other_epochs=g["epoch"],
                                       other_val_loss=g["val_loss"])
  summary = {"pairs_overfit_held": float(v.held)}
  table = ["| arrangement | run | epoch | validation loss | validation accuracy |", "|---|---|---|---|---|"]
  for name, c in (("grouped by prompt", g), ("shuffled pairs", p)):
    tag = "grouped" if c is g else "pairs"
    i1 = int(np.argmin(np.abs(c["epoch"] - 1.0)))
    summary.update({f"{tag}_val_loss_epoch1": float(c["val_loss"][i1]),
                    f"{tag}_val_loss_final": float(c["val_loss"][-1]),
                    f"{tag}_val_loss_min_epoch": float(c["epoch"][int(np.argmin(c["val_loss"]))]),
                    f"{tag}_val_accuracy_final": float(c["val_accuracy"][-1])})
    table += [f"| {name} | {c['run']} | {e:.2f} | {lo:.4f} | {a:.3f} |"
              for e, lo, a in zip(c["epoch"], c["val_loss"], c["val_accuracy"])]
  _plot_rm(curves, os.path.join(out_dir, "rm_batching.png"))
  lines = ["## InstructGPT's reward-model batching", "",
           "Validation ranking loss (InstructGPT eq. 1 on held-out comparisons) and accuracy per epoch: all "
           "C(K,2) pairs of a prompt in one batch element against every pair a shuffled example.", "",
           "![validation loss and accuracy per epoch](rm_batching.png)", "", *table, ""]
  return lines, summary, [v]


def _plot_rm(curves, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for grouping, c in sorted(curves.items()):
    label = "grouped by prompt" if grouping == "prompt" else "shuffled pairs"
    axes[0].plot(c["epoch"], c["val_loss"], "o-", label=label)
    axes[1].plot(c["epoch"], c["val_accuracy"], "o-", label=label)
  for ax, name in zip(axes, ("validation loss", "validation accuracy")):
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The alignment tax and PPO-ptx.

_EVAL_KEYS = ("gold_score", "kl_to_sft", "win_rate_vs_sft", "win_rate_vs_sft_se")


def _eval_point(workdir: str, run: str, keys: tuple[str, ...]) -> dict[str, Any]:
  s = _read_summary(workdir, run)
  missing = [k for k in keys if not isinstance(s.get(k), (int, float))]
  if missing:
    raise ValueError(f"{os.path.join(workdir, run, 'summary.json')}: no {', '.join(missing)}; expected a PPO or DPO "
                     "stage's summary with its held-out evaluation")
  return {"run": run, **{k: float(s[k]) for k in keys}, "sft_gold_score": float(s.get("sft_gold_score", np.nan)),
          "sft_pretrain_val_loss": float(s.get("sft_pretrain_val_loss", np.nan))}


def alignment_tax(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  pc = config.papers
  keys = (*_EVAL_KEYS, "pretrain_val_loss", "benchmark_accuracy")
  pts = sorted(({**_eval_point(workdir, run, keys), "coef": float(c)} for run, c in zip(pc.runs, pc.ptx_coefs)),
               key=lambda p: p["coef"])
  sft_loss = next((p["sft_pretrain_val_loss"] for p in pts if np.isfinite(p["sft_pretrain_val_loss"])), np.nan)
  verdicts = scaling.alignment_tax([p["coef"] for p in pts], [p["pretrain_val_loss"] for p in pts],
                                   [p["benchmark_accuracy"] for p in pts], [p["win_rate_vs_sft"] for p in pts],
                                   [p["win_rate_vs_sft_se"] for p in pts], sft_loss)
  summary = {"tax_held": float(verdicts[0].held), "recovered_held": float(verdicts[1].held),
             "win_rate_kept_held": float(verdicts[2].held), "sft_pretrain_val_loss": sft_loss}
  table = ["| run | ptx coefficient | held-out pretraining loss | benchmark accuracy | gold | KL to SFT | "
           "win rate vs SFT |", "|---|---|---|---|---|---|---|", f"| sft | - | {sft_loss:.3f} | - | - | 0 | - |"]
  for p in pts:
    table.append(f"| {p['run']} | {p['coef']:g} | {p['pretrain_val_loss']:.3f} | {p['benchmark_accuracy']:.3f} | "
                 f"{p['gold_score']:+.3f} | {p['kl_to_sft']:.2f} | {p['win_rate_vs_sft']:.3f} +- "
                 f"{p['win_rate_vs_sft_se']:.3f} |")
    summary.update({f"{p['run']}_{k}": p[k] for k in ("pretrain_val_loss", "benchmark_accuracy", "win_rate_vs_sft",
                                                       "gold_score")})
  _plot_tax(pts, sft_loss, os.path.join(out_dir, "alignment_tax.png"))
  lines = ["## The alignment tax and PPO-ptx (InstructGPT sec 4.2)", "",
           "PPO at several PPO-ptx coefficients (the weight of the next-token loss on pretraining text mixed into "
           "every PPO minibatch; 0 is plain PPO): the held-out pretraining loss and the benchmark's exact-match "
           "skill, against the gold win rate over SFT on held-out prompts.", "",
           "![pretraining loss and benchmark against win rate](alignment_tax.png)", "", *table, ""]
  return lines, summary, verdicts


def _plot_tax(pts, sft_loss: float, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  wr = [p["win_rate_vs_sft"] for p in pts]
  for ax, key, name in ((axes[0], "pretrain_val_loss", "held-out pretraining loss"),
                        (axes[1], "benchmark_accuracy", "benchmark accuracy")):
    ax.plot(wr, [p[key] for p in pts], "o-")
    for p in pts:
      ax.annotate(f"ptx {p['coef']:g}", (p["win_rate_vs_sft"], p[key]), fontsize=7)
    ax.set_xlabel("gold win rate vs SFT")
    ax.set_ylabel(name)
  axes[0].axhline(sft_loss, ls=":", c="gray", label="SFT")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# DPO against PPO.


def _dpo_beta(config, workdir: str, run: str) -> float:
  """A DPO run's beta: its summary's, or (runs from before the summary held it) the config that names the run."""
  s = _read_summary(workdir, run)
  if isinstance(s.get("beta"), (int, float)):
    return float(s["beta"])
  for v in config.variants.values():
    if "dpo" in v and v.dpo.get("stage_dir") == run:
      return float(v.dpo.get("beta", config.dpo.beta))
  if run == config.dpo.stage_dir:
    return float(config.dpo.beta)
  raise ValueError(f"{os.path.join(workdir, run, 'summary.json')}: no beta, and no dpo variant of this experiment "
                   "writes that directory")


def dpo_vs_ppo(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  pc = config.papers
  series = {}
  for method, runs in (("PPO", pc.runs), ("DPO", pc.dpo_runs)):
    pts = []
    for run in runs:
      if method == "PPO":  # None: the adaptive controller
        rows = _read_rows(workdir, run, ("beta",))
        beta = None if max(r["beta"] for r in rows) > min(r["beta"] for r in rows) else rows[0]["beta"]
      else:
        beta = _dpo_beta(config, workdir, run)
      pts.append({**_eval_point(workdir, run, _EVAL_KEYS), "beta": beta})
    series[method] = sorted(pts, key=lambda p: p["kl_to_sft"])
  sft_gold = next((p["sft_gold_score"] for ps in series.values() for p in ps if np.isfinite(p["sft_gold_score"])),
                  np.nan)  # every run is evaluated against the same SFT samples
  # Both frontiers start at SFT itself (KL 0); the adaptive PPO runs count as points of PPO's frontier too.
  kl_of = lambda m: [0.0] + [p["kl_to_sft"] for p in series[m]]  # noqa: E731
  gold_of = lambda m: [sft_gold] + [p["gold_score"] for p in series[m]]  # noqa: E731
  v = scaling.frontier_dominates(kl_of("DPO")[1:], gold_of("DPO")[1:], kl_of("PPO"), gold_of("PPO"))
  summary = {"dpo_dominates_held": float(v.held), "sft_gold_score": sft_gold,
             "best_gold_dpo": max(p["gold_score"] for p in series["DPO"]),
             "best_gold_ppo": max(p["gold_score"] for p in series["PPO"])}
  table = ["| method | run | beta | KL to SFT | gold | win rate vs SFT |", "|---|---|---|---|---|---|",
           f"| SFT | sft | - | 0 | {sft_gold:+.3f} | 0.5 |"]
  for method, pts in series.items():
    for p in pts:
      beta = "adaptive" if p["beta"] is None else f"{p['beta']:g}"
      table.append(f"| {method} | {p['run']} | {beta} | {p['kl_to_sft']:.2f} | {p['gold_score']:+.3f} | "
                   f"{p['win_rate_vs_sft']:.3f} +- {p['win_rate_vs_sft_se']:.3f} |")
      summary.update({f"{p['run']}_{k}": p[k] for k in ("gold_score", "kl_to_sft", "win_rate_vs_sft")})
  _plot_dpo_ppo(series, sft_gold, os.path.join(out_dir, "dpo_vs_ppo.png"))
  lines = ["## DPO against PPO (Rafailov et al. 2023, Fig. 2)", "",
           "Held-out gold score against the KL to SFT each policy ended at, for DPO and PPO at several betas on "
           "the same SFT model and the same comparisons (DPO trains on them directly, PPO through the reward "
           "model trained on them). A PPO point's KL is measured on its held-out samples, as DPO's.", "",
           "![gold against KL, DPO and PPO](dpo_vs_ppo.png)", "", *table, ""]
  return lines, summary, [v]


def _plot_dpo_ppo(series, sft_gold: float, path: str) -> None:
  import matplotlib  # lazy: a heavy plotting library, needed only when the section is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for (method, pts), marker in zip(series.items(), ("o-", "s-")):
    ax.plot([0.0] + [p["kl_to_sft"] for p in pts], [sft_gold] + [p["gold_score"] for p in pts], marker,
            label=method)
    for p in pts:
      ax.annotate("adaptive" if p["beta"] is None else f"{p['beta']:g}", (p["kl_to_sft"], p["gold_score"]),
                  fontsize=7)
  ax.set_xlabel("KL(policy || SFT), nats per response")
  ax.set_ylabel("gold score (held-out)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# A better proxy reward model (issue #21 item 6).


def rm_proxy(config, workdir: str, out_dir: str) -> tuple[list[str], dict[str, float], list[scaling.Verdict]]:
  pc = config.papers
  rms, runs = list(pc.rms), list(pc.runs)
  ensembles = [tuple(e) for e in pc.ensembles]
  curves, n_params, n_prompts = _best_of_n_curves(config, workdir, rms, out_dir,
                                                  [[rms.index(m) for m in e] for e in ensembles], sft_logprob=True)
  ns = sorted(n for n in pc.best_of_n if n > 1)
  names = rms + ["+".join(e) for e in ensembles] + [SFT_LOGPROB, f"{rms[0]}+{SFT_LOGPROB}"]
  summary: dict[str, float] = {}
  head = ["| reward model | parameters | comparisons | score at | LM coef | loglik coef | labels | clear-pair gold "
          "accuracy |",
          " labeler accuracy |", *[f" best-of-{n} share of the oracle's gain |" for n in ns],
          " PPO gold | PPO win rate vs SFT | PPO KL |"]
  table = ["".join(head), "|---|---|---|---|---|---|---|---|---|" + "---|" * len(ns) + "---|---|---|"]
  verdicts = []
  for i, name in enumerate(names):
    curve = curves[i]
    sft_gold = curve[1]["gold_score"]
    member = name if name in rms else None
    s = _read_summary(workdir, member) if member else {}
    acc = s.get("val_gold_accuracy_clear", float("nan"))
    lab = s.get("val_accuracy", float("nan"))
    row = [name, f"{n_params[i] / 1e6:.2f}M" if member else "",
           str(s.get("n_train_comparisons", "")) if member else "",  # prompts, each with its K-way ranking
           str(s.get("score_at", "eos")) if member else
           {SFT_LOGPROB: "SFT's log-likelihood (no RM)",
            f"{rms[0]}+{SFT_LOGPROB}": f"z({rms[0]}) + z(SFT log-likelihood)"}.get(name, "mean of members"),
           f"{s.get('lm_coef', 0.0):g}" if member else "", f"{s.get('loglik_coef', 0.0):g}" if member else "",
           str(s.get("labels", "labelers")) if member else "",
           f"{acc:.3f}" if member else "",
           f"{lab:.3f}" if member else ""]
    key = name.replace("+", "_")
    if member:
      summary[f"{key}_backbone_params"] = float(n_params[i])
      summary[f"{key}_train_comparisons"] = float(s.get("n_train_comparisons", np.nan))
      summary[f"{key}_gold_accuracy_clear"] = float(acc)
      summary[f"{key}_labeler_accuracy"] = float(lab)
    for n in ns:
      share = float(curve[n]["share"])  # over best-of-1 (policy_evals.oracle_gain_share, best_of_n_expected)
      summary[f"{key}_bon{n}_share"] = share
      summary[f"{key}_bon{n}_share_se"] = float(curve[n]["share_se"])
      summary[f"{key}_bon{n}_gold_score"] = float(curve[n]["gold_score"])
      summary[f"{key}_bon{n}_oracle_gold_score"] = float(curve[n]["oracle_gold_score"])
      row.append(f"{share:.2f} +- {curve[n]['share_se']:.2f} ({curve[n]['gold_score']:+.3f} of "
                 f"{curve[n]['oracle_gold_score']:+.3f})")
    run = runs[i] if i < len(runs) else ""
    if run:
      p = _eval_point(workdir, run, _EVAL_KEYS)
      summary.update({f"{key}_ppo_{k}": p[k] for k in _EVAL_KEYS})
      row += [f"{p['gold_score']:+.3f}", f"{p['win_rate_vs_sft']:.3f} +- {p['win_rate_vs_sft_se']:.3f}",
              f"{p['kl_to_sft']:.2f}"]
    else:
      row += ["", "", ""]
    table.append("| " + " | ".join(row) + " |")
    n_top = max(ns)
    share = summary[f"{key}_bon{n_top}_share"]
    if name == SFT_LOGPROB:
      continue  # a baseline for the RMs, not a proxy reward model of item 6
    verdicts.append(scaling.Verdict(f"best-of-{n_top} chosen by {name} captures at least half of the oracle's gain "
                                    "over SFT", bool(share >= 0.5),
                                    f"{share:.2f}: gold {curve[n_top]['gold_score']:+.3f} against the oracle's "
                                    f"{curve[n_top]['oracle_gold_score']:+.3f} and SFT's {sft_gold:+.3f}"))
  # Where each RM's picks fall short: the best-of-n share per task family, beside what the oracle gains there.
  n_top = max(ns)
  fams = sorted(k[:-len(".n_prompts")] for k in curves[0][n_top] if k.endswith(".n_prompts"))
  by_family = [f"Best-of-{n_top} by task family: the share of the oracle's gain each RM's picks capture within the "
               "family's prompts (+- its standard error), under the number of prompts and the oracle's gain over "
               "best-of-1 there.", "",
               "| reward model | " + " | ".join(f"{f} ({curves[0][n_top][f + '.n_prompts']}, oracle "
                                               f"{curves[0][n_top][f + '.oracle_gain']:+.3f})" for f in fams) + " |",
               "|---|" + "---|" * len(fams)]
  for i, name in enumerate(names):
    key, c = name.replace("+", "_"), curves[i][n_top]
    for f in fams:
      summary[f"{key}_bon{n_top}_{f}_share"] = float(c[f"{f}.share"])
      summary[f"{key}_bon{n_top}_{f}_share_se"] = float(c[f"{f}.share_se"])
    by_family.append(f"| {name} | " + " | ".join(f"{c[f + '.share']:.2f} +- {c[f + '.share_se']:.2f}" for f in fams)
                     + " |")
  for f in fams:
    summary[f"bon{n_top}_{f}_oracle_gain"] = float(curves[0][n_top][f"{f}.oracle_gain"])
  # What the picks are: the correct answers among them, per family.
  c0 = curves[0][n_top]
  correct = [f"Correct answers (the gold scorer's is_correct) among the best-of-{n_top} picks by task family.", "",
             "| picks | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams),
             "| best-of-1 (a random candidate) | " + " | ".join(f"{c0[f + '.best_of_1_correct_frac']:.2f}"
                                                            for f in fams) + " |",
             f"| the gold scorer's best-of-{n_top} | " + " | ".join(f"{c0[f + '.oracle_correct_frac']:.2f}"
                                                                 for f in fams) + " |"]
  for i, name in enumerate(names):
    key, c = name.replace("+", "_"), curves[i][n_top]
    summary.update({f"{key}_bon{n_top}_{f}_correct_frac": float(c[f"{f}.correct_frac"]) for f in fams})
    correct.append(f"| {name} | " + " | ".join(f"{c[f + '.correct_frac']:.2f}" for f in fams) + " |")
  summary.update({f"bon{n_top}_{f}_{k}": float(c0[f"{f}.{k}"]) for f in fams
                  for k in ("best_of_1_correct_frac", "oracle_correct_frac")})
  s0 = _read_summary(workdir, rms[0])
  base = s0.get("val_policy_logprob_gold_accuracy_clear")
  lines = ["## A better proxy reward model", "",
           "Each reward model on the shared comparisons (or the number of prompts' K-way rankings given), from the "
           "SFT model of its size (the shared one at the policy's size; parameters: the backbone's); best-of-n of "
           "SFT on the held-out "
           f"prompts ({n_prompts}: papers.bon_prompts={config.papers.bon_prompts!r}), {bon_method(config)}, the "
           "same candidates for every model; the share is (gold of the RM's picks - SFT's) / (gold of the gold "
           "scorer's own picks - SFT's), SFT's being best-of-1, +- its standard error over the prompts. "
           "Clear pairs: validation pairs whose gold scores differ by more than rm.clear_gold_margin."
           + (f" The SFT policy's own log-likelihood ranks the clear pairs {base:.3f} right." if base else ""), "",
           f"The {SFT_LOGPROB} row picks by the SFT policy's own log-likelihood of each candidate (no reward model); "
           f"{rms[0]}+{SFT_LOGPROB} by the sum of the two scores, each standardised over all the candidates.",
           "", *table, "", *by_family, "", *correct, ""]
  return lines, summary, verdicts


# ----------------------------------------------------------------------------------------------------------
# Over seeds: what a --seeds sweep (rlhf_jax/sweep.py) adds to sweep.md from the sections' summary keys.


def _pooled(value: dict[str, Any], se: dict[str, Any], seeds: list[str]) -> tuple[float, float]:
  """(mean over seeds, its standard error from the seeds' own standard errors, sqrt(sum se^2) / S)."""
  vals = [value["values"][r] for r in seeds]
  ses = [se["values"][r] for r in seeds]
  return float(np.mean(vals)), float(np.sqrt(np.sum(np.square(ses)))) / len(seeds)


def over_seeds(agg: dict[str, Any]) -> list[str]:
  """Markdown lines: each papers verdict held on how many seeds, and rm_proxy's table over seeds.

  `agg` is rlhf_jax.sweep.aggregate's output over runs whose summaries hold `papers_<name>.*` keys. rm_proxy's
  rows are the seeds that have the row (a variant missing on a seed is left out there, and the seeds column says
  which): the mean of each best-of-n share with the standard error of that mean from each seed's own standard
  error over its prompts (sqrt(sum se^2) / S: the prompts' sampling noise, not the spread between seeds, which the
  per-seed values beside it show), and "held" = on how many of those seeds the best-of-16 share reached half.
  """
  keys, runs = agg["keys"], list(agg["runs"])
  lines: list[str] = []
  held = sorted(k for k in keys if k.startswith("papers_") and k.endswith("_held")
                and not k.endswith(".n_verdicts_held"))  # the section's count of its verdicts
  if held:
    lines += ["## Papers' verdicts over seeds", "", "| experiment | verdict | held on |", "|---|---|---|"]
    for k in held:
      exp, _, name = k.partition(".")
      vals = keys[k]["values"]
      lines.append(f"| {exp[len('papers_'):]} | {name[:-len('_held')]} | {int(sum(vals.values()))} of {len(vals)} "
                   f"({', '.join(r for r in runs if vals.get(r)) or 'none'}) |")
    lines.append("")
  prefix = "papers_rm_proxy."
  rows: dict[str, list[int]] = {}
  for k in keys:
    if k.startswith(prefix) and k.endswith("_share") and "_bon" in k:
      row, _, rest = k[len(prefix):-len("_share")].rpartition("_bon")
      if rest.isdigit():
        rows.setdefault(row, []).append(int(rest))
  if not rows:
    return lines
  ns = sorted({n for v in rows.values() for n in v})
  n_top = max(ns)
  lines += ["## A better proxy reward model over seeds", "",
            "Each best-of-n share: the mean over the seeds that have the row +- the standard error of that mean "
            "from each seed's own (over its prompts), then each seed's value. Held: the seeds on which best-of-"
            f"{n_top} captured at least half of the oracle's gain.", "",
            "| picker | seeds | clear-pair gold accuracy | " + " | ".join(f"best-of-{n} share" for n in ns)
            + f" | best-of-{n_top} held | PPO win rate vs SFT | PPO gold | PPO KL |",
            "|---|---|---|" + "---|" * len(ns) + "---|---|---|---|"]
  for row in sorted(rows, key=lambda r: (r != "rm", r)):
    e = lambda suffix: keys.get(f"{prefix}{row}{suffix}")  # noqa: E731
    top = e(f"_bon{n_top}_share")
    seeds = [r for r in runs if top and r in top["values"] and r in (e(f"_bon{n_top}_share_se") or {"values": {}})
             ["values"]]
    if not seeds:
      continue
    cells = [row, ", ".join(s.removeprefix("seed ").removeprefix("seed_") for s in seeds)]
    acc = e("_gold_accuracy_clear")
    per_seed = lambda entry, rs, fmt: ", ".join(format(entry["values"][r], fmt) for r in rs)  # noqa: E731
    cells.append(f"{acc['mean']:.3f} ({per_seed(acc, [r for r in runs if r in acc['values']], '.3f')})" if acc
                 else "")
    for n in ns:
      share, se = e(f"_bon{n}_share"), e(f"_bon{n}_share_se")
      have = [r for r in seeds if share and se and r in share["values"] and r in se["values"]]
      if not have:
        cells.append("")
        continue
      mean, pooled = _pooled(share, se, have)
      cells.append(f"{mean:.2f} +- {pooled:.2f} ({per_seed(share, have, '.2f')})")
    cells.append(f"{sum(top['values'][r] >= 0.5 for r in seeds)} of {len(seeds)}")
    win, win_se = e("_ppo_win_rate_vs_sft"), e("_ppo_win_rate_vs_sft_se")
    have = [r for r in seeds if win and win_se and r in win["values"] and r in win_se["values"]]
    if have:
      mean, pooled = _pooled(win, win_se, have)
      cells.append(f"{mean:.3f} +- {pooled:.3f} ({per_seed(win, have, '.3f')})")
    else:
      cells.append("")
    for suffix, fmt in (("_ppo_gold_score", "+.3f"), ("_ppo_kl_to_sft", ".2f")):  # mean (each seed's)
      entry = e(suffix)
      have = [r for r in seeds if entry and r in entry["values"]]
      cells.append(f"{format(float(np.mean([entry['values'][r] for r in have])), fmt)} "
                   f"({per_seed(entry, have, fmt)})" if have else "")
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


# ----------------------------------------------------------------------------------------------------------
# The stage.


_INPUTS_FILE = "inputs.json"


# Settings added after sections were recorded, at the values that compute what those sections computed: a
# section recorded without one is current when the config holds that value.
_ADDED_SETTINGS = {"papers": {"bon_prompts": "rl", "bon_estimator": "first", "bon_candidates": 0}}


def _inputs(config) -> dict[str, Any]:
  """What the section is computed from besides the other stages' files: the papers and eval blocks."""
  return json.loads(json.dumps({"papers": config.papers.to_dict(), "eval": config.eval.to_dict(),
                                "seed": config.seed}, default=list))


def is_current(config, workdir: str) -> str | None:
  """None if the finished section was computed with this config's papers and eval settings, else why not: an
  experiment that gains a variant (another RM, another run) redoes its section instead of keeping the old one."""
  path = os.path.join(runtime.stage_dir(config, workdir, "papers"), _INPUTS_FILE)
  if not os.path.exists(path):
    return f"{path} is missing (a section written before the settings were recorded)"
  with open(path) as f:
    stored = json.load(f)
  stored.update({b: {**added, **stored.get(b, {})} for b, added in _ADDED_SETTINGS.items()})
  now = _inputs(config)
  if stored == now:
    return None
  diff = sorted(f"{b}.{k}" for b in ("papers", "eval") for k in set(stored.get(b, {})) | set(now[b])
                if stored.get(b, {}).get(k) != now[b].get(k))
  return f"its settings changed since it ran ({', '.join(diff) or 'seed'})"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  check(config)
  out_dir = runtime.stage_dir(config, workdir, "papers")
  os.makedirs(out_dir, exist_ok=True)
  lines, summary, verdicts = {"gao": gao, "kl_frontier": kl_frontier, "rm_batching": rm_batching,
                              "alignment_tax": alignment_tax,
                              "dpo_vs_ppo": dpo_vs_ppo,
                              "rm_proxy": rm_proxy}[config.papers.experiment](config, workdir, out_dir)
  lines += ["Verdicts (rlhf_jax/evals/scaling.py):", "", *[f"- {v.markdown()}" for v in verdicts], ""]
  summary = {**summary, "n_verdicts_held": int(sum(v.held for v in verdicts)), "n_verdicts": len(verdicts),
             "wall_s": time.time() - t0}
  if jax.process_index() == 0:
    checkpoint.write_text_atomic(os.path.join(out_dir, SECTION_FILE), "\n".join(lines))
    checkpoint.write_json_atomic(os.path.join(out_dir, _INPUTS_FILE), _inputs(config))
    checkpoint.write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
  return summary
