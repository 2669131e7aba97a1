"""End to end: the tiny InstructGPT pipeline (2 PPO iterations), resumption, and run.py's flag handling."""

import json
import os
import subprocess
import sys

import jax
import pytest

from rlhf_jax import metrics, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import instructgpt  # pylint: disable=g-import-not-at-top,wrong-import-position

REQUIRED = ["pretrain.val_loss", "sft.val_loss", "rm.val_accuracy", "rm.gold_ceiling_accuracy", "sft.gold_score",
            "ppo.gold_score", "ppo.rm_score", "ppo.kl_to_sft", "ppo.win_rate_vs_sft", "ppo.pretrain_val_loss"]


def _tiny_config():
  c = instructgpt.get_config("tiny")
  c.mesh.data = 1  # one device of the 8 simulated ones would not match: use a 1x1x1 mesh on device 0
  c.pretrain.train.steps, c.pretrain.train.eval_every = 40, 20
  c.sft.train.steps, c.sft.train.eval_every = 10, 10
  c.rm.n_prompts, c.rm.n_val_prompts = 16, 8
  c.eval.n_prompts, c.eval.n_benchmark, c.eval.best_of_n = 8, 8, []
  c.checkpoint.save_every = 20
  return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("igpt"))
  config = _tiny_config()
  # The suite's tests run on 8 simulated devices; this smoke test uses one of them.
  with jax.default_device(jax.devices()[0]):
    import rlhf_jax.sharding as sh
    orig = sh.make_mesh
    sh.make_mesh = lambda d=1, f=1, t=1, devices=None: orig(d, f, t, devices=devices or jax.devices()[:1])
    try:
      summary = pipeline.run(config, workdir)
    finally:
      sh.make_mesh = orig
  return workdir, config, summary


def test_pipeline_writes_every_summary_key_and_the_report(tiny_run):
  workdir, _, summary = tiny_run
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in REQUIRED:
    assert key in on_disk, key
    assert isinstance(on_disk[key], float), (key, on_disk[key])
  assert on_disk == {**on_disk, **summary}
  for stage in ("pretrain", "sft", "rm", "ppo"):
    rows = metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
    assert rows and all("step" in r for r in rows)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicates
    assert os.path.exists(os.path.join(workdir, stage, "summary.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, stage)))
  report = open(os.path.join(workdir, "report.md")).read()
  assert "learning_curves.png" in report and "reward_vs_kl.png" in report and "| prompt |" in report
  for png in ("learning_curves.png", "reward_vs_kl.png"):
    assert open(os.path.join(workdir, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  ppo_rows = metrics.read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl"))
  assert {"kl_seq", "clip_frac", "approx_kl", "explained_variance", "entropy", "response_len", "rm_score",
          "gold_score", "beta"} <= set(ppo_rows[-1])
  # The unigram yardstick: even 40 steps beat a context-free model.
  assert on_disk["pretrain.val_loss"] < on_disk["pretrain.unigram_entropy"]


def test_rerun_resumes_instead_of_starting_over(tiny_run):
  workdir, config, _ = tiny_run
  before = {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in ("pretrain", "sft", "rm", "ppo")}
  import rlhf_jax.sharding as sh
  orig = sh.make_mesh
  sh.make_mesh = lambda d=1, f=1, t=1, devices=None: orig(d, f, t, devices=devices or jax.devices()[:1])
  try:
    pipeline.run(config, workdir)
  finally:
    sh.make_mesh = orig
  after = {s: os.path.getmtime(os.path.join(workdir, s, "summary.json")) for s in before}
  assert before == after  # every stage was complete: nothing was redone


def _run_py(*args, timeout=120):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def test_run_py_rejects_unknown_keys_and_wrong_types(tmp_path):
  bad_key = _run_py("--experiment=experiments/pretrain.py:tiny", "--experiment.optimizer.lrr=1",
                    f"--workdir={tmp_path}")
  assert bad_key.returncode != 0 and "lrr" in bad_key.stderr
  bad_type = _run_py("--experiment=experiments/pretrain.py:tiny", "--experiment.pretrain.train.steps=abc",
                     f"--workdir={tmp_path}")
  assert bad_type.returncode != 0 and "abc" in bad_type.stderr
  assert not os.listdir(tmp_path)  # rejected before any work


def test_run_py_applies_overrides(tmp_path):
  out = _run_py("--experiment=experiments/data.py:tiny", "--experiment.data.n_sft=37", f"--workdir={tmp_path}")
  assert out.returncode == 0, out.stderr[-2000:]
  stats = json.load(open(os.path.join(tmp_path, "data", "stats.json")))
  assert stats["n_sft"] == 37
  assert "data.n_sft: 37" in out.stdout
