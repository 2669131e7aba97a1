"""experiments/tldr (smoke): the InstructGPT recipe on a user's files from an imported model, handed back.

The committed fixtures (a random Qwen2 with its ChatML tokenizer; TL;DR demonstrations, summarize_from_feedback
comparisons in two files, pretraining text) go through data -> import -> SFT -> RM -> the judge RM -> PPO ->
export, a few steps each. The exported policy, loaded by transformers, decodes greedily the same tokens as our
sampler from the PPO stage's own export; a rerun skips every finished stage. (experiments/hh differs only in its
schemas, which tests/data/user_files_test.py reads; its smoke preset is checked here up to the preflight.)
"""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from helpers import experiments, hf_helpers, stage_runner
from rlhf_jax import pipeline, sampling, sharding, tokenizers, training
from rlhf_jax.data import sources
from rlhf_jax.models import heads, hf

pytestmark = pytest.mark.xdist_group("real_data")  # its module fixture (the pipeline run) is built once

STAGES = ("data", "pretrain", "sft", "rm", "ppo", "export")
N_PROMPTS, NEW_TOKENS = 5, 12
# The smoke preset cut to a few steps. The preset's judge is rm:judge, a second RM trained on other comparisons;
# here the RM judges itself, which runs the same code (rlhf_jax.evals.judge) one training stage sooner.
FLAGS = (f"--experiment={experiments.path('tldr')}:smoke", *(f"--experiment.stages={s}" for s in STAGES),
         "--experiment.sft.train.steps=2", "--experiment.rm.train.steps=2", "--experiment.ppo.iterations=1",
         "--experiment.eval.best_of_n=()", "--experiment.eval.samples_per_prompt=1",
         f"--experiment.eval.n_prompts={N_PROMPTS}", "--experiment.ppo.max_new_tokens=16",
         "--experiment.eval.judge_rm_from=rm")


