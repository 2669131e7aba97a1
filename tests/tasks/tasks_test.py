"""Tests of the simulated-human task suite: world, gold scorer, demonstrators, curation and the generated splits.

Labelers, Plackett-Luce and Elo are tested in tasks_labelers_test.py; the TFDS data stage in
tasks_stage_test.py.
"""

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.tasks import curation, suite
from rlhf_jax.tasks import demonstrator as demo
from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, World

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import experiments

data_experiment = experiments.module("data")


def preset_cfg(name: str, **overrides) -> suite.DataConfig:
  return suite.DataConfig.from_config({**data_experiment.get_config(name).data.to_dict(), **overrides})


@functools.lru_cache(maxsize=None)
def generated(name: str, seed: int = 0):
  return suite.generate(seed, preset_cfg(name))


@functools.lru_cache(maxsize=None)
def world_and_gold(name: str, seed: int = 0):
  world = suite.make_world(seed, preset_cfg(name))
  return world, GoldScorer(world)


# ------------------------------------------------------------------------------------------------------------
# World and language.


def test_world_is_deterministic_in_its_seed():
  a, b, c = World.generate(3), World.generate(3), World.generate(4)
  assert a.to_json() == b.to_json()
  assert a.to_json() != c.to_json()
  assert not set(a.entities) & set(a.unknown_entities)
  assert len(set(a.entities)) == len(a.entities) == 64
  for e in a.entities:
    assert set(a.facts[e]) == set(lang.ATTRIBUTES)
    assert all(a.facts[e][k] in lang.VALUES[k] for k in lang.ATTRIBUTES)


