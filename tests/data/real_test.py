"""Tests for rlhf_jax/data/real.py: parsing user files (JSONL, JSON, Parquet) into TFDS datasets, and the error
for each bad input."""

import gzip
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import real
from rlhf_jax.data import tfds_io


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else
               (line if isinstance(line, str) else json.dumps(line)).encode("utf-8")) + b"\n")
  return str(path)


HH_GOOD = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five, probably."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken...",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."},
]


def test_hh_pairs_records(tmp_path):
  path = _write_lines(tmp_path / "hh.jsonl", HH_GOOD + [""])  # a trailing blank line is allowed
  out = real.prepare_hh_pairs(path, str(tmp_path / "data"))
  src = tfds_io.load_split("hh_pairs", str(tmp_path / "data"), "train")
  assert len(src) == 2
  assert tfds_io.load_split_dir(out, "train")[1]["responses"] == src[1]["responses"]
  r0, r1 = src[0], src[1]
  assert r0["prompt_turns"] == [{"role": "user", "content": "What is 2+2?"}]
  assert r0["responses"] == ["4.", "Five, probably."]
  assert r0["ranks"].tolist() == [0, 1]
  assert r1["prompt_turns"] == [
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Tell me a joke"}]
  assert r1["responses"] == ["Why did the chicken...", "No."]
  meta = tfds_io.read_metadata(out)
  assert meta["splits"]["train"]["records"] == 2 and meta["splits"]["train"]["skipped"] == 0


def test_rankings_records_with_ties_and_turn_prompts(tmp_path):
  lines = [
      {"prompt": "Name a colour.", "responses": ["red", "blue", "uh"], "ranking": [0, 0, 1]},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
       "responses": ["a", "b", "c", "d"], "ranking": [3, 1, 0, 2]},
  ]
  real.prepare_rankings({"train": _write_lines(tmp_path / "r.jsonl", lines),
                         "test": _write_lines(tmp_path / "t.jsonl", lines[:1])}, str(tmp_path / "d"))
  src = tfds_io.load_split("rankings", str(tmp_path / "d"), "train")
  assert src[0]["prompt_turns"] == [{"role": "user", "content": "Name a colour."}]
  assert src[0]["responses"] == ["red", "blue", "uh"]
  np.testing.assert_array_equal(src[0]["ranks"], [0, 0, 1])
  assert src[1]["prompt_turns"][0] == {"role": "system", "content": "Be brief."}
  np.testing.assert_array_equal(src[1]["ranks"], [3, 1, 0, 2])
  assert len(tfds_io.load_split("rankings", str(tmp_path / "d"), "test")) == 1


