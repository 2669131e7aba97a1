"""A user's files in place of the task suite (config.files): the splits the stages read, the judge, the errors.

The records are checked against the raw fixture files parsed here independently (json, the TL;DR prompt format
of the N+ implementation details); the reward-model judge against the reward model's own scores of each
response computed one row at a time without padding.
"""

import copy
import json
import os

import jax
import numpy as np
import pytest

from helpers import experiments
from rlhf_jax import pipeline, sharding, tokenizers
from rlhf_jax.data import sources
from rlhf_jax.evals import judge as judge_lib
from rlhf_jax.models import heads, hf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_fixtures")


def _tldr(tmp_path):
  c = experiments.config("tldr", "smoke")
  c.data.data_dir = str(tmp_path / "data")
  return c


def _raw_tldr():
  """(prompt, summary) of every row of the TL;DR fixture, formatted independently of rlhf_jax.data.real."""
  out = []
  for r in json.load(open(os.path.join(FIXTURES, "tldr_sft.json"))):
    if "prompt" in r:
      out.append((r["prompt"], r["completion"].strip()))
    else:
      head = "".join(f"{label}{r[k].strip().removeprefix('r/')}\n\n" for k, label in
                     (("subreddit", "SUBREDDIT: r/"), ("title", "TITLE: ")) if r.get(k))
      out.append((f"{head}POST: {r['post'].strip()}\n\nTL;DR:", r["summary"].strip()))
  return out


def test_the_user_s_files_stand_in_for_the_suite_s_splits(tmp_path):
  c = _tldr(tmp_path)
  w = str(tmp_path / "w")
  raw = _raw_tldr()
  n_val = round(len(raw) * c.files.val_fraction)
  train, val = sources.split(c, w, "sft"), sources.split(c, w, "sft_val")
  assert (len(train), len(val)) == (len(raw) - n_val, n_val)
  got = [(r["turns"][0]["content"], r["turns"][1]["content"]) for r in (train[i] for i in range(len(train)))]
  got += [(r["turns"][0]["content"], r["turns"][1]["content"]) for r in (val[i] for i in range(len(val)))]
  assert got == raw  # in the file's order, the last n_val held out
  tok = sources.tokenizer(c, w)
  prompts = sources.rl_prompts(c, w, tok, which="validation")
  assert [p["prompt"] for p in prompts] == [p for p, _ in raw[-n_val:]]  # files.prompts unset: SFT's prompts
  assert prompts[0]["ids"] == tokenizers.encode_prompt(tok, [{"role": "user", "content": raw[-n_val][0]}])
  first = {}
  for p, summary in raw[-n_val:]:  # the human summaries are the references (a prompt's first, if repeated)
    first.setdefault(p, summary)
  assert sources.user_references(c, w) == first
  texts = [json.loads(line)["text"] for line in open(os.path.join(FIXTURES, "pretrain_text.jsonl"))]
  pt, pt_val = sources.split(c, w, "pretrain"), sources.split(c, w, "pretrain_val")
  assert [pt[i]["text"] for i in range(len(pt))] + [pt_val[i]["text"] for i in range(len(pt_val))] == texts
  assert sources.benchmark(c, w) == []
  with pytest.raises(ValueError, match="'comparisons' data of the task suite has no stand-in.*rm.source='file'"):
    sources.split(c, w, "comparisons")
  with pytest.raises(ValueError, match="no simulated humans"):
    sources.gold_scorer(c, w)


def test_hh_chosen_dialogues_as_demonstrations_and_their_prompts(tmp_path):
  c = experiments.config("hh", "smoke")
  c.data.data_dir = str(tmp_path / "data")
  w = str(tmp_path / "w")
  rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "hh.jsonl"))]
  train, val = sources.split(c, w, "sft"), sources.split(c, w, "sft_val")
  records = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
  assert len(records) == len(rows)
  for rec, row in zip(records, rows):
    assert rec["turns"][-1] == {"role": "assistant", "content": row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()}
    assert sum(t["role"] == "user" for t in rec["turns"]) == row["chosen"].count("\n\nHuman:")
  prompts = sources.split(c, w, "prompts_val")
  assert [prompts[i]["prompt_turns"] for i in range(len(prompts))] == [r["turns"][:-1] for r in records[-len(val):]]


