"""The tiny pipeline with bfloat16 parameters and compute (model.param_dtype, model.dtype): data, pretraining,
SFT, the reward model, DPO, PPO and GRPO all run in one `run.py` and finish with finite losses; each trained
stage's parameters stay bfloat16 and its Adam moments float32 (rlhf_jax.optim.float32_state), and the weights
move (stochastic rounding, optimizer.param_rounding; with rounding to nearest most small updates are lost)."""

import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import stage_runner
from rlhf_jax import metrics

pytestmark = pytest.mark.xdist_group("bf16_pipeline")

STAGES = ("data", "pretrain", "sft", "rm", "dpo", "ppo", "ppo:grpo")
TRAINED = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")
FLAGS = ("--experiment.model.param_dtype=bfloat16", "--experiment.model.dtype=bfloat16",
         "--experiment.checkpoint.save_every=100", *(f"--experiment.stages={s}" for s in STAGES))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("bf16_pipeline")
  workdir = str(root / "w")
  base = tuple(f for f in stage_runner.BASELINE_FLAGS if not f.startswith("--experiment.stages="))
  proc = stage_runner.run(workdir, *FLAGS, cache_dir=str(root / "cache"), timeout=1200, base_flags=base)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.parametrize("stage", TRAINED)
def test_every_stage_finishes_with_finite_losses(run, stage):
  rows = metrics.read_jsonl(os.path.join(run, stage, "metrics.jsonl"))
  steps = [r for r in rows if "loss" in r]
  assert steps, stage
  for r in steps:
    assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]), (stage, r)


@pytest.mark.parametrize("stage", ("pretrain", "sft", "rm", "dpo", "ppo"))
def test_parameters_stay_bfloat16_with_float32_moments_and_move(run, stage):
  ckpts = os.path.join(run, stage, "checkpoints")
  last = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(last), "state"))
  p = state["params"]
  # The Transformers are bfloat16; the scalar heads (the RM's and the value model's) stay float32.
  models = [p["backbone"]] if stage == "rm" else [p["policy"], p["value"]["backbone"]] if stage == "ppo" else [p]
  assert all(x.dtype == ml_dtypes.bfloat16 for m in models for x in jax.tree.leaves(m)), stage
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) >= 1]
  assert moments and all(x.dtype == np.float32 for x in moments), stage
  if stage == "pretrain":
    return
  # The stage's first weights (the previous stage's export) against its last checkpoint: the weights moved.
  # (How far, against float32 parameters: tests/optim_test.py. DPO's 3 steps at its small learning rate move
  # each weight less than a bfloat16 spacing, so stochastic rounding moves about a fifth of them.)
  start = stage_runner.load_params(os.path.join(run, "pretrain" if stage == "sft" else "sft", "params"))
  wq_start = np.asarray(start["['layers']['wq']"], np.float32)
  wq_end = np.asarray(models[0]["layers"]["wq"], np.float32)
  assert wq_end.shape == wq_start.shape
  assert np.mean(wq_end != wq_start) > 0.1, stage
