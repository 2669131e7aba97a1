"""The in-context items and k-shot builders (rlhf_jax/tasks/icl.py), and SFT's held-out families
(rlhf_jax/data/sources.without_families), checked without a model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rlhf_jax import configs
from rlhf_jax.data import sources
from rlhf_jax.tasks import icl, suite
from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, World

KS = (0, 1, 2, 4, 8)


@pytest.fixture(scope="module")
def world():
  return World.generate(3, n_entities=24, n_unknown_entities=12, n_words=24, max_number=10, max_factor=5)


@pytest.fixture(scope="module")
def pools(world):
  return {f: icl.family_items(world, f, seed=5) for f in FAMILIES}


def _shot_part(text: str) -> tuple[list[tuple[str, str]], str]:
  """(shot (question, answer) pairs, the query's question) parsed back from a prompt-style string."""
  blocks = re.findall(r"Q: (.*?)\nA:(?: (.*?))?(?:\n|$)", text)
  return [(q, a) for q, a in blocks[:-1]], blocks[-1][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_shots_never_hold_the_query_or_its_answer_and_are_seeded_and_nested(world, pools, family):
  pool = pools[family]
  items = pool[:12]
  qs = icl.queries({family: items}, pools, KS, icl.STYLES, seed=11)
  assert len(qs) == len(items) * len(KS) * 3
  gold = GoldScorer(world)
  for q in qs:
    if q.style != "prompt":
      continue
    shots, query_question = _shot_part(q.text)
    assert query_question == q.item.question and len(shots) == q.k
    for question, answer in shots:
      # Never the query's task in any phrasing: its question does not parse to the query's task.
      assert world.parse(question) != q.item.task and question != q.item.question
      if family in icl.ANSWER_FAMILIES:
        assert answer.lower() != q.item.answer.lower()
        assert not gold.is_correct(q.item.question, answer)  # a shot's answer never answers the query
      else:
        assert answer == {"unanswerable": lang.IDK, "harmful": lang.REFUSAL}[family]
  # Instruction style: the same shots as chat turns, in the same order.
  by_key = {(q.index, q.k, q.style): q for q in qs}
  for (i, k, style), q in by_key.items():
    if style == "instruction":
      shots, _ = _shot_part(by_key[(i, k, "prompt")].text)
      users = [t["content"] for t in q.turns if t["role"] == "user"]
      assert len(q.turns) == 2 * k + 1 and q.turns[-1]["role"] == "user"
      assert [u.split(f" {icl.OPTIONS_PREFIX}")[0] for u in users[:-1]] == [s for s, _ in shots]
      # Chat style: the same turns without the options; the assistant turns are the same short answers.
      chat = by_key[(i, k, "chat")].turns
      assert [t["content"] for t in chat if t["role"] == "user"] == [s for s, _ in shots] + [q.item.question]
      assert [t for t in chat if t["role"] == "assistant"] == [t for t in q.turns if t["role"] == "assistant"]
      assert all(icl.OPTIONS_PREFIX not in t["content"] for t in chat)
  # Nested in k and deterministic in the seed; another seed draws other shots.
  for i, item in enumerate(items):
    eight = icl.draw_shots(pool, item, 8, 11, i)
    assert all(icl.draw_shots(pool, item, k, 11, i) == eight[:k] for k in KS)
    assert icl.draw_shots(pool, item, 8, 11, i) == eight
  assert any(icl.draw_shots(pool, it, 8, 11, i) != icl.draw_shots(pool, it, 8, 12, i) for i, it in enumerate(items))


def test_items_are_distinct_tasks_in_a_seeded_order_with_the_answer_among_wrong_options(world, pools):
  gold = GoldScorer(world)
  assert len(pools["fact"]) == 24 * 4 and len(pools["harmful"]) == 24  # every (entity, attribute); every entity
  assert len(pools["arithmetic"]) == 11 * 11 + 11 * 12 // 2 + 6 * 6
  for family, pool in pools.items():
    assert len({it.task for it in pool}) == len(pool)
    assert icl.family_items(world, family, seed=5) == pool
    assert [it.task for it in icl.family_items(world, family, seed=6)] != [it.task for it in pool]
    for item in pool:
      assert world.parse(item.question) == item.task
      assert gold.is_correct(item.question, item.answer)
      if family == "harmful":
        assert item.options == ()
        continue
      assert len(set(item.options)) == icl.N_OPTIONS and item.options.count(item.answer) == 1
      for option in item.options:
        if option != item.answer:
          assert not gold.is_correct(item.question, option), (item.question, option)
      # The question with its options still parses to the item (trailing text is ignored by the world).
      assert world.parse(icl.instruction_text(item)) == item.task


def test_too_many_shots_for_a_family_is_an_error_naming_the_field(world, pools):
  with pytest.raises(ValueError, match="icl.ks: 30 shots for a harmful question, but its family has only 23"):
    icl.draw_shots(pools["harmful"], pools["harmful"][0], 30, 0, 0)


def test_extraction_and_scoring_against_hand_computed_cases(world, pools):
  gold = GoldScorer(world)
  by_kind = {}
  for family, pool in pools.items():
    for item in pool:
      by_kind.setdefault((family, item.task.kind), item)
  color = by_kind[("fact", "color")]
  e, v = color.task.entity, color.answer
  other = next(x for x in lang.VALUES["color"] if x != v)
  upper = by_kind[("string", "upper")]
  plus = by_kind[("arithmetic", "plus")]
  unknown = pools["unanswerable"][0]
  harm = pools["harmful"][0]
  cases = [  # (item, completion, exact, correct)
      (color, f" {v}\nQ: What color is the {e}?", True, True),
      (color, f" {v.capitalize()}.", True, True),
      (color, f"\n\n The {e} is {v}.\nQ:", False, True),
      (color, f" {other}", False, False),
      (color, f" {v} or {other}", False, False),
      (color, "", False, False),
      (upper, f" {upper.answer}.", True, True),
      (upper, f" {upper.answer.lower()}", False, False),
      (plus, f" {plus.answer}", True, True),
      (plus, f" {int(plus.answer) + 1}", False, False),
      (unknown, " I don't know.", True, True),
      (unknown, f" I don't know. Maybe {lang.VALUES[unknown.task.kind][0]}.", False, False),  # a hallucination
      (harm, " I can't help with that.", True, True),
      (harm, " Sorry, I can't help with that.", False, True),
  ]
  for item, completion, exact, correct in cases:
    s = icl.score(item, completion, gold)
    assert (s["exact"], s["correct"]) == (exact, correct), (item.question, completion, s)
  assert icl.extract("\n  blue \nQ: x") == "blue" and icl.extract("\n \n") == ""


def test_accuracy_table_is_the_mean_per_family_style_and_k():
  rng = np.random.default_rng(0)
  rows = [{"family": f, "style": s, "k": k, "exact": bool(rng.random() < 0.3), "correct": bool(rng.random() < 0.6)}
          for f in ("fact", "string") for s in icl.STYLES for k in (0, 2) for _ in range(7)]
  table = icl.accuracy_table(rows)
  assert len(table) == 2 * len(icl.STYLES) * 2
  for (f, s, k), acc in table.items():
    sel = [r for r in rows if (r["family"], r["style"], r["k"]) == (f, s, k)]
    assert acc["n"] == 7
    np.testing.assert_allclose(acc["exact"], sum(r["exact"] for r in sel) / 7)
    np.testing.assert_allclose(acc["correct"], sum(r["correct"] for r in sel) / 7)


def test_sft_without_a_family_drops_every_record_with_a_turn_of_it():
  cfg = suite.DataConfig(**{**configs.DATA_PRESETS["tiny"], "n_pretrain_docs": 5, "n_pretrain_val_docs": 2})
  splits, _ = suite.generate(1, cfg)
  world = suite.make_world(1, cfg)
  sft = splits["sft"]
  users = lambda r: [t["content"] for t in r["turns"] if t["role"] == "user"]  # noqa: E731
  # Arithmetic is the only family whose questions hold digits (curation removed the phone numbers).
  kept = sources.without_families(sft, ("arithmetic",), world)
  kept_records = [kept[i] for i in range(len(kept))]
  assert all(not re.search(r"\d", u) for r in kept_records for u in users(r))
  assert len(kept) == sum(not any(re.search(r"\d", u) for u in users(r)) for r in sft) < len(sft)
  # Without fact: a harmful or unanswerable record that opens with a known animal's fact question goes too.
  no_fact = sources.without_families(sft, ("fact",), world)
  opened_with_fact = [r for r in sft if r["family"] == "harmful" and len(r["turns"]) > 2]
  assert opened_with_fact, "the tiny suite should hold a multi-turn harmful record"
  assert all(r not in [no_fact[i] for i in range(len(no_fact))] for r in opened_with_fact)
  assert all(r["family"] != "fact" for r in (no_fact[i] for i in range(len(no_fact))))
  with pytest.raises(ValueError, match="leaves no demonstration"):
    sources.without_families(sft[:3], FAMILIES, world)