def test_sft_both_formats(tmp_path):
  turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
  path = _write_lines(tmp_path / "s.jsonl", [{"prompt": "Say hi", "response": "hi"}, {"turns": turns}])
  real.prepare_sft(path, str(tmp_path / "d"))
  src = tfds_io.load_split("sft", str(tmp_path / "d"), "train")
  assert src[0]["turns"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
  assert src[1]["turns"] == turns


def test_changed_file_is_noticed_and_skip_mode_counts(tmp_path):
  path = _write_lines(tmp_path / "hh.jsonl", HH_GOOD)
  real.prepare_hh_pairs(path, str(tmp_path / "d"))
  _write_lines(path, HH_GOOD + [{"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x\n\nAssistant: y"}])
  with pytest.raises(ValueError, match="the input changed"):
    real.prepare_hh_pairs(path, str(tmp_path / "d"))
  out = real.prepare_hh_pairs(path, str(tmp_path / "d2"), on_error="skip")
  assert len(tfds_io.load_split("hh_pairs", str(tmp_path / "d2"), "train")) == 2
  meta = tfds_io.read_metadata(out)["splits"]["train"]
  assert meta["skipped"] == 1 and "hh.jsonl:3" in meta["errors"][0]


# (preparer, lines, message). The message must name the line (1-based) and the field.
BAD_INPUTS = {
    "invalid_json": (real.prepare_rankings, ['{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}',
                                             '{"prompt": "p", "responses": '],
                     r"r\.jsonl:2: invalid JSON"),
    "not_utf8": (real.prepare_sft, [b'{"prompt": "caf\xe9", "response": "ok"}'],
                 r"r\.jsonl:1: not valid UTF-8"),
    "not_object": (real.prepare_sft, ['["prompt", "response"]'], r"r\.jsonl:1: expected a JSON object, got list"),
    "missing_field": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"]}],
                      r"r\.jsonl:1: missing field 'ranking'"),
    "wrong_type": (real.prepare_rankings, [{"prompt": "p", "responses": "a b", "ranking": [0, 1]}],
                   r"r\.jsonl:1: field 'responses': expected a list of at least 2 response strings, got str"),
    "one_response": (real.prepare_rankings, [{"prompt": "p", "responses": ["a"], "ranking": [0]}],
                     r"r\.jsonl:1: field 'responses': expected at least 2 responses to compare, got 1"),
    "ranking_length": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}],
                       r"r\.jsonl:1: field 'ranking': has 2 ranks but 'responses' has 3"),
    "rank_not_int": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1.5]}],
                     r"r\.jsonl:1: field 'ranking', item 1: expected a non-negative integer rank, got 1\.5"),
    "rank_bool": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, True]}],
                  r"r\.jsonl:1: field 'ranking', item 1: expected a non-negative integer rank, got True"),
    "all_tied": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}],
                 r"r\.jsonl:1: field 'ranking': all responses are tied"),
    "empty_response": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "  "], "ranking": [0, 1]}],
                       r"r\.jsonl:1: field 'responses', item 1: the response is empty"),
    "hh_no_final_assistant": (real.prepare_hh_pairs,
                              [HH_GOOD[0], {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
                                            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"}],
                              r"r\.jsonl:2: field 'chosen': the dialogue must end with an Assistant turn"),
    "hh_empty_reply": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: ",
                                                "rejected": "\n\nHuman: a\n\nAssistant: b"}],
                       r"r\.jsonl:1: field 'chosen': the final Assistant reply is empty"),
    "hh_prefix_mismatch": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                    "rejected": "\n\nHuman: OTHER\n\nAssistant: b"}],
                           r"r\.jsonl:1: fields 'chosen' and 'rejected': expected the same dialogue"),
    "hh_missing_rejected": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: b"}],
                            r"r\.jsonl:1: missing field 'rejected'"),
    "sft_unknown_role": (real.prepare_sft, [{"turns": [{"role": "bot", "content": "x"}]}],
                         r"r\.jsonl:1: field 'turns', turn 0: unknown role 'bot'"),
    "sft_no_assistant": (real.prepare_sft, [{"turns": [{"role": "user", "content": "x"}]}],
                         r"r\.jsonl:1: expected at least one non-empty assistant turn"),
    "sft_response_type": (real.prepare_sft, [{"prompt": "p", "response": 3}],
                          r"r\.jsonl:1: field 'response': expected a string, got int"),
    "empty_file": (real.prepare_sft, ["", "  "], r"r\.jsonl: the file has no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_line_and_field(tmp_path, case):
  prepare, lines, message = BAD_INPUTS[case]
  path = _write_lines(tmp_path / "r.jsonl", lines)
  with pytest.raises(ValueError, match=message):
    prepare(path, str(tmp_path / "d"))
  # Nothing is published for a failed conversion.
  assert not any(os.path.isdir(os.path.join(tmp_path, "d", n, "1.0.0")) for n in ("sft", "rankings", "hh_pairs"))


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    real.prepare_sft(str(tmp_path / "nope.jsonl"), str(tmp_path / "d"))


# ----------------------------------------------------------------------------------------------------------
# The public schemas (real.prepare / real.check) on committed fixtures: small invented files in each schema's
# published layout, written by `make_fixtures` (to rewrite them: PYTHONPATH=. python tests/data/real_test.py).

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_fixtures")

# (question, best, okay, bad answer)
_QA = [
    ("How long should I boil an egg for a firm yolk?",
     "About 9 to 12 minutes once the water is boiling, then cool it in cold water so it peels easily.",
     "Around ten minutes usually works.", "Eggs can't be boiled."),
    ("What's a good way to start running if I've never exercised?",
     "Start with walk-run intervals three times a week, say one minute jogging and two walking for twenty minutes, "
     "and add a little each week.", "Go for short runs and build up slowly.",
     "Sign up for a marathon next month to force yourself."),
    ("Can you explain what compound interest is?",
     "It is interest earned on the original amount and on the interest already added, so the balance grows faster "
     "over time.", "It's when interest keeps adding up.", "It is a fee banks charge for opening an account."),
    ("How do I get my dog to stop pulling on the leash?",
     "Stop walking whenever the leash goes tight and reward your dog when it comes back to your side; short, "
     "consistent sessions work best.", "Try a different harness.", "Pull back harder than the dog does."),
    ("What should I pack for a three-day hiking trip?",
     "Layers for warmth and rain, a map, water and a way to purify it, enough food, a first-aid kit, a headlamp and "
     "shelter suited to the weather.", "Water, food and a jacket.",
     "Just your phone, you can buy everything on the trail."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight far more than red ones, so blue light reaches your "
     "eyes from every direction.", "Because of how sunlight scatters in the air.",
     "It reflects the color of the ocean."),
    ("How can I stop my houseplants from dying?",
     "Check how much light each plant needs, water only when the top few centimeters of soil are dry, and make "
     "sure the pots drain.", "Water them less often.", "Keep them in a closet so they don't get stressed."),
    ("Write a polite email asking my landlord to fix the heating.",
     "Hi Sam, the heating in my flat has not worked since Monday. Could you arrange a repair this week? I'm home "
     "most evenings. Thanks, Alex", "Hi, the heating is broken, please fix it.",
     "Fix the heating now or I stop paying rent."),
    ("What's the difference between a virus and bacteria?",
     "Bacteria are single-celled organisms that live on their own; viruses are much smaller and only reproduce "
     "inside a host's cells, so antibiotics work on bacteria but not on viruses.",
     "Viruses are smaller than bacteria.", "They are the same thing."),
    ("How do I apologize to a friend I hurt?",
     "Say specifically what you did, acknowledge how it affected them without excuses, ask what would help, and "
     "follow through.", "Just say sorry and mean it.", "Wait until they forget about it."),
    ("Give me a quick vegetarian dinner idea.",
     "Chickpea curry: fry onion, garlic and curry paste, add a can each of chickpeas and tomatoes, simmer ten "
     "minutes and stir in spinach. Serve with rice.", "Pasta with vegetables.", "Skip dinner."),
    ("How many hours of sleep do adults need?",
     "Most adults need seven to nine hours a night; regular sleep and wake times matter too.",
     "About eight hours.", "Four hours is plenty if you drink coffee."),
]
_GREETING = ("Hi, can you help me with something?", "Of course, what do you need?")
_SYSTEM = "You are a helpful, concise assistant."

# (subreddit, title, post, [good, medium, bad summary]); OpenAI's summaries start with a space.
_POSTS = [
    ("relationships", "My (26F) boyfriend (28M) accepted a job across the country without asking me",
     "We've been together three years and live twenty minutes from my parents. Last night he told me he accepted "
     "an offer in Seattle and that we move in two months. He never mentioned he was interviewing. I love him, but "
     "I like my job and my mom is recovering from surgery. When I said I needed time to think he called me "
     "unsupportive. Am I wrong to be upset that he decided for both of us?",
     [" Boyfriend took a job across the country without telling me and expects me to move in two months; I'm "
      "upset he decided for both of us.", " Boyfriend is moving for a job and wants me to come.",
      " I love my boyfriend."]),
    ("personalfinance", "22 with my first full-time job: pay off my car loan or start saving?",
     "I just started at $48k a year. I have $6,000 left on a car loan at 4.5% and about $1,500 in savings. My "
     "employer matches 401k contributions up to 4%. No credit card debt. Should I throw everything at the loan or "
     "build an emergency fund first?",
     [" New job, $6k car loan at 4.5%, $1.5k saved and a 401k match: pay off the loan or save first?",
      " Should I pay off my car?", " I got a job."]),
    ("tifu", "TIFU by sending my boss a meme meant for my sister",
     "My sister and I send each other memes about work all day. This morning I was laughing at one about "
     "pointless meetings and hit send without checking the chat. It went to my boss, five minutes before our "
     "weekly meeting. She replied with a thumbs up and nothing else, and I had to sit across from her for an hour.",
     [" Sent a meme mocking meetings to my boss instead of my sister right before our meeting; she replied with a "
      "thumbs up.", " Sent a meme to the wrong person.", " Memes are funny."]),
    ("running", "Knee pain after increasing my mileage: rest or push through?",
     "I went from 15 to 30 miles a week over three weeks while training for a half marathon. Now the outside of "
     "my right knee hurts after about four miles and stops when I stop. No swelling. The race is in six weeks. "
     "Should I keep running slower or take time off?",
     [" Doubled weekly mileage in three weeks, now outer knee pain after four miles; race in six weeks, rest or "
      "keep running?", " My knee hurts when I run.", " Running a half marathon."]),
    ("dogs", "Our rescue dog barks at every person who walks past the window",
     "We adopted a two-year-old mix a month ago. She is sweet with us but barks nonstop whenever someone walks "
     "past the front window, sometimes for ten minutes. We both work from home, so calls are hard. Yelling "
     "'quiet' seems to make her more excited.",
     [" New rescue dog barks for minutes at everyone passing the window and yelling makes it worse; we work from "
      "home.", " Our dog barks a lot.", " We adopted a dog."]),
    ("legaladvice", "Landlord kept my whole deposit for 'cleaning' after I left the apartment spotless",
     "I moved out of my apartment in Ohio after two years and photographed every room the day I left. The "
     "landlord wrote that the whole $1,200 deposit went to cleaning and new carpet. The carpet was already ten "
     "years old when I moved in. What are my options?",
     [" Landlord kept my full $1,200 deposit for cleaning and old carpet although I have move-out photos; what "
      "can I do?", " Landlord kept my deposit.", " I moved apartments."]),
    ("Cooking", "Why does my homemade bread come out dense every time?",
     "I've baked five loaves from the same basic recipe: flour, water, salt and instant yeast. They rise a little "
     "but the crumb is always tight and heavy. My kitchen is cold in winter, about 17C, and I knead for about "
     "five minutes by hand.",
     [" My bread is always dense; the cold kitchen (17C) and only five minutes of kneading may be why.",
      " Bread is dense.", " I like bread."]),
    ("AskReddit", "What's a skill that took you under a month to learn but you use every day?",
     "I'm picking something small to learn this month. For me it was touch typing: about three weeks of practice "
     "and it saves me time every day. What's yours?",
     [" Asking for skills that take under a month to learn but pay off daily, as touch typing did for me.",
      " What skill should I learn?", " Typing."]),
]
_PAIRS = [(0, 1), (0, 2), (1, 2)]


def _tldr_format(subreddit, title, post):
  """The TL;DR prompt written out independently of real.py (parts with a missing field left out)."""
  parts = ([f"SUBREDDIT: r/{subreddit}"] if subreddit else []) + ([f"TITLE: {title}"] if title else [])
  return "\n\n".join(parts + [f"POST: {post}"]) + "\n\nTL;DR:"


def _hh_text(turns):
  return "".join(f"\n\n{'Human' if role == 'user' else 'Assistant'}: {content}" for role, content in turns)


_SUBJECTS = ("My neighbour", "The city council", "A friend of mine", "Our landlord", "The new manager", "My sister",
             "The local library", "A small bakery", "The school board", "My roommate", "The bus company", "Our team")
_VERBS = ("decided to", "finally agreed to", "refused to", "quietly planned to", "announced it would", "tried to")
_OBJECTS = ("repaint the old fence", "open on Sundays", "cut the budget for parks", "move across the country",
            "adopt a rescue dog", "start a running club", "replace the broken heater", "learn to play the violin",
            "raise the rent by ten percent", "plant tomatoes on the balcony", "switch to a four-day week")
_FOLLOW = ("Nobody was surprised.", "Everyone had an opinion about it.", "It took three meetings to settle.",
           "The results were better than expected.", "Some people complained online.", "It was a long week.",
           "We will see how it goes next month.", "Honestly, it made sense in the end.")


def _pretrain_texts():
  """32 short documents of plain text (PPO-ptx's pretraining text in experiments/tldr and hh)."""
  rng = random.Random(7)
  out = []
  for _ in range(32):
    sents = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(rng.randint(2, 4))]
    sents.insert(rng.randint(1, len(sents)), rng.choice(_FOLLOW))
    out.append({"text": " ".join(sents)})
  return out


