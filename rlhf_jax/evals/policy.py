"""Evaluation of policies on held-out prompts: what InstructGPT reports, at our scale.

For a policy (any parameters of the policy's shape), on the task suite's held-out prompts, with
`eval.samples_per_prompt` samples of each policy per prompt (the suite has only ~100 held-out prompts, and
with one sample each the win rate's standard error was about 0.04):
  gold_score        mean gold score of sampled responses (the simulated humans' hidden preference);
  rm_score          mean normalised reward-model score of the same responses;
  win_rate_vs_sft   P(gold(policy) > gold(SFT)) on the same prompts, ties counting half, over every pair of a
                    prompt's policy and SFT samples, prompts weighted alike; win_rate_vs_sft_se its standard
                    error over the prompts, n_eval_samples the responses drawn of each policy;
  kl_to_sft         mean over prompts of sum_t log pi(y_t) - log pi_SFT(y_t) on the policy's own samples, at the
                    sampling temperature (nats per sequence, the unit of the KL target);
  pretrain_val_loss held-out pretraining next-token loss, and benchmark_accuracy the world-knowledge benchmark
                    (greedy exact match): together, the alignment tax;
  <family>.gold_score and <family>.correct_frac per task family (fact, arithmetic, string, unanswerable,
                    harmful), and top_response_frac, the share of prompts answered with the single most common
                    response: a policy that collapsed to one answer ("I don't know." everywhere) shows it here.
Best-of-n (sample n from SFT, keep the RM's favourite) is evaluated the same way; its KL to SFT is
log n - (n - 1) / n analytically (`losses.best_of_n_kl`). Two ceilings come with it: `oracle_*`, best-of-n
with the gold scorer choosing (what a perfect RM would buy at that KL), and `reference_win_rate_vs_sft`, the
gold reference answer to every prompt against the SFT samples (ties count half, so with an SFT policy that is
often already right this is well below 1).

Every function takes parameters, prompts and scorers as arguments; `rlhf_jax.runtime.evaluate_policy` builds
them from an experiment's config for the stages.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import losses, sampling, sharding
from rlhf_jax.data.batching import decode_responses, fit_prompt, left_pad, pad_rows
from rlhf_jax.models import heads, transformer

Params = Any


def sample(params, cfg: transformer.ModelConfig, prompt_ids: Sequence[Sequence[int]], tok,
           scfg: sampling.SamplingConfig, rng: jax.Array, *, batch_size: int, mesh, rules) -> dict[str, np.ndarray]:
  """Samples one response per prompt in batches; returns host arrays (prompt, response, masks, ended)."""
  n_dp = sharding.data_parallel_size(mesh, rules)
  prompt_ids = [fit_prompt(p, cfg.max_len - scfg.max_new_tokens) for p in prompt_ids]
  p_len = max(len(p) for p in prompt_ids)
  outs = []
  for s in range(0, len(prompt_ids), batch_size):
    chunk = list(prompt_ids[s:s + batch_size])
    n_real = len(chunk)
    chunk += [chunk[-1]] * (pad_rows(batch_size, n_dp) - n_real)
    prompt_bp, mask_bp = left_pad(chunk, tok.pad_id, p_len)
    # Every process holds every prompt: each feeds its rows, and all get every row back.
    placed = sharding.put_global_batch({"p": prompt_bp, "m": mask_bp}, mesh, rules)
    out = sampling.generate(params, placed["p"], placed["m"], jax.random.fold_in(rng, s), cfg, scfg,
                            eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = jax.tree.map(sharding.fetch, out)
    outs.append({"prompt_bp": prompt_bp[:n_real], "prompt_mask_bp": mask_bp[:n_real],
                 "response_bn": out.tokens_bn[:n_real], "response_mask_bn": out.mask_bn[:n_real],
                 "logprobs_bn": out.logprobs_bn[:n_real], "ended_b": out.ended_b[:n_real]})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _batched(fn, params, arrays: dict[str, np.ndarray], batch_size: int, mesh, rules) -> np.ndarray:
  n = len(next(iter(arrays.values())))
  n_dp = sharding.data_parallel_size(mesh, rules)
  outs = []
  for s in range(0, n, batch_size):
    chunk = {k: v[s:s + batch_size] for k, v in arrays.items()}
    n_real = len(next(iter(chunk.values())))
    pad = pad_rows(n_real, n_dp) - n_real
    if pad:
      chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in chunk.items()}
    outs.append(sharding.fetch(fn(params, sharding.put_global_batch(chunk, mesh, rules)))[:n_real])
  return np.concatenate(outs)


# Module-level jits keyed by the (hashable) configs: the policy and SFT, or each set of best-of-n candidates,
# reuse one compiled program per batch shape instead of tracing and compiling a new lambda for every call.
@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _seq_logprob_sums(p, b, cfg, temperature):
  return sampling.sequence_logprobs(p, b["prompt_bp"], b["prompt_mask_bp"], b["response_bn"], b["response_mask_bn"],
                                    cfg, temperature=temperature).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _rm_scores(p, b, cfg):
  return heads.response_scores(p, b["prompt_bp"], b["prompt_mask_bp"], b["response_bn"], b["response_mask_bn"], cfg)


def seq_logprob_sums(params, cfg, samples, temperature: float, *, batch_size: int, mesh, rules) -> np.ndarray:
  """sum_t log pi(y_t | x, y_<t) [b] at `temperature`, one full forward pass per batch."""
  fn = functools.partial(_seq_logprob_sums, cfg=cfg, temperature=float(temperature))
  keys = ("prompt_bp", "prompt_mask_bp", "response_bn", "response_mask_bn")
  return _batched(fn, params, {k: samples[k] for k in keys}, batch_size, mesh, rules)


def rm_scores(rm_params, rm_cfg, samples, *, batch_size: int, mesh, rules, no_eos_penalty: float | None = None):
  fn = functools.partial(_rm_scores, cfg=rm_cfg)
  keys = ("prompt_bp", "prompt_mask_bp", "response_bn", "response_mask_bn")
  s = _batched(fn, rm_params, {k: samples[k] for k in keys}, batch_size, mesh, rules)
  if no_eos_penalty is not None:
    s = np.where(samples["ended_b"], s, no_eos_penalty)
  return s


def response_breakdown(gold, prompts: Sequence[str], responses: Sequence[str], scores: np.ndarray,
                       prefix: str = "") -> dict[str, float]:
  """Per-family mean gold score and correct fraction, and the share of the most common response."""
  families = [gold.family(p) for p in prompts]
  correct = np.array([gold.is_correct(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)
  out = {f"{prefix}gold_correct_frac": float(correct.mean())}
  for fam in sorted(set(families)):
    idx = np.array([f == fam for f in families])
    out[f"{prefix}{fam}.gold_score"] = float(np.asarray(scores)[idx].mean())
    out[f"{prefix}{fam}.correct_frac"] = float(correct[idx].mean())
  out[f"{prefix}top_response_frac"] = collections.Counter(responses).most_common(1)[0][1] / len(responses)
  return out


def per_prompt_win_rates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """P(a > b) per prompt [n], ties counting half, over every pair of one prompt's samples: a and b are scores
  [n] (one sample per prompt) or [k, n] (k samples per prompt, the prompt on the last axis)."""
  a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
  b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"win rate: {a.shape[1]} prompts against {b.shape[1]}; expected the same prompts")
  cmp_abn = (a[:, None, :] > b[None, :, :]) + 0.5 * (a[:, None, :] == b[None, :, :])
  return cmp_abn.mean(axis=(0, 1))


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
  """P(a > b) with ties counting half, each prompt weighted alike (shapes as in per_prompt_win_rates)."""
  return float(per_prompt_win_rates(a, b).mean())


def win_rate_se(a: np.ndarray, b: np.ndarray) -> float:
  """Standard error of `win_rate` over the prompts (sample sd of the per-prompt win rates / sqrt(n)): how far
  the number would move on another draw of held-out prompts and samples. 0 for a single prompt."""
  w = per_prompt_win_rates(a, b)
  return float(w.std(ddof=1) / np.sqrt(len(w))) if len(w) > 1 else 0.0


def benchmark_accuracy(params, cfg, tok, records: Sequence[dict], *, batch_size: int, mesh, rules) -> float:
  """Greedy completion of the benchmark prompts (plain text after BOS) must start with the answer."""
  if not records:
    return float("nan")
  prompts = [[tok.bos_id] + tok.encode(r["prompt"]) for r in records]
  n_new = max(len(tok.encode(r["answer"])) for r in records) + 1
  scfg = sampling.SamplingConfig(max_new_tokens=n_new, temperature=0.0)
  out = sample(params, cfg, prompts, tok, scfg, jax.random.PRNGKey(0), batch_size=batch_size, mesh=mesh,
               rules=rules)
  texts = [tok.decode([int(t) for t in r]) for r in out["response_bn"]]
  return float(np.mean([t.strip().startswith(r["answer"].strip()) for t, r in zip(texts, records)]))


def gold_eval(params, cfg: transformer.ModelConfig, tok, prompts: Sequence[dict], gold,
              scfg: sampling.SamplingConfig, rng: jax.Array, *, batch_size: int, mesh, rules) -> dict[str, float]:
  """Mean gold score (and the per-family breakdown) of one response per prompt sampled from `params`.
  prompts: records {"ids", "prompt"}; gold: the task suite's GoldScorer (or anything with its methods)."""
  with sharding.activate(mesh, rules):
    out = sample(params, cfg, [p["ids"] for p in prompts], tok, scfg, rng, batch_size=batch_size, mesh=mesh,
                 rules=rules)
  texts = decode_responses(tok, out["response_bn"], out["response_mask_bn"])
  texts_p = [p["prompt"] for p in prompts]
  g = gold.score_batch(texts_p, texts)
  return {"gold_score": float(g.mean()), "ended_frac": float(out["ended_b"].mean()),
          **response_breakdown(gold, texts_p, texts, g)}


