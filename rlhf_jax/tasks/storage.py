"""The task suite on disk: generated once, written as TFDS ArrayRecord datasets, reused after.

`ensure_suite(config, workdir)` (what the data stage runs) writes into `config.data.data_dir` (default
`<workdir>/data`):

    suite_pretrain      train, validation     {"text"}
    suite_benchmark     test                  {"prompt", "answer", "kind"}
    suite_sft           train, validation     {"turns" (json), "user_id", "family"}
    suite_prompts       train, validation     {"turns" (json), "prompt", "family", "user_id", "reference"}
    suite_comparisons   train, validation     {"prompt_turns" (json), "prompt", "family", "user_id",
                                               "responses" (text_seq), "ranks" (int32_seq), "labeler_id",
                                               "gold_scores" (float32_seq)}
    stats.json          counts, curation, labeler agreement, gold ceiling, timings
    world.json          the world's entities, facts and words (the hidden truth, for analysis)

Every dataset stores the suite statistics (without timings) in its metadata ("dataset info") and the
fingerprint of (seed, config.data); a second run with the same fingerprint returns the stored stats without
generating anything. A data folder written from another config is an error unless `config.data.overwrite`.

`load_suite(path)` opens every split (random access, decoded to Python values) from a workdir or data folder.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging

from rlhf_jax.data import tfds_io
from rlhf_jax.tasks import suite

# dataset name -> (features, {TFDS split: suite split})
DATASETS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "suite_pretrain": ({"text": "text"}, {"train": "pretrain", "validation": "pretrain_val"}),
    "suite_benchmark": ({"prompt": "text", "answer": "text", "kind": "text"}, {"test": "benchmark"}),
    "suite_sft": ({"turns": "json", "user_id": "text", "family": "text"}, {"train": "sft", "validation": "sft_val"}),
    "suite_prompts": ({"turns": "json", "prompt": "text", "family": "text", "user_id": "text", "reference": "text"},
                      {"train": "prompts", "validation": "prompts_val"}),
    "suite_comparisons": ({"prompt_turns": "json", "prompt": "text", "family": "text", "user_id": "text",
                           "responses": "text_seq", "ranks": "int32_seq", "labeler_id": "int32",
                           "gold_scores": "float32_seq"},
                          {"train": "comparisons", "validation": "comparisons_val"}),
}
STATS_FILE = "stats.json"
WORLD_FILE = "world.json"
_TIMING_KEYS = ("generation_s", "write_s", "total_s")


def data_dir_for(config: Any, workdir: str) -> str:
  data_dir = config.data.get("data_dir", "") if hasattr(config.data, "get") else ""
  return os.fspath(data_dir) if data_dir else os.path.join(os.fspath(workdir), "data")


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _complete(data_dir: str) -> bool:
  return all(os.path.isfile(os.path.join(data_dir, name, suite.SUITE_VERSION, "metadata.json")) for name in DATASETS)


def ensure_suite(config: Any, workdir: str) -> dict[str, Any]:
  """Generates and writes every split (or reuses them); returns the stats written to `stats.json`."""
  start = time.perf_counter()
  seed, cfg = int(config.seed), suite.DataConfig.from_config(config.data)
  overwrite = bool(config.data.get("overwrite", False)) if hasattr(config.data, "get") else False
  data_dir = data_dir_for(config, workdir)
  fp = suite.fingerprint(seed, cfg)
  stats_path = os.path.join(data_dir, STATS_FILE)
  stored = _read_json(stats_path)
  if stored is not None and not overwrite:
    if stored.get("fingerprint") == fp and _complete(data_dir):
      logging.info("data: reusing the suite in %s (fingerprint %s)", data_dir, fp)
      return {**stored, "cached": True}
    if stored.get("fingerprint") != fp:
      raise ValueError(
          f"{data_dir} holds a task suite generated from another seed/config.data (fingerprint "
          f"{stored.get('fingerprint')}, this config {fp}); use another workdir or config.data.data_dir, or set "
          "config.data.overwrite=True")

  os.makedirs(data_dir, exist_ok=True)
  splits, stats = suite.generate(seed, cfg)
  generated = time.perf_counter()
  metadata = {k: v for k, v in stats.items() if k not in _TIMING_KEYS}  # timings would break byte-identity
  for name, (features, split_map) in DATASETS.items():
    fields = list(features)
    tfds_io.prepare_dataset(
        name, data_dir, features,
        {tfds_split: (lambda s=suite_split: ({f: r[f] for f in fields} for r in splits[s]))
         for tfds_split, suite_split in split_map.items()},
        version=suite.SUITE_VERSION,
        description=f"{name}: simulated-human task suite of rlhf_jax (rlhf_jax/tasks), seed {seed}",
        metadata=metadata, fingerprint=fp, overwrite=True)
  _write_json(os.path.join(data_dir, WORLD_FILE), suite.make_world(seed, cfg).to_json())
  end = time.perf_counter()
  stats["write_s"] = round(end - generated, 3)
  stats["total_s"] = round(end - start, 3)
  stats["data_config"] = cfg.to_json()
  _write_json(stats_path, stats)
  logging.info("data: wrote %s in %.1f s (generation %.1f s): %s", data_dir, stats["total_s"],
               stats["generation_s"], {k: stats[f"n_{k}"] for k in suite.SPLITS})
  return stats


def _resolve(path: str) -> str:
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "data", STATS_FILE)):
    return os.path.join(path, "data")
  if os.path.isfile(os.path.join(path, STATS_FILE)):
    return path
  raise FileNotFoundError(f"{path} holds no task suite (expected {STATS_FILE} in it or in {path}/data); run "
                          "`python run.py --experiment=experiments/data/config.py:small --workdir=...` first")


def load_suite(path: str) -> dict[str, tfds_io.DecodedSource]:
  """Every split, by suite name ("pretrain", "sft_val", "comparisons", ...), from a workdir or data folder."""
  data_dir = _resolve(path)
  out = {}
  for name, (_, split_map) in DATASETS.items():
    for tfds_split, suite_split in split_map.items():
      out[suite_split] = tfds_io.load_split(name, data_dir, tfds_split, version=suite.SUITE_VERSION)
  return out


def load_stats(path: str) -> dict[str, Any]:
  """The stats.json of a workdir or data folder."""
  return _read_json(os.path.join(_resolve(path), STATS_FILE))


def load_world(path: str):
  """The World a suite was generated from (same seed and config, so same facts), from a workdir or data folder."""
  stats = load_stats(path)
  return suite.make_world(int(stats["seed"]), suite.DataConfig.from_config(stats["data_config"]))
