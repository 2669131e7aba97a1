"""Tests of the data stage: TFDS ArrayRecord datasets, stats.json, caching and byte-identical output."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.data import tfds_io
from rlhf_jax.tasks import storage, suite

from helpers import stage_runner  # tests/ is on sys.path (tests/conftest.py)

from helpers import experiments

data_experiment = experiments.module("data")


def _tiny_config(**overrides):
  config = data_experiment.get_config("tiny")
  config.data.update(overrides)
  return config


def test_stage_writes_every_split_and_stats(tmp_path):
  config = _tiny_config()
  stats = storage.ensure_suite(config, str(tmp_path / "w1"))
  data_dir = tmp_path / "w1" / "data"
  with open(data_dir / "stats.json") as f:
    on_disk = json.load(f)
  assert on_disk == stats
  for key in ("generation_s", "curation_removed_prefix", "curation_removed_user_cap", "curation_removed_pii",
              "labeler_agreement", "gold_ceiling_accuracy"):
    assert key in stats, key
  assert stats["curation_removed_pii"] == stats["curation_planted_pii"] > 0

  splits, _ = suite.generate(config.seed, suite.DataConfig.from_config(config.data))
  loaded = storage.load_suite(str(tmp_path / "w1"))
  assert set(loaded) == set(suite.SPLITS)
  for name, source in loaded.items():
    assert len(source) == stats[f"n_{name}"] == len(splits[name]), name
  assert loaded["pretrain"][3]["text"] == splits["pretrain"][3]["text"]
  assert loaded["sft"][5]["turns"] == splits["sft"][5]["turns"]
  assert loaded["prompts_val"][0]["prompt"] == splits["prompts_val"][0]["prompt"]
  c, c_ref = loaded["comparisons"][7], splits["comparisons"][7]
  assert c["responses"] == c_ref["responses"]
  np.testing.assert_array_equal(c["ranks"], c_ref["ranks"])
  np.testing.assert_allclose(c["gold_scores"], c_ref["gold_scores"], rtol=1e-6)  # stored as float32
  assert loaded["benchmark"][0] == splits["benchmark"][0]

  # The dataset info holds the statistics (without timings).
  meta = tfds_io.read_metadata(str(data_dir / "suite_comparisons" / suite.SUITE_VERSION))
  assert meta["labeler_agreement"] == stats["labeler_agreement"]
  assert "generation_s" not in meta
  world = storage.load_world(str(tmp_path / "w1"))
  assert world.to_json() == suite.make_world(config.seed, suite.DataConfig.from_config(config.data)).to_json()

  # A second run reuses the data; another config in the same folder is refused.
  again = storage.ensure_suite(config, str(tmp_path / "w1"))
  assert again["cached"] and again["content_sha256"] == stats["content_sha256"]
  with pytest.raises(ValueError, match="another seed/config.data"):
    storage.ensure_suite(_tiny_config(labeler_noise=0.3), str(tmp_path / "w1"))
  replaced = storage.ensure_suite(_tiny_config(labeler_noise=0.3, overwrite=True), str(tmp_path / "w1"))
  assert replaced["labeler_agreement"] > stats["labeler_agreement"]


def test_stage_output_is_byte_identical_across_runs(tmp_path):
  config = _tiny_config(data_dir=str(tmp_path / "elsewhere"))
  storage.ensure_suite(config, str(tmp_path / "unused"))
  first = stage_runner.tree_digest(tmp_path / "elsewhere")
  os.rename(tmp_path / "elsewhere", tmp_path / "first")
  storage.ensure_suite(config, str(tmp_path / "unused"))
  second = stage_runner.tree_digest(tmp_path / "elsewhere")
  assert not (tmp_path / "unused").exists()
  assert set(first) == set(second) and len(first) > 10
  differing = sorted(f for f in first if first[f] != second[f])
  assert differing == ["stats.json"]  # only its timings differ
