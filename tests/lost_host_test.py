"""A lost host: two run.py processes on 127.0.0.1 train; the coordinator (process 0) is killed with SIGKILL
mid-training. The other must exit by itself, with an `error:` line, within the configured --host_timeout_s (plus
slack), instead of waiting forever on a collective."""

import os
import subprocess
import sys
import time

import portpicker
import pytest

from helpers import stage_runner

pytestmark = pytest.mark.xdist_group("tiny_reference")  # with the other users of the shared tiny run

HOST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return stage_runner.shared_reference(tmp_path_factory)


def test_the_survivor_of_a_lost_host_exits_with_an_error_in_bounded_time(reference, tmp_path):
  ref_dir, cache = reference
  workdir = str(tmp_path / "w")
  stage_runner.copy_workdir(os.path.join(ref_dir, "data"), os.path.join(workdir, "data"))
  port = portpicker.pick_unused_port()
  logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
  procs = []
  for i in range(2):
    cmd = [sys.executable, stage_runner.RUN_PY, *stage_runner.TINY_FLAGS, "--experiment.stage=pretrain",
           "--experiment.pretrain.train.steps=2000", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", f"--host_timeout_s={HOST_TIMEOUT_S}"]
    procs.append(subprocess.Popen(cmd, env=stage_runner.subprocess_env(cache), cwd=stage_runner.ROOT,
                                  stdout=open(logs[i], "w"), stderr=subprocess.STDOUT))
  try:
    deadline = time.monotonic() + 300
    while "[pretrain] step 5/" not in open(logs[0]).read():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
      time.sleep(0.2)
    procs[0].kill()
    lost = time.monotonic()
    try:
      procs[1].wait(timeout=HOST_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor was still running {HOST_TIMEOUT_S + 60} s after its peer was lost")
    waited = time.monotonic() - lost
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = open(logs[1]).read()
  assert procs[1].returncode != 0, out[-3000:]
  assert waited < HOST_TIMEOUT_S + 60
  assert any(line.startswith("error: ") for line in out.splitlines()) or "heartbeat timeout" in out, out[-3000:]
