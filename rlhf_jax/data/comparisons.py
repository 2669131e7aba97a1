"""Comparison records -> groups of tokenised prompt + response sequences, batched for the reward model.

A comparison is one prompt with K >= 2 responses and their ranks (0 = best, equal ranks are ties). Training
units are groups: all K responses of a prompt (`grouping="prompt"`, InstructGPT's arrangement) or one ranked pair
(`"pairs"`, the ablation). `GroupIterator` gives deterministic shuffled epochs of them, checkpointable.
`rating_targets` turns a ranking into per-response regression targets (rm.target = "elo").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax import sharding, tokenizers
from rlhf_jax.tasks import labelers

Batch = dict[str, np.ndarray]



@dataclasses.dataclass
class Comparison:
  prompt_ids: list[int]
  response_ids: list[list[int]]  # each ends with EOS
  ranks: list[int]  # 0 = best; equal ranks are ties
  gold: list[float] | None = None
  labeler: int = -1
  ref_logp: list[float] | None = None  # a reference policy's log-prob of each response (DPO), when known
  target: list[float] | None = None  # a regression target per response (rm.target "elo"), when set


def tokenize_comparisons(records: Sequence[dict], tok, *, seq_len: int, too_long: str, source: str,
                         allow_empty: bool = False) -> tuple[list[Comparison], int]:
  """Tokenises records {prompt_turns, responses, ranks[, gold_scores, labeler_id]}; returns (comparisons,
  number truncated). Over-long sequences lose prompt tokens from the left (`too_long="truncate"`) or raise.
  Empty responses are an error in labelled data; policy samples may be empty (just EOS): `allow_empty`."""
  out, truncated = [], 0
  for i, r in enumerate(records):
    responses = list(r["responses"])
    ranks = [int(x) for x in np.asarray(r["ranks"]).tolist()]
    if len(responses) < 2 or len(ranks) != len(responses):
      raise ValueError(f"{source}: record {i}: field 'ranks' must rank at least 2 responses, one rank each; got "
                       f"{len(responses)} responses and {len(ranks)} ranks")
    for j, text in enumerate(responses):
      if not allow_empty and not str(text).strip():
        raise ValueError(f"{source}: record {i}: field 'responses[{j}]' is empty")
    prompt = tokenizers.encode_prompt(tok, r["prompt_turns"])
    resp = [tok.encode(str(text)) + [tok.eos_id] for text in responses]
    longest = max(len(x) for x in resp)
    if len(prompt) + longest > seq_len:
      if too_long == "error":
        raise ValueError(f"{source}: record {i}: prompt + response is {len(prompt) + longest} tokens, longer "
                         f"than rm.seq_len={seq_len} (set rm.too_long='truncate' to cut the prompt)")
      keep = seq_len - longest
      if keep < 2:
        raise ValueError(f"{source}: record {i}: a response alone is {longest} tokens, longer than "
                         f"rm.seq_len={seq_len}")
      prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]  # keep BOS, drop the oldest prompt tokens
      truncated += 1
    gold = r.get("gold_scores")
    out.append(Comparison(prompt, resp, ranks, None if gold is None else [float(g) for g in np.asarray(gold)],
                          int(r.get("labeler_id", -1))))
  return out, truncated


# A Bradley-Terry fit of one ranking is no option here: the ranking is separable (its MLE infinite), and with a
# prior tasks.labelers.bradley_terry's MM iteration needs far more than its 1000 steps (~0.1 s per prompt, unconverged).
RATING_TARGETS = ("elo",)
ELO_K = 32.0  # the chess K-factor on the 400-point scale; after the per-prompt normalisation only the shape matters


def rating_targets(ranks: Sequence[int], method: str) -> np.ndarray:
  """[K] float32 ratings of a prompt's responses from its ranking's pairwise outcomes, mean 0 and std 1.

  The C(K, 2) outcomes of the ranking (response i beats j when rank_i < rank_j; ties play no game) are rated
  by Elo (`"elo"`: from 1000 each, one pass over the games in index order i < j, tasks.labelers.elo_ratings),
  then standardised per prompt. A ranking with no strict pair (all tied) gives zeros.
  """
  if method not in RATING_TARGETS:
    raise ValueError(f"rm.target={method!r}: expected 'rankings' or one of {RATING_TARGETS}")
  r = [int(x) for x in ranks]
  games = [(i, j) if r[i] < r[j] else (j, i) for i in range(len(r)) for j in range(i + 1, len(r)) if r[i] != r[j]]
  if not games:
    return np.zeros(len(r), np.float32)
  fit = labelers.elo_ratings(games, k=ELO_K)
  x = np.array([fit[i] for i in range(len(r))], np.float64)  # with one game, every response is in one
  std = x.std()
  return ((x - x.mean()) / std if std > 0 else np.zeros_like(x)).astype(np.float32)


def gold_ranks(gold: Sequence[float]) -> list[int]:
  """Ranks (0 = best) of the gold scores: equal scores share a rank, so their pair gives no comparison."""
  distinct = sorted(set(float(g) for g in gold), reverse=True)
  return [distinct.index(float(g)) for g in gold]


def relabel_by_gold(comps: Sequence[Comparison]) -> None:
  """Replaces each comparison's ranks by its responses' gold ranks (noiseless labels: rm.labels="gold")."""
  for i, c in enumerate(comps):
    if c.gold is None:
      raise ValueError(f"rm.labels='gold': comparison {i} has no gold scores (comparisons from a user's file or "
                       "an old workdir carry none); expected the simulated labelers' comparisons")
    c.ranks = gold_ranks(c.gold)


def set_rating_targets(comps: Sequence[Comparison], method: str) -> None:
  """Sets each comparison's `target` (rating_targets of its ranks): group batches then carry "target"."""
  for c in comps:
    c.target = rating_targets(c.ranks, method).tolist()


