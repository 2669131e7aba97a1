"""Human feedback for the stages that learn from it (the reward model, DPO): comparison records and the
sampling of K responses per prompt from the SFT policy for the simulated labelers to rank (`sample_and_rank`,
which the online rounds' collect stage also uses on the current policy; `rm.source = "collected"` reads them).

The comparisons are configured in the `rm` block (rm.source, rm.n_prompts / n_val_prompts, rm.k_min / k_max,
rm.sample_temperature, rm.max_new_tokens, rm.init_from, and rm.seq_len / too_long for tokenising), so the RM and
DPO learn from the same data; like rlhf_jax.runtime, this module reads the experiment config to build them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from rlhf_jax import runtime, sampling, sharding, tokenizers
from rlhf_jax.data import comparisons, real, sources, tfds_io
from rlhf_jax.data.batching import decode_responses
from rlhf_jax.evals import policy as policy_evals

SOURCES = ("policy", "offline", "policy+offline", "file", "collected", "policy+collected")
COLLECTED_FILES = {"train": "comparisons.jsonl", "validation": "comparisons_val.jsonl"}  # in a collect stage dir


def check(config) -> None:
  """The comparison settings of config.rm, from the config alone (a rankings file is read line by line)."""
  rc = config.rm
  runtime.check_choice(rc.too_long, "rm.too_long", ("truncate", "error"))
  runtime.check_choice(rc.source, "rm.source", SOURCES)
  if not 2 <= rc.k_min <= rc.k_max:
    raise ValueError(f"rm.k_min={rc.k_min}, rm.k_max={rc.k_max}: expected 2 <= k_min <= k_max")
  if sources.on_user_data(config) and rc.source != "file":
    raise ValueError(f"rm.source={rc.source!r} on a user's files (config.files): there are no simulated labelers; "
                     "expected rm.source='file' with rm.file and rm.file_schema")
  if rc.source == "file":
    runtime.check_choice(rc.file_schema, "rm.file_schema", real.COMPARISON_SCHEMAS)
    if os.path.isfile(rc.file):
      real.check(rc.file_schema, rc.file)  # every line, now: a bad line 900 lines in must not wait for pretraining
    elif not os.path.isdir(rc.file):
      what = ("a K-way rankings .jsonl file ({\"prompt\", \"responses\", \"ranking\"} per line)"
              if rc.file_schema == "rankings" else f"a {rc.file_schema} comparisons file (rm.file_schema)")
      raise ValueError(f"rm.file={rc.file!r}: expected {what} or a dataset folder written by "
                       "rlhf_jax.data.real.prepare")
  if rc.source in ("collected", "policy+collected") and not rc.collected:
    raise ValueError(f"rm.collected=(): rm.source={rc.source!r} needs the collect stage directories to train on "
                     "(e.g. ('collect_r0', 'collect_r1'))")


def sample_and_rank(params, policy_cfg, tok, recs: Sequence[dict], *, ks: np.ndarray, sample_keys, scfg, gold, pool,
                    rng: np.random.Generator, batch_size: int, mesh, rules) -> list[dict]:
  """ks[i] responses of the policy to each prompt record {prompt_turns, prompt}, ranked by a random labeler of
  `pool` around the gold scores: records {prompt_turns, prompt, responses, ranks, gold_scores, labeler_id}.
  Sample j of every prompt is drawn with sample_keys[j] (max(ks) keys); rng picks the labelers and their noise."""
  prompt_ids = [tokenizers.encode_prompt(tok, r["prompt_turns"]) for r in recs]
  texts = []
  with sharding.activate(mesh, rules):
    for key in sample_keys:
      out = policy_evals.sample(params, policy_cfg, prompt_ids, tok, scfg, key, batch_size=batch_size, mesh=mesh,
                                rules=rules)
      texts.append(decode_responses(tok, out["response_bn"], out["response_mask_bn"]))
  records = []
  for i, r in enumerate(recs):
    responses = [texts[j][i] for j in range(ks[i])]
    g = gold.score_batch([r["prompt"]] * len(responses), responses)
    labeler = int(rng.integers(pool.n_labelers))
    ranks = pool.rank_responses(g, responses, labeler, rng)
    records.append({"prompt_turns": r["prompt_turns"], "prompt": r["prompt"], "responses": responses,
                    "ranks": [int(x) for x in ranks], "gold_scores": [float(x) for x in g],
                    "labeler_id": labeler})
  return records


def collected_comparisons(workdir: str, dirs: Sequence[str]) -> tuple[list[dict], list[dict]]:
  """Every listed collect stage's training comparisons, and the last one's validation comparisons (samples of
  the newest policy: what the next PPO round will be scored on)."""
  out = {}
  for split_name, name in COLLECTED_FILES.items():
    for d in (dirs if split_name == "train" else dirs[-1:]):
      path = os.path.join(workdir, d, name)
      if not os.path.isfile(path):
        raise ValueError(f"rm.collected: {path} does not exist; run the collect stage writing WORKDIR/{d} first")
      with open(path) as f:
        out.setdefault(split_name, []).extend(json.loads(line) for line in f if line.strip())
  return out["train"], out["validation"]




def policy_comparisons(config, workdir: str, tok) -> tuple[list[dict], list[dict]]:
  """K samples of the SFT policy per prompt, ranked by the simulated labelers (what InstructGPT did).
  Written once as a TFDS dataset under WORKDIR/comparisons, so a resumed stage, and every stage that learns from
  the same comparisons (the RM, DPO), reads the same data."""
  rc = config.rm
  out_dir = os.path.join(workdir, "comparisons")
  name = "policy_comparisons"
  fp = f"seed={config.seed};n={rc.n_prompts},{rc.n_val_prompts};k={rc.k_min}-{rc.k_max};" \
       f"T={rc.sample_temperature};new={rc.max_new_tokens};from={rc.init_from}"
  ds_dir = os.path.join(out_dir, name, "1.0.0")
  if os.path.isdir(ds_dir) and tfds_io.read_fingerprint(ds_dir) != fp:
    # Not silently reused: a variant asking for more prompts (or another K, temperature or policy) would train on
    # the other settings' comparisons.
    raise ValueError(f"{ds_dir} holds policy comparisons sampled with {tfds_io.read_fingerprint(ds_dir)!r}, not "
                     f"this run's {fp!r} (rm.n_prompts, n_val_prompts, k_min/k_max, sample_temperature, "
                     "max_new_tokens, init_from): the shared comparisons are sampled once a workdir; use another "
                     "workdir for other settings")
  if not os.path.isdir(ds_dir):
    mesh, rules = runtime.mesh_and_rules(config)
    params, policy_cfg = runtime.load_policy(workdir, rc.init_from, mesh, rules,
                                             expect=runtime.policy_config(config, tok.vocab_size),
                                             field="rm.init_from")
    gold = sources.gold_scorer(config, workdir)
    pool = sources.labelers(config)
    scfg = sampling.SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.sample_temperature)
    splits = {}
    for split_name, src_name, n in (("train", "comparisons", rc.n_prompts),
                                    ("validation", "comparisons_val", rc.n_val_prompts)):
      src = sources.split(config, workdir, src_name)
      recs = [src[i] for i in range(min(n, len(src)))]
      rng = np.random.default_rng([config.seed, 17, len(splits)])
      ks = rng.integers(rc.k_min, rc.k_max + 1, size=len(recs))
      keys = [jax.random.fold_in(jax.random.PRNGKey(config.seed + 29), 1000 * len(splits) + j)
              for j in range(rc.k_max)]
      splits[split_name] = sample_and_rank(params, policy_cfg, tok, recs, ks=ks, sample_keys=keys, scfg=scfg,
                                           gold=gold, pool=pool, rng=rng, batch_size=config.eval.batch_size,
                                           mesh=mesh, rules=rules)
    features = {"prompt_turns": "json", "prompt": "text", "responses": "text_seq", "ranks": "int32_seq",
                "gold_scores": "float32_seq", "labeler_id": "int32"}
    if jax.process_index() == 0:
      tfds_io.prepare_dataset(name, out_dir, features, {k: (lambda v=v: iter(v)) for k, v in splits.items()},
                              fingerprint=fp, description="SFT-policy samples ranked by simulated labelers")
    logging.info("[rm] sampled %d + %d policy comparisons", len(splits["train"]), len(splits["validation"]))
  tr = tfds_io.load_split_dir(ds_dir, "train")
  va = tfds_io.load_split_dir(ds_dir, "validation")
  return [tr[i] for i in range(len(tr))], [va[i] for i in range(len(va))]


def comparison_records(config, workdir: str, tok) -> tuple[list[dict], list[dict]]:
  """(train, validation) comparison records {prompt_turns, responses, ranks[, gold_scores, labeler_id]}."""
  rc = config.rm
  runtime.check_choice(rc.source, "rm.source", SOURCES)
  if rc.source == "offline":
    return sources.offline_comparisons(config, workdir)
  if rc.source == "file":
    path = rc.file
    if os.path.isfile(path) and rc.file_schema == "rankings":  # converted once (cached by the file's hash)
      path = real.prepare_rankings(path, os.path.join(sources.data_dir(config, workdir), "user_rankings"),
                                   name=f"rankings_{real.file_sha256(path)[:16]}")
    elif os.path.isfile(path):  # another schema (summarize_from_feedback, hh, ...): named by the file's hash
      path = real.prepare(rc.file_schema, path, os.path.join(sources.data_dir(config, workdir), "user"))
    return sources.file_comparisons(path)
  if rc.source == "collected":
    return collected_comparisons(workdir, rc.collected)
  tr, va = policy_comparisons(config, workdir, tok)
  if rc.source == "policy+collected":
    # More comparisons than the shared SFT samples: the collect stages' (more prompts, or more samples of the same
    # prompts); validation, and with it every RM's clear-pair accuracy and normalisation, stays on SFT samples.
    tr = tr + collected_comparisons(workdir, rc.collected)[0]
  elif rc.source == "policy+offline":
    # SFT samples plus the demonstrators' comparisons, whose wider range of mistakes (over-refusals, garbage,
    # loops) a policy drifting away from SFT may find; validation (and the normalisation) stays on SFT samples.
    off = sources.split(config, workdir, "comparisons")
    tr = tr + [off[i] for i in range(len(off))]
  return tr, va


def suite_families(config, workdir: str, records: Sequence[dict]) -> list[str] | None:
  """The task suite's family of each comparison's prompt, or None when the records are not the suite's (a user's
  rankings file, or prompts the suite's world cannot parse)."""
  if config.rm.source == "file" or not records or any("prompt" not in r for r in records):
    return None
  world = sources.gold_scorer(config, workdir).world
  try:
    return [str(r["family"]) if "family" in r else world.parse(str(r["prompt"])).family for r in records]
  except ValueError:
    return None


def tokenized(config, workdir: str, tok) -> tuple[list[comparisons.Comparison], list[comparisons.Comparison], int,
                                                 list[dict], list[dict]]:
  """(train, validation, number truncated, train records, validation records): `comparison_records` tokenised at
  rm.seq_len (over-long prompts cut from the left, or an error, per rm.too_long)."""
  rc = config.rm
  train_records, val_records = comparison_records(config, workdir, tok)
  allow_empty = rc.source.startswith("policy") or rc.source == "collected"  # policy samples may be empty (EOS)
  train, n_trunc = comparisons.tokenize_comparisons(train_records, tok, seq_len=rc.seq_len, too_long=rc.too_long,
                                                    source="rm train comparisons", allow_empty=allow_empty)
  val, n_trunc_val = comparisons.tokenize_comparisons(val_records, tok, seq_len=rc.seq_len, too_long=rc.too_long,
                                                      source="rm validation comparisons", allow_empty=allow_empty)
  return train, val, n_trunc + n_trunc_val, train_records, val_records
