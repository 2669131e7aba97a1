"""The icl stage end to end on the shared tiny reference run (its data, pretrained, SFT and PPO policies), after a
two-step SFT without arithmetic and one without strings (sft:noarith, sft:nostring): every row scored as tasks/icl scores it, the summary the mean of
the rows, a batched greedy answer equal to the same prompt decoded alone; the preflight's errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import experiments, stage_runner
from rlhf_jax import pipeline, sampling, sharding, tokenizers, training
from rlhf_jax.evals import icl as icl_evals
from rlhf_jax.tasks import icl, suite
from rlhf_jax.tasks.gold import GoldScorer

pytestmark = pytest.mark.xdist_group("icl_stage")  # its module fixture is built once, on one worker

POLICIES = ("pretrain", "sft", "sft_noarith", "sft_nostring", "ppo")


def _config():
  """experiments/icl's tiny preset on the reference run (stage_runner.TINY_FLAGS), shrunk."""
  c = experiments.config("icl", "tiny")
  c.sft.train.steps, c.sft.train.log_every, c.sft.train.eval_every, c.sft.train.eval_batches = 2, 1, 2, 1
  c.eval.n_prompts, c.eval.batch_size = 8, 8
  c.icl.n_items, c.icl.ks, c.icl.batch_size, c.icl.max_new_tokens = 2, (0, 1), 8, 8
  c.checkpoint.save_every = 100
  c.stages = ("sft:noarith", "sft:nostring", "icl")
  return c


# _config() as run.py flags (the checks below read n_items, ks and the SFT steps back from what ran): the stages
# run in a subprocess on one device, as the reference run did, so its compilation cache serves the SFT steps.
FLAGS = (f"--experiment={experiments.path('icl')}:tiny", "--experiment.sft.train.steps=2",
         "--experiment.sft.train.log_every=1", "--experiment.sft.train.eval_every=2",
         "--experiment.sft.train.eval_batches=1", "--experiment.eval.n_prompts=8", "--experiment.eval.batch_size=8",
         "--experiment.icl.n_items=2", "--experiment.icl.ks=0", "--experiment.icl.ks=1",
         "--experiment.icl.batch_size=8", "--experiment.icl.max_new_tokens=8", "--experiment.checkpoint.save_every=100",
         *(f"--experiment.stages={s}" for s in ("sft:noarith", "sft:nostring", "icl")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  ref, cache = stage_runner.shared_reference(tmp_path_factory)
  workdir = stage_runner.copy_workdir(ref, str(tmp_path_factory.mktemp("icl") / "w"))
  proc = stage_runner.run(workdir, cache_dir=cache, base_flags=FLAGS, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return _config(), workdir, summary


def test_every_row_is_scored_and_the_summary_is_their_mean(run):
  config, workdir, summary = run
  with open(os.path.join(workdir, "icl", "summary.json")) as f:
    s = json.load(f)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "icl", "icl.jsonl"))]
  assert s["policies"] == ",".join(POLICIES) and s["missing"] == ""
  assert s["n_queries"] == 5 * 2 * 2 * len(icl.STYLES) and len(rows) == len(POLICIES) * s["n_run"] > 0
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  gold = GoldScorer(world)
  items = {(f, i): it for f in config.icl.families for i, it in enumerate(icl.family_items(world, f, 0)[:2])}
  for r in rows:
    item = items[(r["family"], r["index"])]
    assert r["question"] == item.question
    assert {k: r[k] for k in ("answer", "exact", "correct")} == icl.score(item, r["completion"], gold)
  for name in POLICIES:
    for fam in config.icl.families:
      for style in icl.STYLES:
        for k in (0, 1):
          sel = [r for r in rows if (r["policy"], r["family"], r["style"], r["k"]) == (name, fam, style, k)]
          key = f"{name}.{style}.{fam}.k{k}"
          if not sel:  # too long for the tiny model's 128 tokens
            assert key not in s
            continue
          np.testing.assert_allclose(s[key], np.mean([r["correct"] for r in sel]))
          np.testing.assert_allclose(s[f"{key}.exact"], np.mean([r["exact"] for r in sel]))
  section = open(os.path.join(workdir, "icl", "report_section.md")).read()
  assert section.startswith("## In-context learning")
  for name, fam in (("sft_noarith", "arithmetic"), ("sft_nostring", "string")):
    assert f"### Held-out family (FLAN): {fam}" in section
    for style in icl.STYLES:
      np.testing.assert_allclose(s[f"held_out.{fam}.{style}.zero_shot"], s.get(f"{name}.{style}.{fam}.k0", np.nan))
      np.testing.assert_allclose(s[f"held_out.{fam}.{style}.sft_zero_shot"], s.get(f"sft.{style}.{fam}.k0", np.nan))
    few = [s[f"pretrain.{st}.{fam}.k1"] for st in icl.STYLES if f"pretrain.{st}.{fam}.k1" in s]  # tiny: k = 0, 1
    if few:
      np.testing.assert_allclose(s[f"held_out.{fam}.pretrained_best_few_shot"], max(few))
  assert os.path.getsize(os.path.join(workdir, "icl", "icl_accuracy.png")) > 0
  assert summary["icl.n_run"] == s["n_run"]
  with open(os.path.join(workdir, "sft_noarith", "summary.json")) as f:
    assert json.load(f)["step"] == 2


