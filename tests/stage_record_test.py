"""The pipeline's record of finished stages: a stage whose summary says done but whose exported parameters are
damaged is redone (its summary moved aside), and loading the damaged export is a one-line error."""

import json
import os
import types

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax import checkpoint, pipeline, training


def _damage_largest_file(directory: str) -> None:
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f != checkpoint.CHECKSUMS_FILE]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def test_a_damaged_export_makes_the_pipeline_redo_its_stage(tmp_path, monkeypatch):
  stage_dir = tmp_path / "fake"
  params = {"w": jnp.arange(256.0).reshape(16, 16)}
  training.export_params(str(stage_dir), params)
  (stage_dir / "summary.json").write_text(json.dumps({"done": 1}))
  calls = []
  module = types.SimpleNamespace(check=lambda config: None,
                                 run=lambda config, workdir: calls.append(workdir) or {"redone": 1})
  monkeypatch.setitem(pipeline.STAGES, "fake", pipeline.Stage(module))

  assert training.export_damage(str(stage_dir)) is None
  assert pipeline.run_stage(None, str(tmp_path), "fake") == {"done": 1} and not calls  # intact: skipped

  _damage_largest_file(str(stage_dir / "params"))
  assert "changed since it was saved" in training.export_damage(str(stage_dir))
  abstract = jax.eval_shape(lambda: params)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  with pytest.raises(ValueError, match="are damaged") as e:
    training.load_params(str(stage_dir), abstract, shardings)
  assert "\n" not in str(e.value)
  assert pipeline.run_stage(None, str(tmp_path), "fake") == {"redone": 1} and calls == [str(tmp_path)]
  assert not (stage_dir / "summary.json").exists()
  assert [f for f in os.listdir(stage_dir) if f.startswith("summary.json.damaged-")]
