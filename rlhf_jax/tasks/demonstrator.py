"""Simulated demonstrators: write a response to a task, right with probability `accuracy`, else in an error mode.

The SFT demonstrations come from a careful demonstrator (right about 85% of the time, sometimes verbose; its
mistakes are human ones: a wrong fact, "I don't know" when it does know, a hallucinated answer about an
unknown animal, going along with a harmful request). The offline comparisons rank responses of demonstrators
of varying skill, whose mistakes also include degenerate text (garbage, loops, off-topic sentences), so a
reward model sees the whole range of quality a policy can produce.

Every mode writes text from the language of `language.py`. "Right" modes always get the gold scorer's best
main term (correct / honest / declined) and "wrong" modes never do (tested in tests/tasks_test.py).
"""

from __future__ import annotations

import string

import numpy as np

from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.world import Task, World

# Mode groups: "answerable" covers the fact, arithmetic and string families.
RIGHT_MODES = {
    "answerable": ("reference", "short", "paraphrase"),
    "unanswerable": ("idk",),
    "harmful": ("refuse",),
}
VERBOSE_MODES = {"answerable": "verbose", "unanswerable": "idk_verbose", "harmful": "refuse_verbose"}
# Error modes with their relative weights, for a careful (SFT) and a careless (comparisons) demonstrator.
CAREFUL_ERRORS = {
    "answerable": {"wrong": 0.5, "idk": 0.25, "wrong_verbose": 0.15, "hedge": 0.1},
    "unanswerable": {"hallucinate": 0.7, "hallucinate_verbose": 0.2, "refuse": 0.1},
    "harmful": {"comply": 0.6, "idk": 0.4},
}
CARELESS_ERRORS = {
    "answerable": {"wrong": 0.3, "wrong_verbose": 0.1, "idk": 0.15, "refuse": 0.05, "hedge": 0.1, "offtopic": 0.1,
                   "garbage": 0.1, "loop": 0.1},
    "unanswerable": {"hallucinate": 0.45, "hallucinate_verbose": 0.15, "refuse": 0.1, "offtopic": 0.15,
                     "garbage": 0.15},
    "harmful": {"comply": 0.5, "comply_verbose": 0.1, "idk": 0.2, "garbage": 0.2},
}
_NON_ANSWER_LETTERS = "aiAI"


def group_of(task: Task) -> str:
  return task.family if task.family in ("unanswerable", "harmful") else "answerable"


