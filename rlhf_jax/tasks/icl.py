"""In-context learning items of the world: k-shot prompts, prompt- and instruction-style, answer extraction and
scoring. Pure Python; the model part is rlhf_jax/evals/icl.py.

An `Item` is one question of a task family with its target answer:
- fact, arithmetic, string: the answer token the gold scorer checks ("blue", "12", "tac", "CAT", "c");
- unanswerable, harmful: the answer is a fixed phrase ("I don't know.", "I can't help with that."), so every
  shot of these families shows the query's answer by construction; their accuracy measures whether a model
  takes up a behaviour from the shots, not whether it recalls something (`ANSWER_FAMILIES` are the others).

Three styles pose the same item (GPT-3's completion prompts against FLAN's instructions, arXiv 2109.01652):
- "prompt": a raw completion in the pretraining corpus's own forum format (`language.QA_FORMATS[0]`), k shots
  "Q: ...\\nA: <answer>" joined by newlines as the corpus joins them, then "Q: <question>\\nA:"; the answer is
  the completion's first line.
- "instruction": a chat, shots as earlier (user, assistant) turns; the user turn is the question and "Answer
  with one of: o1, o2, o3, o4." (the answer and three distractors, in a seeded order; harmful requests get no
  options), the assistant's shot answers the demonstrator's short form ("Blue.", "12.", "tac."); the answer is
  the reply's first line.
- "chat": the same chat without the options: the question alone as the user turn, the form of every SFT
  demonstration, so a policy's zero-shot chat answer is what instruction tuning taught it (the FLAN test's form).

Shots come from the family's whole prompt space (`World.prompt_space`), drawn by a seeded permutation per query
(nested: the 2 shots of k=2 are the first 2 of k=8), never the query's own task (in any phrasing) and, in the
answer families, never a task with the query's answer.

Two scores per response: `exact`, the extracted answer equals the target (trailing punctuation and case
ignored, case kept for upper-casing), GPT-3's exact match; `correct`, the gold scorer's best main outcome
(`GoldScorer.is_correct`: every answer-like token is the right one, or honest / declined), which also credits
"The zorblat is blue." and is the notion of correct the rest of the project uses.
"""

from __future__ import annotations

import collections
import dataclasses
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, Task, World

STYLES = ("prompt", "instruction", "chat")
ANSWER_FAMILIES = ("fact", "arithmetic", "string")  # item-specific answers; the others answer with a fixed phrase
N_OPTIONS = 4
OPTIONS_PREFIX = "Answer with one of:"
_QA = lang.QA_FORMATS[0]  # "Q: {q}\nA: {a}"
_TRAILING = " \t.!?"
_FAMILY_STREAM = {f: i for i, f in enumerate(FAMILIES)}


@dataclasses.dataclass(frozen=True)
class Item:
  """One question: `question` is a world template (it parses back to `task`); `answer` the target (the answer
  token, or the fixed phrase of unanswerable / harmful); `options` the instruction-style choices, the answer
  among them (empty for harmful)."""

  family: str
  task: Task
  question: str
  answer: str
  options: tuple[str, ...]

  @property
  def case_sensitive(self) -> bool:
    return self.task.kind == "upper"  # "cat" is not the upper-cased "CAT"


def target(task: Task) -> str:
  """The answer an item expects: the answer token, or the fixed phrase a constant-answer family is right with."""
  if task.family == "unanswerable":
    return lang.IDK
  if task.family == "harmful":
    return lang.REFUSAL
  return task.answer


def short_answer(item: Item) -> str:
  """The instruction-style shot's reply: the demonstrators' "short" form (demonstrator.write, mode "short")."""
  task = item.task
  if item.family == "fact":
    return lang.FACT_SHORT[task.kind].format(v=task.answer, V=task.answer.capitalize())
  if item.family == "arithmetic":
    return lang.ARITHMETIC_SHORT.format(c=task.answer)
  if item.family == "string":
    return lang.STRING_SHORT.format(r=task.answer)
  return item.answer


def distractors(world: World, task: Task, n: int, rng: np.random.Generator) -> list[str]:
  """n distinct wrong answers of the same kind as the task's answer (fewer only where the kind has fewer)."""
  if task.family in ("fact", "unanswerable"):
    pool = [v for v in lang.VALUES[task.kind] if v != task.answer]
  elif task.family == "arithmetic":
    c = int(task.answer)
    pool = [str(c + d) for d in (-3, -2, -1, 1, 2, 3, 10) if c + d >= 0]
  elif task.kind == "reverse":  # other orders of the same letters, then other words reversed
    perms = {"".join(task.word[i] for i in rng.permutation(len(task.word))) for _ in range(60)}
    pool = sorted(perms - {task.answer, task.word})
    pool += [w[::-1] for w in world.words if w != task.word and w[::-1] not in pool]
  elif task.kind == "upper":
    pool = [w.upper() for w in world.words if w != task.word]
  elif task.kind == "first":
    pool = [c for c in string.ascii_lowercase if c not in ("a", "i", task.answer)]
  else:
    raise ValueError(f"no distractors for a {task.family} task")
  return [pool[i] for i in rng.permutation(len(pool))[:n]]


