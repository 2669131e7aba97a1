"""The chain-of-thought evaluation's queries and accuracies (rlhf_jax/evals/cot.py), without a model; the stage
test (tests/stages/cot_test.py) decodes with one."""

import re

import numpy as np
import pytest

from helpers import experiments
from rlhf_jax import tokenizers
from rlhf_jax.evals import cot
from rlhf_jax.tasks import multistep, suite


@pytest.fixture(scope="module")
def world():
  return suite.make_world(0, suite.DataConfig.from_config(experiments.config("data", "tiny").data))


def test_few_shot_queries_hold_out_the_question_and_share_their_demonstrations(world):
  tok = tokenizers.ByteTokenizer()
  queries = cot.few_shot_queries(tok, world, n_items=3, shots=2, seed=0)
  for kind in multistep.KINDS:
    train, held_out = multistep.split(world, kind)
    train_q = {it.question for it in train}
    for i, item in enumerate(held_out[:3]):
      mine = [q for q in queries if q.kind == kind and q.item == i]
      assert [q.group for q in mine] == ["direct", "worked"] + ["one_step"] * len(item.sub_questions)
      texts = [tok.decode(q.ids[1:]) for q in mine]
      assert all(q.ids[0] == tok.bos_id for q in mine)
      direct, worked = texts[0], texts[1]
      demos = re.findall(r"Q: ([^\n]*)\nA: ([^\n]*)\n", direct)
      assert len(demos) == 2 and all(q in train_q for q, _ in demos)  # demonstrations are training items
      assert direct.endswith(f"Q: {item.question}\nA:") and worked.endswith(f"Q: {item.question}\nA:")
      by_q = {it.question: it for it in train}
      assert [a for _, a in demos] == [by_q[q].direct for q, _ in demos]
      assert re.findall(r"Q: ([^\n]*)\nA: ([^\n]*)\n", worked) == [(q, by_q[q].worked) for q, _ in demos]
      for s, (q, a, domain) in enumerate(item.sub_questions):
        one = mine[2 + s]
        assert texts[2 + s].endswith(f"Q: {q}\nA:") and one.answer == a and one.domain == domain
        # The demonstrations' same sub-question, answered directly.
        assert re.findall(r"Q: ([^\n]*)\nA: ([^\n]*)\n", texts[2 + s]) == [
            (by_q[d].sub_questions[s][0], multistep.ANSWER_DIRECT.format(answer=by_q[d].sub_questions[s][1]))
            for d, _ in demos]
      assert mine[0].answer == mine[1].answer == item.answer


def test_zero_shot_queries_are_one_user_turn(world):
  tok = tokenizers.ByteTokenizer()
  queries = cot.zero_shot_queries(tok, world, n_items=2)
  _, held_out = multistep.split(world, "neighbour")
  mine = [q for q in queries if q.kind == "neighbour" and q.item == 1]
  item = held_out[1]
  user = lambda text: tuple(tokenizers.encode_prompt(tok, [{"role": "user", "content": text}]))  # noqa: E731
  assert mine[0].ids == user(item.question)
  assert mine[1].ids == user(item.question + multistep.STEP_TRIGGER)
  assert [q.ids for q in mine[2:]] == [user(q) for q, _, _ in item.sub_questions]


def test_accuracies_against_a_direct_count():
  rng = np.random.default_rng(0)
  rows = []
  for kind in multistep.KINDS:
    for item in range(5):
      rows += [{"group": g, "kind": kind, "item": item, "correct": bool(rng.random() < 0.5)} for g in ("direct", "worked")]
      rows += [{"group": "one_step", "kind": kind, "item": item, "correct": bool(rng.random() < 0.7)} for _ in range(3)]
  acc = cot.accuracies(rows)
  for kind in multistep.KINDS:
    for g in ("direct", "worked", "one_step"):
      sel = [r["correct"] for r in rows if r["group"] == g and r["kind"] == kind]
      assert acc[f"{g}.{kind}"] == pytest.approx(sum(sel) / len(sel))
    chains = [all(r["correct"] for r in rows if r["group"] == "one_step" and r["kind"] == kind and r["item"] == i)
              for i in range(5)]
    assert acc[f"all_steps.{kind}"] == pytest.approx(np.mean(chains))
  direct = [r["correct"] for r in rows if r["group"] == "direct"]
  assert acc["direct.all"] == pytest.approx(np.mean(direct))
  assert acc["all_steps.all"] <= acc["one_step.all"]
