"""Prompt curation as in InstructGPT (arXiv 2203.02155, sec. 3.2): PII, near-duplicates, prompts per user.

Three rules, applied in this order over the prompts in submission order:
1. PII: drop a prompt any of whose user turns contains an e-mail address or a phone number.
2. Long common prefix: drop a prompt whose text shares a common prefix of at least `prefix_chars` characters
   with an earlier kept prompt, or that is a prefix of one (or has one as prefix): the same question asked
   again with a "Thanks!" appended is a near-duplicate even when it is shorter than `prefix_chars`.
3. User cap: keep at most `max_per_user` prompts per user id (the first ones; InstructGPT used 200).

A prompt is a dict with "prompt" (the text the prefix rule compares: the last user message), "user_id" and
optionally "turns" (all turns; the PII rule reads every user turn). `curate` returns the kept prompts and
how many each rule removed.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
PHONE_RE = re.compile(r"(?<!\d)(?:\+?\d{1,2}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]?\d{4}(?!\d)")


def has_pii(text: str) -> bool:
  """Whether the text contains an e-mail address or a (North-American-style) phone number."""
  return EMAIL_RE.search(text) is not None or PHONE_RE.search(text) is not None


class PrefixIndex:
  """Kept prompts, indexed so that "does p collide with a kept prompt?" costs O(prefix_chars), not O(n).

  p and q collide when their common prefix is at least min(prefix_chars, len(p), len(q)) characters long.
  """

  def __init__(self, prefix_chars: int):
    if prefix_chars < 1:
      raise ValueError(f"data.prefix_dedup_chars={prefix_chars}: expected a positive number of characters")
    self.n = prefix_chars
    self._heads: set[str] = set()  # every prefix of a kept prompt, up to n characters
    self._short: set[str] = set()  # kept prompts shorter than n characters

  def collides(self, p: str) -> bool:
    if p[: self.n] in self._heads:  # a long common prefix, or p (short) is a prefix of a kept prompt
      return True
    # a kept prompt shorter than n is a prefix of p
    return any(p[:i] in self._short for i in range(1, min(len(p), self.n) + 1))

  def add(self, p: str) -> None:
    head = p[: self.n]
    self._heads.update(head[:i] for i in range(1, len(head) + 1))
    if len(p) < self.n:
      self._short.add(p)


def _user_texts(prompt: dict[str, Any]) -> list[str]:
  turns = prompt.get("turns")
  if turns:
    return [t["content"] for t in turns if t["role"] == "user"]
  return [prompt["prompt"]]


def curate(prompts: Sequence[dict[str, Any]], *, prefix_chars: int = 40,
           max_per_user: int = 200) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """(kept prompts in their order, {"removed_pii", "removed_prefix", "removed_user_cap", "kept", "input"})."""
  if max_per_user < 1:
    raise ValueError(f"data.max_prompts_per_user={max_per_user}: expected at least 1")
  for n, p in enumerate(prompts):
    if "prompt" not in p or "user_id" not in p:
      raise ValueError(f"curate: prompt {n} has fields {sorted(p)}; expected at least 'prompt' and 'user_id'")
  stage1 = [p for p in prompts if not any(has_pii(t) for t in _user_texts(p))]
  index = PrefixIndex(prefix_chars)
  stage2 = []
  for p in stage1:
    if not index.collides(p["prompt"]):
      index.add(p["prompt"])
      stage2.append(p)
  per_user: collections.Counter = collections.Counter()
  kept = []
  for p in stage2:
    per_user[p["user_id"]] += 1
    if per_user[p["user_id"]] <= max_per_user:
      kept.append(p)
  stats = {"input": len(prompts), "removed_pii": len(prompts) - len(stage1),
           "removed_prefix": len(stage1) - len(stage2), "removed_user_cap": len(stage2) - len(kept),
           "kept": len(kept)}
  return kept, stats