def policy_eval(params, sft_params, cfg: transformer.ModelConfig, tok, prompts: Sequence[dict], gold, *,
                rm_params, rm_cfg: transformer.ModelConfig, scfg: sampling.SamplingConfig, samples_per_prompt: int,
                rng: jax.Array, sft_rng: jax.Array, benchmark: Sequence[dict],
                pretrain_loss: Callable[[Params], float], batch_size: int, mesh, rules,
                n_samples_table: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The metrics of the module docstring for one policy against the SFT policy, and the first
  `n_samples_table` (prompt, policy, SFT) rows for a sample table.

  prompts: held-out records {"ids", "prompt"}; gold: the gold scorer; rng / sft_rng: the keys of the policy's
  and SFT's samples (the same sft_rng for every policy compared); benchmark: records {"prompt", "answer"};
  pretrain_loss(params): the held-out pretraining loss of a set of parameters; rm_params None: no rm_score.
  """
  k, n = samples_per_prompt, len(prompts)
  if k < 1:
    raise ValueError(f"eval.samples_per_prompt={k}: expected at least 1 sample per held-out prompt")
  texts_p = [p["prompt"] for p in prompts]
  # k samples per prompt: the prompt list repeated k times, so sample j of prompt i is row j * n + i.
  ids_k = [p["ids"] for p in prompts] * k
  texts_k = texts_p * k
  kw = dict(batch_size=batch_size, mesh=mesh, rules=rules)
  with sharding.activate(mesh, rules):
    pol = sample(params, cfg, ids_k, tok, scfg, rng, **kw)
    sft = sample(sft_params, cfg, ids_k, tok, scfg, sft_rng, **kw)
    lp_pol = seq_logprob_sums(params, cfg, pol, scfg.logprob_temperature, **kw)
    lp_sft = seq_logprob_sums(sft_params, cfg, pol, scfg.logprob_temperature, **kw)
    rm_pol = None if rm_params is None else rm_scores(rm_params, rm_cfg, pol, **kw)
    out_texts = decode_responses(tok, pol["response_bn"], pol["response_mask_bn"])
    sft_texts = decode_responses(tok, sft["response_bn"], sft["response_mask_bn"])
    g_pol = gold.score_batch(texts_k, out_texts)
    g_sft = gold.score_batch(texts_k, sft_texts)
    g_pol_kn, g_sft_kn = g_pol.reshape(k, n), g_sft.reshape(k, n)
    refs = [gold.reference(p) for p in texts_p]  # a judge without a reference for every prompt gives NaN
    g_ref = gold.score_batch(texts_p, refs) if all(r is not None for r in refs) else np.full(n, np.nan)
    result = {
        "gold_score": float(g_pol.mean()),
        "sft_gold_score": float(g_sft.mean()),
        "win_rate_vs_sft": win_rate(g_pol_kn, g_sft_kn),
        "win_rate_vs_sft_se": win_rate_se(g_pol_kn, g_sft_kn),
        # The gold reference answer to every prompt against the same SFT samples: no policy can win more.
        "reference_win_rate_vs_sft": win_rate(g_ref, g_sft_kn) if not np.isnan(g_ref).any() else float("nan"),
        "kl_to_sft": float(np.mean(lp_pol - lp_sft)),
        "n_eval_samples": len(out_texts),  # k * n of each policy
        "ended_frac": float(pol["ended_b"].mean()),
        "pretrain_val_loss": pretrain_loss(params),
        "sft_pretrain_val_loss": pretrain_loss(sft_params),
        "benchmark_accuracy": benchmark_accuracy(params, cfg, tok, benchmark, **kw),
        **response_breakdown(gold, texts_k, out_texts, g_pol),
        **response_breakdown(gold, texts_k, sft_texts, g_sft, prefix="sft_"),
    }
    if rm_pol is not None:
      result["rm_score"] = float(rm_pol.mean())
  rows = [{"prompt": p, "policy": a, "sft": b, "gold_policy": ga, "gold_sft": gb}
          for p, a, b, ga, gb in list(zip(texts_p, out_texts, sft_texts, g_pol, g_sft))[:n_samples_table]]
  return result, rows


def best_of_n_eval(sft_params, cfg: transformer.ModelConfig, tok, prompts: Sequence[dict], gold, *, rm_params,
                   rm_cfg: transformer.ModelConfig, scfg: sampling.SamplingConfig, candidate_rngs: Sequence[jax.Array],
                   samples_per_prompt: int, sft_rng: jax.Array, no_eos_penalty: float, batch_size: int, mesh,
                   rules) -> dict[str, float]:
  """Best-of-n against the RM: n = len(candidate_rngs) SFT samples per prompt, the highest RM score kept. On the
  same candidates, the gold scorer's own favourite ("oracle_*", Gao et al.'s best-of-n against the gold reward):
  what a perfect reward model buys at the same KL, a ceiling for the RM and for any policy that stays this close
  to SFT. Win rates are against the SFT samples `policy_eval` compares with (the same sft_rng), not against a
  candidate."""
  kw = dict(batch_size=batch_size, mesh=mesh, rules=rules)
  texts_p = [p["prompt"] for p in prompts]
  ids = [p["ids"] for p in prompts]
  k = samples_per_prompt
  with sharding.activate(mesh, rules):
    cands = [sample(sft_params, cfg, ids, tok, scfg, key, **kw) for key in candidate_rngs]
    rm = np.stack([rm_scores(rm_params, rm_cfg, c, no_eos_penalty=no_eos_penalty, **kw) for c in cands])
    base = sample(sft_params, cfg, ids * k, tok, scfg, sft_rng, **kw)
  texts = [decode_responses(tok, c["response_bn"], c["response_mask_bn"]) for c in cands]
  gold_np = np.stack([gold.score_batch(texts_p, t) for t in texts])
  g0 = gold.score_batch(texts_p * k, decode_responses(tok, base["response_bn"], base["response_mask_bn"]))
  return best_of_n_summary(rm, gold_np, g0.reshape(k, len(texts_p)))


def best_of_n_scores(sft_params, cfg: transformer.ModelConfig, tok, prompts: Sequence[dict], gold, *,
                     rms: Sequence[tuple[Params, transformer.ModelConfig]], scfg: sampling.SamplingConfig,
                     candidate_rngs: Sequence[jax.Array], samples_per_prompt: int, sft_rng: jax.Array,
                     no_eos_penalty: float, batch_size: int, mesh, rules,
                     ensembles: Sequence[Sequence[int]] = (), sft_logprob: bool = False) -> dict[str, np.ndarray]:
  """What best-of-n is read from: N = len(candidate_rngs) SFT candidates per prompt, scored by each reward model
  of `rms` (params, cfg) and then by each entry of `ensembles` (indices into `rms`: the mean of those models'
  scores, Coste et al. 2023's mean ensemble) ("rm" [models, N, prompts]) and by the gold scorer ("gold"
  [N, prompts]), with their texts ("text") and whether the gold scorer counts each correct ("correct"); the gold
  scores of samples_per_prompt SFT samples a prompt from sft_rng, the win-rate baseline ("gold_sft" [k, prompts]);
  each prompt's task family ("family"); with sft_logprob, each candidate's log-likelihood under SFT itself at
  scfg.logprob_temperature ("sft_logprob" [N, prompts]: the ranker an RM should beat)."""
  kw = dict(batch_size=batch_size, mesh=mesh, rules=rules)
  texts_p = [p["prompt"] for p in prompts]
  ids = [p["ids"] for p in prompts]
  k = samples_per_prompt
  with sharding.activate(mesh, rules):
    cands = [sample(sft_params, cfg, ids, tok, scfg, key, **kw) for key in candidate_rngs]
    rm_np = [np.stack([rm_scores(p, c_rm, c, no_eos_penalty=no_eos_penalty, **kw) for c in cands]) for p, c_rm in rms]
    lp = ([seq_logprob_sums(sft_params, cfg, c, scfg.logprob_temperature, **kw) for c in cands] if sft_logprob
          else None)
    base = sample(sft_params, cfg, ids * k, tok, scfg, sft_rng, **kw)
  texts = [decode_responses(tok, c["response_bn"], c["response_mask_bn"]) for c in cands]
  gold_np = np.stack([gold.score_batch(texts_p, t) for t in texts])
  g0 = gold.score_batch(texts_p * k, decode_responses(tok, base["response_bn"], base["response_mask_bn"]))
  rm_np += [np.mean([rm_np[i] for i in members], axis=0) for members in ensembles]
  out = {"rm": np.stack(rm_np), "gold": gold_np, "gold_sft": g0.reshape(k, len(texts_p)),
         "family": np.array([gold.family(p) for p in texts_p]), "text": np.array(texts),
         "correct": np.array([[gold.is_correct(p, r) for p, r in zip(texts_p, t)] for t in texts])}
  if lp is not None:
    out["sft_logprob"] = np.stack(lp)
  return out


def best_of_n_curve(sft_params, cfg: transformer.ModelConfig, tok, prompts: Sequence[dict], gold, *,
                    rms: Sequence[tuple[Params, transformer.ModelConfig]], ns: Sequence[int],
                    scfg: sampling.SamplingConfig, candidate_rngs: Sequence[jax.Array], samples_per_prompt: int,
                    sft_rng: jax.Array, no_eos_penalty: float, batch_size: int, mesh, rules,
                    ensembles: Sequence[Sequence[int]] = (), estimator: str = "first") -> list[dict[int, dict]]:
  """Best-of-n at every n of `ns` from one set of N = len(candidate_rngs) >= max(ns) SFT candidates per prompt,
  each reward model of `rms` choosing (best_of_n_scores, then curves_from_scores): Gao et al.'s best-of-n curve
  for N samples a prompt instead of 1 + 2 + ... + 64. estimator "first": best-of-n is the first n candidates
  (with best_of_n_eval's keys, the same candidates it draws; only max(ns) are drawn); "subsets": its expectation
  over every n-subset of the N (best_of_n_expected)."""
  check_best_of_n(ns, len(candidate_rngs), estimator)
  n_cands = len(candidate_rngs) if estimator == "subsets" else max(ns)
  scores = best_of_n_scores(sft_params, cfg, tok, prompts, gold, rms=rms, scfg=scfg,
                            candidate_rngs=candidate_rngs[:n_cands], samples_per_prompt=samples_per_prompt,
                            sft_rng=sft_rng, no_eos_penalty=no_eos_penalty, batch_size=batch_size, mesh=mesh,
                            rules=rules, ensembles=ensembles)
  return curves_from_scores(scores, ns, estimator)


def check_best_of_n(ns: Sequence[int], n_candidates: int, estimator: str) -> None:
  if not ns or min(ns) < 1 or max(ns) > n_candidates:
    raise ValueError(f"best-of-n sizes {list(ns)}: expected sizes from 1 to the {n_candidates} candidates")
  if estimator not in ("first", "subsets"):
    raise ValueError(f"best-of-n estimator {estimator!r}: expected 'first' or 'subsets'")


def curves_from_scores(scores: dict[str, np.ndarray], ns: Sequence[int], estimator: str) -> list[dict[int, dict]]:
  """One {n: summary} per row of scores["rm"] (best_of_n_scores): best_of_n_summary's numbers and the share of
  the oracle's gain over best-of-1 with its standard error ("share", "share_se"), read by `estimator` ("first":
  each prompt's first n candidates; "subsets": best_of_n_expected), and the same share per task family
  ("<family>.share", "<family>.share_se", with "<family>.oracle_gain", the gold the oracle's pick gains there,
  and "<family>.n_prompts"; where scores has "correct", the correct fraction of the RM's picks, the oracle's and
  best-of-1's there: "<family>.correct_frac", ".oracle_correct_frac", ".best_of_1_correct_frac")."""
  gold_np, g0, fams = scores["gold"], scores["gold_sft"], scores["family"]
  check_best_of_n(ns, gold_np.shape[0], estimator)
  out = []
  for r in scores["rm"]:
    curve = {}
    for n in ns:
      if estimator == "subsets":
        row = best_of_n_expected(r, gold_np, g0, n)
      else:
        row = {**best_of_n_summary(r[:n], gold_np[:n], g0), **oracle_gain_share(r[:n], gold_np[:n])}
      a, b = gains_over_best_of_1(r, gold_np, n, estimator)
      ok = picked(r, gold_np, scores["correct"], n, estimator) if "correct" in scores else None
      for fam in sorted(set(fams.tolist())):
        idx = fams == fam
        row.update({f"{fam}.{k}": v for k, v in _share_of_gain(a[idx], b[idx]).items()})
        row[f"{fam}.oracle_gain"], row[f"{fam}.n_prompts"] = float(b[idx].mean()), int(idx.sum())
        if ok is not None:  # correct answers among the RM's picks, the oracle's and best-of-1's
          for name, v in zip(("correct_frac", "oracle_correct_frac", "best_of_1_correct_frac"), ok):
            row[f"{fam}.{name}"] = float(v[idx].mean())
      curve[n] = row
    out.append(curve)
  return out


def picked(rm_np: np.ndarray, gold_np: np.ndarray, values: np.ndarray, n: int, estimator: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per prompt, from [N, prompts] arrays: `values` of the RM's best-of-n pick, of the gold scorer's own pick
  and of best-of-1. "first": among the first n candidates, best-of-1 the first; "subsets": expectations over
  every n-subset of the N (best_of_n_weights), best-of-1 the candidates' mean."""
  values = np.asarray(values, np.float64)
  if estimator == "first":
    cols = np.arange(rm_np.shape[1])
    return (values[:n][rm_np[:n].argmax(axis=0), cols], values[:n][gold_np[:n].argmax(axis=0), cols], values[0])
  w = best_of_n_weights(n, rm_np.shape[0])
  by = lambda x: w @ np.take_along_axis(values, np.argsort(x, axis=0, kind="stable"), 0)  # noqa: E731
  return by(rm_np), by(gold_np), values.mean(axis=0)


def gains_over_best_of_1(rm_np: np.ndarray, gold_np: np.ndarray, n: int, estimator: str
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Per prompt: the gold the RM's best-of-n pick gains over best-of-1, and the gold the gold scorer's own pick
  gains (`picked`)."""
  pick, oracle, base = picked(rm_np, gold_np, gold_np, n, estimator)
  return pick - base, oracle - base


def _share_of_gain(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """mean(a) / mean(b) over prompts, with its standard error by the delta method for a ratio of means
  (sqrt(sum (a - share b)^2 / (P (P - 1))) / mean(b)); NaN when b gains nothing."""
  n_prompts = len(b)
  gain = float(b.mean())
  if gain <= 1e-9 or n_prompts < 2:
    return {"share": float("nan"), "share_se": float("nan")}
  share = float(a.mean()) / gain
  return {"share": share, "share_se": float(np.sqrt(np.sum((a - share * b) ** 2) / (n_prompts * (n_prompts - 1)))
                                            / gain)}


def oracle_gain_share(rm_np: np.ndarray, gold_np: np.ndarray) -> dict[str, float]:
  """The share of the oracle's gain the RM's pick captures, both over the first candidate (best-of-1) of each
  prompt, from scores [n, prompts]: mean(pick - first) / mean(oracle - first), with its standard error over
  prompts (_share_of_gain); NaN when the oracle gains nothing (n = 1)."""
  return _share_of_gain(*gains_over_best_of_1(rm_np, gold_np, rm_np.shape[0], "first"))


def best_of_n_weights(n: int, n_candidates: int) -> np.ndarray:
  """w[r] = C(r, n - 1) / C(N, n): the probability that the candidate ranked r-th from the bottom (r = 0..N-1)
  of N is the best of n drawn from them without replacement (Gao et al. 2022's unbiased best-of-n estimator)."""
  if not 1 <= n <= n_candidates:
    raise ValueError(f"best-of-{n} from {n_candidates} candidates: expected 1 <= n <= the candidates")
  # Exact integers, then one division: C(255, 127) ~ 6e75 is still a float, its share of C(N, n) exact enough.
  return np.array([math.comb(r, n - 1) for r in range(n_candidates)], np.float64) / math.comb(n_candidates, n)


def best_of_n_expected(rm_np: np.ndarray, gold_np: np.ndarray, gold_sft_p: np.ndarray, n: int) -> dict[str, float]:
  """best_of_n_summary's numbers and the oracle-gain share as expectations over every n-subset of the N
  candidates [N, prompts] rather than from the first n: each candidate weighted by the chance that it is the
  RM's (or the gold scorer's) pick of a random n-subset (best_of_n_weights), so every candidate counts at every
  n. Best-of-1, the share's baseline, is the mean of the N. The share's standard error is over prompts, whose
  expected picks are independent."""
  # Ties in the RM's scores: the same text scores the same, so the order among them does not matter.
  pick, oracle, base = picked(rm_np, gold_np, gold_np, n, "subsets")
  wins = np.stack([per_prompt_win_rates(g, gold_sft_p) for g in gold_np])  # [N, prompts]
  win_pick, win_oracle, _ = picked(rm_np, gold_np, wins, n, "subsets")
  return {"gold_score": float(pick.mean()), "rm_score": float(picked(rm_np, gold_np, rm_np, n, "subsets")[0].mean()),
          "win_rate_vs_sft": float(win_pick.mean()), "kl_to_sft": float(losses.best_of_n_kl(n)),
          "oracle_gold_score": float(oracle.mean()), "oracle_win_rate_vs_sft": float(win_oracle.mean()), "n": n,
          "n_candidates": rm_np.shape[0], **_share_of_gain(pick - base, oracle - base)}


def write_samples(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """The rows of `policy_eval` as JSON lines (read back by `samples_markdown`)."""
  with open(path, "w") as f:
    for row in rows:
      f.write(_json_line(row))


def best_of_n_summary(rm_np: np.ndarray, gold_np: np.ndarray, gold_sft_p: np.ndarray) -> dict[str, float]:
  """From RM and gold scores of n candidates per prompt [n, prompts] and the gold scores of the SFT samples
  compared with ([prompts], or [k, prompts] for k samples per prompt): the RM's pick against the gold scorer's
  own pick (the oracle). One pick per prompt, compared with every SFT sample of its prompt."""
  n, n_prompts = rm_np.shape
  g = gold_np[rm_np.argmax(axis=0), np.arange(n_prompts)]
  g_oracle = gold_np.max(axis=0)
  return {"gold_score": float(g.mean()), "rm_score": float(rm_np.max(axis=0).mean()),
          "win_rate_vs_sft": win_rate(g, gold_sft_p), "kl_to_sft": float(losses.best_of_n_kl(n)),
          "oracle_gold_score": float(g_oracle.mean()), "oracle_win_rate_vs_sft": win_rate(g_oracle, gold_sft_p),
          "n": n}


def _json_line(obj) -> str:
  return json.dumps({k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in obj.items()}) + "\n"


def samples_markdown(path: str, limit: int = 12) -> str:
  """A side-by-side table of prompts, policy and SFT responses with their gold scores."""
  if not os.path.exists(path):
    return ""
  rows = [json.loads(line) for line in open(path)][:limit]
  esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
  lines = ["| prompt | policy | gold | SFT | gold |", "|---|---|---|---|---|"]
  lines += [f"| {esc(r['prompt'])} | {esc(r['policy'])} | {r['gold_policy']:.2f} | {esc(r['sft'])} | "
            f"{r['gold_sft']:.2f} |" for r in rows]
  return "\n".join(lines)