def _fixture_rows():
  """file name -> rows, for every schema's fixture."""
  rng = random.Random(0)
  hh, rankings, sft, pairs, prompts, ultra = [], [], [], [], [], []
  for i, (q, best, okay, bad) in enumerate(_QA):
    for multi in (False, True):
      before = [("user", _GREETING[0]), ("assistant", _GREETING[1])] if multi else []
      good, worse = (best, bad) if multi else (best, okay)
      hh.append({"chosen": _hh_text(before + [("user", q), ("assistant", good)]),
                 "rejected": _hh_text(before + [("user", q), ("assistant", worse)])})
    responses = [best, okay, bad] + (["I'm not sure."] if i % 3 == 0 else [])
    order = list(range(len(responses)))
    rng.shuffle(order)
    prompt = q if i % 2 else [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": q}]
    rankings.append({"prompt": prompt, "responses": [responses[j] for j in order],
                     "ranking": [min(j, 2) for j in order]})  # "not sure" ties with the bad answer
    sft.append({"prompt": q, "response": best})
    sft.append({"turns": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _GREETING[0]},
                          {"role": "assistant", "content": _GREETING[1]}, {"role": "user", "content": q},
                          {"role": "assistant", "content": best}]})
    pairs.append({"prompt": q, "chosen": best, "rejected": bad, "source": "invented"})
    pairs.append({"prompt": [{"role": "user", "content": _GREETING[0]},
                             {"role": "assistant", "content": _GREETING[1]}, {"role": "user", "content": q}],
                  "chosen": okay, "rejected": bad})
    prompts.append({"prompt": q} if i % 3 else {"query": q})
    prompts.append({"prompt": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": q}]})
    for k, (worse, score) in enumerate(((okay, 6.5), (bad, 2.0))):
      head = [{"role": "system", "content": _SYSTEM}] if (i + k) % 5 == 0 else []
      chosen = head + [{"role": "user", "content": q}, {"role": "assistant", "content": best}]
      ultra.append({"prompt": q, "prompt_id": hashlib.sha256(f"{q}{k}".encode()).hexdigest(), "chosen": chosen,
                    "rejected": chosen[:-1] + [{"role": "assistant", "content": worse}], "messages": chosen,
                    "score_chosen": 9.0, "score_rejected": score})
  comparisons, tldr = [], []
  for p, (subreddit, title, post, summaries) in enumerate(_POSTS):
    for k, (a, b) in enumerate(_PAIRS):
      flip = rng.random() < 0.5
      first, second = (b, a) if flip else (a, b)
      noisy = (3 * p + k) % 7 == 3  # labelers disagree sometimes
      better = 1 if flip else 0
      info = {"id": f"t3_{p:02d}x{k}", "post": post, "title": title, "subreddit": subreddit}
      if p == 7:
        del info["subreddit"]  # a post without a subreddit: its prompt has no SUBREDDIT line
      comparisons.append({
          "info": info, "split": "valid1" if p == 6 else "train",
          "summaries": [{"text": summaries[first], "policy": f"sup{first}", "note": None},
                        {"text": summaries[second], "policy": f"sup{second}", "note": None}],
          "choice": 1 - better if noisy else better, "worker": f"w{(p + k) % 5}", "batch": "batch3",
          "extra": {"confidence": 1 + (p + k) % 9}})
      if k % 2:
        tldr.append({"prompt": _tldr_format(subreddit, title, post), "completion": summaries[a]})
      else:
        tldr.append({"id": f"t3_{p:02d}s{k}", "subreddit": subreddit, "title": title, "post": post,
                     "summary": summaries[a]})
  parquet_comparisons = [dict(c, info={**c["info"], "subreddit": c["info"].get("subreddit"), "site": None,
                                        "article": None}) for c in comparisons[:12]]
  return {
      "hh.jsonl": hh, "rankings.jsonl": rankings, "sft.jsonl": sft, "pairs.jsonl": pairs, "prompts.jsonl": prompts,
      "summarize_batch.json": comparisons,  # JSON Lines under a .json name, as OpenAI ships batch*.json
      "summarize_from_feedback.parquet": parquet_comparisons,  # the hub's layout: struct columns, nulls
      "tldr_sft.json": tldr,  # a JSON list
      "ultrafeedback.parquet": ultra,
      "pretrain_text.jsonl": _pretrain_texts(),
  }


FIXTURE_SCHEMAS = {
    "hh.jsonl": "hh", "rankings.jsonl": "rankings", "sft.jsonl": "sft", "pairs.jsonl": "pairs",
    "prompts.jsonl": "prompts", "summarize_batch.json": "summarize_from_feedback",
    "summarize_from_feedback.parquet": "summarize_from_feedback", "tldr_sft.json": "tldr_sft",
    "ultrafeedback.parquet": "ultrafeedback", "pretrain_text.jsonl": "text",
}


# The hub's column types for summarize_from_feedback (its CNN/DM fields are typed strings, null in TL;DR rows).
_SUMMARIZE_PARQUET_SCHEMA = pa.schema([
    ("info", pa.struct([(k, pa.string()) for k in ("id", "post", "title", "subreddit", "site", "article")])),
    ("split", pa.string()),
    ("summaries", pa.list_(pa.struct([("text", pa.string()), ("policy", pa.string()), ("note", pa.string())]))),
    ("choice", pa.int32()), ("worker", pa.string()), ("batch", pa.string()),
    ("extra", pa.struct([("confidence", pa.int32())])),
])


def _write_rows(path, rows, *, json_lines=False, schema=None):
  """rows -> a file in the format its name says (.jsonl, .json as a list or as JSON Lines, .parquet)."""
  path = str(path)
  if path.endswith(".parquet"):
    # Every column in every row, null where a row lacks it (from_pylist would take the first row's keys only).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    rows = [{k: row.get(k) for k in columns} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=8)  # several row groups
  elif path.endswith(".json") and not json_lines:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
      f.write("\n")
  else:
    _write_lines(path, rows)
  return path


def make_fixtures(folder):
  os.makedirs(folder, exist_ok=True)
  for name, rows in _fixture_rows().items():
    _write_rows(os.path.join(folder, name), rows, json_lines=name == "summarize_batch.json",
                schema=_SUMMARIZE_PARQUET_SCHEMA if name == "summarize_from_feedback.parquet" else None)


def _read_rows(path):
  """The rows of a file, read without real.py."""
  if path.endswith(".parquet"):
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json") and text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _turns(prompt):
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
      [{"role": t["role"], "content": t["content"]} for t in prompt]


def _expected(schema, row):
  """The record real.prepare should make from `row` (not "hh", see its test), derived without real.py."""
  if schema == "summarize_from_feedback":
    info = row["info"]
    return {"prompt_turns": _turns(_tldr_format(info.get("subreddit"), info.get("title"), info["post"])),
            "responses": [s["text"].strip() for s in row["summaries"]],
            "ranks": [0, 1] if row["choice"] == 0 else [1, 0]}
  if schema == "ultrafeedback":
    return {"prompt_turns": _turns(row["chosen"][:-1]),
            "responses": [row["chosen"][-1]["content"], row["rejected"][-1]["content"]], "ranks": [0, 1]}
  if schema == "pairs":
    return {"prompt_turns": _turns(row["prompt"]), "responses": [row["chosen"], row["rejected"]], "ranks": [0, 1]}
  if schema == "rankings":
    return {"prompt_turns": _turns(row["prompt"]), "responses": row["responses"], "ranks": row["ranking"]}
  if schema == "sft":
    return {"turns": _turns(row["turns"]) if "turns" in row else
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]}
  if schema == "tldr_sft":
    if "prompt" in row:
      prompt, completion = row["prompt"], row["completion"]
    else:
      prompt, completion = _tldr_format(row["subreddit"], row["title"], row["post"]), row["summary"]
    return {"turns": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]}
  if schema == "text":
    return {"text": row["text"]}
  assert schema == "prompts", schema
  return {"prompt_turns": _turns(row["prompt"] if "prompt" in row else row["query"])}


