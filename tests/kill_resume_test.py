"""Kill-and-resume: a run SIGKILLed at random moments and resumed ends with bit-for-bit the same parameters.

The uninterrupted reference is one run of the tiny pipeline cut to a few steps per stage (tests/helpers/
stage_runner.py TINY_FLAGS). The harness then copies its generated data into a fresh workdir and runs the same
pipeline again, killing it with SIGKILL at seeded random moments in every stage: right after a step's progress
line (the step's async checkpoint save is in flight) and at random times after a stage starts (restore,
compilation, a step, the final export). Each restart is a new process resuming the workdir: the pipeline skips
finished stages and the unfinished one resumes from its latest checkpoint. At the end the exported parameters
of pretrain, SFT, RM and PPO must equal the reference's exactly, and each stage's metrics.jsonl must read as one
uninterrupted run with the reference's losses.

The suite runs 1 kill per stage (right after a step's progress line, so during its async save), the full harness
5 (both require at least one kill during an async save):

    RLHF_FULL_KILL_TEST=1 python -m pytest tests/kill_resume_test.py -q -x

and a different seed with RLHF_KILL_SEED=<int>.
"""

import os

import numpy as np
import pytest

from helpers import stage_runner

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("kill_resume")  # its module fixtures are built once, on one worker

FULL = os.environ.get("RLHF_FULL_KILL_TEST", "") not in ("", "0")
SEED = int(os.environ.get("RLHF_KILL_SEED", "0"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(workdir, cache dir) of an uninterrupted run of the tiny pipeline."""
  return stage_runner.shared_reference(tmp_path_factory)


def _metric_rows(path):
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_killed_pipeline_resumes_to_identical_parameters(reference, tmp_path):
  ref_dir, cache = reference
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(workdir, "data"))
  rng = np.random.default_rng(SEED)
  kills = 5 if FULL else 1
  attempts = stage_runner.kill_and_resume(workdir, (), rng, kills_per_stage=kills, cache_dir=cache)

  killed = [a for a in attempts if a.killed]
  report = "\n".join(f"{a.kill.describe() if a.kill else 'final run'}: killed={a.killed} rc={a.returncode} "
                     f"in={a.stage} tmp={len(a.tmp_checkpoints)} {a.wall_s:.1f}s" for a in attempts)
  print(report)
  # Every stage was interrupted at least twice (a kill whose moment never came does not count).
  for stage in stage_runner.TRAINED_STAGES:
    n = sum(1 for a in killed if a.stage == stage)
    assert n >= kills, f"only {n} kills landed in {stage}:\n{report}"
  # A kill right after a step's progress line finds that step's async save in flight (orbax's temporary
  # folder is left behind); such kills are the point of the harness, so at least one must have happened.
  assert any(a.tmp_checkpoints for a in killed), f"no kill landed during an async save:\n{report}"

  for stage in stage_runner.TRAINED_STAGES:
    want = stage_runner.load_params(os.path.join(ref_dir, stage, "params"))
    got = stage_runner.load_params(os.path.join(workdir, stage, "params"))
    assert sorted(got) == sorted(want), stage
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{stage} {name}\n{report}")
    # metrics.jsonl reads as one uninterrupted run: each step once, in order, with the reference's losses.
    rows = _metric_rows(os.path.join(workdir, stage, "metrics.jsonl"))
    ref_rows = _metric_rows(os.path.join(ref_dir, stage, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(
        range(1, stage_runner.STAGE_STEPS[stage] + 1)), f"{stage}\n{report}"
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], f"{stage}\n{report}"
    assert os.path.exists(os.path.join(workdir, stage, "summary.json"))
  # A kill never leaves a temporary checkpoint that a later run restores or keeps: all are cleaned up or
  # ignored, and the final checkpoints are the reference's steps.
  for stage in stage_runner.TRAINED_STAGES:
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, stage, "checkpoints")) if d.isdigit())
    ref_steps = sorted(int(d) for d in os.listdir(os.path.join(ref_dir, stage, "checkpoints")) if d.isdigit())
    assert steps == ref_steps, stage


def test_killed_baseline_stages_resume_to_identical_parameters(reference, tmp_path):
  """DPO and a critic-free RL variant (GRPO; RLOO shares its state and update), killed at random moments after
  the shared stages (copied from the reference), resume to the parameters of an uninterrupted run of them."""
  ref_dir, cache = reference
  flags = stage_runner.BASELINE_FLAGS
  shared = ("data", "pretrain", "sft", "rm", "comparisons")
  workdirs = {}
  for name in ("uninterrupted", "killed"):
    workdirs[name] = str(tmp_path / name)
    for d in shared:
      if os.path.exists(os.path.join(ref_dir, d)):
        stage_runner.copy_workdir(os.path.join(ref_dir, d), os.path.join(workdirs[name], d))
  proc = stage_runner.run(workdirs["uninterrupted"], cache_dir=cache, base_flags=flags, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # DPO's reference log-probs, computed once before training, match the training pass: at the first step the
  # policy is the reference, so every implicit reward margin is 0 (up to float32 rounding).
  first = _metric_rows(os.path.join(workdirs["uninterrupted"], "dpo", "metrics.jsonl"))[0]
  assert abs(first["reward_margin"]) < 1e-4, first
  rng = np.random.default_rng(SEED + 1)
  kills = 2 if FULL else 1
  attempts = stage_runner.kill_and_resume(workdirs["killed"], (), rng, kills_per_stage=kills, cache_dir=cache,
                                          stages=tuple(stage_runner.BASELINE_STEPS), base_flags=flags,
                                          stage_steps=stage_runner.BASELINE_STEPS)
  killed = [a for a in attempts if a.killed]
  report = "\n".join(f"{a.kill.describe() if a.kill else 'final run'}: killed={a.killed} rc={a.returncode} "
                     f"in={a.stage} {a.wall_s:.1f}s" for a in attempts)
  for stage in stage_runner.BASELINE_STEPS:
    assert sum(1 for a in killed if a.stage == stage) >= kills, f"no kill landed in {stage}:\n{report}"
    want = stage_runner.load_params(os.path.join(workdirs["uninterrupted"], stage, "params"))
    got = stage_runner.load_params(os.path.join(workdirs["killed"], stage, "params"))
    assert sorted(got) == sorted(want), stage
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{stage} {name}\n{report}")
    rows = _metric_rows(os.path.join(workdirs["killed"], stage, "metrics.jsonl"))
    ref_rows = _metric_rows(os.path.join(workdirs["uninterrupted"], stage, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, stage_runner.BASELINE_STEPS[stage] + 1)), stage
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], f"{stage}\n{report}"
