"""Multi-step questions about the world, each with its worked steps and its one-step sub-questions.

Three kinds, every step of which is a one-step question the pretraining corpus answers:
- "arith2", two-step arithmetic: "What is 3 plus 4, then times 2?" -> 14, worked "3 plus 4 is 7. 7 times 2 is
  14."; both steps are sums of the world's operand ranges (`World.operand_pairs`), which the corpus's sums state.
- "legs_sum", a fact and a sum: "How many legs do the zorblat and the quimtor have together?" -> worked "The
  zorblat has 4 legs. The quimtor has 6 legs. 4 plus 6 is 10.".
- "neighbour", a two-hop fact chain: "What color is the neighbour of the zorblat?" -> worked "The neighbour of
  the zorblat is the quimtor. The quimtor is blue.". The neighbour relation is a random cycle over the
  entities (each has one neighbour, none is its own), drawn from the world's seed on a stream of its own, so the
  world and every default split are unchanged; the corpus states it only with `data.n_multistep_docs` > 0
  (`multistep_documents`). A forward relation, not an inverse lookup ("the animal that lives in the forest"):
  the world's values are shared by several entities, and recalling an entity from its value is the reversal the
  corpus never writes.

Every kind's items are split once into a training part (pretraining documents, few-shot demonstrations, SFT
demonstrations) and a held-out part (evaluation), by a seeded permutation: a held-out question (or, for
legs_sum, its pair of animals) never appears in any generated text; its steps do, as other questions' steps.

A worked answer ends with an explicit marker, "So the answer is 14."; a direct answer is "The answer is 14.".
`final_answer` reads the word after the last "answer is", else the last answer-like token (a number, an
attribute value, an entity name) of the response's first line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.world import World, arithmetic_result

KINDS = ("arith2", "legs_sum", "neighbour")
HELD_OUT_EVERY = 4  # every 4th item of a kind's permuted order is held out for evaluation
STEP_TRIGGER = " Think step by step."  # appended to a question to ask an SFT model for worked steps
ANSWER_DIRECT = "The answer is {answer}."
ANSWER_WORKED = "So the answer is {answer}."
QA = "Q: {q}\nA: {a}"  # the corpus's first forum format (language.QA_FORMATS[0])

ARITH2_QUESTION = "What is {a} {op1} {b}, then {op2} {c}?"
LEGS_SUM_QUESTION = "How many legs do the {e} and the {e2} have together?"
NEIGHBOUR_QUESTION = "Who is the neighbour of the {e}?"
NEIGHBOUR_STATEMENTS = ("The neighbour of the {e} is the {n}.", "The {e} has a neighbour, the {n}.")
_OPS = ("plus", "minus", "times")
# Random streams of this module: SeedSequence(world.seed, spawn_key=(stream, ...)); the suite uses 1..10.
_STREAM_NEIGHBOURS, _STREAM_SPLIT = 101, 102


@dataclasses.dataclass(frozen=True)
class Item:
  """One multi-step question.

  domain: what kind of token the answer is, "number", "entity" or an attribute of language.ATTRIBUTES.
  steps: the worked sentences, in order. sub_questions: ((question, answer, domain), ...), the one-step
  questions the steps answer.
  """

  kind: str
  question: str
  answer: str
  domain: str
  steps: tuple[str, ...]
  sub_questions: tuple[tuple[str, str, str], ...]

  @property
  def worked(self) -> str:
    """The step-by-step answer: "3 plus 4 is 7. 7 times 2 is 14. So the answer is 14."."""
    return " ".join(self.steps + (ANSWER_WORKED.format(answer=self.answer),))

  @property
  def direct(self) -> str:
    return ANSWER_DIRECT.format(answer=self.answer)


def neighbours(world: World) -> dict[str, str]:
  """entity -> its neighbour: one random cycle through every entity, from the world's seed."""
  rng = np.random.default_rng(np.random.SeedSequence(world.seed, spawn_key=(_STREAM_NEIGHBOURS,)))
  order = [world.entities[i] for i in rng.permutation(len(world.entities))]
  return {e: order[(i + 1) % len(order)] for i, e in enumerate(order)}


def _arith_question(op: str, a: int, b: int) -> str:
  return lang.ARITHMETIC_PROMPTS[op][0].format(a=a, b=b)


def _arith_step(op: str, a: int, b: int) -> str:
  return lang.ARITHMETIC_REFERENCE.format(a=a, op=lang.ARITHMETIC_WORD[op], b=b, c=arithmetic_result(op, a, b))


