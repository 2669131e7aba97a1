"""The cot stage end to end on two freshly initialised tiny decoders (a "pretrained" one few-shot and an "SFT" one
zero-shot): every query answered, the summary what its rows give, the rows what the parser reads, the report
section; the preflight's errors and the prompt-length check, raised before any decoding."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from helpers import experiments
from rlhf_jax import pipeline, sharding, tokenizers, training
from rlhf_jax.evals import cot as cot_evals
from rlhf_jax.models import presets, transformer
from rlhf_jax.tasks import multistep, suite

pytestmark = pytest.mark.xdist_group("cot_stage")  # its module fixture is built once, on one worker


def _config():
  """experiments/cot's tiny preset cut to the cot stage, two items per kind and short answers."""
  c = experiments.config("cot", "tiny")
  c.stages = ("cot",)
  c.cot.pretrained, c.cot.sft = ("pretrain_tiny",), ("sft_tiny",)
  c.cot.n_items, c.cot.shots, c.cot.max_new_tokens, c.cot.max_new_tokens_direct = 2, 1, 6, 4
  return c


def _export(workdir: str, name: str, seed: int, max_len: int) -> transformer.ModelConfig:
  cfg = presets.preset("tiny", vocab_size=tokenizers.ByteTokenizer().vocab_size, max_len=max_len)
  params = transformer.init(jax.random.PRNGKey(seed), cfg)
  training.export_params(os.path.join(workdir, name), params, model_cfg=cfg, tokenizer=tokenizers.ByteTokenizer())
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cot") / "w")
  cfg = _export(workdir, "pretrain_tiny", 0, max_len=512)
  _export(workdir, "sft_tiny", 1, max_len=512)
  config = _config()
  summary = pipeline.run(config, workdir)
  return config, workdir, summary, cfg


def test_every_query_is_answered_and_the_summary_is_what_the_rows_give(run):
  config, workdir, summary, cfg = run
  stage = os.path.join(workdir, "cot")
  with open(os.path.join(stage, "summary.json")) as f:
    s = json.load(f)
  rows = [json.loads(line) for line in open(os.path.join(stage, "cot.jsonl"))]
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  n_subs = sum(len(it.sub_questions) for k in multistep.KINDS for it in multistep.split(world, k)[1][:2])
  tok = tokenizers.ByteTokenizer()
  asked = {"pretrain_tiny": cot_evals.few_shot_queries(tok, world, n_items=2, shots=1, seed=config.seed),
           "sft_tiny": cot_evals.zero_shot_queries(tok, world, n_items=2)}
  for name, setting in (("pretrain_tiny", "few_shot"), ("sft_tiny", "zero_shot")):
    mine = [r for r in rows if r["model"] == name]
    assert {r["setting"] for r in mine} == {setting} and s[f"{name}.setting"] == setting
    assert len(mine) == len(asked[name]) == 2 * 2 * len(multistep.KINDS) + n_subs
    assert s[f"{name}.num_params"] == cfg.num_params()
    for q, r in zip(asked[name], mine):  # the parser's reading of the first line, exact match against the answer
      assert (r["group"], r["kind"], r["item"], r["answer"]) == (q.group, q.kind, q.item, q.answer)
      assert "\n" not in r["response"]
      assert r["parsed"] == multistep.final_answer(r["response"], q.domain, world.entities)
      assert r["correct"] == (r["parsed"] == q.answer.lower())
    want = cot_evals.accuracies(mine)
    for k, v in want.items():
      assert s[f"{name}.{k}"] == pytest.approx(v)
    assert {f"{g}.{k}" for g in ("direct", "worked", "one_step", "all_steps") for k in (*multistep.KINDS, "all")} \
        <= set(want)
  assert s["n_items_per_kind"] == 2 and s["pretrain_tiny.n_truncated"] == 0
  assert summary["cot.pretrain_tiny.direct.all"] == s["pretrain_tiny.direct.all"]
  section = open(os.path.join(stage, "report_section.md")).read()
  assert section.startswith("## Chain of thought and scale") and "(cot.png)" in section
  assert f"| pretrain_tiny | few_shot | {cfg.num_params():,} | all |" in section
  assert os.path.getsize(os.path.join(stage, "cot.png")) > 1000


def test_the_greedy_responses_are_the_model_s(run):
  """One row recomputed with the sampler outside the stage: the response is the model's greedy continuation."""
  config, workdir, _, _ = run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "cot", "cot.jsonl"))]
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  tok = tokenizers.ByteTokenizer()
  query = cot_evals.zero_shot_queries(tok, world, n_items=2)[0]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, cfg, _ = training.load_export(os.path.join(workdir, "sft_tiny"), mesh, sharding.DEFAULT_RULES)
  text = cot_evals.greedy_responses(params, cfg, tok, [query.ids], max_new_tokens=4, batch_size=1, mesh=mesh,
                                    rules=sharding.DEFAULT_RULES)[0]
  row = next(r for r in rows if r["model"] == "sft_tiny" and r["group"] == "direct" and r["kind"] == query.kind
             and r["item"] == 0)
  assert row["response"] == cot_evals.first_line(text)


def test_a_prompt_past_the_context_fails_before_decoding(tmp_path):
  workdir = str(tmp_path / "w")
  _export(workdir, "pretrain_tiny", 0, max_len=128)  # three demonstrations of worked steps are ~400 bytes
  _export(workdir, "sft_tiny", 1, max_len=128)
  config = _config()
  config.cot.shots = 3
  with pytest.raises(ValueError, match=r"prompts for pretrain_tiny do not fit its model.max_len=128.*cot.shots"):
    pipeline.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "cot", "cot.jsonl"))
  config.cot.too_long = "truncate"
  config.cot.n_items, config.cot.sft = 1, ()
  s = pipeline.run(config, workdir)
  assert s["cot.pretrain_tiny.n_truncated"] > 0 and np.isfinite(s["cot.pretrain_tiny.direct.all"])


@pytest.mark.parametrize("field,value,message", [
    ("cot.shots", -1, r"cot.shots=-1: expected >= 0"),
    ("cot.too_long", "cut", r"cot.too_long='cut': expected 'error' or 'truncate'"),
    ("cot.sft", ("pretrain_tiny",), r"a model is named twice"),
])
def test_preflight_names_the_field(field, value, message):
  config = _config()
  config.cot[field.split(".")[1]] = value
  with pytest.raises(ValueError, match=message):
    pipeline.preflight(config)


def test_preflight_wants_a_model():
  config = _config()
  config.cot.pretrained, config.cot.sft = (), ()
  with pytest.raises(ValueError, match="cot.pretrained and cot.sft are both empty"):
    pipeline.preflight(config)