def _pack(prompt: list[int], response: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = prompt + response
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros((seq_len,), np.int32)
  mask[:len(ids)] = 1
  return tokens, mask


def num_strict_pairs(ranks: Sequence[int]) -> int:
  r = np.asarray(ranks)
  return int((r[:, None] < r[None, :]).sum())


def make_groups(comps: Sequence[Comparison], *, grouping: str, pair_weighting: str) -> list[tuple[int, list[int],
                                                                                                   float]]:
  """Training units: (comparison index, response indices, weight). Grouped: one per prompt, all K responses.
  Pairs: one per strictly ranked pair (ties make no pair)."""
  if grouping == "prompt":
    return [(i, list(range(len(c.response_ids))), 1.0) for i, c in enumerate(comps) if num_strict_pairs(c.ranks)]
  if grouping != "pairs":
    raise ValueError(f"rm.grouping must be 'prompt' or 'pairs', got {grouping!r}")
  if pair_weighting not in ("uniform", "per_prompt"):
    raise ValueError(f"rm.pair_weighting must be 'uniform' or 'per_prompt', got {pair_weighting!r}")
  groups = []
  for i, c in enumerate(comps):
    n = num_strict_pairs(c.ranks)
    for a in range(len(c.ranks)):
      for b in range(a + 1, len(c.ranks)):
        if c.ranks[a] != c.ranks[b]:
          groups.append((i, [a, b], 1.0 / n if pair_weighting == "per_prompt" else 1.0))
  return groups


def bucketed_len(comps: Sequence[Comparison], groups: Sequence[tuple[int, list[int], float]], *, seq_len: int,
                 bucket: int) -> int:
  """The time axis of a batch of these groups: its longest prompt+response rounded up to a multiple of `bucket`,
  at most seq_len (bucket 0: always seq_len). Rows are right-padded and attention is causal, so the scores do
  not depend on it; a few buckets mean a few compiled shapes, and short batches cost less."""
  if bucket <= 0:
    return seq_len
  longest = max(len(comps[ci].prompt_ids) + len(comps[ci].response_ids[r]) for ci, idx, _ in groups for r in idx)
  return min(seq_len, -(-longest // bucket) * bucket)


def group_batch(comps: Sequence[Comparison], groups: Sequence[tuple[int, list[int], float]], *, k: int,
                seq_len: int, pad_id: int) -> Batch:
  b = len(groups)
  tokens = np.full((b, k, seq_len), pad_id, np.int32)
  mask = np.zeros((b, k, seq_len), np.int32)
  ranks = np.zeros((b, k), np.int32)
  valid = np.zeros((b, k), bool)
  weight = np.zeros((b,), np.float32)
  prompt_len = np.ones((b, k), np.int32)
  with_ref = all(comps[ci].ref_logp is not None for ci, _, _ in groups)
  ref_logp = np.zeros((b, k), np.float32)
  with_target = all(comps[ci].target is not None for ci, _, _ in groups)
  target = np.zeros((b, k), np.float32)
  for row, (ci, idx, w) in enumerate(groups):
    c = comps[ci]
    for j, r in enumerate(idx):
      tokens[row, j], mask[row, j] = _pack(c.prompt_ids, c.response_ids[r], seq_len, pad_id)
      prompt_len[row, j] = len(c.prompt_ids)
      # Sequences must keep at least one real token so padded slots do not produce NaNs; invalid slots
      # are excluded from the loss by `valid`.
      ranks[row, j] = c.ranks[r]
      valid[row, j] = True
      if with_ref:
        ref_logp[row, j] = c.ref_logp[r]
      if with_target:
        target[row, j] = c.target[r]  # the prompt's rating of response r (a pair keeps its prompt's ratings)
    for j in range(len(idx), k):
      mask[row, j, 0] = 1
    weight[row] = w
  batch = {"tokens": tokens, "mask": mask, "ranks": ranks, "valid": valid, "weight": weight, "prompt_len": prompt_len}
  if with_ref:
    batch["ref_logp"] = ref_logp
  if with_target:
    batch["target"] = target
  return batch


def batch_shardings(mesh, rules, *, with_ref: bool = False, with_target: bool = False) -> dict[str, Any]:
  """Shardings of a `group_batch` batch (with_ref: of comparisons with reference log-probs; with_target: with
  rating targets): rows (prompts) split over the data-parallel axes."""
  ndims = {"tokens": 3, "mask": 3, "ranks": 2, "valid": 2, "weight": 1, "prompt_len": 2}
  if with_ref:
    ndims["ref_logp"] = 2
  if with_target:
    ndims["target"] = 2
  return {key: sharding.batch_sharding(mesh, rules, n) for key, n in ndims.items()}


class GroupIterator:
  """Deterministic shuffled epochs over training groups, checkpointable as {"epoch", "pos"}."""

  def __init__(self, comps, groups, *, batch_size: int, k: int, seq_len: int, pad_id: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, length_bucket: int = 0):
    if len(groups) < batch_size:
      raise ValueError(f"rm.train.batch_size={batch_size} is larger than the {len(groups)} training groups")
    self.comps, self.groups = comps, groups
    self.batch_size, self.k, self.seq_len, self.pad_id, self.seed = batch_size, k, seq_len, pad_id, seed
    self.shard_index, self.shard_count, self.length_bucket = shard_index, shard_count, length_bucket
    self.epoch, self.pos = 0, 0

  def _order(self):
    return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self.pos + self.batch_size > len(self.groups):
      self.epoch, self.pos = self.epoch + 1, 0
    idx = self._order()[self.pos:self.pos + self.batch_size]
    self.pos += self.batch_size
    # The length comes from the global batch, so every process builds slices of one shape.
    t = bucketed_len(self.comps, [self.groups[i] for i in idx], seq_len=self.seq_len, bucket=self.length_bucket)
    per_host = self.batch_size // self.shard_count  # each process builds only its slice of the global batch
    idx = idx[self.shard_index * per_host:(self.shard_index + 1) * per_host]
    return group_batch(self.comps, [self.groups[i] for i in idx], k=self.k, seq_len=t, pad_id=self.pad_id)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def set_state(self, state: dict) -> None:
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