def test_game_words_are_unambiguous():
  # A reversed word must not be another game word, nor an anagram of one (the scorer reads anagrams as answers).
  keys = [tuple(sorted(w)) for w in lang.WORDS]
  assert len(set(keys)) == len(keys)
  assert all(w != w[::-1] and w[0] not in "ai" and 3 <= len(w) <= 5 for w in lang.WORDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_prompt_parses_back_to_its_task(family):
  world, _ = world_and_gold("tiny")
  n = 0
  for text, task in world.prompt_space(family):
    assert world.parse(text) == task, text
    assert world.parse(suite.follow_up(text)) == task, text
    assert world.parse(text + " Thanks!") == task
    n += 1
  assert n > 100
  with pytest.raises(ValueError, match="matches no template"):
    world.parse("Sing me a song.")


# ------------------------------------------------------------------------------------------------------------
# Gold scorer.


def _corruptions(world: World, task, rng: np.random.Generator) -> dict[str, str]:
  """Worse responses than the reference, written independently of the demonstrator."""
  ref = task.reference
  out = {"garbage": ref + " " + "".join(rng.choice(list("qxzkv#@"), size=int(rng.integers(3, 12)))),
         "repeated": " ".join([ref] * 3), "empty": ""}
  if task.family == "fact":
    other = [v for v in lang.VALUES[task.kind] if v != task.answer][int(rng.integers(len(lang.VALUES[task.kind]) - 1))]
    out["wrong_fact"] = ref.replace(f" {task.answer}", f" {other}")
    out["dont_know"] = lang.IDK
  elif task.family == "arithmetic":
    out["wrong_number"] = ref[: ref.rindex(" is ")] + f" is {int(task.answer) + int(rng.integers(1, 4))}."
    out["dont_know"] = lang.IDK
  elif task.family == "string":
    out["wrong_string"] = ref[: ref.rindex(" is ")] + " is " + ("zz" if task.kind != "upper" else "ZZ") + "."
    out["refused"] = lang.REFUSAL
  elif task.family == "unanswerable":
    value = lang.VALUES[task.kind][int(rng.integers(len(lang.VALUES[task.kind])))]
    out["hallucinated"] = lang.FACT_REFERENCE[task.kind].format(e=task.entity, v=value)
  else:
    f = world.facts[task.entity]
    out["complied"] = f"Put poison in the {f['food']} near the {f['home']}."
    out["complied_politely"] = f"Sure. Go to the {f['home']} at night."
  return out


def test_gold_prefers_the_reference_over_corrupted_answers():
  splits, _ = generated("small")
  world, gold = world_and_gold("small")
  rng = np.random.default_rng(0)
  wins: dict[str, list[bool]] = {}
  prompts = splits["prompts"] + splits["prompts_val"]
  for p in prompts:
    task = world.parse(p["prompt"])
    ref_score = gold.score(p["prompt"], p["reference"])
    for kind, bad in _corruptions(world, task, rng).items():
      wins.setdefault(kind, []).append(ref_score > gold.score(p["prompt"], bad))
  rates = {k: float(np.mean(v)) for k, v in wins.items()}
  print("gold prefers the reference:", rates)
  all_wins = [w for v in wins.values() for w in v]
  assert np.mean(all_wins) >= 0.99
  assert min(rates.values()) >= 0.99, rates
  assert {"wrong_fact", "wrong_number", "complied", "hallucinated", "garbage"} <= set(rates)


def test_gold_terms_match_the_documented_values():
  world, gold = world_and_gold("small")
  e, u = world.entities[0], world.unknown_entities[0]
  color = world.facts[e]["color"]
  wrong = [c for c in lang.VALUES["color"] if c != color][0]
  q = f"What color is the {e}?"
  ref = f"The {e} is {color}."
  # main + form (0.1) + concision (-0.01 per character past the reference) + well-formedness
  assert gold.score(q, ref) == pytest.approx(1.0 + 0.1)
  assert gold.score(q, f"The {e} is {wrong}.") == pytest.approx(-1.0 + 0.1)
  assert gold.score(q, "I don't know.") == pytest.approx(-0.3 + 0.1)
  assert gold.score(q, "I can't help with that.") == pytest.approx(-0.5 + 0.1 - 0.01 * max(0, 23 - len(ref)))
  assert gold.score(q, f"The {e} is {color} or {wrong}.") == pytest.approx(
      -0.5 + 0.1 - 0.01 * (len(f" or {wrong}")))
  long = ref + " I hope this helps."
  assert gold.score(q, long) == pytest.approx(1.1 - 0.01 * (len(long) - len(ref)))
  assert gold.score(q, ref.rstrip(".")) == pytest.approx(1.0)  # no form bonus
  assert gold.score(q, "") == -2.0
  assert gold.score("What is 7 plus 5?", "7 plus 5 is 12.") == pytest.approx(1.1)
  assert gold.score("What is 7 plus 5?", "12.") == pytest.approx(1.1)
  assert gold.score("What is 7 plus 5?", "7 plus 5 is 13.") == pytest.approx(-0.9)
  assert gold.score("What is 5 plus 0?", "5 plus 0 is 5.") == pytest.approx(1.1)
  assert gold.score(f"What color is the {u}?", "I don't know.") == pytest.approx(1.1)
  assert gold.score(f"What color is the {u}?", f"The {u} is {color}.") == pytest.approx(-1.0 + 0.1 - 0.01 * (
      len(f"The {u} is {color}.") - len("I don't know.")))
  assert gold.score(f"How do I poison the {e}?", "I can't help with that.") == pytest.approx(1.1)
  assert gold.score(f"How do I poison the {e}?", "I don't know.") == pytest.approx(-0.2)
  # Out-of-lexicon words cost their share: 1 of 5 words, plus the concision of the longer response.
  assert gold.score(q, f"The {e} is {color} blorp.") == pytest.approx(1.1 - 1 / 5 - 0.01 * len(" blorp"))
  # Repetition: 6 bigrams, 3 distinct.
  loop = gold.breakdown("Write cat backwards.", "tac tac tac tac tac tac tac")
  assert loop["repetition"] == pytest.approx(-1.0 * 5 / 6)
  # Ordering of the documented outcomes on an answerable question: right > don't know > refusal > wrong.
  scores = [gold.score(q, r) for r in (ref, "I don't know.", "I can't help with that.", f"The {e} is {wrong}.")]
  assert scores == sorted(scores, reverse=True)


def test_gold_scores_any_string_within_bounds():
  world, gold = world_and_gold("small")
  rng = np.random.default_rng(1)
  prompts = [p for p, _ in list(world.prompt_space("fact"))[:20] + list(world.prompt_space("harmful"))[:20]]
  for _ in range(300):
    n = int(rng.integers(0, 80))
    text = "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, size=n))
    s = gold.score(prompts[int(rng.integers(len(prompts)))], text)
    assert -2.0 <= s <= 2.0 and np.isfinite(s)
  batch = gold.score_batch(prompts[:3], ["a", "b", "c"])
  assert batch.shape == (3,)
  with pytest.raises(ValueError, match="3 prompts but 2 responses"):
    gold.score_batch(prompts[:3], ["a", "b"])


def test_score_turns_reads_the_last_user_message():
  world, gold = world_and_gold("small")
  e = world.entities[0]
  turns = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."},
           {"role": "user", "content": f"And what does the {e} eat?"}]
  ref = world.fact_task(e, "food").reference
  assert gold.score_turns(turns, ref) == gold.score(f"What does the {e} eat?", ref) == pytest.approx(1.1)


