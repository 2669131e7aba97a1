"""The KL-penalty frontier (Ziegler et al. 2019, Stiennon et al. 2020): PPO at fixed betas and under the adaptive
controller, held-out gold score against KL to SFT. The papers' claim: the best gold lies at an interior beta.

  python run.py --experiment=experiments/papers/kl_frontier.py:cpu --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/kl_frontier.py:cpu --seeds=0-2 --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/kl_frontier.py:accelerator --workdir=/data/kl_frontier
  python run.py --experiment=experiments/papers/kl_frontier.py:tiny --workdir=/tmp/papers_tiny   # smoke test

The shared stages are experiments/instructgpt's `small` (`tiny`), so in its workdir this adds one RL stage
directory per beta (ppo_beta0_1 for 0.1) and per adaptive target (ppo_target1_5), each evaluated on the held-out
prompts as PPO is, and the papers stage (WORKDIR/papers_kl_frontier: figure, table, verdict). Every run has the
same 40 iterations at lr 5e-5 (2.5x the default's, so a small beta can over-optimise within the run; the
instructgpt `kl0` variant at that rate peaked in gold after ~10 iterations). Results: experiments/papers/README.md.

Presets:
  cpu          betas 1, 0.3, 0.1, 0.03, 0.003 and the adaptive controller at target 1.5 nats (the default's): six
               RL runs of 40 iterations, about 4 minutes each on an idle 2-core CPU. (Beta 1 was added after
               seed 2's first run found the best gold at 0.3, the largest beta then: the range must bracket it.)
  accelerator  betas 0.5, 0.2, 0.1, 0.05, 0.02, 0.005, 0 and adaptive targets 0.5, 1.5, 4, 10, at 100 iterations.
  tiny         betas 0.1, 0.01, 0.001 and target 1.5, 2 iterations each: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "accelerator", "tiny")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  return c


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/kl_frontier.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = _instructgpt("tiny" if preset == "tiny" else "small")
  betas, targets, iterations = {
      "cpu": ((1.0, 0.3, 0.1, 0.03, 0.003), (1.5,), 40),
      "accelerator": ((0.5, 0.2, 0.1, 0.05, 0.02, 0.005, 0.0), (0.5, 1.5, 4.0, 10.0), 100),
      "tiny": ((0.1, 0.01, 0.001), (1.5,), 2),
  }[preset]
  common = {"iterations": iterations, "optimizer": {"lr": 5e-5}}
  no_bon = {"eval": {"best_of_n": []}}  # best-of-n of SFT does not depend on beta
  c.variants = ml_collections.ConfigDict()
  for beta in betas:
    name = f"beta{beta:g}".replace(".", "_")  # config keys have no dots
    c.variants[name] = {"ppo": {"stage_dir": f"ppo_{name}", "kl": {"adaptive": False, "init_beta": beta}, **common},
                        **no_bon}
  for target in targets:
    name = f"target{target:g}".replace(".", "_")
    c.variants[name] = {"ppo": {"stage_dir": f"ppo_{name}", "kl": {"adaptive": True, "target": target}, **common},
                        **no_bon}
  names = list(c.variants)
  c.papers.stage_dir = "papers_kl_frontier"
  c.papers.experiment = "kl_frontier"
  c.papers.runs = tuple(f"ppo_{n}" for n in names)
  c.stages = ("data", "pretrain", "sft", "rm", *(f"ppo:{n}" for n in names), "papers", "report")
  return c
