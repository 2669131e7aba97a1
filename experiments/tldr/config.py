"""TL;DR summarisation with RLHF from an open checkpoint, on files you downloaded: the N+ implementation details.

  python run.py --experiment=experiments/tldr/config.py:smoke --workdir=/tmp/tldr_smoke   # this CPU, ~2 minutes
  python run.py --experiment=experiments/tldr/config.py:qwen05b --workdir=/data/runs/tldr \
      --experiment.init.hf_path=/models/Qwen2.5-0.5B \
      --experiment.files.sft=/data/tldr_sft/train.parquet \
      --experiment.rm.file=/data/summarize_from_feedback/comparisons/train.parquet \
      --experiment.variants.judge.rm.file=/data/summarize_from_feedback/comparisons/validation.parquet

The recipe of Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (arXiv 2403.17031; ../shared/RLHF_NOTES.md): the SFT model from the imported checkpoint on the
TL;DR demonstrations (`tldr_sft` schema: post and summary, or prompt/completion), the reward model from the SFT
model on OpenAI's summarize_from_feedback comparisons (one epoch), PPO at lr 3e-6 with a fixed KL coefficient
0.05, 4 epochs per batch, temperature 0.7, 53-token responses, a score of -1 for a response without EOS, no
reward whitening, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95; PPO-ptx mixes in pretraining text from
`files.pretrain`. There are no simulated humans: the evaluation's judge is a second reward model (`rm:judge`,
WORKDIR/rm_judge) trained on other comparisons, standing in for the gold labeler as in Gao et al. 2022, and
the references are the validation demonstrations' human summaries. At the end the policy and the reward model
are exported as Hugging Face folders (WORKDIR/export/policy, WORKDIR/export/reward).

Presets:
  smoke    the committed tiny fixtures: a random 2-layer Qwen2 with the ChatML tokenizer (tests/data/hf/qwen2_chat)
           and a few dozen rows of each schema (tests/data/real_fixtures). Checks that every stage runs, resumes
           and exports; the numbers mean nothing.
  qwen05b  the paper's settings at a size this codebase imports (the paper used Pythia 1B-6.9B, a GPT-NeoX
           architecture rlhf_jax does not import yet): Qwen2.5-0.5B, PPO batch 512 for 1M episodes (1953
           iterations), SFT and RM batch 128/64 for one epoch. Needs an accelerator: one H100/H200 holds the four
           0.5B parameter sets with Adam in float32 (about 20 GB); on a CPU it would take weeks. Give the paths
           of your files and model with the flags above. The paper reports PPO win rates against the reference
           summaries judged by GPT-3.5 (rising with size, their Figure 1); here the judge is the held-out RM, a
           different measurement. BUILD.md has the hardware.
"""

import os

import ml_collections

from rlhf_jax import configs

PRESETS = ("smoke", "qwen05b")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FIXTURES = os.path.join(_ROOT, "tests", "data", "real_fixtures")


def _n_plus(c) -> None:
  """The N+ implementation details' values that do not depend on the size (RLHF_NOTES.md)."""
  for block in (c.sft, c.rm, c.ppo):
    block.optimizer.lr = 3e-6
  c.rm.train.epochs = 1.0
  c.ppo.kl.adaptive, c.ppo.kl.init_beta = False, 0.05
  c.ppo.epochs, c.ppo.clip_eps, c.ppo.vf_clip_eps, c.ppo.vf_coef = 4, 0.2, 0.2, 0.1
  c.ppo.gamma, c.ppo.lam = 1.0, 0.95
  c.ppo.temperature, c.ppo.max_new_tokens, c.ppo.no_eos_penalty = 0.7, 53, -1.0
  c.ppo.whiten_rewards = False
  c.rm.source, c.rm.file_schema = "file", "summarize_from_feedback"
  c.files.sft_schema = "tldr_sft"
  c.tokenizer.kind = "hf"  # the imported model's own tokenizer (tokenizer.path defaults to init.hf_path)
  c.pretrain.train.steps = 0  # import only: SFT starts from the checkpoint
  c.eval.judge, c.eval.judge_rm_from = "rm", "rm_judge"
  c.eval.best_of_n = (4,)
  c.variants = ml_collections.ConfigDict({
      "judge": {"rm": {"stage_dir": "rm_judge"}},  # rm.file set by the preset (other comparisons)
      "ptx": {"ppo": {"stage_dir": "ppo_ptx", "ptx": {"coef": 1.0}}, "eval": {"best_of_n": ()}},
  })
  c.stages = ("data", "pretrain", "sft", "rm", "rm:judge", "ppo", "ppo:ptx", "report", "export")


def smoke():
  c = configs.base_config(model_size="tiny", world="tiny")
  _n_plus(c)
  c.init.hf_path = os.path.join(_ROOT, "tests", "data", "hf", "qwen2_chat")
  c.files.sft = os.path.join(_FIXTURES, "tldr_sft.json")
  c.files.pretrain = os.path.join(_FIXTURES, "pretrain_text.jsonl")
  c.rm.file = os.path.join(_FIXTURES, "summarize_from_feedback.parquet")
  c.variants.judge.rm.file = os.path.join(_FIXTURES, "summarize_batch.json")
  c.files.val_fraction = 0.25  # 24 demonstrations: 6 held out (the evaluation's prompts)
  # Sizes of the fixtures: TL;DR prompts are 250-430 tokens in the ChatML template; a context of 1024.
  c.pretrain.train = configs.train_config(steps=0, batch_size=8, seq_len=255, eval_batches=1)
  c.sft.train = configs.train_config(steps=6, batch_size=8, seq_len=479, log_every=2, eval_every=6, eval_batches=1)
  c.rm.seq_len, c.rm.train.batch_size, c.rm.train.eval_every = 480, 8, 0
  c.ppo.iterations, c.ppo.batch_size, c.ppo.n_minibatches, c.ppo.log_every = 2, 16, 2, 1
  c.ppo.max_prompt_len = 448  # the fixture's prompts in the ChatML template (and its system turn): up to ~400
  c.ppo.ptx.seq_len = 63
  c.eval.n_prompts, c.eval.batch_size, c.eval.samples_per_prompt, c.eval.n_samples_table = 6, 8, 2, 4
  c.checkpoint.save_every = 2
  return c


def qwen05b():
  c = configs.base_config(model_size="tiny", world="tiny")  # the model comes from init.hf_path
  _n_plus(c)
  c.init.hf_path = ""  # required: --experiment.init.hf_path=/models/Qwen2.5-0.5B
  c.model.dtype = "bfloat16"
  c.model.attention = "auto"
  c.model.remat = True
  c.files.sft = ""  # required: --experiment.files.sft=... (tldr_sft: post/summary or prompt/completion)
  c.files.val_fraction = 0.01
  # One epoch of the 116,722 TL;DR demonstrations at batch 128.
  c.sft.train = configs.train_config(steps=912, batch_size=128, seq_len=615, log_every=20, eval_every=200)
  c.rm.seq_len, c.rm.train.batch_size = 615, 64
  c.ppo.iterations, c.ppo.batch_size, c.ppo.n_minibatches = 1953, 512, 4  # 1M episodes
  c.ppo.max_prompt_len = 512
  c.eval.n_prompts, c.eval.batch_size, c.eval.samples_per_prompt = 500, 64, 1
  c.checkpoint.save_every = 50
  return c


def get_config(arg: str | None = None):
  preset = arg or "smoke"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/tldr/config.py; expected one of {', '.join(PRESETS)}")
  return smoke() if preset == "smoke" else qwen05b()