def _plain(record):
  return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in record.items()}


def test_fixtures_are_what_make_fixtures_writes(tmp_path):
  make_fixtures(str(tmp_path))
  assert sorted(os.listdir(FIXTURES)) == sorted(FIXTURE_SCHEMAS) == sorted(os.listdir(tmp_path))
  for name in FIXTURE_SCHEMAS:
    fixture, fresh = os.path.join(FIXTURES, name), str(tmp_path / name)
    if name.endswith(".parquet"):  # compare content: the bytes name the pyarrow version that wrote them
      assert pq.read_table(fixture).equals(pq.read_table(fresh)), name
    else:
      with open(fixture, "rb") as a, open(fresh, "rb") as b:
        assert a.read() == b.read(), f"{name}: run PYTHONPATH=. python tests/data/real_test.py to rewrite the fixtures"
    assert 12 <= len(_read_rows(fixture)) <= 48


@pytest.mark.parametrize("name", sorted(FIXTURE_SCHEMAS))
def test_schema_converts_and_reads_back(tmp_path, name):
  schema, path = FIXTURE_SCHEMAS[name], os.path.join(FIXTURES, name)
  rows = _read_rows(path)
  assert real.check(schema, path) == len(rows)
  out = real.prepare(schema, path, str(tmp_path))
  assert os.path.basename(os.path.dirname(out)).startswith(real.SCHEMAS[schema].kind + "_")
  assert tfds_io.read_schema(out) == dict(real.SCHEMAS[schema].features)
  meta = tfds_io.read_metadata(out)["splits"]["train"]
  assert meta["records"] == len(rows) and meta["skipped"] == 0 and meta["source"] == path
  src = tfds_io.load_split_dir(out, "train")
  assert len(src) == len(rows)
  for i, row in enumerate(rows):
    got = _plain(src[i])
    if schema == "hh":  # the record rendered back to HH text is the file's text
      turns = [(t["role"], t["content"]) for t in got["prompt_turns"]]
      assert _hh_text(turns + [("assistant", got["responses"][0])]) == row["chosen"], i
      assert _hh_text(turns + [("assistant", got["responses"][1])]) == row["rejected"], i
      assert got["ranks"] == [0, 1]
    else:
      assert got == _expected(schema, row), (name, i)


