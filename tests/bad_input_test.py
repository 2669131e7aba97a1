"""Bad inputs stop a run before any work with an error naming the problem, and leave every checkpoint untouched.

Each case runs against a copy of a finished tiny pipeline workdir (its checkpoints, exported parameters and
summaries are hashed before and after) and asserts that the error message names the field, file or record and
what was expected. Flag errors go through `run.py` in a subprocess (what a user sees: a non-zero exit and the
message on the console); the rest call `pipeline.run(config, workdir)` in-process on the 8 simulated devices of
tests/conftest.py, or the real-data builders (rlhf_jax/data/real.py) directly.
"""

import json
import os

import pytest

from helpers import experiments, stage_runner
from rlhf_jax import pipeline
from rlhf_jax.data import real

# Every module built on the shared tiny run goes to one pytest-xdist worker, so the run is built once.
pytestmark = pytest.mark.xdist_group("bad_input")  # its module fixtures are built once, on one worker

_DIGESTED = ("pretrain", "sft", "rm", "ppo")


@pytest.fixture(scope="module")
def done_workdir(tmp_path_factory):
  """(copy of a finished tiny pipeline workdir, XLA cache dir)."""
  ref, cache = stage_runner.shared_reference(tmp_path_factory)
  dst = str(tmp_path_factory.mktemp("bad_input") / "w")
  return stage_runner.copy_workdir(ref, dst), cache


def _digest(workdir):
  return {s: stage_runner.tree_digest(os.path.join(workdir, s)) for s in _DIGESTED}


def _config(stage="pretrain", **overrides):
  """The tiny experiment with the reference's step counts (stage_runner.TINY_FLAGS) and `overrides`
  ("a.b": value)."""
  config = experiments.config("instructgpt", "tiny")
  for flag in stage_runner.TINY_FLAGS[1:]:
    key, value = flag[len("--experiment."):].split("=")
    overrides.setdefault(key, int(value))
  overrides["stage"] = stage
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _expect_pipeline_error(workdir, config, *fragments):
  before = _digest(workdir)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    pipeline.run(config, workdir)
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))
  assert _digest(workdir) == before, "a failed run modified a checkpoint or exported parameters"
  return str(e.value)


def _expect_cli_error(workdir, cache, flags, *fragments, run_workdir=None):
  before = _digest(workdir)
  proc = stage_runner.run(run_workdir or workdir, *flags, cache_dir=cache, devices=8, timeout=120)
  assert proc.returncode != 0, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])
  assert _digest(workdir) == before, "a failed run modified a checkpoint or exported parameters"


# ----------------------------------------------------------------------------------------------------------
# Flags, through run.py.


def test_unknown_config_key(done_workdir):
  w, cache = done_workdir
  _expect_cli_error(w, cache, ["--experiment.pretrain.optimizer.lrr=1"], "lrr")


def test_mistyped_config_value(done_workdir):
  w, cache = done_workdir
  _expect_cli_error(w, cache, ["--experiment.pretrain.train.steps=abc"], "steps", "abc")


def test_workdir_that_cannot_be_written(done_workdir, tmp_path):
  w, cache = done_workdir
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _expect_cli_error(w, cache, ["--experiment.stage=pretrain"], "cannot be written", str(blocker),
                    run_workdir=str(blocker / "workdir"))


def test_heads_not_dividing_width_through_cli(done_workdir):
  w, cache = done_workdir
  _expect_cli_error(w, cache, ["--experiment.stage=pretrain", "--experiment.model.n_heads=3"],
                    "model.d_model=64 must be divisible by model.n_heads=3")


# ----------------------------------------------------------------------------------------------------------
# Sizes and settings, in-process on 8 devices.


def test_mesh_not_matching_devices(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(**{"mesh.data": 3}), "mesh data=3", "8 are available")


def test_negative_mesh_size(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(**{"mesh.data": -2}), "mesh.data must be a positive integer")


def test_batch_not_dividing_devices(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(**{"mesh.data": 8, "pretrain.train.batch_size": 12}),
                         "pretrain.train.batch_size=12 does not divide over the data-parallel size 8")


def test_sequence_longer_than_context(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(**{"pretrain.train.seq_len": 500}),
                         "pretrain.train.seq_len=500", "model.max_len=128")


def test_checkpoint_from_incompatible_config(done_workdir):
  msg = _expect_pipeline_error(done_workdir[0], _config(**{"model.d_ff": 128}), "incompatible model config",
                               "d_ff: checkpoint has 256, config has 128")
  assert os.path.join("pretrain", "checkpoints") in msg


def test_unknown_stage(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(stage="pretrian"), "unknown stage 'pretrian'")


def test_invalid_nonfinite_policy(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(**{"guard.on_nonfinite": "ignore"}),
                         "guard.on_nonfinite='ignore'", "'stop' or 'skip'")


def test_invalid_sampling_temperature_fails_before_pretraining(done_workdir, tmp_path):
  """In a pipeline, a bad PPO setting is found before the first stage trains."""
  _expect_pipeline_error(done_workdir[0], _config(stage="ppo", **{"ppo.temperature": -1.0}), "temperature")
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ValueError, match="temperature"):
    pipeline.run(_config(stage="pipeline", **{"ppo.temperature": -1.0}), fresh)
  assert not os.path.exists(os.path.join(fresh, "pretrain"))


