"""Host-side batching helpers shared by sampling, RL and evaluation: left-padded prompts and masked decoding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded [b, p] tokens and mask (prompts for generation)."""
  length = length or max(len(s) for s in seqs)
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"prompt {i} has {len(s)} tokens, more than the {length} allowed")
    if len(s):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  return tokens, mask


def fit_prompt(ids: Sequence[int], max_len: int) -> list[int]:
  """Keeps BOS and the last max_len - 1 tokens of an over-long prompt (the question is at the end)."""
  ids = list(ids)
  return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max_len + 1:]


def decode_responses(tok, response_bn: np.ndarray, mask_bn: np.ndarray) -> list[str]:
  """The text of each row's masked tokens."""
  return [tok.decode([int(t) for t, m in zip(r, mk) if m]) for r, mk in zip(response_bn, mask_bn)]


def pad_rows(n: int, multiple: int) -> int:
  """n rounded up to a multiple (rows of a batch split over data-parallel devices)."""
  return int(math.ceil(n / multiple) * multiple)