def test_summarize_prompt_is_the_tldr_format():
  """One record written out by hand, so the format itself (not only its two implementations) is pinned."""
  rows = _read_rows(os.path.join(FIXTURES, "summarize_batch.json"))
  assert real.SCHEMAS["summarize_from_feedback"].parse(rows[0])["prompt_turns"][0]["content"] == (
      "SUBREDDIT: r/relationships\n\nTITLE: My (26F) boyfriend (28M) accepted a job across the country without "
      "asking me\n\nPOST: " + _POSTS[0][2] + "\n\nTL;DR:")
  assert real.SCHEMAS["summarize_from_feedback"].parse(rows[-1])["prompt_turns"][0]["content"].startswith(
      "TITLE: What's a skill")  # no subreddit: no SUBREDDIT line


def _summary_row(**changes):
  row = json.loads(json.dumps(_fixture_rows()["summarize_batch.json"][0]))
  row.update(changes)
  return row


def _ultra_row(k=0):
  return json.loads(json.dumps(_fixture_rows()["ultrafeedback.parquet"][k]))


def _edit(row, fn):
  row = json.loads(json.dumps(row))
  fn(row)
  return row


def _del(field):
  return lambda row: row.pop(field)


def _set(field, value):
  return lambda row: row.__setitem__(field, value)


