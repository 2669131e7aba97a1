"""A helpful assistant with RLHF from an open checkpoint on Anthropic's HH-RLHF files (arXiv 2204.05862).

  python run.py --experiment=experiments/hh/config.py:smoke --workdir=/tmp/hh_smoke   # this CPU, ~2 minutes
  python run.py --experiment=experiments/hh/config.py:qwen05b --workdir=/data/runs/hh \
      --experiment.init.hf_path=/models/Qwen2.5-0.5B-Instruct \
      --experiment.files.sft=/data/hh-rlhf/helpful-base/train.jsonl.gz \
      --experiment.rm.file=/data/hh-rlhf/helpful-base/train.jsonl.gz \
      --experiment.variants.judge.rm.file=/data/hh-rlhf/harmless-base/train.jsonl.gz

The InstructGPT recipe on dialogues: SFT on the chosen dialogues (`hh_sft` schema: the "chosen" field of each
row, every Assistant reply learned), the reward model from the SFT model on the chosen/rejected pairs (`hh`
schema), PPO and PPO-ptx (pretraining text from `files.pretrain`) from SFT, RL prompts the dialogues before
their last Assistant reply. As in experiments/tldr there are no simulated humans: a second reward model trained
on other comparisons (`rm:judge`, WORKDIR/rm_judge; for HH, e.g. another subset) judges the evaluation, and
the chosen replies of the held-out dialogues are the references. The policy and the reward model are exported
as Hugging Face folders at the end (WORKDIR/export/{policy,reward}). The settings are InstructGPT's where they
carry over (adaptive KL, whitened rewards, temperature 1) and experiments/tldr's otherwise.

Presets:
  smoke    the committed fixtures (tests/data/hf/qwen2_chat; tests/data/real_fixtures/hh.jsonl for SFT and the
           RM, pairs.jsonl for the judge): every stage runs, resumes and exports; the numbers mean nothing.
  qwen05b  Qwen2.5-0.5B(-Instruct) on the 160k HH training dialogues: an accelerator run (about 20 GB for the four
           parameter sets with Adam); give the paths with the flags above.
"""

import os

import ml_collections

from rlhf_jax import configs

PRESETS = ("smoke", "qwen05b")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FIXTURES = os.path.join(_ROOT, "tests", "data", "real_fixtures")


def _common(c) -> None:
  c.tokenizer.kind = "hf"  # the imported model's own (tokenizer.path defaults to init.hf_path)
  c.pretrain.train.steps = 0  # import only
  c.files.sft_schema = "hh_sft"
  c.rm.source, c.rm.file_schema = "file", "hh"
  c.rm.train.epochs = 1.0
  c.eval.judge, c.eval.judge_rm_from = "rm", "rm_judge"
  c.eval.best_of_n = (4,)
  c.ppo.max_new_tokens = 64
  c.variants = ml_collections.ConfigDict({
      "judge": {"rm": {"stage_dir": "rm_judge"}},  # rm.file / rm.file_schema set by the preset
      "ptx": {"ppo": {"stage_dir": "ppo_ptx", "ptx": {"coef": 1.0}}, "eval": {"best_of_n": ()}},
  })
  c.stages = ("data", "pretrain", "sft", "rm", "rm:judge", "ppo", "ppo:ptx", "report", "export")


def smoke():
  c = configs.base_config(model_size="tiny", world="tiny")
  _common(c)
  c.init.hf_path = os.path.join(_ROOT, "tests", "data", "hf", "qwen2_chat")
  c.files.sft = os.path.join(_FIXTURES, "hh.jsonl")
  c.files.pretrain = os.path.join(_FIXTURES, "pretrain_text.jsonl")
  c.files.val_fraction = 0.25
  c.rm.file = os.path.join(_FIXTURES, "hh.jsonl")
  c.variants.judge.rm.file = os.path.join(_FIXTURES, "pairs.jsonl")
  c.variants.judge.rm.file_schema = "pairs"
  c.pretrain.train = configs.train_config(steps=0, batch_size=8, seq_len=255, eval_batches=1)
  c.sft.train = configs.train_config(steps=6, batch_size=8, seq_len=255, log_every=2, eval_every=6, eval_batches=1)
  c.rm.seq_len, c.rm.train.batch_size, c.rm.train.eval_every = 256, 8, 0
  c.ppo.iterations, c.ppo.batch_size, c.ppo.n_minibatches, c.ppo.log_every = 2, 16, 2, 1
  c.ppo.max_prompt_len, c.ppo.max_new_tokens = 192, 32
  c.ppo.ptx.seq_len = 63
  c.eval.n_prompts, c.eval.batch_size, c.eval.samples_per_prompt, c.eval.n_samples_table = 6, 8, 2, 4
  c.checkpoint.save_every = 2
  return c


def qwen05b():
  c = configs.base_config(model_size="tiny", world="tiny")  # the model comes from init.hf_path
  _common(c)
  c.model.dtype, c.model.attention, c.model.remat = "bfloat16", "auto", True
  c.files.val_fraction = 0.01
  c.sft.train = configs.train_config(steps=1250, batch_size=128, seq_len=1023, log_every=20, eval_every=250)
  c.rm.seq_len, c.rm.train.batch_size = 1024, 64
  c.ppo.iterations, c.ppo.batch_size, c.ppo.n_minibatches = 500, 512, 4
  c.ppo.max_prompt_len, c.ppo.max_new_tokens = 768, 128
  c.ppo.optimizer.lr = 1e-6
  c.eval.n_prompts, c.eval.batch_size, c.eval.samples_per_prompt = 500, 64, 1
  c.checkpoint.save_every = 50
  return c


def get_config(arg: str | None = None):
  preset = arg or "smoke"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/hh/config.py; expected one of {', '.join(PRESETS)}")
  return smoke() if preset == "smoke" else qwen05b()