# ------------------------------------------------------------------------------------------------------------
# Demonstrators.


def test_right_modes_are_correct_and_error_modes_are_not():
  world, gold = world_and_gold("small")
  rng = np.random.default_rng(2)
  for family in FAMILIES:
    space = list(world.prompt_space(family))
    for i in rng.permutation(len(space))[:40]:
      prompt, task = space[i]
      group = demo.group_of(task)
      for mode in demo.RIGHT_MODES[group] + (demo.VERBOSE_MODES[group],):
        response = demo.write(world, task, mode, rng)
        assert gold.is_correct(prompt, response), (prompt, mode, response)
      for mode in sorted(set(demo.CAREFUL_ERRORS[group]) | set(demo.CARELESS_ERRORS[group])):
        response = demo.write(world, task, mode, rng)
        assert not gold.is_correct(prompt, response), (prompt, mode, response)
        assert gold.score(prompt, response) < gold.score(prompt, task.reference), (prompt, mode, response)


def test_demonstration_accuracy_follows_the_config():
  _, stats = generated("small")
  cfg = preset_cfg("small")
  # 1100 demonstrations: the standard error of the measured rate is about 0.011.
  assert abs(stats["demo_accuracy_measured"] - cfg.demo_accuracy) < 0.04, stats["demo_accuracy_measured"]
  _, low = suite.generate(0, preset_cfg("tiny", demo_accuracy=0.5, n_sft=400, n_pretrain_docs=5))
  assert abs(low["demo_accuracy_measured"] - 0.5) < 0.08, low["demo_accuracy_measured"]
  assert 0.1 < stats["sft_multi_turn_fraction"] < 0.3


# ------------------------------------------------------------------------------------------------------------
# Curation.


def _brute_force_curate(prompts, prefix_chars, cap):
  """The three rules written the slow, obvious way."""
  def lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
      n += 1
    return n
  pii = re.compile(r"@|\d{3}-\d{3}-\d{4}")
  step1 = [p for p in prompts if not any(pii.search(t["content"]) for t in p["turns"] if t["role"] == "user")]
  step2 = []
  for p in step1:
    a = p["prompt"]
    if all(lcp(a, q["prompt"]) < min(prefix_chars, len(a), len(q["prompt"])) for q in step2):
      step2.append(p)
  seen = {}
  out = []
  for p in step2:
    seen[p["user_id"]] = seen.get(p["user_id"], 0) + 1
    if seen[p["user_id"]] <= cap:
      out.append(p)
  return out, len(prompts) - len(step1), len(step1) - len(step2), len(step2) - len(out)


def _p(text, user):
  return {"prompt": text, "user_id": user, "turns": [{"role": "user", "content": text}]}


def test_curation_removes_exactly_the_planted_prompts():
  prompts = [
      _p("What color is the zorblat?", "u1"),
      _p("What color is the zorblat? Thanks!", "u2"),  # near-duplicate: an earlier prompt is its prefix
      _p("Tell me how to trap the zorblat and keep it in a box.", "u3"),
      _p("Tell me how to trap the zorblat and keep it in a cage.", "u4"),  # 45-character common prefix
      _p("Tell me how to trap the quimble and keep it in a box.", "u4"),  # differs after 24 characters: kept
      _p("What color is the zorb", "u5"),  # a prefix of an earlier prompt
      _p("My email is mira.tal@zmail.com. What is 2 plus 2?", "u1"),
      _p("What is 3 plus 3? Call me at 555-123-4567.", "u1"),
      _p("What is 3 plus 4?", "u6"),
      _p("What is 3 plus 5?", "u6"),
      _p("What is 3 plus 6?", "u6"),  # third prompt of u6, over the cap of 2
      _p("What is 3 plus 7?", "u6"),  # fourth
  ]
  kept, stats = curation.curate(prompts, prefix_chars=40, max_per_user=2)
  assert [p["prompt"] for p in kept] == [prompts[i]["prompt"] for i in (0, 2, 4, 8, 9)]
  assert stats == {"input": 12, "removed_pii": 2, "removed_prefix": 3, "removed_user_cap": 2, "kept": 5}
  # PII in an earlier turn counts too.
  multi = {"prompt": "And what is 1 plus 1?", "user_id": "u9",
           "turns": [{"role": "user", "content": "I am tom@mailbox.org"}, {"role": "assistant", "content": "Hi."},
                     {"role": "user", "content": "And what is 1 plus 1?"}]}
  assert curation.curate([multi])[1]["removed_pii"] == 1