# (schema, file name, how to break a good row, what the message must say after "file:place: ").
# The broken row is the second of three; in a .parquet file a wrong type is not possible (a column has one
# type), so those cases use nulls and bad values.
BAD_RECORDS = {
    "hh_missing_rejected": ("hh", "x.jsonl", _del("rejected"), "missing field 'rejected'"),
    "hh_empty_reply": ("hh", "x.json",
                       lambda r: r.update(chosen=r["chosen"].rsplit("Assistant:", 1)[0] + "Assistant: "),
                       "field 'chosen': the final Assistant reply is empty"),
    "hh_prefix_mismatch": ("hh", "x.parquet", _set("rejected", "\n\nHuman: other\n\nAssistant: b"),
                           "fields 'chosen' and 'rejected': expected the same dialogue"),
    "rankings_missing": ("rankings", "x.jsonl", _del("ranking"), "missing field 'ranking'"),
    "rankings_wrong_type": ("rankings", "x.json", _set("responses", "a b"),
                            "field 'responses': expected a list of at least 2 response strings, got str"),
    "rankings_empty": ("rankings", "x.jsonl", _set("responses", ["a", " ", "c"]),
                       "field 'responses', item 1: the response is empty"),
    "sft_wrong_type": ("sft", "x.jsonl", _set("response", 3), "field 'response': expected a string, got int"),
    "sft_no_assistant": ("sft", "x.json", _set("turns", [{"role": "user", "content": "x"}]),
                         "expected at least one non-empty assistant turn"),
    "sft_missing": ("sft", "x.jsonl", lambda r: r.clear() or r.update(text="hi"), "missing field 'turns'"),
    "summarize_choice_out_of_range": ("summarize_from_feedback", "x.jsonl", _set("choice", 2),
                                      "field 'choice': expected 0 or 1 (the index of the preferred summary), got 2"),
    "summarize_choice_type": ("summarize_from_feedback", "x.json", _set("choice", "1"),
                              "field 'choice': expected 0 or 1 (the index of the preferred summary), got '1'"),
    "summarize_choice_parquet": ("summarize_from_feedback", "x.parquet", _set("choice", -1),
                                 "field 'choice': expected 0 or 1"),
    "summarize_missing_text": ("summarize_from_feedback", "x.parquet",
                               lambda r: r["summaries"][1].__setitem__("text", None),
                               "field 'summaries', item 1: missing 'text'"),
    "summarize_empty_text": ("summarize_from_feedback", "x.jsonl",
                             lambda r: r["summaries"][0].__setitem__("text", "  "),
                             "field 'summaries', item 0, 'text': the summary is empty"),
    "summarize_post_type": ("summarize_from_feedback", "x.jsonl", lambda r: r["info"].__setitem__("post", 7),
                            "field 'info.post': expected the Reddit post text (a string), got int"),
    "summarize_cnndm": ("summarize_from_feedback", "x.parquet",
                        lambda r: r["info"].update(post=None, article="(CNN) An article."),
                        "missing field 'info.post': this is a CNN/DM row"),
    "summarize_three": ("summarize_from_feedback", "x.json", lambda r: r["summaries"].append({"text": "c"}),
                        "field 'summaries': expected 2 summaries to compare, got 3"),
    "tldr_missing_summary": ("tldr_sft", "x.json", _del("summary"), "missing field 'summary'"),
    "tldr_post_type": ("tldr_sft", "x.jsonl", _set("post", ["a"]),
                       "field 'post': expected the Reddit post text (a string), got list"),
    "tldr_empty_summary": ("tldr_sft", "x.parquet", _set("summary", " "), "field 'summary': the text is empty"),
    "tldr_empty_completion": ("tldr_sft", "x.jsonl", lambda r: r.clear() or r.update(prompt="p", completion=""),
                              "field 'completion': the text is empty"),
    "ultra_not_shared": ("ultrafeedback", "x.parquet",
                         lambda r: r["rejected"][0].__setitem__("content", "A different question?"),
                         "fields 'chosen' and 'rejected': expected the same turns before the final assistant "
                         "reply, but they differ at turn 0"),
    "ultra_empty_reply": ("ultrafeedback", "x.parquet", lambda r: r["chosen"][-1].__setitem__("content", ""),
                          "field 'chosen': the final assistant reply is empty"),
    "ultra_missing": ("ultrafeedback", "x.json", _del("rejected"), "missing field 'rejected'"),
    "ultra_null": ("ultrafeedback", "x.parquet", _set("rejected", None), "missing field 'rejected'"),
    "ultra_last_not_assistant": ("ultrafeedback", "x.jsonl",
                                 lambda r: r["rejected"][-1].__setitem__("role", "user"),
                                 "field 'rejected': the last turn must be the 'assistant' reply"),
    "ultra_wrong_type": ("ultrafeedback", "x.jsonl", _set("chosen", "text"),
                         "field 'chosen': expected a non-empty list of {\"role\", \"content\"} turns, got str"),
    "pairs_missing": ("pairs", "x.jsonl", _del("chosen"), "missing field 'chosen'"),
    "pairs_list": ("pairs", "x.jsonl", _set("chosen", [{"role": "assistant", "content": "x"}]),
                   "field 'chosen': expected the response text (a string), got list"),
    "pairs_empty": ("pairs", "x.json", _set("rejected", "  "), "field 'rejected': the text is empty"),
    "pairs_empty_prompt": ("pairs", "x.parquet", _set("prompt", ""), "field 'prompt': expected non-empty text"),
    "prompts_missing": ("prompts", "x.jsonl", lambda r: r.clear() or r.update(text="q"),
                        "missing field 'prompt' (or 'query')"),
    "prompts_wrong_type": ("prompts", "x.json", _set("prompt", 12),
                           "field 'prompt': expected a string or a list of turns, got int"),
    "prompts_ends_with_assistant": ("prompts", "x.jsonl", _set("prompt", [{"role": "assistant", "content": "a"}]),
                                    "field 'prompt': the last turn must be a 'user' turn"),
    "prompts_empty": ("prompts", "x.parquet", _set("prompt", " "), "field 'prompt': expected non-empty text"),
    "hh_sft_missing": ("hh_sft", "x.jsonl", _del("chosen"), "missing field 'chosen'"),
    "hh_sft_ends_with_human": ("hh_sft", "x.json", _set("chosen", "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok"),
                               "field 'chosen': the dialogue must end with an Assistant turn"),
    "hh_sft_empty_reply": ("hh_sft", "x.jsonl", _set("chosen", "\n\nHuman: hi\n\nAssistant:  "),
                           "field 'chosen': the final Assistant reply is empty"),
    "text_missing": ("text", "x.jsonl", lambda r: r.clear() or r.update(content="a"), "missing field 'text'"),
    "text_type": ("text", "x.json", _set("text", ["a", "b"]),
                  "field 'text': expected a document of pretraining text (a string), got list"),
    "text_empty": ("text", "x.parquet", _set("text", "   "), "field 'text': the text is empty"),
}

