"""A masked-LM encoder (BERT) beside the GPT decoder: cloze accuracy at the same size and compute, and the
encoder as a reward-model backbone.

  python run.py --experiment=experiments/mlm/config.py:small --workdir=workdirs/baselines
  python run.py --experiment=experiments/mlm/config.py:small --seeds=0-2 --workdir=workdirs/mlm
  python run.py --experiment=experiments/mlm/config.py:tiny --workdir=/tmp/mlm_tiny   # smoke test

The data, pretraining, SFT and decoder RM are experiments/instructgpt's with InstructGPT's reward model
(rm.loglik_coef=0), so in experiments/baselines' workdir this reuses them. The mlm stage (rlhf_jax/stages/mlm.py)
trains the pretraining Transformer with model.causal=False on BERT's objective with pretraining's data, batch,
steps and learning rate (the same parameter count: the MLM head is the unembedding), then scores the cloze items
(rlhf_jax/tasks/cloze.py) with it and with WORKDIR/pretrain; `rm:encoder` trains a second reward model on the same
comparisons from the encoder (rm.backbone="encoder", WORKDIR/rm_encoder) beside the decoder RM in WORKDIR/rm.
Results, with the commands and times: experiments/mlm/README.md.

tiny: the instructgpt tiny pipeline's data and pretraining (byte tokens) plus the encoder on the same 300 steps.
small: the instructgpt small data and pretraining (550 steps of 32 x 127 SentencePiece tokens), the encoder on
the same budget, SFT and both reward models. The mlm stage costs what pretraining costs, plus the cloze scoring;
expect the decoder far ahead on the cloze at this budget (0.94 against 0.14 over seeds 0-2, README.md).
"""

import copy
import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("small", "tiny")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  # InstructGPT's reward model for both backbones: an encoder has no response log-likelihood to add, so the
  # decoder RM it is compared with is read the same way (and as README.md's results were measured).
  c.rm.loglik_coef = 0.0
  return c


def get_config(arg: str | None = None):
  preset = arg or "small"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/mlm/config.py; expected one of {', '.join(PRESETS)}")
  c = _instructgpt(preset)
  # Same compute as the decoder: pretraining's batches, steps and schedule.
  c.mlm.train = copy.deepcopy(c.pretrain.train)
  c.mlm.optimizer = copy.deepcopy(c.pretrain.optimizer)
  c.variants = ml_collections.ConfigDict({"encoder": {"rm": {"stage_dir": "rm_encoder", "backbone": "encoder"}}})
  c.stages = ("data", "pretrain", "mlm", "sft", "rm", "rm:encoder", "report")
  return c