def test_a_batched_greedy_answer_is_the_prompt_decoded_alone(run):
  config, workdir, _ = run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "icl", "icl.jsonl"))]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, cfg, _ = training.load_export(os.path.join(workdir, "sft"), mesh, sharding.DEFAULT_RULES)
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  pools = {f: icl.family_items(world, f, 0) for f in config.icl.families}
  queries = icl.queries({f: p[:2] for f, p in pools.items()}, pools, (0, 1), icl.STYLES, 0)
  tok = tokenizers.ByteTokenizer()
  # The longest and the shortest rows of the sft policy: padded most and least in their batches.
  sft_rows = sorted((r for r in rows if r["policy"] == "sft"), key=lambda r: r["prompt_len"])
  for r in (sft_rows[0], sft_rows[-1]):
    q = next(q for q in queries if (q.family, q.style, q.k, q.index) == (r["family"], r["style"], r["k"], r["index"]))
    ids = icl_evals.encode(tok, q)
    assert len(ids) == r["prompt_len"]
    out = sampling.generate(params, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), jax.random.PRNGKey(0), cfg,
                            sampling.SamplingConfig(max_new_tokens=config.icl.max_new_tokens, temperature=0.0),
                            eos_id=tok.eos_id, pad_id=tok.pad_id)
    alone = tok.decode([int(t) for t, m in zip(out.tokens_bn[0], out.mask_bn[0]) if m])
    assert alone == r["completion"]


@pytest.mark.parametrize("field,value,message", [
    ("icl.ks", (0, -1), r"icl.ks=\(0, -1\): expected distinct shot counts >= 0"),
    ("icl.styles", ("dialogue",), r"icl.styles=\('dialogue',\): expected some of \('prompt', 'instruction', 'chat'\)"),
    ("icl.held_out_family", ("maths", "string"), r"'maths' is not one of icl.families"),
    ("icl.held_out_family", ("string",), r"expected one family per held-out SFT"),
    ("icl.policies", (), r"icl.policies is empty"),
    ("sft.exclude_families", ("maths",), r"sft.exclude_families=\('maths',\): expected some \(not all\) of"),
])
def test_preflight_names_the_field(field, value, message):
  config = _config()
  block, _, name = field.rpartition(".")
  config[block][name] = value
  config.stages = ("sft",) if block == "sft" else ("icl",)
  with pytest.raises(ValueError, match=message):
    pipeline.preflight(config)
