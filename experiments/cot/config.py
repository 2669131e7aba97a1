"""Chain of thought and scale: direct against step-by-step answers to multi-step questions, for three model
sizes trained on the same corpus, few-shot after pretraining and zero-shot after SFT on step-by-step
demonstrations.

  nice -n 10 python run.py --experiment=experiments/cot/config.py:small --seeds=0 --workdir=workdirs/cot
  nice -n 10 python run.py --experiment=experiments/cot/config.py:small --seeds=0-2 --workdir=workdirs/cot
  python run.py --experiment=experiments/cot/config.py:tiny --workdir=/tmp/cot_tiny   # smoke test, ~3 minutes

The suite is the small (or tiny) world with the multi-step kinds switched on: data.n_multistep_docs pretraining
documents of their training items (forum Q&A answered directly or with worked steps, and the neighbour notes)
and data.n_multistep_sft chat demonstrations (the direct answer, or with "Think step by step." the worked one).
Held-out items never appear in either (rlhf_jax/tasks/multistep.py). Three model sizes are pretrained on the
same corpus for the same number of tokens (same steps, batch and schedule: `pretrain:<size>_model`), each is
fine-tuned on the same demonstrations (`sft:<size>_model`), and the cot stage (rlhf_jax/stages/cot.py)
evaluates all six: one-step, direct and step-by-step accuracy on each kind. Results and the reasons for the sizes
and budgets: experiments/cot/README.md.

small: SentencePiece 768 pieces; sizes 2x64 (tiny), 4x128 (small, the default policy) and 4x192 (large), all with
a 256-token context and trained on 255-token windows (a few-shot prompt of three worked demonstrations is ~170
tokens and RoPE does not stretch past the trained length); 300 steps of 16 x 255 tokens each (1.2M tokens),
SFT 100 steps of 16 x 127. About 10 minutes per seed on a 2-core CPU (README.md).
tiny: byte tokens, the tiny world, sizes 1x32, 2x64 and 2x96, a few dozen steps each: a smoke test of every
stage of the experiment, not a result.
"""

import ml_collections

from rlhf_jax import configs

PRESETS = ("small", "tiny")
# name -> model overrides; every size keeps the default head width of its preset (d_model / n_heads = 32 or 16).
SIZES = {
    "small": {"tiny": dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=256),
              "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512),
              "large": dict(d_model=192, n_layers=4, n_heads=6, n_kv_heads=6, d_ff=768)},
    "tiny": {"tiny": dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=128),
             "small": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256),
             "large": dict(d_model=96, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=384)},
}


def get_config(arg: str | None = None):
  preset = arg or "small"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/cot/config.py; expected one of {', '.join(PRESETS)}")
  c = configs.base_config(model_size=preset, world=preset)
  if preset == "small":
    c.tokenizer = configs.tokenizer_config("sentencepiece", 768)
    c.model.max_len = 256
    c.data.n_multistep_docs, c.data.n_multistep_sft = 2000, 1500
    c.pretrain.train = configs.train_config(steps=300, batch_size=16, seq_len=255, log_every=50, eval_every=150,
                                            eval_batches=4)
    c.pretrain.optimizer = configs.optimizer_config(lr=3e-3, warmup_steps=40)
    c.sft.train = configs.train_config(steps=100, batch_size=16, seq_len=127, log_every=20, eval_every=100,
                                       eval_batches=4)
    c.sft.optimizer = configs.optimizer_config(lr=5e-4, warmup_steps=10)
    c.eval.n_prompts, c.eval.batch_size = 48, 48  # the SFT stage's own gold evaluation, kept short
    c.cot.n_items, c.cot.shots, c.cot.max_new_tokens, c.cot.max_new_tokens_direct = 40, 3, 40, 16
    c.checkpoint.save_every = 100
  else:
    c.model.max_len = 512
    c.data.n_multistep_docs, c.data.n_multistep_sft = 200, 200
    c.pretrain.train = configs.train_config(steps=30, batch_size=8, seq_len=255, log_every=10, eval_every=30,
                                            eval_batches=1)
    c.sft.train = configs.train_config(steps=10, batch_size=8, seq_len=127, log_every=5, eval_every=10,
                                       eval_batches=1)
    c.eval.n_prompts, c.eval.batch_size = 8, 8
    c.cot.n_items, c.cot.shots, c.cot.max_new_tokens, c.cot.max_new_tokens_direct = 4, 1, 96, 24
    c.cot.batch_size = 16
    c.checkpoint.save_every = 100
  variants = {}
  for size, dims in SIZES[preset].items():
    variants[f"{size}_model"] = {"model": dict(dims), "pretrain": {"stage_dir": f"pretrain_{size}"},
                                 "sft": {"stage_dir": f"sft_{size}", "init_from": f"pretrain_{size}"}}
  c.variants = ml_collections.ConfigDict(variants)
  c.cot.pretrained = tuple(f"pretrain_{s}" for s in SIZES[preset])
  c.cot.sft = tuple(f"sft_{s}" for s in SIZES[preset])
  c.stage = "pipeline"
  c.stages = ("data", *(f"pretrain:{s}_model" for s in SIZES[preset]), *(f"sft:{s}_model" for s in SIZES[preset]),
              "cot", "report")
  return c
