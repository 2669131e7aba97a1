"""Metrics everyone can read: JSON lines, TensorBoard events, a console progress line, a summary file.

Each stage writes under `WORKDIR/<stage>/`:
  metrics.jsonl   one JSON object per log step, with `step` (a resumed run first drops lines past its
                  checkpoint, so the file reads as one uninterrupted run);
  events.*        TensorBoard scalars (tensorboardX, no TensorFlow needed);
  summary.json    the stage's final metrics (e.g. val_loss, wall_s), written last: its presence marks the stage
                  complete.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from rlhf_jax import checkpoint


def _scalar(v: Any) -> Any:
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    v = np.asarray(v)
    if v.size == 1:
      v = v.item()
    else:
      return v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsWriter:
  """Writes one stage's metrics; `log(step, metrics)` on every log step, `summary(metrics)` at the end."""

  def __init__(self, stage_dir: str, *, stage: str, total_steps: int, start_step: int = 0,
               tokens_per_step: int | None = None):
    self.stage_dir = stage_dir
    self.stage = stage
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.is_main = jax.process_index() == 0
    self._t0 = time.time()
    self._last_time = self._t0
    self._last_step = start_step
    self._tb = None
    if self.is_main:
      os.makedirs(stage_dir, exist_ok=True)
      self._truncate_after(start_step)
      try:
        from tensorboardX import SummaryWriter  # lazy: an optional dependency
        self._tb = SummaryWriter(stage_dir, flush_secs=10)
      except ImportError:  # TensorBoard is optional: JSON lines stay the source of truth
        self._tb = None

  @property
  def jsonl_path(self) -> str:
    return os.path.join(self.stage_dir, "metrics.jsonl")

  def _truncate_after(self, step: int) -> None:
    path = self.jsonl_path
    if not os.path.exists(path):
      return
    keep = []
    with open(path, errors="replace") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a line half-written when the previous run was killed
          continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
          keep.append(json.dumps(row, sort_keys=True) + "\n")
    # Through a temporary file and a rename: a kill during the rewrite must not lose the logged history.
    checkpoint.write_text_atomic(path, "".join(keep))

  def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> dict[str, Any]:
    now = time.time()
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    steps_done = step - self._last_step
    if steps_done > 0:
      dt = max(now - self._last_time, 1e-9)
      row["steps_per_s"] = steps_done / dt
      if self.tokens_per_step:
        row["tokens_per_s"] = steps_done * self.tokens_per_step / dt
      eta = (self.total_steps - step) / row["steps_per_s"]
    else:
      eta = float("nan")
    self._last_time, self._last_step = now, step
    if not self.is_main:
      return row
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{self.stage}/{k}", v, step)
    if console:
      shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                       if k not in ("step", "steps_per_s") and isinstance(v, (int, float)))
      eta_s = "?" if not math.isfinite(eta) else f"{eta:.0f}s"
      logging.info("[%s] step %d/%d %s eta=%s", self.stage, step, self.total_steps, shown, eta_s)
    return row

  def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: _scalar(v) for k, v in metrics.items()}
    if self.is_main:
      checkpoint.write_json_atomic(os.path.join(self.stage_dir, "summary.json"), out)
      if self._tb is not None:
        self._tb.flush()
    return out

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  if isinstance(v, int):
    return str(v)
  if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
    return f"{v:.3e}"
  return f"{v:.4f}"


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