_GOOD_ROWS = {
    "hh": lambda: _fixture_rows()["hh.jsonl"][:3],
    "rankings": lambda: _fixture_rows()["rankings.jsonl"][1:4],
    "sft": lambda: [_fixture_rows()["sft.jsonl"][i] for i in (1, 0, 2)],  # the bad one {"prompt", "response"}
    "summarize_from_feedback": lambda: _fixture_rows()["summarize_from_feedback.parquet"][:3],
    "tldr_sft": lambda: [_fixture_rows()["tldr_sft.json"][i] for i in (1, 0, 2)],  # the bad one {"post", ...}
    "ultrafeedback": lambda: _fixture_rows()["ultrafeedback.parquet"][:3],
    "pairs": lambda: _fixture_rows()["pairs.jsonl"][0:6:2],  # string prompts (a parquet column has one type)
    "prompts": lambda: _fixture_rows()["prompts.jsonl"][2:6:2],
    "hh_sft": lambda: _fixture_rows()["hh.jsonl"][:3],
    "text": lambda: _fixture_rows()["pretrain_text.jsonl"][:3],
}


def _place(path, index):
  """How the message names record `index` of a file written by _write_rows."""
  if path.endswith(".parquet"):
    return f"{path}:row {index}:"
  return f"{path}:record {index}:" if path.endswith(".json") else f"{path}:{index + 1}:"


def test_every_schema_has_three_bad_record_cases():
  counts = {schema: 0 for schema in real.SCHEMAS}
  for schema, *_ in BAD_RECORDS.values():
    counts[schema] += 1
  assert min(counts.values()) >= 3, counts


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_names_file_place_and_field(tmp_path, case):
  schema, filename, breaks, message = BAD_RECORDS[case]
  rows = _GOOD_ROWS[schema]()
  if schema == "prompts":
    rows = rows + rows[:1]
  rows[1] = _edit(rows[1], breaks)
  path = _write_rows(tmp_path / filename, rows)
  with pytest.raises(ValueError) as e:
    real.prepare(schema, path, str(tmp_path / "d"))
  assert str(e.value).startswith(f"{_place(path, 1)} {message}"), str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=re.escape(message)):
    real.check(schema, path)
  published = [n for n in os.listdir(tmp_path / "d") if os.path.isdir(tmp_path / "d" / n / "1.0.0")]
  assert not published  # nothing is published for a failed conversion
  # on_error="skip": the other rows are kept and the bad one counted, with its message.
  assert real.check(schema, path, on_error="skip") == 2
  out = real.prepare(schema, path, str(tmp_path / "d"), on_error="skip")
  meta = tfds_io.read_metadata(out)["splits"]["train"]
  assert (meta["records"], meta["skipped"]) == (2, 1)
  assert meta["errors"] == [str(e.value)]
  assert len(tfds_io.load_split_dir(out, "train")) == 2


def _bad_utf8_parquet(path):
  rows = _fixture_rows()["ultrafeedback.parquet"][:3]
  table = pa.Table.from_pylist(rows)
  raw = pa.array([r["prompt"].encode() for r in rows[:1]] + [b"caf\xe9"] + [rows[2]["prompt"].encode()],
                 type=pa.binary())
  # pyarrow checks UTF-8 when it builds a string array, not when it reads one: build it from the bytes' buffers
  table = table.set_column(0, "prompt", pa.Array.from_buffers(pa.string(), 3, raw.buffers()))
  pq.write_table(table, path)
  return path


def _gzip_bytes(path, data):
  with gzip.open(path, "wb") as f:
    f.write(data)
  return path


