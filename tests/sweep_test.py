"""rlhf_jax/sweep.py: seed parsing, the aggregation against NumPy, bad summaries, and a real two-seed sweep."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_seeds():
  assert sweep.parse_seeds("0-4") == [0, 1, 2, 3, 4]
  assert sweep.parse_seeds("3, 1,7-8") == [3, 1, 7, 8]
  for bad in ("", "a", "1,1", "4-2", "-1", "1-x"):
    with pytest.raises(ValueError, match="--seeds"):
      sweep.parse_seeds(bad)


def test_aggregate_against_numpy_with_a_missing_key():
  rng = np.random.default_rng(0)
  a, b, c = rng.normal(size=3), rng.normal(size=3), rng.normal(size=2)
  summaries = {f"seed {i}": {"x.a": a[i], "x.b": b[i], "name": "text", "flag": True} for i in range(3)}
  for i in range(2):
    summaries[f"seed {i}"]["ppo_ptx.c"] = c[i]
  summaries["seed 2"]["x.nan"] = float("nan")
  agg = sweep.aggregate(summaries)
  assert agg["runs"] == ["seed 0", "seed 1", "seed 2"]
  assert set(agg["keys"]) == {"x.a", "x.b", "ppo_ptx.c"}  # text, booleans and NaN are not numbers to average
  for key, vals in (("x.a", a), ("x.b", b), ("ppo_ptx.c", c)):
    e = agg["keys"][key]
    np.testing.assert_allclose(e["mean"], np.mean(vals), rtol=1e-12)
    np.testing.assert_allclose(e["sd"], np.std(vals, ddof=1), rtol=1e-12)
    assert (e["min"], e["max"], e["n"]) == (np.min(vals), np.max(vals), len(vals))
  assert agg["missing"] == {"ppo_ptx.c": ["seed 2"]}
  md = sweep.markdown(agg, headline=("x.b", "x.a"))
  row = next(l for l in md.splitlines() if l.startswith("| x.b |"))
  assert row.split(" | ")[1:4] == [f"{v:.3f}" for v in b]
  assert md.index("| x.b |") < md.index("| x.a |")
  single = sweep.aggregate({"only": {"k": 1.0}})
  assert single["keys"]["k"]["sd"] is None


def test_read_summaries_names_the_bad_file(tmp_path):
  good, bad, lst = tmp_path / "good", tmp_path / "bad", tmp_path / "list"
  for d in (good, bad, lst):
    d.mkdir()
  (good / "summary.json").write_text(json.dumps({"k": 1.0}))
  (bad / "summary.json").write_text("{not json")
  (lst / "summary.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"bad/summary.json: not valid JSON"):
    sweep.read_summaries([str(good), str(bad)])
  with pytest.raises(ValueError, match=r"list/summary.json: expected a flat JSON object"):
    sweep.read_summaries([str(lst)])
  with pytest.raises(FileNotFoundError, match="no summary.json"):
    sweep.read_summaries([str(tmp_path / "absent")])
  with pytest.raises(ValueError, match="both labelled"):
    sweep.read_summaries([str(good), str(good)])


def test_two_seed_sweep_of_the_data_stage(tmp_path):
  """run.py --seeds runs the experiment per seed into WORKDIR/seed_<n> and aggregates what the runs wrote."""
  wd = tmp_path / "sweep"
  cmd = [sys.executable, "run.py", "--experiment=experiments/instructgpt/config.py:tiny", "--experiment.stages=data",
         "--seeds=3,5", f"--workdir={wd}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  per_seed = {s: json.loads((wd / f"seed_{s}" / "summary.json").read_text()) for s in (3, 5)}
  assert per_seed[3]["data.seed"] == 3 and per_seed[5]["data.seed"] == 5
  assert per_seed[3]["data.content_sha256"] != per_seed[5]["data.content_sha256"]
  agg = json.loads((wd / "sweep.json").read_text())
  e = agg["keys"]["data.labeler_agreement"]
  vals = [per_seed[3]["data.labeler_agreement"], per_seed[5]["data.labeler_agreement"]]
  assert e["values"] == {"seed 3": vals[0], "seed 5": vals[1]}
  np.testing.assert_allclose(e["sd"], np.std(vals, ddof=1), rtol=1e-12)
  assert "| key | seed 3 | seed 5 | mean | sd | n |" in (wd / "sweep.md").read_text()
  bad = subprocess.run(cmd[:-2] + ["--seeds=2-1", f"--workdir={tmp_path / 'x'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, check=False)
  assert bad.returncode != 0 and "the range '2-1' is empty" in bad.stderr
  assert not (tmp_path / "x").exists()


def test_markdown_adds_the_rows_of_every_policy_evaluated_against_sft():
  runs = {f"seed {s}": {"ppo.win_rate_vs_sft": 0.6 + s / 100, "grpo.win_rate_vs_sft": 0.5 + s / 100,
                        "grpo.kl_to_sft": 0.2, "dpo.win_rate_vs_sft": 0.55, "dpo.val_accuracy": 0.6}
          for s in (0, 1)}
  lines = sweep.markdown(sweep.aggregate(runs)).splitlines()
  keys = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and " | " in line][1:]
  assert keys == ["ppo.win_rate_vs_sft", "dpo.win_rate_vs_sft", "grpo.win_rate_vs_sft", "grpo.kl_to_sft"]
  grpo = next(line for line in lines if line.startswith("| grpo.win_rate_vs_sft |"))
  assert grpo.split(" | ")[1:4] == ["0.500", "0.510", "0.505"]
