"""Pretraining alone: next-token prediction on the task suite's generated corpus.

  python run.py --experiment=experiments/pretrain/config.py:tiny --workdir=/tmp/pt
  python run.py --experiment=experiments/pretrain/config.py:tiny --experiment.pretrain.optimizer.lr=3e-4 \
      --workdir=/tmp/pt

tiny: a 2-layer width-64 byte-level model, 300 steps of 16 x 127 tokens; under 2 minutes on a 2-core laptop
CPU (data generation included). Expect the held-out loss (val_loss in WORKDIR/pretrain/summary.json) to fall
far below the unigram entropy of the data (unigram_entropy, about 3.2 nats): about 1.0 nats. Running the same
command again resumes from the last checkpoint (or reports the finished stage).
small: a 4-layer width-128 model over a 768-piece SentencePiece vocabulary, 550 steps of 32 x 127 tokens (the
pretraining of experiments/instructgpt's default; a test keeps the two equal): about 4 minutes, val_loss about
0.58 nats per token.
base: small's data and schedule with GPT-2 small's body (12 x 768, context 1024), for accelerators (BUILD.md).
"""

from rlhf_jax import configs


def get_config(arg: str | None = None):
  preset = arg or "tiny"
  if preset not in ("tiny", "small", "base"):
    raise ValueError(f"unknown preset {preset!r} of experiments/pretrain/config.py; expected tiny, small or base")
  c = configs.base_config(model_size=preset, world="tiny" if preset == "tiny" else "small")
  if preset == "tiny":
    c.pretrain.train = configs.train_config(steps=300, batch_size=16, seq_len=127, log_every=25, eval_every=100,
                                            eval_batches=4)
    c.pretrain.optimizer = configs.optimizer_config(lr=3e-3, warmup_steps=30)
    c.checkpoint.save_every = 100
  else:
    c.tokenizer = configs.tokenizer_config("sentencepiece", 768)
    c.pretrain.train = configs.train_config(steps=550, batch_size=32, seq_len=127, log_every=50, eval_every=250)
    c.pretrain.optimizer = configs.optimizer_config(lr=3e-3, warmup_steps=50)
    c.checkpoint.save_every = 200
  c.stage = "pretrain"
  c.stages = ("data", "pretrain")
  return c
