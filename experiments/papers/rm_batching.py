"""InstructGPT's reward-model batching (Ouyang et al. 2022, sec 3.5): all C(K,2) pairs of a prompt in one batch
element against every pair a shuffled independent example. The paper: shuffled pairs overfit after one epoch.

  python run.py --experiment=experiments/papers/rm_batching.py:cpu --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/rm_batching.py:cpu --seeds=0-2 --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/rm_batching.py:tiny --workdir=/tmp/papers_tiny   # smoke test

Both reward models start from the shared SFT model and train on the same cached comparisons (WORKDIR/comparisons,
written by the shared `rm` stage) with the same optimizer; each is evaluated twice an epoch
(rm.train.evals_per_epoch) with the validation ranking loss, so their curves share an x axis in epochs. They write
WORKDIR/rm_grouped and WORKDIR/rm_pairs; the papers stage (WORKDIR/papers_rm_batching) draws validation loss and
accuracy per epoch and checks the claim. Shuffled pairs cost about C(K,2) * 2 / K (5x at K 4..9) the forward
passes an epoch of the grouped arrangement: this is the most expensive of the CPU presets. Results:
experiments/papers/README.md.

Presets:
  cpu          the small pipeline's comparisons (1000 prompts, K 4..9), 4 epochs each at lr 3e-4 (the shared RM's
               values), batch 16 groups / 16 pairs; not yet timed here.
  accelerator  the same with 6 epochs and 4 evaluations an epoch.
  tiny         2 epochs of the tiny pipeline's comparisons: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "accelerator", "tiny")


def _instructgpt(preset: str):
  c = configs.experiment_config(_INSTRUCTGPT, preset)
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  return c


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/rm_batching.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = _instructgpt("tiny" if preset == "tiny" else "small")
  epochs, evals = {"cpu": (4.0, 2), "accelerator": (6.0, 4), "tiny": (2.0, 2)}[preset]
  train = {"epochs": epochs, "evals_per_epoch": evals, "log_every": 10}
  c.variants = ml_collections.ConfigDict({
      "grouped": {"rm": {"stage_dir": "rm_grouped", "grouping": "prompt", "train": train}},
      "pairs": {"rm": {"stage_dir": "rm_pairs", "grouping": "pairs", "train": train}},
  })
  c.papers.stage_dir = "papers_rm_batching"
  c.papers.experiment = "rm_batching"
  c.papers.runs = ("rm_grouped", "rm_pairs")
  # The shared `rm` stage first: it samples and caches the comparisons both variants train on.
  c.stages = ("data", "pretrain", "sft", "rm", "rm:grouped", "rm:pairs", "papers", "report")
  return c
