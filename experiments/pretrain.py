"""Pretraining alone: next-token prediction on the task suite's generated corpus.

  python run.py --experiment=experiments/pretrain.py:tiny --workdir=/tmp/pt

tiny: a 2-layer width-64 byte-level model, 300 steps of 16 x 127 tokens; under 2 minutes on a 2-core laptop
CPU (data generation included). Expect the held-out loss (val_loss in WORKDIR/pretrain/summary.json) to fall
far below the unigram entropy of the data (unigram_entropy, about 3.2 nats): about 1.0 nats. Running the same
command again resumes from the last checkpoint (or reports the finished stage).
small: a 4-layer width-128 model over a 768-piece SentencePiece vocabulary, 550 steps of 32 x 127 tokens (the
pretraining of the default pipeline): about 4 minutes, val_loss about 0.58 nats per token.
"""

from rlhf_jax import configs


def get_config(arg: str | None = None):
  config = configs.base_config(arg or "tiny")
  config.stage = "pretrain"
  config.stages = ("data", "pretrain")
  return config