_HH_LINE = json.dumps(HH_GOOD[0]).encode()
# (schema, file name, how to write it, message): a damaged file raises even with on_error="skip".
DAMAGED_FILES = {
    "jsonl_not_utf8": ("hh", "x.jsonl", lambda p: _write_lines(p, [_HH_LINE, b'{"chosen": "caf\xe9"}']),
                       "x.jsonl:2: not valid UTF-8"),
    "json_lines_not_utf8": ("summarize_from_feedback", "batch.json",
                            lambda p: _write_lines(p, [json.dumps(_summary_row()), b'{"info": "\xff"}']),
                            "batch.json:2: not valid UTF-8"),
    "json_not_utf8": ("pairs", "x.json",
                      lambda p: open(p, "wb").write(b'[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n'
                                                    b' {"prompt": "\xe9"}\n]\n'),
                      "x.json:3: not valid UTF-8"),
    "json_invalid": ("pairs", "x.json", lambda p: open(p, "w").write('[\n {"prompt": "a",\n]\n'),
                     "x.json:3: invalid JSON"),
    "json_lines_invalid": ("prompts", "x.json", lambda p: _write_lines(p, ['{"prompt": "a"}', '{"prompt": ']),
                           "x.json:2: invalid JSON"),
    "json_not_a_list": ("prompts", "x.json", lambda p: open(p, "w").write('{"rows": [{"prompt": "a"}]}'),
                        "x.json: a JSON object with neither of a 'data' and a 'train' list"),
    "json_item_not_object": ("prompts", "x.json", lambda p: open(p, "w").write('[{"prompt": "a"}, "b"]'),
                             "x.json:record 1: expected a JSON object, got str"),
    "json_empty_list": ("prompts", "x.json", lambda p: open(p, "w").write("[]"), "x.json: the file has no records"),
    "parquet_not_utf8": ("ultrafeedback", "x.parquet", _bad_utf8_parquet,
                         "x.parquet:row 1: column 'prompt' is not valid UTF-8"),
    "parquet_damaged": ("ultrafeedback", "x.parquet", lambda p: open(p, "wb").write(b"PAR1 not really"),
                        "x.parquet: not a readable Parquet file"),
    "gzip_damaged": ("hh", "x.jsonl.gz", lambda p: open(p, "wb").write(b"\x1f\x8b\x08\x00garbage"),
                     "x.jsonl.gz: not a readable gzip file"),
    "gzip_not_utf8": ("hh", "x.jsonl.gz", lambda p: _gzip_bytes(p, _HH_LINE + b"\n\xff\n"),
                      "x.jsonl.gz:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_FILES))
def test_damaged_file_raises_even_when_skipping(tmp_path, case):
  schema, filename, write, message = DAMAGED_FILES[case]
  path = str(tmp_path / filename)
  write(path)
  for on_error in ("raise", "skip"):
    with pytest.raises(ValueError) as e:
      real.prepare(schema, path, str(tmp_path / "d"), on_error=on_error)
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=re.escape(message)):
      real.check(schema, path, on_error=on_error)


def test_json_wrappers_gzip_and_several_files(tmp_path):
  rows = _fixture_rows()["pairs.jsonl"][:4]
  for key in ("data", "train"):
    path = tmp_path / f"{key}.json"
    path.write_text(json.dumps({key: rows, "version": 2}))
    assert real.check("pairs", str(path)) == 4
  both = tmp_path / "both.json"
  both.write_text(json.dumps({"data": rows, "train": rows}))
  with pytest.raises(ValueError, match="with both of a 'data' and a 'train' list"):
    real.check("pairs", str(both))
  gz = _gzip_bytes(str(tmp_path / "hh.jsonl.gz"), "".join(json.dumps(r) + "\n" for r in HH_GOOD).encode())
  assert real.check("hh", gz) == 2
  # Several files (the hub's parquet shards) make one split, in order; a dict names the splits.
  ultra = _fixture_rows()["ultrafeedback.parquet"]
  shards = [_write_rows(tmp_path / f"train-{i:05d}-of-00002.parquet", ultra[i * 10:(i + 1) * 10]) for i in (0, 1)]
  val = _write_rows(tmp_path / "test.jsonl", ultra[20:])
  out = real.prepare("ultrafeedback", {"train": shards, "validation": val}, str(tmp_path / "d"))
  train = tfds_io.load_split_dir(out, "train")
  assert len(train) == 20 and train[13]["responses"][1] == ultra[13]["rejected"][-1]["content"]
  assert len(tfds_io.load_split_dir(out, "validation")) == len(ultra) - 20
  assert tfds_io.read_metadata(out)["splits"]["train"]["source"] == shards
  with pytest.raises(ValueError, match="schema 'dpo': expected one of"):
    real.check("dpo", val)
  with pytest.raises(FileNotFoundError, match="nope.parquet: file not found"):
    real.prepare("ultrafeedback", str(tmp_path / "nope.parquet"), str(tmp_path / "d"))


def test_ultrafeedback_replies_only_use_the_prompt_field(tmp_path):
  row = _ultra_row()
  row["chosen"], row["rejected"] = row["chosen"][-1:], row["rejected"][-1:]
  record = real.SCHEMAS["ultrafeedback"].parse(row)
  assert record["prompt_turns"] == [{"role": "user", "content": row["prompt"]}]


def test_cache_reused_for_the_same_file_and_redone_for_an_edited_one(tmp_path):
  path = str(tmp_path / "comparisons.json")
  shutil.copy(os.path.join(FIXTURES, "summarize_batch.json"), path)
  first = real.prepare("summarize_from_feedback", path, str(tmp_path / "d"))
  shard = [f for f in os.listdir(first) if ".array_record-" in f][0]
  stamp = os.stat(os.path.join(first, shard)).st_mtime_ns
  assert real.prepare("summarize_from_feedback", path, str(tmp_path / "d")) == first
  assert os.stat(os.path.join(first, shard)).st_mtime_ns == stamp  # reused, not rewritten
  with open(path, "rb") as f:
    lines = f.read().splitlines(keepends=True)
  with open(path, "wb") as f:
    f.writelines(lines[:-1])  # the last comparison removed
  second = real.prepare("summarize_from_feedback", path, str(tmp_path / "d"))
  assert second != first and len(tfds_io.load_split_dir(second, "train")) == len(lines) - 1
  assert len(tfds_io.load_split_dir(first, "train")) == len(lines)  # the old conversion is left alone
  skipped = real.prepare("summarize_from_feedback", path, str(tmp_path / "d"), on_error="skip")
  assert skipped not in (first, second)  # on_error is part of the fingerprint
  # An explicit name keeps tfds_io's rule: an edited input is an error, not a silent reuse.
  real.prepare("summarize_from_feedback", os.path.join(FIXTURES, "summarize_batch.json"), str(tmp_path / "e"),
               name="tldr")
  with pytest.raises(ValueError, match="the input changed"):
    real.prepare("summarize_from_feedback", path, str(tmp_path / "e"), name="tldr")


if __name__ == "__main__":
  make_fixtures(FIXTURES)
  print(f"wrote {sorted(os.listdir(FIXTURES))} to {FIXTURES}")
