"""End to end: the tiny InstructGPT pipeline (3 PPO iterations), resumption, and run.py's flag handling."""

import collections
import json
import os
import re
import shutil

import pytest

from rlhf_jax import feedback, metrics, pipeline
from rlhf_jax.data import sources
from rlhf_jax.tasks.world import FAMILIES

from helpers import experiments, stage_runner  # tests/ is on sys.path (tests/conftest.py)

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("pipeline")  # its module fixtures are built once, on one worker

ROOT = stage_runner.ROOT
REQUIRED = ["pretrain.val_loss", "sft.val_loss", "rm.val_accuracy", "rm.gold_ceiling_accuracy", "sft.gold_score",
            "ppo.gold_score", "ppo.rm_score", "ppo.kl_to_sft", "ppo.win_rate_vs_sft", "ppo.pretrain_val_loss"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  # The tiny pipeline (3 PPO iterations), run once per session through run.py and shared with the
  # reliability tests (tests/helpers/stage_runner.py); this module only reads it, or copies it first.
  workdir, cache = stage_runner.shared_reference(tmp_path_factory)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  return workdir, cache, summary


def test_pipeline_writes_every_summary_key_and_the_report(tiny_run):
  workdir, _, summary = tiny_run
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in REQUIRED:
    assert key in on_disk, key
    assert isinstance(on_disk[key], float), (key, on_disk[key])
  assert on_disk == {**on_disk, **summary}
  for stage in ("pretrain", "sft", "rm", "ppo"):
    rows = metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
    assert rows and all("step" in r for r in rows)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicates
    assert os.path.exists(os.path.join(workdir, stage, "summary.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, stage)))
  report = open(os.path.join(workdir, "report.md")).read()
  assert "learning_curves.png" in report and "reward_vs_kl.png" in report and "| prompt |" in report
  for png in ("learning_curves.png", "reward_vs_kl.png"):
    assert open(os.path.join(workdir, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  # The per-family table (policy collapse shows in its last row) and the keys it reads.
  assert "## Gold score by task family" in report and "| most common response |" in report
  for prefix in ("sft.", "sft.pretrain_", "ppo.", "ppo.sft_"):
    assert 0 < on_disk[f"{prefix}top_response_frac"] <= 1, prefix
    assert -2 <= on_disk[f"{prefix}harmful.gold_score"] <= 2, prefix
  # The ceilings and the RM's likelihood baseline reach the summary. On the same candidates the gold scorer's
  # pick scores at least the RM's; the reference answer is the gold maximum, so it wins at least as often.
  assert "## Against best-of-n and the ceilings" in report
  assert on_disk["ppo.bon2.oracle_gold_score"] >= on_disk["ppo.bon2.gold_score"]
  assert on_disk["ppo.bon2.oracle_win_rate_vs_sft"] >= on_disk["ppo.bon2.win_rate_vs_sft"]
  assert 1 >= on_disk["ppo.reference_win_rate_vs_sft"] >= on_disk["ppo.bon2.oracle_win_rate_vs_sft"]
  # Two samples per prompt (the tiny preset) of each policy on the shared run's 8 held-out prompts
  # (stage_runner.TINY_FLAGS); per-prompt win rates lie in [0, 1], so the standard error over 8 prompts is at
  # most 0.5 / sqrt(7).
  assert on_disk["ppo.n_eval_samples"] == 2 * 8
  assert 0 < on_disk["ppo.win_rate_vs_sft_se"] <= 0.5 / 7 ** 0.5 + 1e-9
  assert 0 <= on_disk["rm.val_policy_logprob_accuracy"] <= 1
  # Per-family clear-pair accuracies: their pair counts add up to the total, their weighted mean is the total.
  fams = [k.split(".")[1] for k in on_disk if k.startswith("rm.") and k.endswith(".val_gold_pairs_clear")
          and k.count(".") == 2]
  n = {f: on_disk[f"rm.{f}.val_gold_pairs_clear"] for f in fams}
  assert sum(n.values()) == on_disk["rm.val_gold_pairs_clear"]  # this tiny draw may have no clear pair
  # The families come from the RM stage's own policy comparisons (prompt text only, parsed by the world).
  config = experiments.config("instructgpt", "tiny")
  config.rm.n_prompts, config.rm.n_val_prompts = 16, 8  # the shared run's sizes (stage_runner.FLAGS)
  _, val_records = feedback.comparison_records(config, workdir, sources.tokenizer(config, workdir))
  families = feedback.suite_families(config, workdir, val_records)
  assert families is not None and len(families) == len(val_records) and set(families) <= set(FAMILIES)
  assert set(fams) <= set(families)
  for metric in ("val_gold_accuracy_clear", "val_policy_logprob_gold_accuracy_clear") if n else ():
    weighted = sum(on_disk[f"rm.{f}.{metric}"] * n[f] for f in fams) / sum(n.values())
    assert weighted == pytest.approx(on_disk[f"rm.{metric}"]), metric
  ppo_rows = metrics.read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl"))
  assert {"kl_seq", "clip_frac", "approx_kl", "explained_variance", "entropy", "response_len", "rm_score",
          "gold_score", "beta"} <= set(ppo_rows[-1])


def test_each_stage_compiles_its_training_programs_once(tiny_run, tmp_path_factory):
  """A jitted step whose input signature changes after the first call (an uncommitted scalar that comes back
  placed, a weak type) compiles again: seconds here, minutes for a large model."""
  compiled = collections.Counter()
  stage = None
  for line in stage_runner.reference_log(tmp_path_factory).splitlines():
    m = re.search(r"stage (\w+): starting", line)
    stage = m.group(1) if m else stage
    m = re.search(r"Compiling jit\((\w+)\)", line)
    if m:
      compiled[stage, m.group(1)] += 1
  want = {("pretrain", "train_step"): 1, ("sft", "train_step"): 1, ("rm", "train_step"): 1,
          ("ppo", "rollout_fn"): 1, ("ppo", "update_fn"): 1,
          # the held-out LM loss: in the training loop and at the end; of the PPO policy and of SFT
          ("pretrain", "eval_step"): 1, ("sft", "eval_step"): 1, ("ppo", "_eval_step"): 1}
  assert {k: compiled[k] for k in want} == want, sorted(compiled.items())


def test_rerun_resumes_instead_of_starting_over(tiny_run, tmp_path):
  ref, cache, _ = tiny_run
  workdir = str(tmp_path / "w")
  shutil.copytree(ref, workdir)
  stages = ("pretrain", "sft", "rm", "ppo")
  before = {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in stages}
  proc = stage_runner.run(workdir, cache_dir=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert all(f"stage {s} is complete" in proc.stderr for s in stages)
  after = {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in stages}
  assert before == after  # every stage was complete: nothing was redone
  assert "is reused as it ran" not in proc.stderr
  # A finished stage is reused by its directory; a setting it recorded that the config now changes is named.
  proc = stage_runner.run(workdir, "--experiment.rm.loglik_coef=0", "--experiment.rm.labels=gold", cache_dir=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(ln for ln in proc.stderr.splitlines() if "stage rm is reused as it ran, with settings" in ln)
  assert "rm.labels: 'labelers' there, 'gold' here" in line and "rm.loglik_coef: 1.0 there, 0.0 here" in line
  assert "--experiment.rm.stage_dir" in proc.stderr and "stage ppo is reused" not in proc.stderr
  assert {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in stages} == before


def test_settings_changed_names_what_a_finished_stage_recorded_otherwise():
  c = experiments.config("instructgpt", "tiny")
  assert c.rm.loglik_coef == 1.0 and c.rm.score_at == "eos"
  recorded = {"loglik_coef": 0.0, "score_at": "eos", "lm_coef": 0.0, "val_accuracy": 0.6, "grouping": "prompt",
              "step": 4}
  assert pipeline.settings_changed(c, "rm", recorded) == ["rm.loglik_coef: 0.0 there, 1.0 here"]
  assert pipeline.settings_changed(c, "rm", {**recorded, "loglik_coef": 1.0}) == []
  assert pipeline.settings_changed(c, "data", recorded) == []  # no config block of its own


def test_policy_plus_offline_comparisons_add_the_suite_split_to_training_only(tiny_run):
  workdir, _, _ = tiny_run
  config = experiments.config("instructgpt", "tiny")
  config.rm.n_prompts, config.rm.n_val_prompts = 16, 8  # the shared run's sizes (stage_runner.FLAGS)
  tok = sources.tokenizer(config, workdir)
  policy_tr, policy_va = feedback.policy_comparisons(config, workdir, tok)
  offline = sources.split(config, workdir, "comparisons")
  config.rm.source = "policy+offline"
  tr, va = feedback.comparison_records(config, workdir, tok)
  assert len(policy_tr) == 16 and len(offline) > 0
  assert [r["responses"] for r in tr] == [r["responses"] for r in policy_tr] + [
      offline[i]["responses"] for i in range(len(offline))]
  assert [r["responses"] for r in va] == [r["responses"] for r in policy_va]
  # The shared comparisons were sampled for 16 prompts: a variant asking for 32 is an error, not the 16 reused.
  config.rm.n_prompts = 32
  with pytest.raises(ValueError, match=r"n=16,8;.*not this run's 'seed=0;n=32,8;.*use another workdir"):
    feedback.policy_comparisons(config, workdir, tok)
