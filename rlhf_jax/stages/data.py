"""The data stage: the simulated-human task suite (world, corpus, demonstrations, comparisons, prompts).

Writes TFDS ArrayRecord datasets and stats.json into config.data.data_dir (default WORKDIR/data); a second run
with the same seed and config.data reuses them (rlhf_jax/tasks/storage.py).
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data import sources
from rlhf_jax.tasks import suite


def check(config) -> None:
  suite.DataConfig.from_config(config.data)  # the world's knobs are validated here, before anything runs


def run(config, workdir: str) -> dict[str, Any]:
  return sources.ensure_suite(config, workdir)
