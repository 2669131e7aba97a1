"""The data stage: the simulated-human task suite (world, corpus, demonstrations, comparisons, prompts), or a
user's files in its place (config.files).

Writes TFDS ArrayRecord datasets and stats.json into config.data.data_dir (default WORKDIR/data); a second run
with the same seed and config.data reuses them (rlhf_jax/tasks/storage.py). With config.files it converts each
file once into DATA_DIR/user (rlhf_jax/data/real.py, cached by the files' hash); its preflight parses every
record, so a bad line stops the pipeline before any stage runs, with its file:line, field and expectation.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax import runtime, tokenizers
from rlhf_jax.data import real, sources
from rlhf_jax.tasks import suite


def check(config) -> None:
  suite.DataConfig.from_config(config.data)  # the world's knobs are validated here, before anything runs
  sources.check_files(config)
  for field in ("sft", "prompts", "pretrain") if sources.on_user_data(config) else ():
    fc = config.files
    if fc[field]:
      real.check(fc[f"{field}_schema"], sources.file_paths(fc[field]), on_error=fc.on_error)


def run(config, workdir: str) -> dict[str, Any]:
  if not sources.on_user_data(config):
    return sources.ensure_suite(config, workdir)
  out = {}
  for field in ("sft", "prompts", "pretrain"):
    if config.files[field]:
      train, val = sources.user_datasets(config, workdir, field)
      out.update({f"n_{field}": len(train), f"n_{field}_val": len(val)})
  check_prompt_lengths(config, workdir)
  return out


def check_prompt_lengths(config, workdir: str) -> None:
  """Every prompt of files.sft / files.prompts must leave room for a reply in the model's context: a longer one
  is an error naming its file:line, before any stage trains (RL would cut it from the left, SFT would train on
  no reply)."""
  tok = sources.tokenizer(config, workdir)
  max_len = runtime.policy_config(config, tok.vocab_size).max_len
  limit = max_len - 1  # at least one token of reply
  fc = config.files
  for field in ("sft", "prompts"):
    if not fc[field]:
      continue
    for where, record in real.records_with_places(fc[f"{field}_schema"], sources.file_paths(fc[field])):
      turns = record.get("prompt_turns")
      if turns is None:  # a demonstration: its prompt is every turn before the last assistant reply
        last = max(i for i, t in enumerate(record["turns"]) if t["role"] == "assistant")
        turns = record["turns"][:last]
      n = len(tokenizers.encode_prompt(tok, turns))
      if n > limit:
        raise ValueError(f"{where}: field 'prompt': {n} tokens in the chat template, longer than the model's "
                         f"context of {max_len} leaves room for; expected at most {limit} (files.{field})")
