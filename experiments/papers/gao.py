"""Gao et al. 2022, scaling laws for reward over-optimisation: best-of-n and RL against sqrt(KL), gold and proxy.

  python run.py --experiment=experiments/papers/gao.py:cpu --workdir=workdirs/instructgpt_small   # one seed
  python run.py --experiment=experiments/papers/gao.py:cpu --seeds=0-2 --workdir=workdirs/papers  # three seeds
  python run.py --experiment=experiments/papers/gao.py:accelerator --workdir=/data/gao             # 3 RM sizes
  python run.py --experiment=experiments/papers/gao.py:tiny --workdir=/tmp/papers_tiny               # smoke test

The shared stages (data, pretrain, SFT, the reward model) are experiments/instructgpt's `small` (`tiny` for the
smoke test), so in that experiment's workdir this adds only the low-beta RL run (WORKDIR/ppo_gao) and the papers
stage (WORKDIR/papers_gao: best-of-n of SFT for n = 1..64 on the held-out prompts, the fits, the figure and the
verdicts; rlhf_jax/stages/papers.py). report.md then includes its section. Results and the time each preset took:
experiments/papers/README.md.

Presets:
  cpu          one reward model (the shared `rm`); PPO at a fixed beta of 0.005 for 60 iterations at lr 5e-5 (the
               instructgpt `kl0` variant's rate, whose gold score peaked after ~10 iterations), every iteration
               logged: on a 2-core CPU, about 10 minutes once the shared stages exist.
  accelerator  the same at 200 iterations, plus reward models of three sizes, the two others trained from
               scratch (rm_tiny, rm_base: only the policy-sized one can start from SFT, a confound the README
               states), each with its own RL run: does the gold peak move out as the RM grows? And a policy-sized
               RM on half the comparisons (rm_half, rm.max_train_prompts) with its RL run: does the peak move out
               with the comparison-set size?
  tiny         the tiny pipeline, 4 RL iterations, best-of-n up to 4, a second reward model (the `small` size,
               from scratch) and one on half the comparisons, each with its own RL run: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "accelerator", "tiny")


def _instructgpt(preset: str):
  return configs.experiment_config(_INSTRUCTGPT, preset)


def _rl(stage_dir: str, iterations: int, rm_from: str = "rm") -> dict:
  # A fixed low beta (Gao et al. ran RL with little or no KL penalty), every iteration logged: iteration 1's
  # rollout is the SFT policy's own, the origin of the RL curve. The papers stage evaluates best-of-n itself.
  return {"ppo": {"stage_dir": stage_dir, "rm_from": rm_from, "iterations": iterations, "log_every": 1,
                  "kl": {"adaptive": False, "init_beta": 0.005}, "optimizer": {"lr": 5e-5}},
          "eval": {"best_of_n": []}}


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/gao.py; expected one of {', '.join(PRESETS)}")
  c = _instructgpt("tiny" if preset == "tiny" else "small")
  iterations = {"cpu": 60, "accelerator": 200, "tiny": 4}[preset]
  c.variants = ml_collections.ConfigDict({"gao": _rl("ppo_gao", iterations)})
  runs, rms, rm_stages = ["ppo_gao"], ["rm"], []
  if preset in ("accelerator", "tiny"):
    # Reward models of other sizes on the same comparisons, from scratch (the smoke test: one, the `small` size).
    sizes = ("tiny", "base") if preset == "accelerator" else ("small",)
    for size in sizes:
      name = f"rm_{size}"
      c.variants[name] = {"rm": {"stage_dir": name, "model_size": size}}
      c.variants[f"gao_{name}"] = _rl(f"ppo_gao_{name}", iterations, rm_from=name)
      runs.append(f"ppo_gao_{name}")
      rms.append(name)
      rm_stages.append(f"rm:{name}")
    # The comparison-set size: the policy-sized RM on the first half of the shared comparisons' prompts.
    c.variants["rm_half"] = {"rm": {"stage_dir": "rm_half", "max_train_prompts": c.rm.n_prompts // 2}}
    c.variants["gao_rm_half"] = _rl("ppo_gao_rm_half", iterations, rm_from="rm_half")
    runs.append("ppo_gao_rm_half")
    rms.append("rm_half")
    rm_stages.append("rm:rm_half")
  c.papers.stage_dir = "papers_gao"
  c.papers.experiment = "gao"
  c.papers.runs = tuple(runs)
  c.papers.rms = tuple(rms)
  c.papers.best_of_n = (1, 2, 4) if preset == "tiny" else (1, 2, 4, 8, 16, 32, 64)
  c.stages = ("data", "pretrain", "sft", "rm", *rm_stages, *(f"ppo:{r[len('ppo_'):]}" for r in runs), "papers",
              "report")
  return c
