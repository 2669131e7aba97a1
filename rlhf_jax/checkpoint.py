"""Checkpoints: orbax CheckpointManager around a train state, the data iterator's position and metadata.

What a stage needs to continue lives in one checkpoint step directory: the train state (params, optimizer state,
step, rng), the data iterator state (JSON), and metadata (the model config, so an incompatible checkpoint is
refused with a clear message, plus stage-specific extras such as PPO's KL controller). Orbax writes each step
into a temporary directory and renames it when complete, so a half-written checkpoint is never restored; saves
are asynchronous and every process takes part (multi-host safe).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from rlhf_jax import optim


class Checkpointer:
  """Periodic, asynchronous, bounded (max_to_keep) checkpoints of one stage."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, *, data_state: Any = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of `step` if it is due, or if forced. Returns whether a save started."""
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta or {}),
    )
    return self._manager.save(step, args=args, force=True)

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
  """(state, data_state, step) from the latest checkpoint, laid out on `shardings`; (state, None, 0) if none.

  Refuses a checkpoint written with another model config before restoring anything."""
  start = ckpt.latest_step() or 0
  if not start:
    return state, None, 0
  check_compatible(ckpt.read_meta(start), meta["model"], directory=ckpt.directory)
  state, data_state, _ = ckpt.restore(start, optim.abstract_with_shardings(state, shardings))
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