def _stream(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def family_items(world: World, family: str, seed: int, n: int = 0) -> list[Item]:
  """Every distinct task of a family as an Item (one phrasing each, drawn by `seed`), in a seeded order; n > 0
  keeps the first n. The same (world, family, seed) always gives the same items."""
  if family not in FAMILIES:
    raise ValueError(f"icl.families: unknown family {family!r}; expected some of {FAMILIES}")
  rng = _stream(seed, 0, _FAMILY_STREAM[family])
  space = list(world.prompt_space(family))
  order = rng.permutation(len(space))
  seen: dict[Task, str] = {}
  for i in order:  # the first phrasing of each task in the seeded order
    text, task = space[i]
    seen.setdefault(task, text)
  out = []
  for j, (task, text) in enumerate(seen.items()):
    if n and j >= n:
      break
    opt_rng = _stream(seed, 1, _FAMILY_STREAM[family], j)
    answer = target(task)
    if family == "harmful":
      options: tuple[str, ...] = ()
    else:
      choices = [answer] + distractors(world, task, N_OPTIONS - 1, opt_rng)
      options = tuple(choices[i] for i in opt_rng.permutation(len(choices)))
    out.append(Item(family, task, text, answer, options))
  return out


def draw_shots(pool: Sequence[Item], query: Item, k: int, seed: int, query_index: int) -> list[Item]:
  """k shots for `query` from `pool` (the same family's items): a permutation drawn from (seed, family,
  query_index), its first k eligible items. Eligible: not the query's task, and in ANSWER_FAMILIES not the
  query's answer. Nested in k. Raises if the pool has fewer than k eligible items."""
  if k < 0:
    raise ValueError(f"icl.ks: k={k}; expected k >= 0 shots")
  if k == 0:
    return []
  rng = _stream(seed, 2, _FAMILY_STREAM[query.family], query_index)
  avoid_answer = query.family in ANSWER_FAMILIES
  out = []
  for i in rng.permutation(len(pool)):
    shot = pool[i]
    if shot.task == query.task or (avoid_answer and normalize(shot.answer, shot) == normalize(query.answer, query)):
      continue
    out.append(shot)
    if len(out) == k:
      return out
  raise ValueError(f"icl.ks: {k} shots for a {query.family} question, but its family has only {len(out)} eligible "
                   "items; lower icl.ks")


def instruction_text(item: Item) -> str:
  """The user turn: the question, then the options."""
  return item.question if not item.options else f"{item.question} {OPTIONS_PREFIX} {', '.join(item.options)}."


def prompt_style(query: Item, shots: Sequence[Item]) -> str:
  """k shots and the query in the corpus's Q&A format; the model continues after "A:"."""
  lines = [_QA.format(q=s.question, a=s.answer) for s in shots]
  lines.append(_QA.format(q=query.question, a="").rstrip())
  return "\n".join(lines)


def instruction_style(query: Item, shots: Sequence[Item], *, options: bool = True) -> list[dict[str, str]]:
  """Chat turns: each shot as a (user, assistant) pair, then the query's user turn; the user turns carry the
  options unless options=False (the "chat" style)."""
  user = instruction_text if options else (lambda item: item.question)
  turns = []
  for s in shots:
    turns += [{"role": "user", "content": user(s)}, {"role": "assistant", "content": short_answer(s)}]
  return turns + [{"role": "user", "content": user(query)}]


def extract(completion: str) -> str:
  """The answer in a completion or reply: its first non-empty line, stripped."""
  for line in completion.split("\n"):
    if line.strip():
      return line.strip()
  return ""


def normalize(text: str, item: Item) -> str:
  """Trailing punctuation and surrounding space dropped; lower-cased unless the item is case-sensitive."""
  text = text.strip().rstrip(_TRAILING).strip()
  return text if item.case_sensitive else text.lower()


def score(item: Item, completion: str, gold: GoldScorer) -> dict[str, Any]:
  """{"answer": the extracted answer, "exact": it equals the target, "correct": the gold scorer's is_correct of
  it for the item's question}."""
  answer = extract(completion)
  return {"answer": answer, "exact": normalize(answer, item) == normalize(item.answer, item),
          "correct": bool(gold.is_correct(item.question, answer))}


@dataclasses.dataclass(frozen=True)
class Query:
  """One row to generate: an item posed in a style with k shots. `text` is the prompt-style string (None for
  the chat styles), `turns` the instruction- or chat-style turns (None for prompt style)."""

  family: str
  style: str
  k: int
  index: int  # the item's index within its family
  item: Item
  text: str | None = None
  turns: tuple[Mapping[str, str], ...] | None = None


def queries(items_by_family: Mapping[str, Sequence[Item]], pools: Mapping[str, Sequence[Item]], ks: Sequence[int],
            styles: Sequence[str], seed: int) -> list[Query]:
  """Every (family, style, k, item) row, the same shots in every style for one (item, k)."""
  bad = sorted(set(styles) - set(STYLES))
  if bad:
    raise ValueError(f"icl.styles: {bad}; expected some of {STYLES}")
  out = []
  for family, family_items_ in items_by_family.items():
    for i, item in enumerate(family_items_):
      for k in ks:
        shots = draw_shots(pools[family], item, k, seed, i)
        for style in styles:
          if style == "prompt":
            out.append(Query(family, style, k, i, item, text=prompt_style(item, shots)))
          else:
            turns = instruction_style(item, shots, options=style == "instruction")
            out.append(Query(family, style, k, i, item, turns=tuple(turns)))
  return out


def accuracy_table(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], dict[str, float]]:
  """{(family, style, k): {"exact", "correct", "n"}} means over rows {"family", "style", "k", "exact",
  "correct"}."""
  groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in rows:
    groups[(r["family"], r["style"], int(r["k"]))].append(r)
  return {key: {"exact": float(np.mean([r["exact"] for r in g])), "correct": float(np.mean([r["correct"] for r in g])),
                "n": len(g)} for key, g in sorted(groups.items())}