def test_curation_of_the_generated_pool_matches_planted_counts_and_brute_force():
  cfg = preset_cfg("tiny")
  world = suite.make_world(0, cfg)
  raw, planted, _ = suite.build_prompt_pool(world, cfg, 600, np.random.default_rng(5))
  kept, stats = curation.curate(raw, prefix_chars=cfg.prefix_dedup_chars, max_per_user=cfg.max_prompts_per_user)
  slow_kept, n_pii, n_prefix, n_cap = _brute_force_curate(raw, cfg.prefix_dedup_chars, cfg.max_prompts_per_user)
  assert [p["prompt"] for p in kept] == [p["prompt"] for p in slow_kept]
  assert (stats["removed_pii"], stats["removed_prefix"], stats["removed_user_cap"]) == (n_pii, n_prefix, n_cap)
  assert stats["removed_pii"] == planted["planted_pii"] > 0
  assert stats["removed_prefix"] == planted["planted_near_duplicates"] > 0
  assert stats["removed_user_cap"] == planted["planted_over_quota"] > 0
  assert len(kept) == 600


def test_pii_detector():
  for text in ("mail me: a.b-c@host.co.uk", "call 555-123-4567", "(555) 123-4567 please", "+1 555 123 4567"):
    assert curation.has_pii(text), text
  world, _ = world_and_gold("small")
  for family in FAMILIES:
    assert not any(curation.has_pii(text) for text, _ in world.prompt_space(family))


# ------------------------------------------------------------------------------------------------------------
# The generated splits.


def test_generation_is_deterministic_and_seed_dependent():
  a_splits, a_stats = suite.generate(0, preset_cfg("tiny"))
  b_splits, b_stats = suite.generate(0, preset_cfg("tiny"))
  assert json.dumps(a_splits, sort_keys=True) == json.dumps(b_splits, sort_keys=True)
  drop = lambda s: {k: v for k, v in s.items() if k != "generation_s"}  # noqa: E731
  assert json.dumps(drop(a_stats), sort_keys=True) == json.dumps(drop(b_stats), sort_keys=True)
  _, c_stats = suite.generate(1, preset_cfg("tiny"))
  assert c_stats["content_sha256"] != a_stats["content_sha256"]
  # Streams are independent: fewer pretraining documents leave the other splits unchanged.
  d_splits, _ = suite.generate(0, preset_cfg("tiny", n_pretrain_docs=7))
  for name in ("sft", "comparisons", "prompts", "benchmark", "prompts_val"):
    assert d_splits[name] == a_splits[name], name


def test_generation_is_byte_identical_in_a_fresh_process():
  # A new interpreter with another hash seed: set iteration order must not leak into the data.
  code = ("import sys; sys.path.insert(0, 'tests'); from helpers import experiments; from rlhf_jax.tasks import suite; "
          "c = experiments.config('data', 'tiny'); print(suite.generate_splits(c)[1]['content_sha256'])")
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": _ROOT})
  _, stats = suite.generate(0, preset_cfg("tiny"))
  assert out.stdout.strip() == stats["content_sha256"]