def _fact_question(attr: str, e: str) -> str:
  return lang.FACT_PROMPTS[attr][0].format(e=e)


def arith2_item(world: World, op1: str, a: int, b: int, op2: str, c: int) -> Item:
  x = arithmetic_result(op1, a, b)
  y = arithmetic_result(op2, x, c)
  return Item("arith2", ARITH2_QUESTION.format(a=a, op1=op1, b=b, op2=op2, c=c), str(y), "number",
              (_arith_step(op1, a, b), _arith_step(op2, x, c)),
              ((_arith_question(op1, a, b), str(x), "number"), (_arith_question(op2, x, c), str(y), "number")))


def legs_sum_item(world: World, e: str, e2: str) -> Item:
  l1, l2 = int(world.facts[e]["legs"]), int(world.facts[e2]["legs"])
  return Item("legs_sum", LEGS_SUM_QUESTION.format(e=e, e2=e2), str(l1 + l2), "number",
              (lang.FACT_REFERENCE["legs"].format(e=e, v=l1), lang.FACT_REFERENCE["legs"].format(e=e2, v=l2),
               _arith_step("plus", l1, l2)),
              ((_fact_question("legs", e), str(l1), "number"), (_fact_question("legs", e2), str(l2), "number"),
               (_arith_question("plus", l1, l2), str(l1 + l2), "number")))


def neighbour_item(world: World, e: str, attr: str, relation: dict[str, str]) -> Item:
  n = relation[e]
  v = world.facts[n][attr]
  question = _fact_question(attr, e).replace(f"the {e}", f"the neighbour of the {e}")
  return Item("neighbour", question, v, attr,
              (NEIGHBOUR_STATEMENTS[0].format(e=e, n=n), lang.FACT_REFERENCE[attr].format(e=n, v=v)),
              ((NEIGHBOUR_QUESTION.format(e=e), n, "entity"), (_fact_question(attr, n), v, attr)))


def _arith2_space(world: World) -> list[list[tuple]]:
  """The two-step sums whose both steps are sums the world asks about, grouped by (op1, op2)."""
  groups = []
  for op1 in _OPS:
    for op2 in _OPS:
      group = []
      for a, b in world.operand_pairs(op1):
        x = arithmetic_result(op1, a, b)
        group += [(op1, a, b, op2, c) for (xx, c) in world.operand_pairs(op2) if xx == x]
      groups.append(group)
  return groups


def items(world: World, kind: str) -> list[Item]:
  """Every item of a kind in a fixed, seeded order (arith2: the nine operation pairs interleaved)."""
  def perm(n: int, *key: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(world.seed, spawn_key=(_STREAM_SPLIT, *key))).permutation(n)

  if kind == "arith2":
    groups = [[g[i] for i in perm(len(g), 0, j)] for j, g in enumerate(_arith2_space(world))]
    out = []
    for i in range(max(len(g) for g in groups)):
      out += [arith2_item(world, *g[i]) for g in groups if i < len(g)]
    return out
  if kind == "legs_sum":
    es = world.entities
    pairs = [(es[i], es[j]) for i in range(len(es)) for j in range(i + 1, len(es))]
    return [legs_sum_item(world, *pairs[i]) for i in perm(len(pairs), 1)]
  if kind == "neighbour":
    relation = neighbours(world)
    keys = [(e, attr) for e in world.entities for attr in lang.ATTRIBUTES]
    return [neighbour_item(world, *keys[i], relation) for i in perm(len(keys), 2)]
  raise ValueError(f"unknown multi-step kind {kind!r}; expected one of {KINDS}")


def split(world: World, kind: str) -> tuple[list[Item], list[Item]]:
  """(training items, held-out items) of a kind: every HELD_OUT_EVERY-th item of `items` is held out."""
  all_items = items(world, kind)
  return ([it for i, it in enumerate(all_items) if i % HELD_OUT_EVERY],
          [it for i, it in enumerate(all_items) if i % HELD_OUT_EVERY == 0])


# ------------------------------------------------------------------------------------------------------------
# Reading an answer.

_WORD_RE = re.compile(r"[a-z]+|\d+")
_MARKER_RE = re.compile(r"answer is\s+(?:the\s+)?([a-z]+|\d+)")


