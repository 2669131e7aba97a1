"""Cloze items about the world's facts, for comparing a masked-LM encoder with a next-token decoder.

Three kinds, each a sentence with one gap and a closed set of candidate fillers:
- "value": a pretraining fact statement with the value left out: "The wumblat lives in the ___." over the
  attribute's values (" forest", " cave", ...);
- "entity": the same statements with the entity left out: "The ___ lives in the forest." over every entity
  name; any entity with that fact is correct (several may share it);
- "prompt": prompt-style classification, a forum question and an answer slot in the corpus's Q&A format:
  "Q: What color is the wumblat?\\nA: ___" over the attribute's values.

Every entity's facts appear in the pretraining corpus (the animal notes cover every entity), so no fact is
held out: the cloze measures what a model recalls of facts it read, in phrasings it read. A fact it never saw
could not be guessed above chance, since values are drawn independently per entity.

`unigram_choices` is the context-free yardstick: the candidate the pretraining corpus mentions most often.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable, Sequence

from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.world import World

KINDS = ("value", "entity", "prompt")
GAP = "[MASK]"


@dataclasses.dataclass(frozen=True)
class ClozeItem:
  """`prefix + candidates[i] + suffix` is the sentence with filler i; candidates carry their leading space.

  answers: the indices of the correct candidates (one for "value" and "prompt", one or more for "entity").
  """

  kind: str
  attribute: str
  prefix: str
  suffix: str
  candidates: tuple[str, ...]
  answers: frozenset[int]

  @property
  def text(self) -> str:
    """The sentence with its gap, "The wumblat lives in the [MASK]."."""
    return f"{self.prefix} {GAP}{self.suffix}"


def _split(template: str, gap: str, **values: str) -> tuple[str, str]:
  """(prefix, suffix) around the placeholder `gap` of a template, the other placeholders filled; the space
  before the gap goes with the candidate."""
  head, sep, tail = template.partition("{" + gap + "}")
  if not sep or not head.endswith(" "):
    raise ValueError(f"cloze template {template!r}: expected ' {{{gap}}}' (a space before the gap)")
  return head[:-1].format(**values), tail.format(**values)


def items(world: World, kinds: Sequence[str] = KINDS) -> list[ClozeItem]:
  """Every cloze item of the world, in a fixed order: value and entity items over every fact statement of
  `language.FACT_STATEMENTS`, prompt items over the first question template of each attribute in the first
  Q&A format."""
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    raise ValueError(f"cloze kinds {unknown}: expected some of {KINDS}")
  out: list[ClozeItem] = []
  entity_candidates = tuple(" " + e for e in world.entities)
  for attr in lang.ATTRIBUTES:
    values = lang.VALUES[attr]
    value_candidates = tuple(" " + v for v in values)
    for template in lang.FACT_STATEMENTS[attr]:
      if "value" in kinds:
        for e in world.entities:
          prefix, suffix = _split(template, "v", e=e)
          out.append(ClozeItem("value", attr, prefix, suffix, value_candidates,
                               frozenset([values.index(world.facts[e][attr])])))
      if "entity" in kinds:
        for v in values:
          answers = frozenset(i for i, e in enumerate(world.entities) if world.facts[e][attr] == v)
          if answers:  # a value no entity has is no question
            prefix, suffix = _split(template, "e", v=v)
            out.append(ClozeItem("entity", attr, prefix, suffix, entity_candidates, answers))
    if "prompt" in kinds:
      qa = lang.QA_FORMATS[0]  # "Q: {q}\nA: {a}"
      for e in world.entities:
        prefix, suffix = _split(qa.replace("{q}", lang.FACT_PROMPTS[attr][0].format(e=e)), "a")
        out.append(ClozeItem("prompt", attr, prefix, suffix, value_candidates,
                             frozenset([values.index(world.facts[e][attr])])))
  return out


def subsample(cloze_items: Sequence[ClozeItem], per_kind: int) -> list[ClozeItem]:
  """`per_kind` evenly spaced items of each kind, in order (all of a kind that has fewer; 0: all)."""
  if per_kind <= 0:
    return list(cloze_items)
  out = []
  for kind in KINDS:
    of_kind = [it for it in cloze_items if it.kind == kind]
    step = max(1, len(of_kind) / per_kind)
    out += [of_kind[int(i * step)] for i in range(min(per_kind, len(of_kind)))]
  return out


_WORD_RE = re.compile(r"[a-z0-9]+")


def word_counts(texts: Iterable[str]) -> collections.Counter:
  """Lower-cased word counts of a corpus."""
  counts: collections.Counter = collections.Counter()
  for text in texts:
    counts.update(_WORD_RE.findall(text.lower()))
  return counts


def unigram_choices(cloze_items: Sequence[ClozeItem], counts: collections.Counter) -> list[int]:
  """For each item, the candidate the corpus mentions most often (the first one on a tie)."""
  choices = []
  for item in cloze_items:
    freq = [counts.get(c.strip().lower(), 0) for c in item.candidates]
    choices.append(max(range(len(freq)), key=lambda i: (freq[i], -i)))
  return choices


def accuracy(cloze_items: Sequence[ClozeItem], choices: Sequence[int]) -> dict[str, float]:
  """Top-1 accuracy of chosen candidate indices, overall ("all") and per kind, as {kind: accuracy}."""
  if len(cloze_items) != len(choices):
    raise ValueError(f"{len(choices)} choices for {len(cloze_items)} cloze items")
  by_kind: dict[str, list[bool]] = collections.defaultdict(list)
  for item, c in zip(cloze_items, choices):
    by_kind[item.kind].append(int(c) in item.answers)
    by_kind["all"].append(int(c) in item.answers)
  return {k: sum(v) / len(v) for k, v in by_kind.items()}


def chance(cloze_items: Sequence[ClozeItem]) -> dict[str, float]:
  """The expected top-1 accuracy of a uniformly random candidate, overall and per kind."""
  by_kind: dict[str, list[float]] = collections.defaultdict(list)
  for item in cloze_items:
    p = len(item.answers) / len(item.candidates)
    by_kind[item.kind].append(p)
    by_kind["all"].append(p)
  return {k: sum(v) / len(v) for k, v in by_kind.items()}
