"""Iterated online RLHF: rounds of (sample the current policy -> labelers rank -> RM on all comparisons so far ->
PPO from the current policy), a cross-model Elo table after every round, against one round given as many
comparisons and PPO iterations.

  python run.py --experiment=experiments/online/config.py:tiny --workdir=/tmp/online_tiny     # smoke test
  python run.py --experiment=experiments/online/config.py:small --workdir=workdirs/online_small
  python run.py --experiment=experiments/online/config.py:small --seeds=0-2 --workdir=workdirs/online

The shared stages (data, pretrain, SFT) are experiments/instructgpt's, so run in the default experiment's workdir
this reuses them. Round r (stage directories *_r<r>):
  collect_r<r>  the policy of round r-1 (SFT for r = 0) answers comparison prompts [r n, (r+1) n) K = 4..9 times,
                the simulated labelers rank the answers (rlhf_jax/stages/collect.py);
  rm_r<r>       a reward model trained from the SFT backbone on collect_r0 .. collect_r<r> (`rm.source =
                "collected"`; preset *_ft: fine-tuned from rm_r<r-1> on them instead), validated on round r's samples;
  ppo_r<r>      PPO from ppo_r<r-1> (SFT for r = 0) against rm_r<r>, its KL penalty and evaluation against SFT
                (`ppo.ref_from = "sft"`), `iterations_per_round` iterations;
  elo_r<r>      every snapshot so far (pretrain, SFT, ppo_r0 .. ppo_r<r>) plays labeler games on held-out prompts:
                Elo, Bradley-Terry and gold score (rlhf_jax/stages/elo.py), with a figure.
The single-round baseline (collect_1x, rm_1x, ppo_1x) collects all R n comparisons from SFT at once and runs PPO
from SFT for R x iterations_per_round iterations; elo_final rates every snapshot with it. Every stage directory
is kept, and a re-run resumes in the first unfinished stage, so a killed or failed round restarts by itself.

Presets: tiny (3 rounds of 16 prompts, 2 PPO iterations each: a smoke test; with pretraining and SFT cut to a
few steps it took 37 minutes on a 2-core CPU shared with other runs at load ~14, unloaded not measured); tiny_ft
(each round's RM fine-tuned from the last); small (3 rounds of 333 of the 1000 comparison prompts, 14 PPO
iterations each, against 999 prompts and 42 iterations at once: four RMs and 84 PPO iterations, 30 minutes a
seed on a 2-core CPU shared with one other run); small_ft. Results: experiments/online/README.md.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("small", "small_ft", "tiny", "tiny_ft")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as README.md's results were measured
  return c


def online(c, *, rounds: int, prompts_per_round: int, iterations_per_round: int, finetune_rm: bool):
  """Sets c.variants and c.stages for `rounds` online rounds and the single-round baseline."""
  variants = {}
  stages = ["data", "pretrain", "sft"]
  snapshots = ["pretrain", "sft"]
  for r in range(rounds):
    prev = "sft" if r == 0 else f"ppo_r{r - 1}"
    variants[f"c{r}"] = {"collect": {"stage_dir": f"collect_r{r}", "policy_from": prev,
                                     "prompt_offset": r * prompts_per_round}}
    variants[f"r{r}"] = {"rm": {"stage_dir": f"rm_r{r}", "collected": tuple(f"collect_r{i}" for i in range(r + 1)),
                                "finetune_from": f"rm_r{r - 1}" if finetune_rm and r else ""}}
    variants[f"p{r}"] = {"ppo": {"stage_dir": f"ppo_r{r}", "init_from": prev, "rm_from": f"rm_r{r}"}}
    snapshots.append(f"ppo_r{r}")
    variants[f"e{r}"] = {"elo": {"stage_dir": f"elo_r{r}", "snapshots": tuple(snapshots)}}
    stages += [f"collect:c{r}", f"rm:r{r}", f"ppo:p{r}", f"elo:e{r}"]
  variants["c1x"] = {"collect": {"stage_dir": "collect_1x", "n_prompts": rounds * prompts_per_round}}
  variants["r1x"] = {"rm": {"stage_dir": "rm_1x", "collected": ("collect_1x",)}}
  variants["p1x"] = {"ppo": {"stage_dir": "ppo_1x", "rm_from": "rm_1x", "iterations": rounds * iterations_per_round}}
  variants["efinal"] = {"elo": {"stage_dir": "elo_final", "snapshots": (*snapshots, "ppo_1x")}}
  stages += ["collect:c1x", "rm:r1x", "ppo:p1x", "elo:efinal", "report"]
  c.variants = ml_collections.ConfigDict(variants)
  c.stages = tuple(stages)
  # Every round draws K responses as the RM stage does from SFT (the instructgpt preset's rm settings).
  c.collect.n_prompts = prompts_per_round
  c.collect.n_val_prompts = c.rm.n_val_prompts
  c.collect.k_min, c.collect.k_max = c.rm.k_min, c.rm.k_max
  c.collect.sample_temperature, c.collect.max_new_tokens = c.rm.sample_temperature, c.rm.max_new_tokens
  c.rm.source = "collected"
  c.ppo.iterations = iterations_per_round
  c.ppo.ref_from = "sft"
  c.eval.best_of_n = []  # best-of-n of a round's starting policy is not a baseline of this experiment
  c.elo.n_prompts = c.eval.n_prompts
  return c


def get_config(arg: str | None = None):
  preset = arg or "small"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/online/config.py; expected one of "
                     f"{', '.join(PRESETS)}")
  ft = preset.endswith("_ft")
  if preset.startswith("tiny"):
    c = _instructgpt("tiny")
    c = online(c, rounds=3, prompts_per_round=16, iterations_per_round=2, finetune_rm=ft)
    c.collect.n_val_prompts = 8
    c.elo.samples_per_prompt = 1
  else:
    c = _instructgpt("small")
    # 999 of the 1000 comparison prompts in three rounds; 42 PPO iterations in all (instructgpt small: 40).
    c = online(c, rounds=3, prompts_per_round=333, iterations_per_round=14, finetune_rm=ft)
  return c