def final_answer(response: str, domain: str, entities: Sequence[str]) -> str:
  """The answer a response gives: the word after the last "answer is" of its first line, else the last token of
  the line in the answer's domain ("number": an integer, "entity": an entity name, an attribute: its values);
  "" when there is none. Lower-cased."""
  line = response.strip().split("\n", 1)[0].lower()
  marked = _MARKER_RE.findall(line)
  if marked:
    return marked[-1]
  if domain == "number":
    ok = str.isdigit
  elif domain == "entity":
    names = frozenset(entities)
    ok = names.__contains__
  elif domain in lang.VALUES:
    ok = frozenset(lang.VALUES[domain]).__contains__
  else:
    raise ValueError(f"answer domain {domain!r}: expected 'number', 'entity' or one of {lang.ATTRIBUTES}")
  found = [w for w in _WORD_RE.findall(line) if ok(w)]
  return found[-1] if found else ""


def is_correct(response: str, item_answer: str, domain: str, entities: Sequence[str]) -> bool:
  return final_answer(response, domain, entities) == item_answer.lower()


# ------------------------------------------------------------------------------------------------------------
# Prompts and generated text.


def few_shot_prompt(question: str, shots: Sequence[tuple[str, str]]) -> str:
  """k (question, answer) demonstrations and the question, in the corpus's "Q: / A:" format, ending at "A:"."""
  parts = [QA.format(q=q, a=a) for q, a in shots] + [QA.format(q=question, a="").rstrip()]
  return "\n".join(parts)


def _choice(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _neighbour_notes(world: World, relation: dict[str, str], rng: np.random.Generator) -> str:
  es = [world.entities[i] for i in rng.permutation(len(world.entities))[: 3 + int(rng.integers(4))]]
  return " ".join(_choice(rng, NEIGHBOUR_STATEMENTS).format(e=e, n=relation[e]) for e in es)


def _qa_pair(world: World, relation: dict[str, str], train: dict[str, list[Item]], rng: np.random.Generator) -> str:
  """A forum Q&A pair: a training item answered directly or worked (half each), or one of its sub-questions."""
  item = _choice(rng, train[_choice(rng, KINDS)])
  u = rng.random()
  if u < 0.2:
    q, a, _ = _choice(rng, item.sub_questions)
    return QA.format(q=q, a=ANSWER_DIRECT.format(answer=a))
  if u < 0.3:  # a neighbour question of any animal, answered as the notes state it
    e = _choice(rng, world.entities)
    return QA.format(q=NEIGHBOUR_QUESTION.format(e=e), a=NEIGHBOUR_STATEMENTS[0].format(e=e, n=relation[e]))
  return QA.format(q=item.question, a=item.direct if u < 0.65 else item.worked)


def multistep_documents(world: World, n_docs: int, rng: np.random.Generator) -> list[dict[str, str]]:
  """Pretraining documents of the multi-step kinds (`data.n_multistep_docs`): neighbour notes and forum Q&A of
  training items, answered directly or worked. Never a held-out item."""
  relation = neighbours(world)
  train = {kind: split(world, kind)[0] for kind in KINDS}
  docs = []
  for _ in range(n_docs):
    parts = []
    if rng.random() < 0.4:
      parts.append(_neighbour_notes(world, relation, rng))
    parts.append("\n".join(_qa_pair(world, relation, train, rng) for _ in range(2 + int(rng.integers(4)))))
    docs.append({"text": "\n\n".join(parts)})
  return docs


def sft_records(world: World, n: int, rng: np.random.Generator, *, user_id: str) -> list[dict]:
  """`n` chat demonstrations of training items (`data.n_multistep_sft`): with the step trigger the worked
  answer, without it the direct answer (half each), and now and then a neighbour sub-question. family
  "multistep", so no scorer of the world's families sees them."""
  relation = neighbours(world)
  train = {kind: split(world, kind)[0] for kind in KINDS}
  out = []
  for _ in range(n):
    item = _choice(rng, train[_choice(rng, KINDS)])
    u = rng.random()
    if u < 0.1:
      e = _choice(rng, world.entities)
      q, a = NEIGHBOUR_QUESTION.format(e=e), NEIGHBOUR_STATEMENTS[0].format(e=e, n=relation[e])
    elif u < 0.55:
      q, a = item.question, item.direct
    else:
      q, a = item.question + STEP_TRIGGER, item.worked
    out.append({"turns": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "user_id": user_id, "family": "multistep"})
  return out
