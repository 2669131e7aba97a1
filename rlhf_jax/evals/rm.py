"""Evaluation of reward models on held-out comparisons: accuracy against the labelers and against the gold
ordering on clearly different pairs, the gold scorer's own accuracy on the labels (the ceiling), calibration,
and the policy log-likelihood ranker (`response_logprobs`), the baseline a trained RM should beat."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, sharding
from rlhf_jax.data import comparisons
from rlhf_jax.models import transformer


def response_logprobs(policy_params, batch, policy_cfg: transformer.ModelConfig, temperature: float) -> jax.Array:
  """Sum of log pi(response token) [b, k] under a policy at `temperature`: the sequences of a group batch with
  their prompt lengths. Ranking by it is the baseline a trained RM should beat (the policy's own judgement)."""
  b, k, t = batch["tokens"].shape
  tokens_nt = batch["tokens"].reshape(b * k, t)
  mask_nt = batch["mask"].reshape(b * k, t)
  logits_ntv, _ = transformer.forward(policy_params, tokens_nt, policy_cfg, mask_bt=mask_nt)
  lp_nt = transformer.token_logprobs(logits_ntv[:, :-1], tokens_nt[:, 1:], temperature)
  # Position i predicts token i + 1: response tokens are those at index >= prompt_len.
  is_response_nt = (jnp.arange(1, t)[None, :] >= batch["prompt_len"].reshape(b * k, 1)) & (mask_nt[:, 1:] > 0)
  return jnp.sum(jnp.where(is_response_nt, lp_nt, 0.0), axis=1).reshape(b, k)


def score_comparisons(score_fn, params, comps: Sequence[comparisons.Comparison], *, k: int, seq_len: int, pad_id: int,
                      batch_size: int, mesh, rules, length_bucket: int = 0) -> list[np.ndarray]:
  """Raw rewards of every response of every comparison."""
  out = []
  groups = [(i, list(range(len(c.response_ids))), 1.0) for i, c in enumerate(comps)]
  n_dp = sharding.data_parallel_size(mesh, rules)
  for s in range(0, len(groups), batch_size):
    chunk = groups[s:s + batch_size]
    pad_to = int(math.ceil(len(chunk) / n_dp) * n_dp)
    chunk_padded = chunk + [chunk[-1]] * (pad_to - len(chunk))
    t = comparisons.bucketed_len(comps, chunk_padded, seq_len=seq_len, bucket=length_bucket)
    batch = comparisons.group_batch(comps, chunk_padded, k=k, seq_len=t, pad_id=pad_id)
    # Every process holds the whole validation set: each feeds its rows and gets every row's score back.
    r = sharding.fetch(score_fn(params, sharding.put_global_batch(
        {key: batch[key] for key in ("tokens", "mask", "prompt_len")}, mesh, rules)))
    for row, (ci, idx, _) in enumerate(chunk):
      out.append(r[row, :len(idx)])
  return out


def pair_metrics(comps: Sequence[comparisons.Comparison], rewards: Sequence[np.ndarray], *, clear_gold_margin: float,
                 n_bins: int = 10) -> dict[str, float]:
  """Accuracy against the labelers' ranks, against the gold ordering on clearly different pairs, the gold
  scorer's own accuracy on the labelers' pairs (the ceiling), and the calibration of sigmoid(r_w - r_l)."""
  lab_correct, lab_total, gold_correct, gold_total, ceil_correct = 0, 0, 0, 0, 0
  margins, labels = [], []
  for c, r in zip(comps, rewards):
    for a in range(len(c.ranks)):
      for b in range(a + 1, len(c.ranks)):
        if c.ranks[a] != c.ranks[b]:
          w, l = (a, b) if c.ranks[a] < c.ranks[b] else (b, a)
          lab_total += 1
          lab_correct += (r[w] > r[l]) + 0.5 * (r[w] == r[l])
          margins += [r[w] - r[l], r[l] - r[w]]
          labels += [1.0, 0.0]
          if c.gold is not None:
            # Gold ties count one half, as in tasks.labelers.gold_accuracy (the gold scorer has no preference).
            ceil_correct += (c.gold[w] > c.gold[l]) + 0.5 * (c.gold[w] == c.gold[l])
        if c.gold is not None and abs(c.gold[a] - c.gold[b]) > clear_gold_margin:
          gold_total += 1
          gold_correct += (r[a] > r[b]) == (c.gold[a] > c.gold[b])
  out = {"val_accuracy": lab_correct / max(lab_total, 1), "val_pairs": lab_total}
  if any(c.gold is not None for c in comps):
    out["gold_ceiling_accuracy"] = ceil_correct / max(lab_total, 1)
    out["val_gold_pairs_clear"] = gold_total
    if gold_total:
      out["val_gold_accuracy_clear"] = gold_correct / gold_total
  if margins:
    out["val_calibration_ece"] = float(losses.rm_calibration(jnp.asarray(margins), jnp.asarray(labels), n_bins))
  return out


def clear_accuracy_by_group(comps: Sequence[comparisons.Comparison], rewards: Sequence[np.ndarray],
                            groups: Sequence[str], *, clear_gold_margin: float) -> dict[str, float]:
  """`val_gold_accuracy_clear` and `val_gold_pairs_clear` per group of comparisons (the task suite's prompt
  families), keyed "<group>.<metric>": where an RM's errors sit, e.g. refusals ranked first on questions that
  have no answer, which a policy then learns to give everywhere. Groups without clear pairs are left out."""
  if len(groups) != len(comps):
    raise ValueError(f"clear_accuracy_by_group: {len(groups)} groups for {len(comps)} comparisons")
  out = {}
  for g in sorted(set(groups)):
    idx = [i for i, x in enumerate(groups) if x == g]
    m = pair_metrics([comps[i] for i in idx], [rewards[i] for i in idx], clear_gold_margin=clear_gold_margin)
    if m.get("val_gold_pairs_clear"):
      out[f"{g}.val_gold_accuracy_clear"] = m["val_gold_accuracy_clear"]
      out[f"{g}.val_gold_pairs_clear"] = m["val_gold_pairs_clear"]
  return out
