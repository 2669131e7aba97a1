"""Checkpoints move between meshes: written on 8 devices, restored on 1, and back, with identical values.

A train state (params, Adam state, step, rng) saved by `checkpoint.Checkpointer` on mesh data=2 x fsdp=2 x
tensor=2 is restored onto a 1-device mesh, trained there, saved again and restored onto data=8. The restored
leaves must equal what was saved bit for bit and carry the target mesh's shardings, and the run stitched from
the three meshes must give the losses of an uninterrupted 1-device run. The exported-parameters path
(`training.export_params` / `training.load_params`, how one stage hands its model to the next) moves the same
way. Uses the tiny SFT trainers of tests/helpers_multihost/tiny_stages.py (compiled once per process).
"""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, optim, sharding, training
from rlhf_jax.models import transformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers_multihost"))
import tiny_stages as ts  # pylint: disable=g-import-not-at-top,wrong-import-position

# scale_test, checkpoint_test and multihost_test share tiny_stages' cached runs (per mesh, per process): one worker
pytestmark = pytest.mark.xdist_group("tiny_stages")

ONE, SPLIT, WIDE = (1, 1, 1), (2, 2, 2), (8, 1, 1)


def _assert_restored(restored, saved_host, target_shardings):
  """Bit-identical values, and every leaf on exactly the target sharding (same mesh devices and spec)."""
  flat_r, tree_r = jax.tree.flatten(restored)
  flat_s, tree_s = jax.tree.flatten(saved_host)
  flat_t = jax.tree.leaves(target_shardings)
  assert tree_r == tree_s and len(flat_r) == len(flat_t)
  for r, s, t in zip(flat_r, flat_s, flat_t):
    np.testing.assert_array_equal(np.asarray(r), s)
    assert r.sharding.is_equivalent_to(t, r.ndim), (r.sharding, t)
    assert r.sharding.device_set == t.device_set


def test_train_state_moves_8_to_1_to_8_and_training_continues(tmp_path):
  batches = ts.sft_batches()
  ref_losses, _ = ts.sft_run(ONE)  # uninterrupted, on one device
  split, one, wide = ts.lm_trainer(SPLIT), ts.lm_trainer(ONE), ts.lm_trainer(WIDE)
  meta = {"model": dataclasses.asdict(ts.CFG), "stage": "sft"}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=2, max_to_keep=3)

  state = split.fresh_state()
  state, losses_a = split.train(state, batches[:2])
  assert sharding.largest_shard_fraction(state["params"]["layers"]["w_in"]) <= 0.25  # really written split
  saved = jax.device_get(state)
  assert ckpt.save(2, state, data_state={"epoch": 0, "pos": 2}, meta=meta)
  ckpt.wait()

  restored, data_state, got_meta = ckpt.restore(2, optim.abstract_with_shardings(state, one.state_sh))
  _assert_restored(restored, saved, one.state_sh)
  assert {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set} == {jax.devices()[0]}
  assert data_state == {"epoch": 0, "pos": 2} and got_meta == meta
  checkpoint.check_compatible(got_meta, meta["model"], directory=ckpt.directory)

  restored, losses_b = one.train(restored, batches[2:4])  # the 1-device step accepts the restored layout
  saved = jax.device_get(restored)
  assert ckpt.save(4, restored, data_state={"epoch": 0, "pos": 4}, meta=meta)
  ckpt.wait()
  assert ckpt.latest_step() == 4

  restored, data_state, _ = ckpt.restore(4, optim.abstract_with_shardings(restored, wide.state_sh))
  _assert_restored(restored, saved, wide.state_sh)
  assert len(restored["params"]["layers"]["w_in"].sharding.device_set) == 8
  _, losses_c = wide.train(restored, batches[4:6])
  ckpt.close()

  stitched = np.concatenate([losses_a, losses_b, losses_c])
  np.testing.assert_array_less(np.abs(stitched - ref_losses) / ref_losses, 1e-4)


def test_checkpoint_of_another_model_is_refused(tmp_path):
  meta = {"model": dataclasses.asdict(ts.CFG), "stage": "sft"}
  other = dict(meta["model"], d_model=64)
  with pytest.raises(ValueError, match="d_model: checkpoint has 32, config has 64"):
    checkpoint.check_compatible(meta, other, directory=str(tmp_path))


def test_exported_params_move_8_to_1_and_back(tmp_path):
  _, state = ts.sft_run(SPLIT)
  params = state["params"]
  saved = jax.device_get(params)
  axes = transformer.param_axes(ts.CFG)
  abstract = jax.eval_shape(lambda k: transformer.init(k, ts.CFG), jax.random.PRNGKey(0))
  mesh_one = ts.make_mesh(ONE)
  mesh_split = ts.make_mesh(SPLIT)

  training.export_params(str(tmp_path / "from8"), params)
  one_sh = sharding.tree_shardings(axes, abstract, mesh_one, ts.RULES)
  on_one = training.load_params(str(tmp_path / "from8"), abstract, one_sh)
  _assert_restored(on_one, saved, one_sh)

  training.export_params(str(tmp_path / "from1"), on_one)
  split_sh = sharding.tree_shardings(axes, abstract, mesh_split, ts.RULES)
  on_split = training.load_params(str(tmp_path / "from1"), abstract, split_sh)
  _assert_restored(on_split, saved, split_sh)
  for name in ("wq", "wo", "w_in", "w_out"):
    assert sharding.largest_shard_fraction(on_split["layers"][name]) <= 0.25, name

  with pytest.raises(FileNotFoundError, match="no exported parameters"):
    training.load_params(str(tmp_path / "missing"), abstract, one_sh)
