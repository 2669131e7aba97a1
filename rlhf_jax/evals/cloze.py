"""Cloze accuracy of a masked-LM encoder and of a next-token decoder on the same items and candidates.

Each (item, candidate) is one row, `[BOS] + encode(prefix) + encode(candidate) + encode(suffix)`, the three
pieces encoded separately so both models read the same ids and the candidate's span is known.
- Decoder: the candidate's score is the log-likelihood of the whole row, sum_t log p(x_t | x_<t) (the suffix
  counts: "The ___ lives in the forest." is decided by what follows the gap).
- Encoder: the candidate's k tokens are replaced by k [MASK] ids, the rest of the row is visible, and the score
  is sum_i log p(candidate token i | the masked row) at the k masked positions (all masked at once; BERT
  cloze scoring of multi-token fillers, as in X-FACTR, arXiv 2010.06189).
Neither score is length-normalised; the top-1 choice is the candidate with the highest score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding, tokenizers
from rlhf_jax.models import heads, transformer
from rlhf_jax.tasks import cloze


def encode_rows(tok: tokenizers.Tokenizer, cloze_items: Sequence[cloze.ClozeItem]) -> list[tuple[list[int], int, int]]:
  """(token ids, candidate start, candidate end) of every (item, candidate), items in order."""
  rows = []
  for item in cloze_items:
    head = [tok.bos_id] + tok.encode(item.prefix)
    tail = tok.encode(item.suffix)
    for cand in item.candidates:
      ids = tok.encode(cand)
      rows.append((head + ids + tail, len(head), len(head) + len(ids)))
  return rows


def row_batches(rows, *, batch_size: int, pad_id: int, mask_id: int | None, multiple: int = 8):
  """Right-padded numpy batches {"tokens", "mask", "target_mask"} [batch_size, t]: t is the longest row rounded
  up to `multiple`, the last batch is padded with empty rows. With mask_id (the encoder), the candidate span
  is replaced by mask_id and target_mask marks it; without (the decoder), target_mask marks every real token
  after BOS."""
  t = int(math.ceil(max(len(r[0]) for r in rows) / multiple) * multiple)
  for s in range(0, len(rows), batch_size):
    tokens = np.full((batch_size, t), pad_id, np.int32)
    inputs = tokens.copy()
    mask = np.zeros((batch_size, t), np.int32)
    target = np.zeros((batch_size, t), np.int32)
    for i, (ids, lo, hi) in enumerate(rows[s:s + batch_size]):
      tokens[i, :len(ids)] = ids
      inputs[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1
      if mask_id is None:
        target[i, 1:len(ids)] = 1
      else:
        inputs[i, lo:hi] = mask_id
        target[i, lo:hi] = 1
    yield {"inputs": inputs, "tokens": tokens, "mask": mask, "target_mask": target}


def decoder_scores(params, batch, cfg: transformer.ModelConfig) -> jax.Array:
  """sum_t log p(x_t | x_<t) over target_mask [b] (target_mask[:, 0] is never set: BOS is given)."""
  logits_btv, _ = transformer.forward(params, batch["inputs"][:, :-1], cfg, mask_bt=batch["mask"][:, :-1])
  lp_bt = transformer.token_logprobs(logits_btv, batch["tokens"][:, 1:])
  return jnp.sum(jnp.where(batch["target_mask"][:, 1:] > 0, lp_bt, 0.0), axis=1)


def encoder_scores(params, batch, cfg: transformer.ModelConfig) -> jax.Array:
  """sum over the masked span of log p(original token | masked row) [b]."""
  logits_btv = heads.mlm_logits(params, batch["inputs"], batch["mask"], cfg)
  lp_bt = transformer.token_logprobs(logits_btv, batch["tokens"])
  return jnp.sum(jnp.where(batch["target_mask"] > 0, lp_bt, 0.0), axis=1)


def score_items(score_fn, params, tok: tokenizers.Tokenizer, cloze_items: Sequence[cloze.ClozeItem], *,
                mask_id: int | None, batch_size: int, mesh, rules) -> list[np.ndarray]:
  """Every candidate's score [n_candidates] per item: score_fn(params, batch) -> [b] (a jitted
  `decoder_scores` with mask_id None, or `encoder_scores` with the encoder's [MASK] id)."""
  rows = encode_rows(tok, cloze_items)
  n_dp = sharding.data_parallel_size(mesh, rules)
  batch_size = int(math.ceil(batch_size / n_dp) * n_dp)
  flat = []
  for batch in row_batches(rows, batch_size=batch_size, pad_id=tok.pad_id, mask_id=mask_id):
    flat.append(sharding.fetch(score_fn(params, sharding.put_global_batch(batch, mesh, rules))))
  flat = np.concatenate(flat)[:len(rows)]
  out, at = [], 0
  for item in cloze_items:
    out.append(flat[at:at + len(item.candidates)])
    at += len(item.candidates)
  return out


def choices(scores: Sequence[np.ndarray]) -> list[int]:
  """The top-1 candidate of each item (the first on a tie)."""
  return [int(np.argmax(s)) for s in scores]
