"""DPO against PPO (Rafailov et al. 2023, Fig. 2): held-out gold score against KL to SFT for DPO at several betas
and PPO at several betas, on the same SFT model and the same comparisons. The paper's claim: DPO's reward-KL
frontier lies above PPO's (more reward at every KL).

  python run.py --experiment=experiments/papers/dpo_vs_ppo.py:cpu --seeds=0-2 --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/dpo_vs_ppo.py:tiny --workdir=/tmp/papers_tiny   # smoke test

The shared stages and the DPO settings are experiments/baselines' (one epoch of the RM's comparisons at lr 5e-5;
beta 0.1 is its own `dpo` stage); the PPO runs are experiments/papers/kl_frontier.py's, the same stage
directories (ppo_beta0_1, ..., and the adaptive ppo_target1_5), so in a workdir where either experiment ran,
those runs are reused. Each other DPO beta is one stage directory (dpo_beta0_3 for 0.3). The papers stage
(WORKDIR/papers_dpo_vs_ppo) writes the figure, table and verdict: every DPO point inside PPO's KL range at or
above PPO's best gold at that KL (rlhf_jax/evals/scaling.frontier_dominates). Results:
experiments/papers/README.md.

Presets:
  cpu          DPO betas 0.03, 0.1, 0.3 and 1 (about 5 minutes each on an idle 2-core CPU) and kl_frontier's cpu
               PPO runs.
  accelerator  DPO betas 0.01, 0.03, 0.1, 0.3, 1 and 3, and kl_frontier's accelerator PPO runs.
  tiny         DPO betas 0.1 and 1 and kl_frontier's tiny runs: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_HERE = os.path.dirname(os.path.abspath(__file__))
_BASELINES = os.path.join(_HERE, "..", "baselines", "config.py")
_KL_FRONTIER = os.path.join(_HERE, "kl_frontier.py")
PRESETS = ("cpu", "accelerator", "tiny")
BETAS = {"cpu": (0.03, 0.1, 0.3, 1.0), "accelerator": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "tiny": (0.1, 1.0)}


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/dpo_vs_ppo.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = configs.experiment_config(_BASELINES, "tiny" if preset == "tiny" else "small")
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  kl = configs.experiment_config(_KL_FRONTIER, preset)
  ppo_names = [n for n in kl.variants]
  c.variants = ml_collections.ConfigDict({n: kl.variants[n].to_dict() for n in ppo_names})
  dpo_runs = []
  for beta in BETAS[preset]:
    if beta == c.dpo.beta:
      dpo_runs.append(c.dpo.stage_dir)  # the shared `dpo` stage itself
      continue
    name = f"dpo_beta{beta:g}".replace(".", "_")
    c.variants[name] = {"dpo": {"stage_dir": name, "beta": beta}}
    dpo_runs.append(name)
  c.papers.stage_dir = "papers_dpo_vs_ppo"
  c.papers.experiment = "dpo_vs_ppo"
  c.papers.runs = tuple(kl.papers.runs)
  c.papers.dpo_runs = tuple(dpo_runs)
  dpo_stages = ["dpo"] + [f"dpo:{n}" for n in c.variants if n.startswith("dpo_")]
  c.stages = ("data", "pretrain", "sft", "rm", *(f"ppo:{n}" for n in ppo_names), *dpo_stages, "papers", "report")
  return c
