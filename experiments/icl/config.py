"""In-context learning against k for the pretrained, SFT and RL policies, posed prompt-, instruction- and
chat-style, and the held-out-family (FLAN) test: SFTs without the arithmetic or without the string family, then
that family zero-shot.

  python run.py --experiment=experiments/icl/config.py:small --workdir=workdirs/baselines
  python run.py --experiment=experiments/icl/config.py:small --seeds=0-2 --workdir=workdirs/icl
  python run.py --experiment=experiments/icl/config.py:tiny --workdir=/tmp/icl_tiny   # smoke test

The data, pretraining, SFT, RM and PPO are experiments/instructgpt's with InstructGPT's reward model
(rm.loglik_coef=0), so in experiments/baselines' workdir this reuses them; `sft:noarith` and `sft:nostring` train
two more SFTs from the same pretrained model on the same steps without any arithmetic (string) demonstration
(sft.exclude_families, WORKDIR/sft_noarith, WORKDIR/sft_nostring), and the icl stage (rlhf_jax/stages/icl.py) poses
48 items of each family with k = 0, 1, 2, 4, 8 shots in the three styles to pretrain, sft, both held-out SFTs and
ppo (WORKDIR/icl/report_section.md, a figure of accuracy against k, icl.jsonl).

Why arithmetic and string are the held-out families: their prompts share no template with another family, so
an SFT without one has seen no demonstration of any of its phrasings; the fact templates are also the
unanswerable family's, so an SFT without fact would still be taught "I don't know" on exactly those questions,
and the zero-shot test would measure that instead of transfer. Arithmetic alone proved uninformative (the full
SFT does not learn it either, 0.02 on seed 2); string is a family the full SFT answers in its own chat form.

small: the instructgpt small pipeline (about 11 minutes on an idle 2-core CPU), two more SFTs (about 2 minutes
each) and the evaluation (5 policies x about 3000 greedy rows). Results, commands and times: experiments/icl/README.md.
tiny: the instructgpt tiny pipeline with byte tokens and a 128-token context, so only k = 0, 1 and a few items.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("small", "tiny")


def get_config(arg: str | None = None):
  preset = arg or "small"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/icl/config.py; expected one of {', '.join(PRESETS)}")
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as README.md's results were measured
  c.variants = ml_collections.ConfigDict(
      {"noarith": {"sft": {"stage_dir": "sft_noarith", "exclude_families": ("arithmetic",)}},
       "nostring": {"sft": {"stage_dir": "sft_nostring", "exclude_families": ("string",)}}})
  c.icl.policies = ("pretrain", "sft", "sft_noarith", "sft_nostring", "ppo")
  c.icl.held_out_from, c.icl.held_out_family = ("sft_noarith", "sft_nostring"), ("arithmetic", "string")
  if preset == "tiny":  # byte tokens in a 128-token context: two shots do not fit
    c.icl.ks, c.icl.n_items, c.icl.batch_size, c.icl.max_new_tokens = (0, 1), 8, 16, 12
  c.stages = ("data", "pretrain", "sft", "rm", "ppo", "sft:noarith", "sft:nostring", "icl", "report")
  return c
