"""Gao et al. 2022, scaling laws for reward over-optimisation: best-of-n and RL against sqrt(KL), gold and proxy.

  python run.py --experiment=experiments/papers/gao.py:cpu --workdir=workdirs/papers   # one seed
  python run.py --experiment=experiments/papers/gao.py:cpu --seeds=0-2 --workdir=workdirs/papers  # three seeds
  python run.py --experiment=experiments/papers/gao.py:accelerator --workdir=/data/gao             # 3 RM sizes
  python run.py --experiment=experiments/papers/gao.py:tiny --workdir=/tmp/papers_tiny               # smoke test

The shared stages (data, pretrain, SFT, the reward model) are experiments/instructgpt's `small` (`tiny` for the
smoke test), so in that experiment's workdir this adds only the low-beta RL run (WORKDIR/ppo_gao) and the papers
stage (WORKDIR/papers_gao, cpu_sizes: papers_gao_sizes: best-of-n of SFT for n = 1..64 on the held-out prompts,
the fits, the figure and the verdicts; rlhf_jax/stages/papers.py). report.md then includes its section. Results
and the time each preset took: experiments/papers/README.md.

Presets:
  cpu          one reward model (the shared `rm`); PPO at a fixed beta of 0.005 for 60 iterations at lr 5e-5 (the
               instructgpt `kl0` variant's rate, whose gold score peaked after ~10 iterations), every iteration
               logged: on a 2-core CPU, about 10 minutes once the shared stages exist.
  cpu_sizes    cpu, plus reward models of the `tiny` and `medium` sizes (a quarter and 3.4x the `small` policy's
               parameters) and a policy-sized one on half the comparisons (rm_half, rm.max_train_prompts), each
               with its RL run: does the gold peak move out as the RM grows, and as its comparisons grow? Every
               RM starts from an SFT model of its own size (pretrain_<size> and sft_<size>: the shared stages'
               settings with that model), as the policy-sized one starts from the shared SFT model, so the sizes
               differ only in size. Best-of-n from 128 candidates a prompt by Gao et al.'s estimator
               (papers.bon_estimator="subsets"). About an hour a seed on a 2-core CPU (less once rm_proxy.py's
               `medium` stages exist in the workdir).
  accelerator  the same at 200 iterations with RMs of the `tiny`, `small` (the policy's) and `base` sizes, best-of-n
               from 256 candidates a prompt (papers.bon_estimator="subsets", Gao et al.'s estimator).
  tiny         the tiny pipeline, 4 RL iterations, best-of-n up to 4, a second reward model (the `small` size,
               from its own pretraining and SFT) and one on half the comparisons, each with its own RL run: a
               smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "cpu_sizes", "accelerator", "tiny")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  return c


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
  iterations = {"cpu": 60, "cpu_sizes": 60, "accelerator": 200, "tiny": 4}[preset]
  c.variants = ml_collections.ConfigDict({"gao": _rl("ppo_gao", iterations)})
  runs, rms, size_stages, rm_stages = ["ppo_gao"], ["rm"], [], []
  if preset != "cpu":
    # Reward models of other sizes on the same comparisons, each from a pretrained and SFT model of its size
    # (the shared stages' pretraining and SFT settings with that model), as the policy-sized `rm` starts from the
    # shared SFT model.
    sizes = {"cpu_sizes": ("tiny", "medium"), "accelerator": ("tiny", "base"), "tiny": ("small",)}[preset]
    for size in sizes:
      name, entries = configs.add_rm_of_size(c, size)
      c.variants[f"gao_{name}"] = _rl(f"ppo_gao_{name}", iterations, rm_from=name)
      runs.append(f"ppo_gao_{name}")
      rms.append(name)
      size_stages += entries[:-1]
      rm_stages.append(entries[-1])
    # The comparison-set size: the policy-sized RM on the first half of the shared comparisons' prompts.
    c.variants["rm_half"] = {"rm": {"stage_dir": "rm_half", "max_train_prompts": c.rm.n_prompts // 2}}
    c.variants["gao_rm_half"] = _rl("ppo_gao_rm_half", iterations, rm_from="rm_half")
    runs.append("ppo_gao_rm_half")
    rms.append("rm_half")
    rm_stages.append("rm:rm_half")
  # cpu_sizes writes a section of its own, so cpu's (one RM) and cpu_sizes' (four) stay side by side per seed.
  c.papers.stage_dir = "papers_gao_sizes" if preset == "cpu_sizes" else "papers_gao"
  c.papers.experiment = "gao"
  c.papers.runs = tuple(runs)
  c.papers.rms = tuple(rms)
  c.papers.best_of_n = (1, 2, 4) if preset == "tiny" else (1, 2, 4, 8, 16, 32, 64)
  if preset in ("cpu_sizes", "accelerator"):
    # Gao et al.'s estimator: each best-of-n the mean over every n-subset of a pool larger than the largest n,
    # so that the four RMs' best-of-n peaks are not one draw of 64 candidates each. The cpu preset keeps each
    # prompt's first n of 64 (papers.bon_estimator="first"), as its three seeds in experiments/papers/README.md ran.
    c.papers.bon_estimator = "subsets"
    c.papers.bon_candidates = 128 if preset == "cpu_sizes" else 256
  c.stages = ("data", "pretrain", "sft", *size_stages, "rm", *rm_stages, *(f"ppo:{r[len('ppo_'):]}" for r in runs), "papers",
              "report")
  return c
