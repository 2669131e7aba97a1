"""Two processes on 127.0.0.1 with 4 CPU devices each train like one process with 8 (or 1).

tests/helpers_multihost/worker.py runs in two processes joined by `jax.distributed.initialize` (CPU
collectives over gloo); each feeds only its half of every global batch. Their SFT losses, PPO rollouts and PPO
update losses must match the single-process 1-device run of the same tiny stages
(tests/helpers_multihost/tiny_stages.py); the checkpoint they write together must restore in one process; and
only process 0 may write metrics. The workers run under a timeout: a lost peer makes the other one wait on a
collective forever, so on expiry both are killed and the test fails with their logs.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

import helpers
from rlhf_jax import checkpoint, metrics, optim

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_HELPERS = os.path.join(_TESTS, "helpers_multihost")
sys.path.insert(0, _HELPERS)
import tiny_stages as ts  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_PROCESSES = 2
TIMEOUT_S = 240
# One worker runs the module (the two processes start once), with scale_test and checkpoint_test, whose tiny_stages
# runs it reuses.
pytestmark = pytest.mark.xdist_group("tiny_stages")


def _tail(path, n=3000):
  with open(path, errors="replace") as f:
    return f.read()[-n:]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("multihost")
  port = portpicker.pick_unused_port()
  # 4 devices per process; optimization level 0 halves XLA's CPU compile time, which is nearly all the
  # workers' time (the numbers agree with the optimised reference to far below the tolerances).
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {helpers.FAST_COMPILE_XLA_FLAGS}",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([_REPO, _HELPERS]))
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    log = out_dir / f"log_{i}.txt"
    logs.append(log)
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(_HELPERS, "worker.py"), str(i), str(NUM_PROCESSES), str(port), str(out_dir)],
          cwd=_REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1.0))
  except subprocess.TimeoutExpired:
    pass
  finally:
    timed_out = [p.pid for p in procs if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  report = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{_tail(log)}" for i, (p, log) in
                     enumerate(zip(procs, logs)))
  if timed_out:
    pytest.fail(f"workers did not finish within {TIMEOUT_S}s and were killed:\n{report}")
  if any(p.returncode for p in procs):
    pytest.fail(f"a worker failed:\n{report}")
  results = []
  for i in range(NUM_PROCESSES):
    with open(out_dir / f"result_{i}.json") as f:
      results.append(json.load(f))
  return results, out_dir


def test_each_process_feeds_half_of_the_global_batch(workers):
  results, _ = workers
  for i, r in enumerate(results):
    assert (r["process_index"], r["process_count"]) == (i, 2)
    assert (r["device_count"], r["local_device_count"]) == (8, 4)
    assert r["local_rows"] == ts.SFT_BATCH // 2
    assert r["global_batch_shape"] == [ts.SFT_BATCH, ts.SFT_LEN + 1]
    assert r["global_batch_equal"]  # the halves are assembled in process order


def test_sft_losses_match_single_process(workers):
  results, _ = workers
  ref, _ = ts.sft_run((1, 1, 1))
  for r in results:
    losses = np.asarray(r["sft_losses"])
    np.testing.assert_array_less(np.abs(losses - ref) / ref, 1e-4)


def test_ppo_rollout_and_update_match_single_process(workers):
  results, _ = workers
  ref_its, _ = ts.ppo_run((1, 1, 1))
  for r in results:
    assert len(r["ppo"]) == len(ref_its) == ts.PPO_ITERATIONS
    for i, (it, ref) in enumerate(zip(r["ppo"], ref_its)):
      for key in ("response_bn", "response_mask_bn"):
        np.testing.assert_array_equal(np.asarray(it["rollout"][key]), ref["rollout"][key], err_msg=f"{i} {key}")
      for key in ("old_logp_bn", "ref_logp_bn", "old_values_bn", "rewards_bn", "rm_score_b"):
        np.testing.assert_allclose(np.asarray(it["rollout"][key]), ref["rollout"][key], rtol=1e-4, atol=1e-5,
                                   err_msg=f"iteration {i} {key}")
      for key in ("policy_loss", "value_loss", "entropy"):
        assert abs(it["update"][key] - ref["update"][key]) < 1e-4 * abs(ref["update"][key]), (i, key)


def test_checkpoint_written_by_two_processes_restores_in_one(workers):
  results, out_dir = workers
  for r in results:
    assert r["ckpt_restored_equal"] and r["ckpt_data_state"] == {"pos": ts.SFT_STEPS}
  one = ts.lm_trainer((1, 1, 1))
  template = one.fresh_state()
  ckpt = checkpoint.Checkpointer(str(out_dir / "ckpt"), save_every=1)
  assert ckpt.latest_step() == ts.SFT_STEPS
  restored, _, meta = ckpt.restore(ts.SFT_STEPS, optim.abstract_with_shardings(template, one.state_sh))
  ckpt.close()
  assert meta == {"stage": "sft"}
  expected = np.load(out_dir / "sft_params.npz")
  leaves = jax.tree_util.tree_leaves_with_path(restored["params"])
  assert sorted(expected.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
  for p, x in leaves:
    np.testing.assert_array_equal(np.asarray(x), expected[jax.tree_util.keystr(p)])
    assert x.sharding.device_set == {jax.devices()[0]}


def test_only_process_zero_writes_metrics(workers):
  _, out_dir = workers
  rows = metrics.read_jsonl(str(out_dir / "sft" / "metrics.jsonl"))
  assert [row["step"] for row in rows] == list(range(1, ts.SFT_STEPS + 1))  # once each, not once per process
