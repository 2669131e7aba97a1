"""Sharded training equals single-device training; parameters and optimizer state are really split."""

import jax
import numpy as np
import pytest

from rlhf_jax import configs, optim, sharding, training
from rlhf_jax.models import presets, transformer

CFG = presets.preset("tiny", vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_len=32)


def _batches(n, b=8, t=17, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    # Learnable: each row counts up from a random start, so the loss must fall.
    start = rng.integers(0, CFG.vocab_size, size=(b, 1))
    tokens = ((start + np.arange(t)[None, :]) % (CFG.vocab_size - 3) + 3).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask[np.arange(t)[None, :] >= lengths[:, None]] = 0  # right padding
    tokens[mask == 0] = 0
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0
    out.append({"tokens": tokens, "mask": mask, "loss_mask": loss_mask})
  return out


def _train(mesh, batches, steps=10):
  rules = sharding.DEFAULT_RULES
  opt_cfg = configs.optimizer_config(lr=3e-3, warmup_steps=2)
  axes = transformer.param_axes(CFG)
  optimizer = optim.make_optimizer(opt_cfg, steps, optim.decay_mask_from_axes(axes))
  state, state_sh = optim.create_state(lambda k: transformer.init(k, CFG), axes, optimizer, jax.random.PRNGKey(0),
                                       mesh, rules)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in batches[0]}
  with sharding.activate(mesh, rules):
    step = jax.jit(training.make_train_step(training.lm_loss_fn(CFG), optimizer), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None))
    losses = []
    for batch in batches[:steps]:
      state, m = step(state, sharding.put_batch(batch, mesh, rules))
      losses.append(float(m["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_run():
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return _train(mesh, _batches(10))


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_losses_match_single_device(single_device_run, shape):
  assert jax.device_count() == 8
  ref_losses, ref_state = single_device_run
  losses, state = _train(sharding.make_mesh(*shape), _batches(10))
  np.testing.assert_array_less(np.abs(losses - ref_losses) / np.abs(ref_losses), 1e-4)
  assert ref_losses[-1] < ref_losses[0]  # it trained
  if shape == (2, 2, 2):
    # The largest parameters really are split, and Adam's moments are split like them.
    for name in ("w_in", "w_out", "wq", "wo"):
      assert sharding.largest_shard_fraction(state["params"]["layers"][name]) <= 0.25, name
    assert sharding.largest_shard_fraction(state["params"]["embed"]) <= 0.25
    mu = state["opt_state"][1].mu  # chain: (clip, adam, decay, lr)
    assert mu["layers"]["w_in"].sharding == state["params"]["layers"]["w_in"].sharding
    assert sharding.largest_shard_fraction(mu["layers"]["w_in"]) <= 0.25


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh(2, 2, 2)
  spec = sharding.logical_to_spec(("batch", "length", "embed"), (8, 16, 64), mesh, sharding.DEFAULT_RULES)
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)  # fsdp used once, by batch
  spec = sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh,
                                  sharding.DEFAULT_RULES)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)  # 1 kv head cannot split: replicated


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="8 are available"):
    sharding.make_mesh(2, 2, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(-1, -1, 1)
  mesh = sharding.make_mesh(4, 2, 1)
  with pytest.raises(ValueError, match="train.batch_size=12 does not divide over the data-parallel size 8"):
    sharding.check_batch(12, mesh, field="train.batch_size")
  assert sharding.make_mesh(-1, 2, 2).shape["data"] == 2
