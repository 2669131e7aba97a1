"""The alignment tax and PPO-ptx (InstructGPT, Ouyang et al. 2022, sec 4.2 and Fig. 28-29): PPO at several
PPO-ptx coefficients, the held-out pretraining loss and the benchmark skill against the gold win rate over SFT.
The paper's claim: RL from human feedback costs performance on the pretraining distribution (the alignment tax),
and mixing pretraining gradients into PPO recovers it without giving up the preference gains.

  python run.py --experiment=experiments/papers/alignment_tax.py:cpu --seeds=0-2 --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/alignment_tax.py:tiny --workdir=/tmp/papers_tiny   # smoke test

The shared stages are experiments/instructgpt's `small` (`tiny`); coefficient 0 is its own `ppo` stage and 1 the
`ptx` preset's `ppo_ptx` (so in a workdir that already has them, e.g. experiments/baselines', only the other
coefficients run), each other coefficient one RL stage directory (ppo_ptx0_3 for 0.3). The papers stage
(WORKDIR/papers_alignment_tax) writes the figure, table and verdicts. Results: experiments/papers/README.md.

Our loss is per-token means of both terms (rlhf_jax/losses: the PPO loss + gamma * the next-token loss on
ppo.ptx.ratio pretraining sequences per episode), where InstructGPT's gamma = 27.8 weighs a per-example
expectation of the sequence log-likelihood against the episode reward: the two gammas are not the same number,
so the presets sweep gamma over a decade around the `ptx` preset's 1.0.

Presets:
  cpu          coefficients 0, 0.3, 1 and 3 (four 40-iteration RL runs, two of them shared with instructgpt's
               ppo and ppo_ptx), about 4 minutes each on an idle 2-core CPU.
  accelerator  0, 0.1, 0.3, 1, 3, 10 and 30.
  tiny         0, 1 and 3, 2 iterations each: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "accelerator", "tiny")
COEFS = {"cpu": (0.0, 0.3, 1.0, 3.0), "accelerator": (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "tiny": (0.0, 1.0, 3.0)}


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/alignment_tax.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = configs.experiment_config(_INSTRUCTGPT, "tiny" if preset == "tiny" else "small")
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  no_bon = {"eval": {"best_of_n": []}}  # best-of-n of SFT does not depend on the coefficient
  c.variants = ml_collections.ConfigDict()
  runs = []
  for coef in COEFS[preset]:
    if coef == 0:
      runs.append(c.ppo.stage_dir)  # plain PPO: the shared `ppo` stage itself
      continue
    name = "ptx" if coef == 1.0 else f"ptx{coef:g}".replace(".", "_")  # 1.0: the ptx preset's ppo_ptx
    c.variants[name] = {"ppo": {"stage_dir": f"ppo_{name}", "ptx": {"coef": coef}}, **no_bon}
    runs.append(f"ppo_{name}")
  c.papers.stage_dir = "papers_alignment_tax"
  c.papers.experiment = "alignment_tax"
  c.papers.runs = tuple(runs)
  c.papers.ptx_coefs = COEFS[preset]
  c.stages = ("data", "pretrain", "sft", "rm", "ppo", *(f"ppo:{n}" for n in c.variants), "papers", "report")
  return c
