"""In-context learning accuracy of a policy: greedy answers to k-shot queries (rlhf_jax/tasks/icl.py), scored.

A prompt-style query is plain text after BOS (as the pretraining corpus and the benchmark are fed); an
instruction-style query is a chat ending in the assistant's turn (`tokenizers.encode_prompt`, as every policy
is prompted for sampling). Rows are decoded greedily in batches of similar length: the batch is left-padded to
its longest prompt rounded up to `bucket` tokens, so a few shapes are compiled for every k and style.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import sampling, sharding, tokenizers
from rlhf_jax.data.batching import decode_responses, left_pad, pad_rows
from rlhf_jax.models import transformer
from rlhf_jax.tasks import icl
from rlhf_jax.tasks.gold import GoldScorer


def encode(tok: tokenizers.Tokenizer, query: icl.Query) -> list[int]:
  """The ids a policy continues for one query."""
  if query.style == "prompt":
    return [tok.bos_id] + tok.encode(query.text)
  return tokenizers.encode_prompt(tok, query.turns)


def greedy_completions(params, cfg: transformer.ModelConfig, tok: tokenizers.Tokenizer,
                       prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int, mesh, rules,
                       bucket: int = 32) -> list[str]:
  """The greedy continuation (up to EOS or max_new_tokens) of every prompt, as text, in the input order.

  Every prompt must fit: len + max_new_tokens <= cfg.max_len (ValueError otherwise, before any decoding)."""
  limit = cfg.max_len - max_new_tokens
  longest = max(len(p) for p in prompt_ids)
  if longest > limit:
    raise ValueError(f"icl: a prompt of {longest} tokens + icl.max_new_tokens={max_new_tokens} exceeds "
                     f"model.max_len={cfg.max_len}")
  scfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
  n_dp = sharding.data_parallel_size(mesh, rules)
  batch_size = pad_rows(batch_size, n_dp)
  order = np.argsort([len(p) for p in prompt_ids], kind="stable")
  out: list[str] = [""] * len(prompt_ids)
  with sharding.activate(mesh, rules):
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      chunk = [list(prompt_ids[i]) for i in idx]
      p_len = min(limit, int(math.ceil(max(len(c) for c in chunk) / bucket) * bucket))
      chunk += [chunk[-1]] * (batch_size - len(chunk))  # a full batch: one shape per bucket
      prompt_bp, mask_bp = left_pad(chunk, tok.pad_id, p_len)
      placed = sharding.put_global_batch({"p": prompt_bp, "m": mask_bp}, mesh, rules)
      res = sampling.generate(params, placed["p"], placed["m"], jax.random.PRNGKey(0), cfg, scfg,
                              eos_id=tok.eos_id, pad_id=tok.pad_id)
      texts = decode_responses(tok, sharding.fetch(res.tokens_bn), sharding.fetch(res.mask_bn))
      for i, text in zip(idx, texts):
        out[int(i)] = text
  return out


def evaluate(params, cfg: transformer.ModelConfig, tok: tokenizers.Tokenizer, queries: Sequence[icl.Query],
             gold: GoldScorer, *, max_new_tokens: int, batch_size: int, mesh, rules) -> list[dict[str, Any]]:
  """One row per query: {"family", "style", "k", "index", "question", "prompt_len", "completion", "answer",
  "exact", "correct"} (tasks/icl.score of the greedy completion)."""
  ids = [encode(tok, q) for q in queries]
  completions = greedy_completions(params, cfg, tok, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   mesh=mesh, rules=rules)
  rows = []
  for q, p, c in zip(queries, ids, completions):
    rows.append({"family": q.family, "style": q.style, "k": q.k, "index": q.index, "question": q.item.question,
                 "prompt_len": len(p), "completion": c, **icl.score(q.item, c, gold)})
  return rows
