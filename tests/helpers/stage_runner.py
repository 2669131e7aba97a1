"""Runs `run.py` in subprocesses for the reliability tests: a tiny pipeline, a stage, a stage killed with SIGKILL.

Every subprocess gets one CPU device and a persistent XLA compilation cache shared by the test session: the
first (uninterrupted) pipeline run compiles every jitted function once, and each restart after a kill then
loads the compiled executables instead of spending 5-15 s compiling again. A cached executable is the same
machine code, so it cannot hide a difference between a resumed and an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_PY = os.path.join(ROOT, "run.py")

# The tiny pipeline cut to a few steps per stage. log_every=1 prints a progress line at every step (the kill
# harness triggers on them) and save_every=1 checkpoints every step, so kills land in async saves often.
TINY_FLAGS = (
    f"--experiment={os.path.join(ROOT, 'experiments', 'instructgpt', 'config.py')}:tiny",
    "--experiment.pretrain.train.steps=8", "--experiment.pretrain.train.log_every=1",
    "--experiment.sft.train.steps=6", "--experiment.sft.train.log_every=1",
    "--experiment.rm.train.steps=4", "--experiment.rm.train.log_every=1",
    "--experiment.rm.n_prompts=16", "--experiment.rm.n_val_prompts=8",
    "--experiment.ppo.iterations=3", "--experiment.ppo.batch_size=16",
    "--experiment.eval.n_prompts=8", "--experiment.eval.n_benchmark=8",
    "--experiment.checkpoint.save_every=1",
)
STAGE_STEPS = {"pretrain": 8, "sft": 6, "rm": 4, "ppo": 3}
PREEMPTED_EXIT = 75  # rlhf_jax.preemption.EXIT_CODE: saved at a SIGTERM and stopped
TRAINED_STAGES = ("pretrain", "sft", "rm", "ppo")

# The baselines experiment's new stages on the same tiny pipeline (experiments/baselines/config.py:tiny): DPO and
# two critic-free RL variants, a few steps each, after the shared stages.
# RLOO shares GRPO's critic-free state and update, so GRPO stands for both here.
BASELINE_FLAGS = (
    f"--experiment={os.path.join(ROOT, 'experiments', 'baselines', 'config.py')}:tiny", *TINY_FLAGS[1:],
    "--experiment.dpo.train.steps=3", "--experiment.dpo.train.log_every=1",
    *(f"--experiment.stages={s}" for s in ("data", "pretrain", "sft", "rm", "dpo", "ppo:grpo")),
)
BASELINE_STEPS = {"dpo": 3, "grpo": 3}


def subprocess_env(cache_dir: str, devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.update({
      # Compile-speed settings; every run of these tests uses them, the references too, so the runs they compare
      # are the same programs.
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {helpers.FAST_COMPILE_XLA_FLAGS}",
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": cache_dir,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
      "PYTHONUNBUFFERED": "1",
  })
  return env


def run(workdir: str, *flags: str, cache_dir: str, devices: int = 1, timeout: float = 300,
        base_flags=TINY_FLAGS, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """One `run.py` invocation to completion (stdout and stderr captured as text); `env` adds variables."""
  cmd = [sys.executable, RUN_PY, *base_flags, *flags]
  if workdir is not None:
    cmd.append(f"--workdir={workdir}")
  return subprocess.run(cmd, env={**subprocess_env(cache_dir, devices), **(env or {})}, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------------------------------------
# Killing a run at chosen moments.


@dataclasses.dataclass
class Kill:
  """Kill when a stderr line matches `pattern` (None: `delay` seconds after the process starts), `delay`
  seconds after it."""

  pattern: str | None
  delay: float
  signals: tuple = (signal.SIGKILL,)  # sent in turn, `gap` seconds apart (SIGTERM twice: a preemption notice
  gap: float = 0.0                    # repeated while the save it triggered is being written)

  def describe(self) -> str:
    return f"{self.delay:.2f}s after {self.pattern!r}" if self.pattern else f"{self.delay:.2f}s after start"


@dataclasses.dataclass
class Attempt:
  kill: Kill | None
  killed: bool
  returncode: int
  tmp_checkpoints: list[str]  # orbax temporary step folders left behind (a kill during an async save)
  log_tail: str
  wall_s: float = 0.0
  stage: str | None = None  # the stage running when the kill came (the last "stage X: starting" line)
  log: str = ""  # everything the run printed


def _tmp_checkpoint_dirs(workdir: str) -> list[str]:
  found = []
  for root, dirs, _ in os.walk(workdir):
    found += [os.path.join(root, d) for d in dirs if "tmp" in d and "orbax" in d]
  return found


def run_with_kill(workdir: str, flags, kill: Kill | None, *, cache_dir: str, timeout: float = 300,
                  base_flags=TINY_FLAGS) -> Attempt:
  """Starts run.py; SIGKILLs it at `kill` (if it is still running then); returns what happened."""
  cmd = [sys.executable, RUN_PY, *base_flags, *flags, f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, env=subprocess_env(cache_dir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines: list[str] = []
  t0 = time.time()
  fire_at = [None if kill is None or kill.pattern else time.time() + kill.delay]
  regex = re.compile(kill.pattern) if kill is not None and kill.pattern else None

  current = [None]
  starting = re.compile(r"stage (\w+): starting")

  def reader():
    for line in proc.stdout:
      lines.append(line)
      m = starting.search(line)
      if m:
        current[0] = m.group(1)
      if regex is not None and fire_at[0] is None and regex.search(line):
        fire_at[0] = time.time() + kill.delay

  t = threading.Thread(target=reader, daemon=True)
  t.start()
  deadline = time.time() + timeout
  killed = False
  stage = None
  while proc.poll() is None:
    if fire_at[0] is not None and time.time() >= fire_at[0]:
      stage = current[0]
      for i, sig in enumerate(kill.signals):
        if i:
          time.sleep(kill.gap)
        if proc.poll() is None:
          proc.send_signal(sig)
      killed = True
      break
    if time.time() > deadline:
      proc.kill()
      raise TimeoutError(f"run.py did not finish in {timeout}s:\n{''.join(lines[-40:])}")
    time.sleep(0.005)
  proc.wait(timeout=180)  # after SIGTERM the run saves and exits by itself
  t.join(timeout=10)
  stopped = -signal.SIGKILL if kill is None or kill.signals[-1] == signal.SIGKILL else PREEMPTED_EXIT
  return Attempt(kill, killed and proc.returncode == stopped, proc.returncode,
                 _tmp_checkpoint_dirs(workdir), "".join(lines[-60:]), time.time() - t0, stage, "".join(lines))


def _latest_checkpoint(workdir: str, stage: str) -> int:
  d = os.path.join(workdir, stage, "checkpoints")
  steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


def next_kill(rng: np.random.Generator, workdir: str, stage: str, landed: int, stage_steps=STAGE_STEPS) -> Kill:
  """A seeded random moment in `stage` that the next run will reach.

  The first two kills of a stage come right after the progress line of a random step past the latest
  checkpoint (within 0-60 ms: that step's async checkpoint save is then in flight); later ones alternate
  with kills at a random time after the stage's start line (restore, compilation, a step, the final eval or
  export). When every step is checkpointed, only a timed kill can still land in the stage.
  """
  n = stage_steps[stage]
  first = _latest_checkpoint(workdir, stage) + 1
  if first <= n and (landed < 2 or landed % 2 == 0):
    step = int(rng.integers(first, n + 1))
    return Kill(rf"\[{stage}\] step {step}/{n} ", float(rng.uniform(0.0, 0.06)))
  return Kill(rf"stage {stage}: starting", float(rng.uniform(0.3, 3.0)))


def kill_and_resume(workdir: str, flags, rng: np.random.Generator, *, kills_per_stage: int, cache_dir: str,
                    stages=TRAINED_STAGES, base_flags=TINY_FLAGS, stage_steps=STAGE_STEPS) -> list[Attempt]:
  """Kills the run `kills_per_stage` times in each stage (counting where each kill actually landed), each
  time resuming the workdir in a fresh process, then lets one last run finish (it must succeed)."""
  attempts: list[Attempt] = []
  for stage in stages:
    for _ in range(4 * kills_per_stage):  # a kill that lands elsewhere (or never) is retried
      landed = sum(1 for a in attempts if a.killed and a.stage == stage)
      if landed >= kills_per_stage or os.path.exists(os.path.join(workdir, stage, "summary.json")):
        break
      kill = next_kill(rng, workdir, stage, landed, stage_steps)
      a = run_with_kill(workdir, flags, kill, cache_dir=cache_dir, base_flags=base_flags)
      attempts.append(a)
      if not a.killed and a.returncode != 0:
        raise AssertionError(f"run failed (rc={a.returncode}) before the kill {kill.describe()}:\n{a.log_tail}")
  final = run_with_kill(workdir, flags, None, cache_dir=cache_dir, base_flags=base_flags)
  attempts.append(final)
  if final.returncode != 0:
    raise AssertionError(f"the resumed run failed (rc={final.returncode}):\n{final.log_tail}")
  return attempts


# ----------------------------------------------------------------------------------------------------------
# Comparing results.


def load_params(path: str) -> dict[str, np.ndarray]:
  """An exported parameter tree, flattened to {"a/b/c": numpy array}."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def tree_digest(path: str) -> dict[str, str]:
  """relative file path -> SHA-256 of its bytes, for every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def copy_workdir(src: str, dst: str) -> str:
  shutil.copytree(src, dst, symlinks=True)
  return dst


def shared_reference(tmp_path_factory) -> tuple[str, str]:
  """(workdir, XLA cache dir) of one uninterrupted run of the tiny pipeline, built once per pytest session and
  shared by every reliability test module (each must copy it before changing anything). Under pytest-xdist the
  workers share it too: it lives beside their base temp folders, built by whichever worker takes the lock first."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by every worker of this session
  base = root / "rlhf_reference"
  workdir, cache, done = str(base / "w"), str(base / "xla_cache"), base / "done"
  os.makedirs(root, exist_ok=True)
  with open(root / "rlhf_reference.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(base, ignore_errors=True)
      os.makedirs(cache)
      # JAX_LOG_COMPILES: the log names every program compiled (tests/pipeline_test.py counts them).
      proc = run(workdir, cache_dir=cache, timeout=600, env={"JAX_LOG_COMPILES": "1"})
      (base / "run.log").write_text(proc.stderr)
      if proc.returncode != 0:
        raise AssertionError(f"the reference pipeline failed:\n{proc.stderr[-4000:]}")
      done.write_text("ok")
  return workdir, cache


def reference_log(tmp_path_factory) -> str:
  """What the shared reference run printed (stderr), with a line for each program JAX compiled."""
  workdir, _ = shared_reference(tmp_path_factory)
  with open(os.path.join(os.path.dirname(workdir), "run.log")) as f:
    return f.read()
