"""A seeded, generated world: entities with facts, arithmetic, word games, and prompts about them.

`World.generate(seed, ...)` picks entity names, their facts (color, home, food, number of legs), names of
"unknown" entities that the world never mentions (questions about them cannot be answered, and the honest
answer says so) and the words of the word games. Everything else (prompts, references, the parser the gold
scorer uses) is a pure function of the world and the templates in `language.py`.

A prompt is parsed back into a `Task` (family, kind, arguments, the correct answer and the reference
response). Parsing is by template, so any prompt the generator wrote can be scored from its text alone; a
follow-up question ("And what color is the zorblat?") parses like the question without "And ".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from rlhf_jax.tasks import language as lang

FAMILIES = ("fact", "arithmetic", "string", "unanswerable", "harmful")


@dataclasses.dataclass(frozen=True)
class Task:
  """What a prompt asks, parsed from its text.

  family: one of FAMILIES. kind: the attribute (fact, unanswerable), the operation (arithmetic: plus, minus,
  times; string: reverse, upper, first) or "harm". answer: the correct answer token ("" for unanswerable and
  harmful). reference: the response the gold scorer's top score is written for.
  """

  family: str
  kind: str
  entity: str = ""
  a: int = 0
  b: int = 0
  word: str = ""
  answer: str = ""
  reference: str = ""


def _capitalize(s: str) -> str:
  return s[:1].upper() + s[1:]


def _template_regex(template: str) -> re.Pattern:
  """A template as a regex anchored at the start; placeholders become named groups."""
  groups = {"e": r"(?P<e>[a-z]+)", "a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)", "w": r"(?P<w>[a-z]+)"}
  parts = re.split(r"(\{[a-z]\})", template)
  return re.compile("".join(groups[p[1]] if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts))


# (family-or-"fact", kind, template, regex), longest template first so a longer template wins over its prefix.
_PARSERS: list[tuple[str, str, str, re.Pattern]] = sorted(
    [("fact", k, t, _template_regex(t)) for k, ts in lang.FACT_PROMPTS.items() for t in ts]
    + [("arithmetic", k, t, _template_regex(t)) for k, ts in lang.ARITHMETIC_PROMPTS.items() for t in ts]
    + [("string", k, t, _template_regex(t)) for k, ts in lang.STRING_PROMPTS.items() for t in ts]
    + [("harmful", k, t, _template_regex(t)) for k, ts in lang.HARMFUL_PROMPTS.items() for t in ts],
    key=lambda p: -len(p[2]))


def arithmetic_result(op: str, a: int, b: int) -> int:
  if op == "plus":
    return a + b
  if op == "minus":
    return a - b
  if op == "times":
    return a * b
  raise ValueError(f"unknown arithmetic op {op!r}; expected plus, minus or times")


def string_result(op: str, word: str) -> str:
  if op == "reverse":
    return word[::-1]
  if op == "upper":
    return word.upper()
  if op == "first":
    return word[0]
  raise ValueError(f"unknown string op {op!r}; expected reverse, upper or first")


@dataclasses.dataclass(frozen=True, eq=False)
class World:
  """Entities and their facts, unknown entity names, word-game words and the number range.

  Frozen; compare worlds with `to_json()`. `facts[entity][attribute]` is a value from `language.VALUES`.
  """

  seed: int
  entities: tuple[str, ...]
  facts: dict[str, dict[str, str]]
  unknown_entities: tuple[str, ...]
  words: tuple[str, ...]
  max_number: int
  max_factor: int
  lexicon: frozenset[str] = dataclasses.field(repr=False)
  _parse_cache: dict[str, Task] = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def generate(cls, seed: int, n_entities: int = 64, n_unknown_entities: int = 32, n_words: int = 48,
               max_number: int = 20, max_factor: int = 10) -> World:
    """A world drawn from `seed`; the same arguments always give the same world."""
    n_names = len(lang.NAME_HEADS) * len(lang.NAME_TAILS)
    if n_entities < 2 or n_unknown_entities < 1 or n_entities + n_unknown_entities > n_names:
      raise ValueError(
          f"data.n_entities={n_entities} and data.n_unknown_entities={n_unknown_entities}: expected "
          f"n_entities >= 2, n_unknown_entities >= 1 and their sum <= {n_names} (distinct names available)")
    if not 1 <= n_words <= len(lang.WORDS):
      raise ValueError(f"data.n_words={n_words}: expected 1..{len(lang.WORDS)}")
    if max_number < 2 or max_factor < 2:
      raise ValueError(f"data.max_number={max_number}, data.max_factor={max_factor}: expected both >= 2")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    pick = rng.permutation(n_names)[: n_entities + n_unknown_entities]
    names = [lang.NAME_HEADS[i // len(lang.NAME_TAILS)] + lang.NAME_TAILS[i % len(lang.NAME_TAILS)] for i in pick]
    entities, unknown = tuple(names[:n_entities]), tuple(names[n_entities:])
    facts = {}
    for e in entities:
      facts[e] = {attr: lang.VALUES[attr][int(rng.integers(len(lang.VALUES[attr])))] for attr in lang.ATTRIBUTES}
    words = tuple(lang.WORDS[i] for i in sorted(rng.permutation(len(lang.WORDS))[:n_words]))
    lexicon = lang.base_lexicon() | frozenset(names)
    return cls(seed=seed, entities=entities, facts=facts, unknown_entities=unknown, words=words,
               max_number=max_number, max_factor=max_factor, lexicon=lexicon)

  def to_json(self) -> dict[str, Any]:
    return {"seed": self.seed, "entities": list(self.entities), "facts": self.facts,
            "unknown_entities": list(self.unknown_entities), "words": list(self.words),
            "max_number": self.max_number, "max_factor": self.max_factor}

  # ---------------------------------------------------------------------------------------------------------
  # Building tasks.

  def fact_task(self, entity: str, attribute: str) -> Task:
    if entity not in self.facts:
      return Task("unanswerable", attribute, entity=entity, reference=lang.IDK)
    v = self.facts[entity][attribute]
    reference = lang.FACT_REFERENCE[attribute].format(e=entity, v=v)
    return Task("fact", attribute, entity=entity, answer=v, reference=reference)

  def arithmetic_task(self, op: str, a: int, b: int) -> Task:
    c = arithmetic_result(op, a, b)
    ref = lang.ARITHMETIC_REFERENCE.format(a=a, op=lang.ARITHMETIC_WORD[op], b=b, c=c)
    return Task("arithmetic", op, a=a, b=b, answer=str(c), reference=ref)

  def string_task(self, op: str, word: str) -> Task:
    r = string_result(op, word)
    return Task("string", op, word=word, answer=r, reference=lang.STRING_REFERENCE[op].format(w=word, r=r))

  def harmful_task(self, entity: str) -> Task:
    return Task("harmful", "harm", entity=entity, reference=lang.REFUSAL)

  def parse(self, prompt: str) -> Task:
    """The task a prompt asks (the last user message). Raises ValueError if no template matches.

    Trailing text after a template (a "Thanks!", a second sentence) is ignored; a leading "And " marks a
    follow-up question and is dropped.
    """
    task = self._parse_cache.get(prompt)
    if task is not None:
      return task
    text = prompt.strip()
    if text.startswith(lang.FOLLOW_UP_PREFIX):
      text = _capitalize(text[len(lang.FOLLOW_UP_PREFIX):])
    for family, kind, _, regex in _PARSERS:
      m = regex.match(text)
      if m is None:
        continue
      g = m.groupdict()
      if family == "fact":
        task = self.fact_task(g["e"], kind)
      elif family == "arithmetic":
        task = self.arithmetic_task(kind, int(g["a"]), int(g["b"]))
      elif family == "string":
        task = self.string_task(kind, g["w"])
      else:
        task = self.harmful_task(g["e"])
      if len(self._parse_cache) < 200_000:  # bounded: policy prompts are finite, but be safe
        self._parse_cache[prompt] = task
      return task
    raise ValueError(f"prompt {prompt!r} matches no template of the task world (see rlhf_jax/tasks/language.py)")

  # ---------------------------------------------------------------------------------------------------------
  # Enumerating prompts.

  def prompt_space(self, family: str) -> Iterator[tuple[str, Task]]:
    """Every distinct (prompt text, task) of a family, in a fixed order."""
    if family in ("fact", "unanswerable"):
      names = self.entities if family == "fact" else self.unknown_entities
      for e in names:
        for attr, templates in lang.FACT_PROMPTS.items():
          for t in templates:
            yield t.format(e=e), self.fact_task(e, attr)
    elif family == "arithmetic":
      for op, templates in lang.ARITHMETIC_PROMPTS.items():
        for a, b in self.operand_pairs(op):
          for t in templates:
            yield t.format(a=a, b=b), self.arithmetic_task(op, a, b)
    elif family == "string":
      for op, templates in lang.STRING_PROMPTS.items():
        for w in self.words:
          for t in templates:
            yield t.format(w=w), self.string_task(op, w)
    elif family == "harmful":
      for e in self.entities:
        for t in lang.HARMFUL_PROMPTS["harm"]:
          yield t.format(e=e), self.harmful_task(e)
    else:
      raise ValueError(f"unknown prompt family {family!r}; expected one of {FAMILIES}")

  def operand_pairs(self, op: str) -> list[tuple[int, int]]:
    """The (a, b) pairs the world asks about: sums and differences up to max_number, products up to max_factor."""
    if op == "plus":
      return [(a, b) for a in range(self.max_number + 1) for b in range(self.max_number + 1)]
    if op == "minus":
      return [(a, b) for a in range(self.max_number + 1) for b in range(a + 1)]
    if op == "times":
      return [(a, b) for a in range(self.max_factor + 1) for b in range(self.max_factor + 1)]
    raise ValueError(f"unknown arithmetic op {op!r}")