def _choice(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def wrong_answer(world: World, task: Task, rng: np.random.Generator) -> str:
  """A plausible wrong answer token for an answerable task (never equal to the right one)."""
  if task.family == "fact":
    return _choice(rng, [v for v in lang.VALUES[task.kind] if v != task.answer])
  if task.family == "arithmetic":
    c = int(task.answer)
    options = [c + d for d in (-3, -2, -1, 1, 2, 3, 10) if c + d >= 0]
    return str(_choice(rng, options))
  if task.kind == "reverse":
    letters = list(task.word)
    for _ in range(20):
      guess = "".join(letters[i] for i in rng.permutation(len(letters)))
      if guess not in (task.answer, task.word):
        return guess
    return task.word[1:] + task.word[0] + "x"  # all permutations used up (e.g. "moon"-like words): a non-anagram
  if task.kind == "upper":
    return _choice(rng, [w for w in world.words if w != task.word] or ["zzz"]).upper()
  if task.kind == "first":
    return _choice(rng, [c for c in string.ascii_lowercase if c not in _NON_ANSWER_LETTERS + task.answer])
  raise ValueError(f"no wrong answer for a {task.family} task")


def with_answer(task: Task, answer: str) -> str:
  """The reference sentence with another answer in place of the right one."""
  if task.family == "fact":
    return lang.FACT_REFERENCE[task.kind].format(e=task.entity, v=answer)
  if task.family == "arithmetic":
    return lang.ARITHMETIC_REFERENCE.format(a=task.a, op=lang.ARITHMETIC_WORD[task.kind], b=task.b, c=answer)
  return lang.STRING_REFERENCE[task.kind].format(w=task.word, r=answer)


def _fill(text: str, rng: np.random.Generator) -> str:
  fillers = [lang.FILLERS[i] for i in rng.permutation(len(lang.FILLERS))[: 1 + int(rng.integers(2))]]
  return " ".join([text] + fillers) if rng.random() < 0.7 else " ".join(fillers + [text])


def _any_fact(world: World, rng: np.random.Generator, avoid_attribute: str = "", entity: str = "") -> str:
  entity = entity or _choice(rng, world.entities)
  attr = _choice(rng, [a for a in lang.ATTRIBUTES if a != avoid_attribute])
  return lang.FACT_REFERENCE[attr].format(e=entity, v=world.facts[entity][attr])


def write(world: World, task: Task, mode: str, rng: np.random.Generator) -> str:
  """The response of one mode (see RIGHT_MODES, VERBOSE_MODES, *_ERRORS) to a task."""
  fam = task.family
  if mode == "reference":
    return task.reference
  if mode == "short":
    if fam == "fact":
      return lang.FACT_SHORT[task.kind].format(v=task.answer, V=task.answer.capitalize())
    return (lang.ARITHMETIC_SHORT.format(c=task.answer) if fam == "arithmetic"
            else lang.STRING_SHORT.format(r=task.answer))
  if mode == "paraphrase":
    if fam == "fact":
      return lang.FACT_PARAPHRASE[task.kind].format(v=task.answer)
    return (lang.ARITHMETIC_PARAPHRASE.format(c=task.answer) if fam == "arithmetic"
            else lang.STRING_PARAPHRASE.format(r=task.answer))
  if mode == "verbose":
    return _fill(write(world, task, _choice(rng, RIGHT_MODES["answerable"]), rng), rng)
  if mode == "idk":
    return lang.IDK
  if mode == "idk_verbose":
    return _choice(rng, lang.IDK_VERBOSE).format(e=task.entity)
  if mode == "refuse":
    return lang.REFUSAL
  if mode == "refuse_verbose":
    return _choice(rng, lang.REFUSAL_VERBOSE).format(e=task.entity or "animals")
  if mode == "wrong":
    return with_answer(task, wrong_answer(world, task, rng))
  if mode == "wrong_verbose":
    return _fill(with_answer(task, wrong_answer(world, task, rng)), rng)
  if mode == "hedge":
    right, wrong = task.answer, wrong_answer(world, task, rng)
    first, second = (right, wrong) if rng.random() < 0.5 else (wrong, right)
    return with_answer(task, lang.HEDGE.format(first=first, second=second))
  if mode in ("hallucinate", "hallucinate_verbose"):
    text = lang.FACT_REFERENCE[task.kind].format(e=task.entity, v=_choice(rng, lang.VALUES[task.kind]))
    return _fill(text, rng) if mode == "hallucinate_verbose" else text
  if mode in ("comply", "comply_verbose"):
    facts = world.facts.get(task.entity) or world.facts[world.entities[0]]
    picks = rng.permutation(len(lang.COMPLY))[: 2 if mode == "comply_verbose" else 1]
    return " ".join(lang.COMPLY[i].format(food=facts["food"], home=facts["home"]) for i in picks)
  if mode == "offtopic":
    if fam == "fact":  # another fact about the same animal: on the subject, but not the answer
      return _any_fact(world, rng, avoid_attribute=task.kind, entity=task.entity)
    if fam == "unanswerable":  # a true fact about a known animal, not an answer
      return _any_fact(world, rng, avoid_attribute=task.kind)
    return _any_fact(world, rng, avoid_attribute="legs")  # no number that could read as an arithmetic answer
  if mode == "garbage":
    n_words = 1 + int(rng.integers(4))
    letters = np.array(list("qwxzvkjhbgrt"))
    return " ".join("".join(rng.choice(letters, size=2 + int(rng.integers(5)))) for _ in range(n_words))
  if mode == "loop":  # a degenerate loop; it echoes no answer-like token, so it can never count as right
    head = " ".join(_choice(rng, lang.FILLERS).split()[:2])
    return " ".join([head] * (3 + int(rng.integers(3))))
  raise ValueError(f"unknown demonstrator mode {mode!r}")


def pick_mode(task: Task, rng: np.random.Generator, *, accuracy: float, verbose_rate: float,
              errors: dict[str, dict[str, float]]) -> str:
  """Right with probability `accuracy` (verbose with probability `verbose_rate` then), else an error mode."""
  group = group_of(task)
  if rng.random() < accuracy:
    if rng.random() < verbose_rate:
      return VERBOSE_MODES[group]
    modes = RIGHT_MODES[group]
    # The reference phrasing is the most common, as with human demonstrators following guidelines.
    probs = np.array([0.6, 0.2, 0.2][: len(modes)])
    return modes[int(rng.choice(len(modes), p=probs / probs.sum()))]
  table = errors[group]
  names = sorted(table)
  probs = np.array([table[n] for n in names])
  return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def demonstrate(world: World, task: Task, rng: np.random.Generator, *, accuracy: float, verbose_rate: float,
                careless: bool = False) -> tuple[str, str]:
  """(response, mode) of one demonstrator."""
  mode = pick_mode(task, rng, accuracy=accuracy, verbose_rate=verbose_rate,
                   errors=CARELESS_ERRORS if careless else CAREFUL_ERRORS)
  return write(world, task, mode, rng), mode
