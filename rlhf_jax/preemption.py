"""Preemption notices: SIGTERM asks the running stage to finish its step, save, and exit so a rerun resumes.

TPU VMs and most schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they take a machine away.
`install()` (run.py calls it) makes SIGTERM set a flag instead of killing the process; the training loops ask
`should_stop(step)` after every step and, when it says so, save that step, wait for the save and raise
`Preempted`, which run.py reports and turns into exit status `EXIT_CODE`. A second SIGTERM while the save is
being written only sets the flag again, so the save is never cut short by our own handler. With several
processes, `should_stop` is JAX's preemption sync point, so every host stops at the same step (JAX's coordination
service propagates the notice; it needs jax.distributed.initialize, as run.py does for multi-host runs).
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; a scheduler's retry reruns the same command and it resumes

_requested = threading.Event()
_installed = False


class Preempted(Exception):
  """The stage saved its state at a preemption notice and stopped; rerunning the command resumes it."""


def _handler(signum, frame):
  del signum, frame
  _requested.set()


def install() -> None:
  """Routes SIGTERM to the preemption flag (idempotent; only from the main thread, as Python requires)."""
  global _installed
  if not _installed and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handler)
    _installed = True


def requested() -> bool:
  """Whether this process has received a preemption notice."""
  return _requested.is_set()


def request() -> None:
  """Sets the flag as SIGTERM does (tests, or a caller with its own notice)."""
  _requested.set()


def reset() -> None:
  _requested.clear()


def should_stop(step: int) -> bool:
  """After step `step`: stop here? One process: whether a notice arrived. Several: JAX's sync point, True at the
  same step on every host once any host got a notice (every host must call this at every step)."""
  if jax.process_count() > 1:
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # no preemption sync manager: hosts cannot agree on a step, so none stops early
      return False
  return requested()
