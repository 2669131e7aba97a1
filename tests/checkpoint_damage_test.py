"""A damaged latest checkpoint and a full disk, in process: truncated and bit-flipped files are found (by the
checksums recorded at save time, or by orbax itself when there is no record), moved aside with a warning, and the
previous checkpoint restores exactly; with every checkpoint damaged the error is one line; a save that hits ENOSPC
stops with a one-line error naming the folder and the previous checkpoint still restores."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint


def _state(step: int):
  rng = np.random.default_rng(step)
  return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32)},
          "step": jnp.asarray(step, jnp.int32)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _written(tmp_path, steps=(1, 2, 3)):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1, max_to_keep=10)
  for s in steps:
    assert ckpt.save(s, _state(s), data_state={"pos": s}, meta={"model": {"d": 1}})
  ckpt.wait()
  return ckpt


def _largest_file(step_dir: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f != checkpoint.CHECKSUMS_FILE]
  return max(files, key=os.path.getsize)


def _assert_state(restored, step):
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(step))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_every_finished_save_has_a_checksum_record(tmp_path):
  ckpt = _written(tmp_path)
  for s in (1, 2, 3):
    assert os.path.isfile(os.path.join(ckpt.step_dir(s), checkpoint.CHECKSUMS_FILE))
    assert checkpoint.verify_checksums(ckpt.step_dir(s)) is None


@pytest.mark.parametrize("damage", ["truncate", "bit_flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  ckpt = _written(tmp_path)
  path = _largest_file(ckpt.step_dir(3))
  data = bytearray(open(path, "rb").read())
  if damage == "truncate":
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))
  reason = checkpoint.verify_checksums(ckpt.step_dir(3))
  assert reason and os.path.relpath(path, ckpt.step_dir(3)) in reason
  state, data_state, step = ckpt.restore_latest(_abstract(), {"d": 1})
  assert step == 2 and data_state == {"pos": 2}
  _assert_state(state, 2)
  moved = [d for d in os.listdir(ckpt.directory) if d.startswith("damaged-3-")]
  assert len(moved) == 1 and os.path.isfile(os.path.join(ckpt.directory, moved[0], os.path.relpath(
      path, ckpt.step_dir(3))))  # renamed, never deleted
  assert ckpt.all_steps() == [1, 2]
  # Training continues: the next save of step 3 is a fresh checkpoint, restored as the latest.
  assert ckpt.save(3, _state(3), data_state={"pos": 3}, meta={"model": {"d": 1}})
  ckpt.wait()
  assert ckpt.restore_latest(_abstract(), {"d": 1})[2] == 3


def test_without_a_checksum_record_orbax_notices_the_damage(tmp_path):
  ckpt = _written(tmp_path)
  os.remove(os.path.join(ckpt.step_dir(3), checkpoint.CHECKSUMS_FILE))  # e.g. killed before the record
  path = _largest_file(ckpt.step_dir(3))
  open(path, "wb").write(open(path, "rb").read()[:10])
  state, _, step = ckpt.restore_latest(_abstract(), {"d": 1})
  assert step == 2
  _assert_state(state, 2)


def test_every_checkpoint_damaged_is_one_error_line(tmp_path):
  ckpt = _written(tmp_path, steps=(1, 2))
  for s in (1, 2):
    path = _largest_file(ckpt.step_dir(s))
    open(path, "wb").write(b"")
  with pytest.raises(ValueError) as e:
    ckpt.restore_latest(_abstract(), {"d": 1})
  assert "no intact checkpoint left in" in str(e.value) and "damaged-1-" in str(e.value)
  assert "\n" not in str(e.value)


def test_an_incompatible_checkpoint_is_refused_not_moved_aside(tmp_path):
  ckpt = _written(tmp_path, steps=(1,))
  with pytest.raises(ValueError, match="incompatible model config"):
    ckpt.restore_latest(_abstract(), {"d": 2})
  assert ckpt.all_steps() == [1]


def test_a_full_disk_stops_the_save_with_one_line_and_the_previous_checkpoint_restores(tmp_path, monkeypatch):
  ckpt = _written(tmp_path, steps=(1,))

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "save", no_space)  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointStorageError) as e:
    ckpt.save(2, _state(2), meta={"model": {"d": 1}})
  message = str(e.value)
  assert "saving checkpoint 2 in" in message and ckpt.directory in message
  assert "no space left on the device" in message and "MiB were needed" in message and "\n" not in message
  monkeypatch.undo()
  state, _, step = ckpt.restore_latest(_abstract(), {"d": 1})
  assert step == 1
  _assert_state(state, 1)
