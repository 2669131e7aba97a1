"""The pretraining corpus of the simulated world and its "benchmark skill".

Documents mix six kinds of sections, so a small language model learns the world's vocabulary, its facts and
loosely formatted task examples before any instruction tuning:
- animal notes: the four facts of one entity in varied phrasings;
- stories: short stories mixing the facts of two entities;
- sums: arithmetic statements ("7 plus 5 is 12.", "7 + 5 = 12."), always correct;
- word games: reversed, upper-cased and first letters of the game words, always correct;
- forum Q&A: prompts of every family with loosely formatted answers. As on the web, a fraction
  (`qa_error_rate`) of the answers are wrong, harmful questions are usually answered (this is what SFT and
  RLHF must undo), and nobody says "I don't know" (unknown entities never appear in the corpus at all).

The benchmark skill ("public NLP benchmark" of the alignment tax): completing a fact sentence exactly as the
corpus writes it, e.g. prompt "The zorblat is colored" -> answer " blue", plus arithmetic statements
"7 plus 5 is" -> " 12". Scored by exact greedy completion or by the answer's log-likelihood.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.demonstrator import with_answer, wrong_answer
from rlhf_jax.tasks.world import World, arithmetic_result, string_result

SECTION_KINDS = ("notes", "story", "sums", "word_games", "qa")
SECTION_WEIGHTS = (0.3, 0.2, 0.15, 0.1, 0.25)


def _choice(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def _notes(world: World, rng: np.random.Generator) -> str:
  e = _choice(rng, world.entities)
  sentences = []
  for attr in (lang.ATTRIBUTES[i] for i in rng.permutation(len(lang.ATTRIBUTES))):
    sentences.append(_choice(rng, lang.FACT_STATEMENTS[attr]).format(e=e, v=world.facts[e][attr]))
  return " ".join(sentences)


def _story(world: World, rng: np.random.Generator) -> str:
  i, j = rng.choice(len(world.entities), size=2, replace=False)
  e, e2 = world.entities[i], world.entities[j]
  f, f2 = world.facts[e], world.facts[e2]
  values = dict(e=e, e2=e2, home=f["home"], food=f["food"], legs=f["legs"], color2=f2["color"],
                legs2=f2["legs"], home2=f2["home"], food2=f2["food"])
  n = 3 + int(rng.integers(len(lang.STORY_SENTENCES) - 2))
  return " ".join(s.format(**values) for s in lang.STORY_SENTENCES[:n])


def _sum_line(world: World, rng: np.random.Generator) -> str:
  op = _choice(rng, ("plus", "minus", "times"))
  a, b = _choice(rng, world.operand_pairs(op))
  template = _choice(rng, lang.ARITHMETIC_STATEMENTS)
  return template.format(a=a, b=b, op=lang.ARITHMETIC_WORD[op], sym=lang.ARITHMETIC_SYMBOL[op],
                         c=arithmetic_result(op, a, b))


def _sums(world: World, rng: np.random.Generator) -> str:
  return " ".join(_sum_line(world, rng) for _ in range(4 + int(rng.integers(5))))


def _word_games(world: World, rng: np.random.Generator) -> str:
  out = []
  for _ in range(3 + int(rng.integers(4))):
    w, op = _choice(rng, world.words), _choice(rng, ("reverse", "upper", "first"))
    out.append(_choice(rng, lang.WORD_GAME_STATEMENTS[op]).format(w=w, r=string_result(op, w)))
  return " ".join(out)


def _qa(world: World, rng: np.random.Generator, error_rate: float) -> str:
  fmt = _choice(rng, lang.QA_FORMATS)
  pairs = []
  for _ in range(2 + int(rng.integers(4))):
    family = _choice(rng, ("fact", "fact", "arithmetic", "string", "harmful"))
    if family == "fact":
      e, attr = _choice(rng, world.entities), _choice(rng, lang.ATTRIBUTES)
      q, task = _choice(rng, lang.FACT_PROMPTS[attr]).format(e=e), world.fact_task(e, attr)
    elif family == "arithmetic":
      op = _choice(rng, ("plus", "minus", "times"))
      a, b = _choice(rng, world.operand_pairs(op))
      q, task = _choice(rng, lang.ARITHMETIC_PROMPTS[op]).format(a=a, b=b), world.arithmetic_task(op, a, b)
    elif family == "string":
      op, w = _choice(rng, ("reverse", "upper", "first")), _choice(rng, world.words)
      q, task = _choice(rng, lang.STRING_PROMPTS[op]).format(w=w), world.string_task(op, w)
    else:
      e = _choice(rng, world.entities)
      q = _choice(rng, lang.HARMFUL_PROMPTS["harm"]).format(e=e)
      f = world.facts[e]
      # The web answers harmful questions more often than it declines them.
      a = lang.REFUSAL if rng.random() < 0.2 else _choice(rng, lang.COMPLY).format(food=f["food"], home=f["home"])
      pairs.append(fmt.format(q=q, a=a))
      continue
    answer = wrong_answer(world, task, rng) if rng.random() < error_rate else task.answer
    # Loose formatting: half the answers are a bare token ("blue"), half a sentence.
    pairs.append(fmt.format(q=q, a=answer if rng.random() < 0.5 else with_answer(task, answer)))
  return "\n".join(pairs)


def document(world: World, rng: np.random.Generator, *, qa_error_rate: float, max_sections: int = 3) -> str:
  """One pretraining document: 1..max_sections sections, sometimes under a header."""
  parts = []
  if rng.random() < 0.3:
    parts.append(_choice(rng, lang.DOC_HEADERS))
  for _ in range(1 + int(rng.integers(max_sections))):
    kind = SECTION_KINDS[int(rng.choice(len(SECTION_KINDS), p=SECTION_WEIGHTS))]
    if kind == "notes":
      parts.append(_notes(world, rng))
    elif kind == "story":
      parts.append(_story(world, rng))
    elif kind == "sums":
      parts.append(_sums(world, rng))
    elif kind == "word_games":
      parts.append(_word_games(world, rng))
    else:
      parts.append(_qa(world, rng, qa_error_rate))
  return "\n\n".join(parts)


def pretrain_documents(world: World, n_docs: int, rng: np.random.Generator, *, qa_error_rate: float,
                       max_sections: int = 3) -> list[dict[str, str]]:
  return [{"text": document(world, rng, qa_error_rate=qa_error_rate, max_sections=max_sections)}
          for _ in range(n_docs)]


def benchmark(world: World, n_arithmetic: int, rng: np.random.Generator) -> list[dict[str, str]]:
  """Every fact of the world as a cloze, plus `n_arithmetic` sums ("7 plus 5 is" -> " 12")."""
  out = []
  for e in world.entities:
    for attr in lang.ATTRIBUTES:
      out.append({"prompt": lang.BENCHMARK_PROMPTS[attr].format(e=e), "answer": " " + world.facts[e][attr],
                  "kind": f"fact_{attr}"})
  for _ in range(n_arithmetic):
    op = _choice(rng, ("plus", "minus", "times"))
    a, b = _choice(rng, world.operand_pairs(op))
    out.append({"prompt": f"{a} {lang.ARITHMETIC_WORD[op]} {b} is", "answer": f" {arithmetic_result(op, a, b)}",
                "kind": f"arithmetic_{op}"})
  return out
