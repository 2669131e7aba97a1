"""Named model sizes: `preset("small")` is a ModelConfig; vocab_size is set from the tokenizer by the stage."""

from __future__ import annotations

from typing import Any

from rlhf_jax.models.transformer import ModelConfig

# Named sizes. vocab_size is set from the tokenizer by the experiment.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, max_len=128),
    "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512, max_len=256),
    # Twice small's width (3.4x its parameters): a reward model larger than the `small` policy on a CPU
    # (experiments/papers/gao.py's cpu_sizes).
    "medium": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1024, max_len=256),
    # GPT-2 small: 12 layers, width 768, 12 heads, context 1024 (~85M non-embedding parameters).
    "base": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072, max_len=1024),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model size {name!r}; expected one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
