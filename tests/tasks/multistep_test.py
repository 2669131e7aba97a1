"""The multi-step questions (rlhf_jax/tasks/multistep.py): gold answers against an independent computation, the
held-out split, the answer parser, and the opt-in suite options that leave the default suite unchanged."""

import dataclasses
import hashlib
import json
import operator
import re

import numpy as np
import pytest

from helpers import experiments
from rlhf_jax import configs
from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks import multistep, suite

_OPS = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}
_NUMBERS = re.compile(r"\d+")


@pytest.fixture(scope="module")
def world():
  return suite.make_world(0, suite.DataConfig(**configs.DATA_PRESETS["small"]))


def _in_range(world, op, a, b) -> bool:
  """The world's operand ranges, written out (World.operand_pairs is what the module uses)."""
  top = world.max_factor if op == "times" else world.max_number
  return 0 <= a <= top and 0 <= b <= top and (op != "minus" or b <= a)


def test_two_step_arithmetic_answers_are_plain_python(world):
  q_re = re.compile(r"What is (\d+) (plus|minus|times) (\d+), then (plus|minus|times) (\d+)\?")
  items = multistep.items(world, "arith2")
  assert len(items) > 1000
  seen_pairs = set()
  for it in items:
    a, op1, b, op2, c = q_re.fullmatch(it.question).groups()
    a, b, c = int(a), int(b), int(c)
    x = _OPS[op1](a, b)
    assert it.answer == str(_OPS[op2](x, c)), it.question
    assert _in_range(world, op1, a, b) and _in_range(world, op2, x, c), it.question  # both steps are one-step sums
    assert [int(n) for n in _NUMBERS.findall(it.steps[0])] == [a, b, x]
    assert [int(n) for n in _NUMBERS.findall(it.steps[1])] == [x, c, _OPS[op2](x, c)]
    seen_pairs.add((op1, op2))
  assert len(seen_pairs) == 9
  assert len({it.question for it in items}) == len(items)


def test_legs_sums_come_from_the_world_s_facts(world):
  q_re = re.compile(r"How many legs do the ([a-z]+) and the ([a-z]+) have together\?")
  items = multistep.items(world, "legs_sum")
  n = len(world.entities)
  assert len(items) == n * (n - 1) // 2
  for it in items:
    e, e2 = q_re.fullmatch(it.question).groups()
    assert e != e2
    assert it.answer == str(int(world.facts[e]["legs"]) + int(world.facts[e2]["legs"]))


def test_neighbour_chains_follow_one_cycle_and_the_world_s_facts(world):
  relation = multistep.neighbours(world)
  assert sorted(relation) == sorted(relation.values()) == sorted(world.entities)
  e, seen = world.entities[0], []
  while e not in seen:  # one cycle through every entity: no one is its own neighbour
    seen.append(e)
    e = relation[e]
  assert len(seen) == len(world.entities) and all(relation[x] != x for x in seen)
  asked = {"What color is": "color", "Where does": "home", "What does": "food", "How many legs does": "legs"}
  items = multistep.items(world, "neighbour")
  assert len(items) == 4 * len(world.entities)
  for it in items:
    head, e = re.fullmatch(r"(.*) the neighbour of the ([a-z]+)( live| eat| have)?\?", it.question).group(1, 2)
    attr = asked[head]
    assert it.answer == world.facts[relation[e]][attr]
    assert relation[e] in it.steps[0] and it.steps[1].split()[1] == relation[e]


def test_sub_questions_are_one_step_questions_of_the_world(world):
  for kind in multistep.KINDS:
    for it in multistep.items(world, kind)[:300]:
      for q, a, domain in it.sub_questions:
        if q.startswith("Who is the neighbour of the "):
          e = q[len("Who is the neighbour of the "):-1]
          assert a == multistep.neighbours(world)[e] and domain == "entity"
        else:  # the world's own parser and answer for its own templates
          assert world.parse(q).answer == a, q
      # A chain's last step answers the question.
      assert it.sub_questions[-1][1] == it.answer