def _config(workdir):
  c = experiments.config("tldr", "smoke")
  c.data.data_dir = os.path.join(workdir, "data")
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The pipeline in a subprocess on one CPU device (as a user runs it: faster than the 8 simulated devices)."""
  tmp = tmp_path_factory.mktemp("tldr")
  workdir, cache = str(tmp / "w"), str(tmp / "xla_cache")
  proc = stage_runner.run(workdir, *FLAGS, cache_dir=cache, base_flags=(), timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return workdir, cache, summary


def test_every_stage_runs_on_the_user_s_files_and_a_rerun_skips_them(run):
  workdir, cache, summary = run
  assert summary["sft.step"] == 2 and summary["rm.step"] == 2 and summary["ppo.step"] == 1
  assert summary["ppo.judge"] == "rm:rm" and np.isfinite(summary["ppo.gold_score"])
  assert np.isfinite(summary["ppo.reference_win_rate_vs_sft"])  # the held-out human summaries
  assert np.isnan(float(summary["ppo.benchmark_accuracy"]))  # the suite's benchmark does not exist here
  assert summary["rm.n_train_comparisons"] == 12 - 1  # the parquet fixture's 12 rows, the last 10% held out
  for d in ("rm", "ppo", "export/policy", "export/reward"):
    assert os.path.exists(os.path.join(workdir, d))
  assert os.path.isfile(os.path.join(workdir, "export", "policy", "chat_template.jinja"))
  again = stage_runner.run(workdir, *FLAGS, cache_dir=cache, base_flags=(), timeout=300)
  assert again.returncode == 0, again.stderr[-4000:]
  skipped = re.findall(r"stage (\w+) is complete", again.stderr)
  assert skipped == ["pretrain", "sft", "rm", "ppo", "export"], skipped  # data always runs (its own cache)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["ppo.gold_score"] == summary["ppo.gold_score"]


def test_the_exported_policy_decodes_in_transformers_as_in_our_sampler(run, tmp_path):
  workdir, _, _ = run
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, cfg, _ = training.load_export(os.path.join(workdir, "ppo"), mesh, sharding.DEFAULT_RULES)
  c = _config(workdir)
  tok = sources.tokenizer(c, workdir)
  prompts = [p["ids"] for p in sources.rl_prompts(c, workdir, tok, which="validation")][:N_PROMPTS]
  assert len(prompts) == N_PROMPTS
  width = max(map(len, prompts))
  ids = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts], np.int32)
  mask = np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None]
  out = sampling.generate(params, ids, mask, jax.random.PRNGKey(0), cfg,
                          sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0), eos_id=tok.eos_id,
                          pad_id=tok.pad_id)
  ours, ours_mask = np.asarray(out.tokens_bn), np.asarray(out.mask_bn)
  np.savez(tmp_path / "inputs.npz", input_ids=ids, attention_mask=mask.astype(np.int32))
  outputs = hf_helpers.transformers_outputs([dict(model=os.path.join(workdir, "export", "policy"),
                                                  inputs=str(tmp_path / "inputs.npz"), kind="causal_lm",
                                                  greedy_new_tokens=NEW_TOKENS),
                                             dict(model=os.path.join(workdir, "export", "reward"),
                                                  inputs=str(tmp_path / "inputs.npz"), kind="reward")], tmp_path)
  got = outputs[0]["generated"]
  # The exported reward model (the export stage's, normalisation folded in) scores as ours does.
  rm, rm_cfg, _ = training.load_export(os.path.join(workdir, "rm"), mesh, sharding.DEFAULT_RULES)
  with open(os.path.join(workdir, "export", "reward", "config.json")) as f:
    bias = json.load(f)["rlhf_jax_score_bias"]
  np.testing.assert_allclose(outputs[1]["scores"] + bias, np.asarray(heads.scores(rm, ids, mask, rm_cfg)),
                             rtol=1e-4, atol=1e-4)
  for i in range(N_PROMPTS):  # up to and including our EOS (transformers pads after it, with its own pad)
    n = int(ours_mask[i].sum())
    np.testing.assert_array_equal(got[i, :n], ours[i, :n], err_msg=f"prompt {i}")
  with open(os.path.join(workdir, "export", "policy", "config.json")) as f:
    assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]


def test_the_import_its_tokenizer_and_chat_template_carry_through_sft(run):
  workdir, _, _ = run
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  c = _config(workdir)
  imported, cfg = hf.load_hf(c.init.hf_path, mesh)
  # pretrain.train.steps=0: the stage only imported; its export is the imported weights, bit for bit.
  exported, exported_cfg, _ = training.load_export(os.path.join(workdir, "pretrain"), mesh, sharding.DEFAULT_RULES)
  assert exported_cfg == dataclasses.replace(cfg, dtype="float32")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), imported, exported)
  sft_params, sft_cfg, _ = training.load_export(os.path.join(workdir, "sft"), mesh, sharding.DEFAULT_RULES)
  assert sft_cfg.family == "qwen2" and sft_cfg.qkv_bias and "bq" in sft_params["layers"]
  assert not np.array_equal(np.asarray(sft_params["layers"]["w_in"]), np.asarray(imported["layers"]["w_in"]))
  with open(os.path.join(workdir, "sft", "export.json")) as f:
    manifest = json.load(f)
  assert manifest["tokenizer"]["kind"] == "hf"
  tok = tokenizers.load_from_dir(os.path.join(workdir, "sft"), manifest["tokenizer"])
  ids, mask = tokenizers.encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
  text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
  assert text == "yo<|im_end|>", text  # ChatML: the reply and its end-of-turn token are what SFT trains on
  assert tok.decode([tok.eos_id], skip_special=False) == "<|im_end|>"  # what sampling stops on
  assert os.path.isfile(os.path.join(workdir, "export", "policy", "tokenizer.json"))  # the tokenizer travels


def test_the_hh_smoke_preset_passes_its_preflight():
  pipeline.preflight(experiments.config("hh", "smoke"))