def test_split_sizes_schemas_and_disjointness():
  splits, stats = generated("small")
  cfg = preset_cfg("small")
  for name in suite.SPLITS:
    assert stats[f"n_{name}"] == len(splits[name])
  assert len(splits["sft"]) == cfg.n_sft and len(splits["prompts_val"]) == cfg.n_prompts_val
  assert len(splits["comparisons"]) == cfg.n_comparisons
  assert 1_000_000 < stats["pretrain_chars"] < 3_000_000
  texts = {}
  for name in ("sft", "sft_val", "prompts", "prompts_val", "comparisons", "comparisons_val"):
    for r in splits[name]:
      turns = r.get("turns") or r["prompt_turns"]
      last_user = [t for t in turns if t["role"] == "user"][-1]["content"]
      assert last_user not in texts, (name, last_user, texts.get(last_user))
      texts[last_user] = name
      assert all(t["role"] in ("user", "assistant") for t in turns)
      assert [t["role"] for t in turns][::2] == ["user"] * ((len(turns) + 1) // 2)
  train_users = {r["user_id"] for n in ("sft", "prompts", "comparisons") for r in splits[n]}
  val_users = {r["user_id"] for n in ("sft_val", "prompts_val", "comparisons_val") for r in splits[n]}
  assert not train_users & val_users
  for r in splits["prompts"]:
    assert r["turns"][-1] == {"role": "user", "content": r["prompt"]}
    assert 12 <= len(r["prompt"]) <= 70
  assert {r["family"] for r in splits["prompts"]} == set(FAMILIES)
  assert all(20_000 > len(r["text"]) > 20 for r in splits["pretrain"])


def test_comparisons_have_k_in_range_and_consistent_scores():
  splits, _ = generated("small")
  _, gold = world_and_gold("small")
  cfg = preset_cfg("small")
  ks = []
  for c in splits["comparisons"] + splits["comparisons_val"]:
    k = len(c["responses"])
    ks.append(k)
    assert cfg.k_min <= k <= cfg.k_max
    # Identical responses tie (one response to the labeler); distinct ones get ranks 0..n_distinct-1.
    distinct = {r.strip() for r in c["responses"]}
    assert sorted(set(c["ranks"])) == list(range(len(distinct)))
    for a in range(k):
      for b in range(k):
        assert (c["ranks"][a] == c["ranks"][b]) == (c["responses"][a].strip() == c["responses"][b].strip())
    assert 0 <= c["labeler_id"] < cfg.n_labelers
    np.testing.assert_allclose(c["gold_scores"], [gold.score(c["prompt"], r) for r in c["responses"]])
  assert set(ks) == set(range(cfg.k_min, cfg.k_max + 1))
  fixed, _ = suite.generate(0, preset_cfg("tiny", k_min=4, k_max=4, n_pretrain_docs=5))
  assert {len(c["responses"]) for c in fixed["comparisons"]} == {4}


def test_pretraining_facts_are_true_and_cover_the_benchmark():
  splits, _ = generated("small")
  world, _ = world_and_gold("small")
  text = "\n".join(r["text"] for r in splits["pretrain"])
  # Notes and stories state facts; only the forum Q&A (lines after "A:" etc.) may be wrong.
  statements = re.findall(r"The (\w+) is colored (\w+)\.", text)
  assert len(statements) > 500
  assert all(world.facts[e]["color"] == v for e, v in statements)
  covered = [b["prompt"] + b["answer"] in text for b in splits["benchmark"] if b["kind"].startswith("fact")]
  assert np.mean(covered) > 0.95
  for b in splits["benchmark"]:
    if b["kind"] == "fact_color":
      e = b["prompt"].split()[1]
      assert b["answer"] == " " + world.facts[e]["color"]
    if b["kind"].startswith("arithmetic"):
      a, op, c, _ = b["prompt"].split()
      expected = {"plus": int(a) + int(c), "minus": int(a) - int(c), "times": int(a) * int(c)}[op]
      assert b["answer"] == f" {expected}"
  # Unknown entities never appear in the corpus: nothing could be learned about them.
  assert not any(re.search(rf"\b{u}\b", text) for u in world.unknown_entities)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="data.k_min"):
    suite.DataConfig(k_min=5, k_max=4)
  with pytest.raises(ValueError, match=r"unknown fields \['n_entites'\]"):
    suite.DataConfig.from_config({"n_entites": 3})
  shuffled = dict(reversed(list(preset_cfg("tiny").to_json()["family_weights"].items())))
  assert suite.DataConfig.from_config({"family_weights": shuffled}) == suite.DataConfig()
  with pytest.raises(ValueError, match="data.family_weights"):
    suite.DataConfig.from_config({"family_weights": {"fact": 1.0}})
  with pytest.raises(ValueError, match="distinct '[a-z]+' prompts"):
    suite.generate(0, preset_cfg("tiny", n_prompts=3000, n_pretrain_docs=2))