def test_held_out_items_never_appear_in_generated_text(world):
  held_out = {k: multistep.split(world, k)[1] for k in multistep.KINDS}
  train = {k: multistep.split(world, k)[0] for k in multistep.KINDS}
  for k in multistep.KINDS:
    n = len(multistep.items(world, k))
    assert len(held_out[k]) == -(-n // multistep.HELD_OUT_EVERY)
    assert not {it.question for it in held_out[k]} & {it.question for it in train[k]}
  docs = multistep.multistep_documents(world, 300, np.random.default_rng(0))
  demos = multistep.sft_records(world, 300, np.random.default_rng(1), user_id="u")
  text = "\n".join([d["text"] for d in docs] + [t["content"] for r in demos for t in r["turns"]])
  questions = set(re.findall(r"(?:Q: |^)([^\n]*\?)", text, re.MULTILINE))
  questions |= {t["content"].replace(multistep.STEP_TRIGGER, "") for r in demos for t in r["turns"]
                if t["role"] == "user"}
  assert len(questions) > 200
  for k in multistep.KINDS:
    assert not questions & {it.question for it in held_out[k]}, k
  # legs_sum: a held-out pair of animals is never asked about together, in either order.
  pairs = {frozenset(re.fullmatch(r"How many legs do the ([a-z]+) and the ([a-z]+) have together\?", q).groups())
           for q in questions if q.startswith("How many legs do the ")}
  assert pairs and not pairs & {frozenset(re.findall(r"the ([a-z]+)", it.question)) for it in held_out["legs_sum"]}
  # Worked answers are in the corpus, with their marker.
  assert multistep.ANSWER_WORKED.format(answer="")[:-1] in text


@pytest.mark.parametrize("response,domain,expected", [
    ("3 plus 4 is 7. 7 times 2 is 14. So the answer is 14.", "number", "14"),
    ("The answer is 14.\nQ: What is 1 plus 2?\nA: The answer is 3.", "number", "14"),  # the first line only
    ("3 plus 4 is 7. 7 times 2 is 14.", "number", "14"),  # no marker: the last number
    ("The quimdle has 6 legs.", "legs", "6"),
    ("The neighbour of the lubwug is the zebquo.", "entity", "zebquo"),
    ("The neighbour of the lubwug is the zebquo. The zebquo is blue. So the answer is blue.", "color", "blue"),
    ("The answer is the zebquo.", "entity", "zebquo"),
    ("Blue or red.", "color", "red"),
    ("I don't know.", "number", ""),
    ("", "color", ""),
])
def test_final_answer(response, domain, expected):
  assert multistep.final_answer(response, domain, ("lubwug", "zebquo")) == expected


def test_final_answer_names_a_bad_domain():
  with pytest.raises(ValueError, match="answer domain 'size'"):
    multistep.final_answer("x", "size", ())


def test_few_shot_prompt_is_the_corpus_format():
  text = multistep.few_shot_prompt("What is 1 plus 2?", [("What is 2 plus 2?", "The answer is 4.")])
  assert text == "Q: What is 2 plus 2?\nA: The answer is 4.\nQ: What is 1 plus 2?\nA:"
  assert lang.QA_FORMATS[0] == multistep.QA


# ------------------------------------------------------------------------------------------------------------
# The opt-in suite options.


def test_the_default_suite_does_not_see_the_opt_in_fields():
  cfg = suite.DataConfig.from_config(experiments.config("data", "tiny").data)
  # The fingerprint of the suite as it was written before the opt-in fields existed: the same JSON without them.
  before = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in suite.OPT_IN_FIELDS}
  before["family_weights"] = dict(cfg.family_weights)
  blob = json.dumps({"seed": 0, "data": before, "version": suite.SUITE_VERSION}, sort_keys=True)
  assert suite.fingerprint(0, cfg) == hashlib.sha256(blob.encode()).hexdigest()[:16]
  on = dataclasses.replace(cfg, n_multistep_docs=5)
  assert suite.fingerprint(0, on) != suite.fingerprint(0, cfg)
  with pytest.raises(ValueError, match=r"data.n_multistep_sft=-1: expected >= 0"):
    dataclasses.replace(cfg, n_multistep_sft=-1)


def test_opt_in_splits_extend_the_default_ones_and_change_nothing_else():
  cfg = suite.DataConfig.from_config(experiments.config("data", "tiny").data)
  base, base_stats = suite.generate(0, cfg)
  on, on_stats = suite.generate(0, dataclasses.replace(cfg, n_multistep_docs=40, n_multistep_sft=30))
  for name in suite.SPLITS:
    n = len(base[name])
    assert on[name][:n] == base[name], name
  assert len(on["pretrain"]) == len(base["pretrain"]) + 40
  assert len(on["sft"]) == len(base["sft"]) + 30 and len(on["sft_val"]) == len(base["sft_val"]) + 3
  assert {r["family"] for r in on["sft"][len(base["sft"]):]} == {"multistep"}
  for key in ("demo_accuracy_measured", "labeler_agreement", "gold_ceiling_accuracy"):
    assert on_stats[key] == base_stats[key], key
