"""Building blocks for experiment files: default sub-configs and their conversion to typed objects.

Experiment files (experiments/*.py) compose these ConfigDicts; every field exists up front, so `run.py` with
`lock_config=True` rejects unknown keys and mistyped values before any work starts.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from rlhf_jax import model


def model_config(size: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """All ModelConfig fields of a named size; vocab_size 0 means "take it from the tokenizer"."""
  fields = dataclasses.asdict(model.preset(size, **overrides))
  fields["vocab_size"] = overrides.get("vocab_size", 0)
  return ml_collections.ConfigDict(fields)


def to_model_config(model_cd: ml_collections.ConfigDict, vocab_size: int) -> model.ModelConfig:
  fields = dict(model_cd)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
  return model.ModelConfig(**fields)


def optimizer_config(lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.01,
                     grad_clip: float = 1.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup_steps, schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
      eps_convention="pytorch", weight_decay=weight_decay, grad_clip=grad_clip))


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def checkpoint_config(save_every: int = 50, max_to_keep: int = 2, async_save: bool = True):
  return ml_collections.ConfigDict(dict(save_every=save_every, max_to_keep=max_to_keep, async_save=async_save))


def tokenizer_config(kind: str = "byte", vocab_size: int = 512) -> ml_collections.ConfigDict:
  # path "" = <workdir>/data/tokenizer.model for SentencePiece (trained from the pretraining corpus once).
  return ml_collections.ConfigDict(dict(kind=kind, vocab_size=vocab_size, path=""))


def guard_config() -> ml_collections.ConfigDict:
  """Non-finite guard: 'stop' raises naming the step and metric, 'skip' drops that update.
  inject_nan_at_step >= 0 plants a NaN in the loss at that step (to test the guard)."""
  return ml_collections.ConfigDict(dict(on_nonfinite="stop", inject_nan_at_step=-1))
