"""Checkpoints: orbax CheckpointManager around a train state, the data iterator's position and metadata.

What a stage needs to continue lives in one checkpoint step directory: the train state (params, optimizer state,
step, rng), the data iterator state (JSON), and metadata (the model config, so an incompatible checkpoint is
refused with a clear message, plus stage-specific extras such as PPO's KL controller). Orbax writes each step
into a temporary directory and renames it when complete, so a half-written checkpoint is never restored; saves
are asynchronous and every process takes part (multi-host safe).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from rlhf_jax import optim


CHECKSUMS_FILE = "rlhf_jax_checksums.json"


class CheckpointStorageError(OSError):
  """A save could not be written (a full disk, a read-only or vanished folder); the previous checkpoint stays."""


def file_sha256(path: str) -> str:
  """The hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_checksums(directory: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under `directory` (but the checksum record itself)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, directory)
      if rel != CHECKSUMS_FILE:
        out[rel] = [os.path.getsize(full), file_sha256(full)]
  return out


def verify_checksums(directory: str) -> str | None:
  """Why `directory` differs from the record written when it was saved (a missing, truncated or altered file),
  or None when it matches or has no record."""
  path = os.path.join(directory, CHECKSUMS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return f"its checksum record {CHECKSUMS_FILE} is unreadable ({e})"
  for rel, (size, sha) in sorted(recorded.items()):
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    if os.path.getsize(full) != size:
      return f"{rel} has {os.path.getsize(full)} bytes, {size} when it was saved"
    if file_sha256(full) != sha:
      return f"{rel} changed since it was saved (sha256 mismatch)"
  return None


def write_checksums(directory: str) -> None:
  """Records the size and SHA-256 of every file of a finished save (process 0), for `verify_checksums`."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    write_json_atomic(os.path.join(directory, CHECKSUMS_FILE), file_checksums(directory))


def _storage_error(e: OSError, what: str, directory: str, needed: int | None) -> CheckpointStorageError:
  space = f"; about {needed / 2**20:.1f} MiB were needed" if needed else ""
  if e.errno == errno.ENOSPC:
    reason = "no space left on the device"
  else:
    reason = f"{e.strerror or e}"
  return CheckpointStorageError(e.errno, f"{what} in {directory} failed: {reason}{space}; the previous checkpoint "
                                "is untouched, so free the space (or fix the folder) and rerun to resume from it")


class Checkpointer:
  """Periodic, asynchronous, bounded (max_to_keep) checkpoints of one stage.

  A finished save gets a record of its files' sizes and SHA-256 (`CHECKSUMS_FILE`, written once the next save
  starts or the stage waits), so a restore can tell a damaged checkpoint from a good one; `restore_latest` moves
  a damaged one aside and falls back to the one before. A save that fails for lack of space (or any OS error)
  raises CheckpointStorageError naming the folder, with the previous checkpoint left as it was.
  """

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unsealed: list[int] = []  # saves started whose files are not yet recorded
    self._needed: int | None = None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, *, data_state: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of `step` if it is due, or if forced. Returns whether a save started."""
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    self._seal()  # orbax waits for the previous save here anyway: record its files now
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta or {}),
    )
    self._needed = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    try:
      started = self._manager.save(step, args=args, force=True)
    except OSError as e:
      raise _storage_error(e, f"saving checkpoint {step}", self.directory, self._needed) from e
    if started:
      self._unsealed.append(step)
    return started

  def _seal(self) -> None:
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise _storage_error(e, "writing a checkpoint", self.directory, self._needed) from e
    for step in self._unsealed:
      write_checksums(self.step_dir(step))
    self._unsealed = []

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), whatever mesh wrote it."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    )
    restored = self._manager.restore(step, args=args)
    return restored["state"], restored["data"], dict(restored["meta"] or {})

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def quarantine(self, step: int, reason: str) -> str:
    """Moves a damaged checkpoint aside (renamed, never deleted) so it is no longer a step; returns where."""
    src = self.step_dir(step)
    dst = os.path.join(self.directory, f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.replace(src, dst)
    multihost_barrier(f"quarantine-{step}")
    self._manager.reload()
    logging.warning("checkpoint %d in %s is damaged (%s): moved aside to %s; trying the one before", step,
                    self.directory, reason, dst)
    return dst

  def restore_latest(self, abstract_state: Any, expected_model: dict | None) -> tuple[Any, Any, int] | None:
    """(state, data state, step) of the newest intact checkpoint, damaged newer ones moved aside; None if there
    was never one. Every checkpoint damaged: a one-line ValueError. A checkpoint of another model config is
    refused (check_compatible), not moved aside: that is the user's choice to make."""
    moved = []
    while True:
      step = self.latest_step()
      if step is None:
        if moved:
          raise ValueError(f"no intact checkpoint left in {self.directory}: moved aside {', '.join(moved)}; delete "
                           f"{self.directory} to start the stage over")
        return None
      reason = verify_checksums(self.step_dir(step))
      if reason is None:
        try:
          meta = self.read_meta(step)
        except Exception as e:  # pylint: disable=broad-except  (orbax and TensorStore raise many kinds)
          reason = f"its metadata does not read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      if reason is None:
        if expected_model is not None:
          check_compatible(meta, expected_model, directory=self.directory)
        try:
          state, data_state, _ = self.restore(step, abstract_state)
          return state, data_state, step
        except Exception as e:  # pylint: disable=broad-except
          reason = f"it does not restore: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      moved.append(self.quarantine(step, reason))

  def wait(self) -> None:
    self._seal()

  def close(self) -> None:
    self._seal()
    self._manager.close()


def multihost_barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_compatible(meta: dict, expected: dict, *, directory: str) -> None:
  """Refuses a checkpoint whose recorded model config differs from the one being run."""
  saved = meta.get("model")
  if saved is None:
    return
  diffs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
  if diffs:
    detail = ", ".join(f"{k}: checkpoint has {a!r}, config has {b!r}" for k, (a, b) in sorted(diffs.items()))
    raise ValueError(f"checkpoint in {directory} was written with an incompatible model config ({detail}); "
                     "use a fresh --workdir or the matching config")


def abstract_tree(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def write_text_atomic(path: str, text: str) -> None:
  """Write text through a temporary file and a rename, so readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  """`obj` as indented JSON, written atomically (write_text_atomic)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in a stage's loss or gradients, with config.guard.on_nonfinite = "stop"."""


def resume(ckpt: Checkpointer, state: Any, shardings: Any, meta: dict, *, stage: str) -> tuple[Any, Any, int]:
  """(state, data_state, step) from the newest intact checkpoint, laid out on `shardings`; (state, None, 0) if
  none. Damaged checkpoints are moved aside with a warning (Checkpointer.restore_latest); one written with
  another model config is refused before anything is restored."""
  found = ckpt.restore_latest(optim.abstract_with_shardings(state, shardings), meta.get("model"))
  if found is None:
    return state, None, 0
  state, data_state, start = found
  logging.info("[%s] resumed from step %d in %s", stage, start, ckpt.directory)
  return state, data_state, start


def guard_nonfinite(metrics: dict, *, step: int, stage: str, on_nonfinite: str, ckpt: Checkpointer) -> None:
  """Stops the stage (the last good checkpoint untouched) or logs the skipped update, per config.guard."""
  if bool(metrics["finite"]):
    return
  msg = f"[{stage}] non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, " \
        f"grad_norm={float(metrics['grad_norm'])})"
  if on_nonfinite == "stop":
    ckpt.wait()  # let an in-flight save of the last good step finish
    raise NonFiniteError(msg + f"; the last good checkpoint in {ckpt.directory} is untouched")
  logging.warning("%s: update skipped", msg)
