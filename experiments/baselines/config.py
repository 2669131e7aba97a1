"""PPO beside the methods RLHF papers compare it with: PPO-ptx, GRPO, RLOO, DPO and IPO, from one SFT model.

  python run.py --experiment=experiments/baselines/config.py:small --workdir=workdirs/baselines
  python run.py --experiment=experiments/baselines/config.py:small --seeds=0-2 --workdir=workdirs/baselines
  python run.py --experiment=experiments/baselines/config.py:tiny --workdir=/tmp/baselines_tiny   # smoke test

The shared stages (data, pretrain, SFT, the reward model) are experiments/instructgpt's with InstructGPT's reward
model (rm.loglik_coef=0; the default run's adds its log-likelihood), so a workdir of these experiments (icl, mlm,
experiments/papers) shares them; this adds one stage directory per method. Every RL method runs the RL stage
(rlhf_jax/stages/rl.py) with its algorithm, against the same reward model, for the same 40 iterations of 64
episodes at the same learning rate; DPO and IPO train on the reward model's own comparisons (no RM, no
sampling). Every policy is evaluated like PPO's (the same held-out prompts, SFT samples and RL temperature), and
`report.md` has one row per policy and a figure of gold score against KL for all of them. Results:
experiments/baselines/README.md.

Variants (stages entries "stage:variant"):
  ptx     PPO-ptx: pretraining gradients mixed into PPO (InstructGPT's gamma; here 1.0 per the batch).
  grpo    GRPO (DeepSeekMath): G = 4 samples per prompt (16 prompts x 4), group-normalised advantages, no critic,
          the KL as a k3 loss term at beta 0.04 (DeepSeekMath's), each response's tokens averaged.
  drgrpo  Dr. GRPO: GRPO without the std division and the per-response length normalisation (not run by default).
  rloo    RLOO (Ahmadian et al.): k = 4 samples per prompt, leave-one-out baseline on the sequence reward with the
          KL penalty, the adaptive KL controller as PPO's.
  ipo     IPO: the DPO stage with the squared loss (beta as IPO's tau).
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("small", "tiny")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as README.md's results were measured
  return c


def get_config(arg: str | None = None):
  preset = arg or "small"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/baselines/config.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = _instructgpt(preset)
  group = 4  # samples per prompt of GRPO and RLOO: the same 64 (tiny: 16) episodes as PPO, from a quarter the prompts
  no_bon = {"eval": {"best_of_n": []}}  # best-of-n of SFT does not depend on the method: PPO's evaluation has it
  c.variants = ml_collections.ConfigDict({
      "ptx": {"ppo": {"stage_dir": "ppo_ptx", "ptx": {"coef": 1.0}}, **no_bon},
      "grpo": {"ppo": {"stage_dir": "grpo", "algorithm": "grpo", "group_size": group,
                       "kl": {"mode": "loss", "adaptive": False, "init_beta": 0.04}}, **no_bon},
      "drgrpo": {"ppo": {"stage_dir": "drgrpo", "algorithm": "grpo", "group_size": group,
                         "kl": {"mode": "loss", "adaptive": False, "init_beta": 0.04},
                         "grpo": {"scale_rewards": False, "length_norm": False}}, **no_bon},
      "rloo": {"ppo": {"stage_dir": "rloo", "algorithm": "rloo", "group_size": group}, **no_bon},
      "ipo": {"dpo": {"stage_dir": "ipo", "loss": "ipo", "beta": 0.5}},
  })
  # DPO on the RM's comparisons: one epoch (InstructGPT's RM epochs), beta 0.1 (the DPO paper's), a learning rate
  # a tenth of SFT's.
  c.dpo.optimizer.lr = 5e-5
  c.dpo.train.batch_size = c.rm.train.batch_size
  c.stages = ("data", "pretrain", "sft", "rm", "ppo", "ppo:ptx", "ppo:grpo", "ppo:rloo", "dpo", "dpo:ipo", "report")
  return c