@pytest.mark.parametrize("change, message", [
    (dict(files=dict(sft_schema="hh")), r"files.sft_schema='hh': expected one of \['sft', 'tldr_sft', 'hh_sft'\]"),
    (dict(files=dict(sft="/no/such/file.jsonl")), r"files.sft=/no/such/file.jsonl: file not found"),
    (dict(rm=dict(source="policy")), r"rm.source='policy' on a user's files.*no simulated labelers"),
    (dict(eval=dict(judge="gold")), r"eval.judge='gold' on a user's files"),
    (dict(files=dict(pretrain="")), r"ppo.ptx.coef=1.0 on a user's files: PPO-ptx needs pretraining text"),
    (dict(tokenizer=dict(kind="sentencepiece")), r"tokenizer.kind='sentencepiece'.*expected 'hf'"),
    (dict(rm=dict(file_schema="sft")), r"rm.file_schema='sft': expected 'hh', 'rankings', 'summarize_from_feedback'"),
    (dict(files=dict(val_fraction=1.0)), r"files.val_fraction=1.0: expected a fraction in \(0, 1\)"),
])
def test_the_preflight_names_the_bad_setting(tmp_path, change, message):
  c = _tldr(tmp_path)
  for block, values in change.items():
    for k, v in values.items():
      c[block][k] = v
  with pytest.raises(ValueError, match=message):
    pipeline.preflight(c)


def test_a_bad_record_stops_the_pipeline_before_any_stage_runs(tmp_path):
  rows = json.load(open(os.path.join(FIXTURES, "tldr_sft.json")))
  bad = copy.deepcopy(rows)
  del bad[3]["summary"]
  path = tmp_path / "tldr.json"
  path.write_text(json.dumps(bad))
  c = _tldr(tmp_path)
  c.files.sft = str(path)
  with pytest.raises(ValueError, match=rf"{path}:record 3: missing field 'summary'"):
    pipeline.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing written
  sff = tmp_path / "comparisons.jsonl"
  row = {"info": {"post": "p", "title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2}
  sff.write_text(json.dumps({**row, "choice": 0}) + "\n" + json.dumps(row) + "\n")
  c = _tldr(tmp_path)
  c.rm.file = str(sff)
  with pytest.raises(ValueError, match=rf"{sff}:2: field 'choice': expected 0 or 1"):
    pipeline.preflight(c)


def test_the_judge_scores_each_response_as_the_reward_model_does_alone(tmp_path):
  model = os.path.join(os.path.dirname(FIXTURES), "hf", "qwen2_chat")
  tok = tokenizers.make_tokenizer("hf", path=model)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  backbone, cfg = hf.load_hf(model, mesh)
  rm = heads.init_rm_params(jax.random.PRNGKey(0), cfg, backbone=backbone)
  rm["norm"] = {"gain": np.float32(1.7), "bias": np.float32(-0.3)}
  turns = {"Say hi.": [{"role": "user", "content": "Say hi."}],
           "A longer question, with more words?": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "A longer question, with more words?"}]}
  judge = judge_lib.RewardModelJudge(rm, cfg, tok, turns, {"Say hi.": "Hi!"}, batch_size=2, max_prompt_len=200,
                                     max_response_len=40, mesh=mesh, rules=sharding.DEFAULT_RULES)
  prompts = ["Say hi.", "A longer question, with more words?", "Say hi."]
  responses = ["Hello there, friend.", "No.", "Hi"]
  got = judge.score_batch(prompts, responses)
  for p, r, g in zip(prompts, responses, got):  # one row, no padding anywhere
    ids = tokenizers.encode_prompt(tok, turns[p]) + tok.encode(r) + [tok.eos_id]
    want = heads.scores(rm, np.array([ids], np.int32), np.ones((1, len(ids)), bool), cfg)
    np.testing.assert_allclose(g, float(want[0]), rtol=1e-5, atol=1e-5)
  assert got[0] == got[2] or responses[0] != responses[2]
  assert judge.reference("Say hi.") == "Hi!" and judge.reference("A longer question, with more words?") is None
  assert judge.family("Say hi.") == "all" and np.isnan(judge.is_correct("Say hi.", "x"))
  with pytest.raises(KeyError, match="no chat turns for the prompt 'unknown'"):
    judge.score_batch(["unknown"], ["x"])


def test_a_prompt_longer_than_the_model_s_context_is_an_error_naming_its_line(tmp_path):
  rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "hh.jsonl"))]
  long_question = " ".join(["why"] * 1200)  # > 1024 tokens in any tokenizer of this vocabulary
  rows[5]["chosen"] = f"\n\nHuman: {long_question}\n\nAssistant: Because."
  path = tmp_path / "hh.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = experiments.config("hh", "smoke")
  c.data.data_dir = str(tmp_path / "data")
  c.files.sft, c.stages = str(path), ("data",)
  with pytest.raises(ValueError, match=rf"{path}:6: field 'prompt': \d+ tokens in the chat template, longer than "
                                       r"the model's context of 1024 leaves room for; expected at most 1023"):
    pipeline.run(c, str(tmp_path / "w"))
