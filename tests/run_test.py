"""run.py as a user meets it: bad configs, flags and data files get one `error:` line (exit 2, no traceback),
before any work; overrides apply; --verbose shows the traceback."""

import json
import os
import subprocess
import sys

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--experiment=experiments/instructgpt/config.py:tiny"
BASELINES = "--experiment=experiments/baselines/config.py:tiny"


def _run_py(*args, timeout=180):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {helpers.FAST_COMPILE_XLA_FLAGS}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def _bad_rankings(tmp_path) -> str:
  path = tmp_path / "rankings.jsonl"
  good = {"prompt": "Which is bigger, 2 or 3?", "responses": ["3", "2"], "ranking": [0, 1]}
  bad = {"prompt": "Say hi.", "responses": ["hi", "hello"], "ranking": [0]}  # one rank for two responses
  path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
  return str(path)


@pytest.mark.parametrize("case", ["unknown key", "unknown key, default experiment", "wrong type",
                                  "missing experiment file", "unknown preset",
                                  "bad mesh", "bad data file", "missing data file", "unknown stage", "bad seeds",
                                  "negative DPO beta", "GRPO with one sample per prompt", "group not dividing batch",
                                  "unknown variant"])
def test_bad_input_is_one_error_line_before_any_work(tmp_path, case):
  workdir = tmp_path / "w"
  args, expected = {
      "unknown key": ([TINY, "--experiment.ppo.kl.targt=3"],
                      "error: --experiment.ppo.kl.targt: no such key; did you mean ppo.kl.target?"),
      # Without --experiment, config_flags applies the overrides to the default as the flag is defined.
      "unknown key, default experiment": (["--experiment.ppo.kl.targt=3"], "did you mean ppo.kl.target?"),
      "wrong type": ([TINY, "--experiment.pretrain.train.steps=abc"], "abc"),
      "missing experiment file": (["--experiment=experiments/nope/config.py"],
                                  "error: --experiment=experiments/nope/config.py: no experiment file"),
      "unknown preset": (["--experiment=experiments/instructgpt/config.py:huge"], "unknown preset 'huge'"),
      "bad mesh": ([TINY, "--experiment.mesh.data=3"], "error: mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 1"),
      "bad data file": ([TINY, "--experiment.rm.source=file", f"--experiment.rm.file={_bad_rankings(tmp_path)}"],
                        f"error: {tmp_path}/rankings.jsonl:2: "),
      "missing data file": ([TINY, "--experiment.rm.source=file", "--experiment.rm.file=/nonexistent.jsonl"],
                            "error: rm.file='/nonexistent.jsonl': expected a K-way rankings .jsonl file"),
      "unknown stage": ([TINY, "--experiment.stage=kto"], "error: unknown stage 'kto' in experiment.stage"),
      "bad seeds": ([TINY, "--seeds=3-1"], "error: --seeds='3-1': the range '3-1' is empty"),
      "negative DPO beta": ([BASELINES, "--experiment.dpo.beta=-0.1"],
                            "error: dpo.beta=-0.1: expected a KL strength > 0"),
      "GRPO with one sample per prompt": ([BASELINES, "--experiment.variants.grpo.ppo.group_size=1"],
                                          "error: ppo.algorithm='grpo' needs ppo.group_size >= 2"),
      "group not dividing batch": ([BASELINES, "--experiment.variants.rloo.ppo.group_size=3"],
                                   "error: ppo.group_size=3: expected a number of samples per prompt that divides"),
      "unknown variant": ([BASELINES, "--experiment.stages=data", "--experiment.stages=ppo:trpo"],
                          "error: stages entry 'ppo:trpo': no variant 'trpo'"),
  }[case]
  out = _run_py(*args, f"--workdir={workdir}")
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and expected in errors[0], out.stderr[-3000:]
  assert out.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed
  assert not workdir.exists() or not any(p.name != "data" for p in workdir.iterdir())  # nothing was trained


def test_verbose_shows_the_traceback(tmp_path):
  out = _run_py(TINY, "--experiment.mesh.data=3", "--verbose", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "Traceback" in out.stderr and "mesh data=3" in out.stderr


def test_run_py_applies_overrides(tmp_path):
  out = _run_py("--experiment=experiments/data/config.py:tiny", "--experiment.data.n_sft=37", f"--workdir={tmp_path}")
  assert out.returncode == 0, out.stderr[-2000:]
  stats = json.load(open(os.path.join(tmp_path, "data", "stats.json")))
  assert stats["n_sft"] == 37
  assert "data.n_sft: 37" in out.stdout
