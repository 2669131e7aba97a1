"""Collect (one round of online RLHF): K responses per prompt from the current policy, ranked by the labelers.

The policy exported in WORKDIR/<collect.policy_from> (SFT, or the last round's PPO) answers the task suite's
comparison prompts [collect.prompt_offset, collect.prompt_offset + collect.n_prompts) K times each (K drawn from
collect.k_min..k_max; with collect.split = "prompts", the RL training prompts instead: prompts no shared
comparison has, for a reward model trained on more comparisons than the world's comparison prompts with
`rm.source = "policy+collected"`, experiments/papers/rm_proxy.py), and the suite's simulated labelers rank
them around the hidden gold score, as the RM stage's `rm.source = "policy"` does for SFT
(rlhf_jax.feedback.sample_and_rank). The first collect.n_val_prompts validation prompts are answered and ranked
the same way. Written to WORKDIR/<collect.stage_dir>/comparisons.jsonl and comparisons_val.jsonl (records
{prompt_turns, prompt, responses, ranks, gold_scores, labeler_id}), which the RM stage reads with
`rm.source = "collected"`, `rm.collected = (this and earlier dirs)`.

Each round's draws come from its own stage directory's name, so rounds differ and a rerun repeats them exactly;
the files are written atomically and summary.json last, so a killed collect is simply redone.
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

from rlhf_jax import checkpoint, feedback, runtime, sampling, training
from rlhf_jax.data import comparisons, sources


SPLITS = {"comparisons": "n_comparisons", "prompts": "n_prompts"}  # collect.split -> its size's data field


def check(config: ml_collections.ConfigDict) -> None:
  cc = config.collect
  runtime.check_shared(config)
  runtime.check_choice(cc.split, "collect.split", tuple(SPLITS))
  if not 2 <= cc.k_min <= cc.k_max:
    raise ValueError(f"collect.k_min={cc.k_min}, collect.k_max={cc.k_max}: expected 2 <= k_min <= k_max")
  if cc.n_prompts < 1 or cc.n_val_prompts < 1 or cc.prompt_offset < 0:
    raise ValueError(f"collect.n_prompts={cc.n_prompts}, collect.n_val_prompts={cc.n_val_prompts}, "
                     f"collect.prompt_offset={cc.prompt_offset}: expected at least 1 prompt each and an offset >= 0")
  for field, need, have, name in (("collect.prompt_offset + collect.n_prompts", cc.prompt_offset + cc.n_prompts,
                                    config.data[SPLITS[cc.split]], f"data.{SPLITS[cc.split]}"),
                                   ("collect.n_val_prompts", cc.n_val_prompts, config.data.n_comparisons_val,
                                    "data.n_comparisons_val")):
    if need > have:
      raise ValueError(f"{field}={need}: the task suite has only {name}={have} prompts to collect on")
  if not cc.policy_from:
    raise ValueError("collect.policy_from='': expected the stage directory of the policy to sample (e.g. 'sft')")
  sampling.SamplingConfig(max_new_tokens=cc.max_new_tokens, temperature=cc.sample_temperature)


def _round_id(stage_dir: str) -> int:
  """A stable number of the stage directory's name, in int32 range (fold_in data): each round draws its own."""
  return zlib.crc32(stage_dir.encode()) % (2**31)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  cc = config.collect
  stage_dir = runtime.stage_dir(config, workdir, "collect")
  os.makedirs(stage_dir, exist_ok=True)
  tok = sources.tokenizer(config, workdir)
  mesh, rules = runtime.mesh_and_rules(config)
  params, policy_cfg = runtime.load_policy(workdir, cc.policy_from, mesh, rules,
                                           expect=runtime.policy_config(config, tok.vocab_size),
                                           field="collect.policy_from")
  gold = sources.gold_scorer(config, workdir)
  pool = sources.labelers(config)
  scfg = sampling.SamplingConfig(max_new_tokens=cc.max_new_tokens, temperature=cc.sample_temperature)
  rid = _round_id(cc.stage_dir)
  summary: dict[str, Any] = {"policy_from": cc.policy_from, "split": cc.split}
  for n_split, (split_name, src_name, lo, n) in enumerate((
      ("train", cc.split, cc.prompt_offset, cc.n_prompts),
      ("validation", "comparisons_val", 0, cc.n_val_prompts))):
    src = sources.split(config, workdir, src_name)
    if lo + n > len(src):
      raise ValueError(f"collect.prompt_offset={lo} + {n} prompts: the suite's {src_name} split has only {len(src)} "
                       f"prompts (data.{SPLITS.get(src_name, 'n_comparisons_val')})")
    # The RL prompts' records name their turns "turns" (rlhf_jax.tasks.suite), the comparisons' "prompt_turns".
    recs = [{"prompt_turns": r.get("prompt_turns", r.get("turns")), "prompt": r["prompt"]}
            for r in (src[i] for i in range(lo, lo + n))]
    rng = np.random.default_rng([config.seed, 23, rid, n_split])
    ks = rng.integers(cc.k_min, cc.k_max + 1, size=len(recs))
    base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed + 31), rid), n_split)
    records = feedback.sample_and_rank(params, policy_cfg, tok, recs, ks=ks,
                                       sample_keys=[jax.random.fold_in(base, j) for j in range(cc.k_max)],
                                       scfg=scfg, gold=gold, pool=pool, rng=rng, batch_size=config.eval.batch_size,
                                       mesh=mesh, rules=rules)
    if jax.process_index() == 0:
      checkpoint.write_text_atomic(os.path.join(stage_dir, feedback.COLLECTED_FILES[split_name]),
                                   "".join(json.dumps(r) + "\n" for r in records))
    gold_all = np.concatenate([r["gold_scores"] for r in records])
    prefix = "" if split_name == "train" else "val_"
    summary.update({f"{prefix}n_prompts": len(records), f"{prefix}n_responses": int(gold_all.size),
                    f"{prefix}n_pairs": sum(comparisons.num_strict_pairs(r["ranks"]) for r in records),
                    f"{prefix}sample_gold_score": float(gold_all.mean())})
  summary["wall_s"] = time.time() - t0
  training.write_summary(stage_dir, summary)
  return summary