def test_ppo_minibatch_too_small_to_whiten(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(stage="ppo", **{"ppo.batch_size": 32, "ppo.n_minibatches": 4,
                                                                  "ppo.min_whiten": 16}),
                         "whitening needs at least 16 elements, got 8")


def test_evaluation_samples_checked_before_ppo_trains(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(stage="ppo", **{"eval.samples_per_prompt": 0}),
                         "eval.samples_per_prompt=0", "at least 1 sample")


def test_reward_ranking_size_out_of_range(done_workdir):
  _expect_pipeline_error(done_workdir[0], _config(stage="rm", **{"rm.k_min": 1}), "rm.k_min=1",
                         "2 <= k_min <= k_max")


def test_missing_rankings_dataset(done_workdir, tmp_path):
  _expect_pipeline_error(done_workdir[0], _config(stage="rm", **{"rm.source": "file",
                                                                 "rm.file": str(tmp_path / "nothing")}),
                         "rm.file=", "expected a K-way rankings .jsonl file", "or a dataset folder")


def test_over_long_ranking_rejected(done_workdir, tmp_path):
  """rm.too_long='error' names the record and the lengths; 'truncate' would cut (and count) it instead."""
  path = tmp_path / "rankings.jsonl"
  rows = [{"prompt": f"question {i}?", "responses": ["yes " * (60 if i == 1 else 2), "no"], "ranking": [0, 1]}
          for i in range(12)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ds = real.prepare_rankings(str(path), str(tmp_path / "ds"))
  for given in (ds, str(path)):  # the prepared dataset, or the .jsonl itself (converted by the stage)
    _expect_pipeline_error(done_workdir[0], _config(stage="rm", **{"rm.source": "file", "rm.file": given,
                                                                   "rm.too_long": "error", "rm.seq_len": 96}),
                           "record 1", "longer than rm.seq_len=96", "rm.too_long='truncate'")


def test_a_bad_rankings_line_fails_before_pretraining(tmp_path):
  """In a pipeline, the preflight reads every line of rm.file: a bad one stops the run before the first stage."""
  path = tmp_path / "rankings.jsonl"
  path.write_text(json.dumps(_GOOD) + "\n" + json.dumps({"prompt": "x", "responses": ["a", "b"]}) + "\n")
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ValueError, match=f"{path}:2: missing field 'ranking'"):
    pipeline.run(_config(stage="pipeline", **{"rm.source": "file", "rm.file": str(path)}), fresh)
  assert not os.path.exists(os.path.join(fresh, "pretrain"))


# ----------------------------------------------------------------------------------------------------------
# Data files (rlhf_jax/data/real.py): the message names the file, the line, the field and what was expected;
# nothing is published and no checkpoint changes.

_GOOD = {"prompt": "Which is larger, 3 or 5?", "responses": ["5", "3"], "ranking": [0, 1]}


@pytest.mark.parametrize("line, fragments", [
    (b'{"prompt": "x", "responses": ["a", "b"], "ranking": [0, 1]\n', ["invalid JSON"]),
    (b'{"prompt": "caf\xe9", "responses": ["a", "b"], "ranking": [0, 1]}\n', ["not valid UTF-8"]),
    (json.dumps({"prompt": "x", "ranking": [0, 1]}).encode() + b"\n", ["missing field 'responses'"]),
    (json.dumps({"prompt": "x", "responses": ["a"], "ranking": [0]}).encode() + b"\n",
     ["field 'responses'", "at least 2 responses"]),
    (json.dumps({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 1, 2]}).encode() + b"\n",
     ["field 'ranking'", "3 ranks", "'responses' has 2"]),
    (json.dumps({"prompt": "x", "responses": ["a", "b"], "ranking": [0, -1]}).encode() + b"\n",
     ["field 'ranking', item 1", "non-negative integer rank"]),
    (json.dumps({"prompt": "x", "responses": ["a", ""], "ranking": [0, 1]}).encode() + b"\n",
     ["field 'responses', item 1", "empty"]),
], ids=["invalid_json", "non_utf8", "missing_field", "one_response", "rank_count_mismatch", "negative_rank",
        "empty_response"])
def test_bad_ranking_record(done_workdir, tmp_path, line, fragments):
  w = done_workdir[0]
  before = _digest(w)
  path = tmp_path / "rankings.jsonl"
  path.write_bytes(json.dumps(_GOOD).encode() + b"\n" + line)  # the bad record is on line 2
  out = tmp_path / "ds"
  with pytest.raises(ValueError) as e:
    real.prepare_rankings(str(path), str(out))
  for fragment in [f"{path}:2:", *fragments]:
    assert fragment in str(e.value), (fragment, str(e.value))
  assert not os.path.exists(os.path.join(out, "rankings", "1.0.0"))
  assert _digest(w) == before


def test_empty_rankings_file(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n")
  with pytest.raises(ValueError, match="has no records"):
    real.prepare_rankings(str(path), str(tmp_path / "ds"))
