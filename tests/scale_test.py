"""Every stage gives the same numbers on 8 simulated devices as on one, and its parameters really are split.

SFT (`pretrain.make_train_step` on chat batches), the reward model (`reward.make_train_step` on [b, k, t] group
batches) and PPO (`ppo.make_rollout`, `ppo.make_update` with the four parameter sets of `ppo.run`) run for a few
steps on a 1-device mesh, on mesh data=2 x fsdp=2 x tensor=2 and on data=8, from the same parameters, batches
and rngs (tests/helpers_multihost/tiny_stages.py). The 1-device run is the reference: sharding may reorder
float32 sums, nothing else, so losses agree to 1e-4 relative and sampled tokens are identical.

Compiled functions and results are cached per mesh in tiny_stages, so checkpoint_test.py and multihost_test.py
reuse them in the same pytest process.
"""

import os
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import sharding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers_multihost"))
import tiny_stages as ts  # pylint: disable=g-import-not-at-top,wrong-import-position

# scale_test, checkpoint_test and multihost_test share tiny_stages' cached runs (per mesh, per process): one worker
pytestmark = pytest.mark.xdist_group("tiny_stages")

ONE = (1, 1, 1)
SHARDED = [(2, 2, 2), (8, 1, 1)]
# The PPO comparisons (the costliest here) on the mesh that splits all three axes at once.
PPO_SHARDED = [(2, 2, 2)]


def _assert_rel(actual, expected, rtol=1e-4, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  rel = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-30)
  assert np.all(rel < rtol), f"{what}: relative difference {rel.max():.2e} >= {rtol} ({actual} vs {expected})"


def test_device_count():
  assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices


def test_sft_batches_train_on_assistant_tokens_only():
  # The loss-masked targets of each row are exactly the assistant replies and their closing EOS.
  batch = ts.sft_batches(1)[0]
  for tokens, mask, loss_mask in zip(batch["tokens"], batch["mask"], batch["loss_mask"]):
    assert loss_mask[0] == 0 and np.all(loss_mask <= mask)
    targets = tokens[loss_mask.astype(bool)]
    assert targets[-1] == ts.TOK.eos_id
    replies = ts.TOK.decode(targets, skip_special=False).split("</s>")[:-1]
    assert all(r.isdigit() for r in replies) and len(replies) in (1, 2), replies


@pytest.mark.parametrize("shape", SHARDED, ids=str)
def test_sft_step_matches_single_device(shape):
  ref_losses, _ = ts.sft_run(ONE)
  losses, state = ts.sft_run(shape)
  assert len(losses) == ts.SFT_STEPS
  _assert_rel(losses, ref_losses, what=f"SFT losses on mesh {shape}")
  assert ref_losses[-1] < ref_losses[0] - 0.2  # it trained, so later steps compare trained parameters
  if shape == (2, 2, 2):
    for name in ("wq", "wk", "wo", "w_in", "w_out"):
      assert sharding.largest_shard_fraction(state["params"]["layers"][name]) <= 0.25, name
    for name in ("embed", "unembed"):
      assert sharding.largest_shard_fraction(state["params"][name]) <= 0.25, name
    mu = state["opt_state"][1].mu  # chain: (clip, adam, decay, lr)
    assert mu["layers"]["w_in"].sharding == state["params"]["layers"]["w_in"].sharding


@pytest.mark.parametrize("shape", SHARDED, ids=str)
def test_rm_step_matches_single_device(shape):
  assert ts.rm_batches(1)[0]["tokens"].shape == (ts.RM_BATCH, ts.RM_K, ts.RM_LEN)
  ref, _ = ts.rm_run(ONE)
  out, trainer = ts.rm_run(shape)
  _assert_rel(out[:, 0], ref[:, 0], what=f"RM losses on mesh {shape}")
  np.testing.assert_array_equal(out[:, 1], ref[:, 1])  # pairwise accuracy: the same pairs ordered alike
  assert ref[-1, 0] < ref[0, 0]
  if shape == (2, 2, 2):
    backbone = trainer.state["params"]["backbone"]
    assert sharding.largest_shard_fraction(backbone["layers"]["w_in"]) <= 0.25
    assert sharding.largest_shard_fraction(backbone["embed"]) <= 0.25


def test_ppo_rollouts_exercise_both_reward_paths():
  # Guards the test data: some responses stop at EOS (RM score) and some never do (fixed penalty), and the
  # policy and reference differ, so the KL term is not trivially zero.
  iterations, _ = ts.ppo_run(ONE)
  for it in iterations:
    assert 0.0 < it["stats"]["ended_frac"] < 1.0
    assert it["stats"]["kl_token"] > 0.01
    assert it["stats"]["sampler_logp_maxdiff"] < 1e-4  # the sampler's log-probs equal the full forward pass


@pytest.mark.parametrize("shape", PPO_SHARDED, ids=str)
def test_ppo_rollouts_match_single_device(shape):
  ref_its, _ = ts.ppo_run(ONE)
  its, _ = ts.ppo_run(shape)
  assert len(its) == ts.PPO_ITERATIONS == 2  # the second rollout samples from the updated policy
  for i, (ref, out) in enumerate(zip(ref_its, its)):
    for key in ("prompt_bp", "prompt_mask_bp", "response_bn", "response_mask_bn"):
      np.testing.assert_array_equal(out["rollout"][key], ref["rollout"][key], err_msg=f"iteration {i} {key}")
    # Relative 1e-4; the absolute floor covers entries that are zero up to rounding (masked positions,
    # whitened advantages near 0).
    for key in ("old_logp_bn", "ref_logp_bn", "old_values_bn", "rewards_bn", "advantages_bn", "returns_bn",
                "rm_score_b"):
      np.testing.assert_allclose(out["rollout"][key], ref["rollout"][key], rtol=1e-4, atol=1e-5,
                                 err_msg=f"iteration {i} {key} on mesh {shape}")


@pytest.mark.parametrize("shape", PPO_SHARDED, ids=str)
def test_ppo_update_matches_single_device(shape):
  ref_its, _ = ts.ppo_run(ONE)
  its, _ = ts.ppo_run(shape)
  for i, (ref, out) in enumerate(zip(ref_its, its)):
    m, r = out["update"], ref["update"]
    for key in ("policy_loss", "value_loss", "entropy"):
      _assert_rel(m[key], r[key], what=f"iteration {i} {key} on mesh {shape}")
    # The total is a sum of terms of both signs; its error is relative to the terms, not to the sum.
    scale = abs(r["policy_loss"]) + ts.PPO.vf_coef * abs(r["value_loss"]) + ts.PPO.entropy_coef * r["entropy"]
    assert abs(m["loss"] - r["loss"]) < 1e-4 * scale, (i, m["loss"], r["loss"])
    # The clipped objective has kinks, so the gradient norm is looser than the losses.
    _assert_rel(m["grad_norm"], r["grad_norm"], rtol=1e-3, what=f"iteration {i} grad_norm")
    assert r["clip_frac"] > 0  # the clipped branch is exercised


def test_ppo_four_parameter_sets_are_split():
  _, layouts = ts.ppo_run((2, 2, 2))
  for name in ("policy", "value", "ref", "rm"):
    # Matrices: two or more axes longer than 1 (a norm scale is [layers, d] with one layer here).
    matrices = {k: v for k, v in layouts[name].items() if sum(d > 1 for d in v[0]) >= 2}
    assert len(matrices) >= 7, (name, sorted(layouts[name]))  # embed, unembed, wq, wk, wv, wo, w_in, w_out
    for key, (_, fraction, spec) in matrices.items():
      assert fraction <= 0.25, f"{name}{key}: one device holds {fraction:.2f} of it ({spec})"
  # Adam's first moment of policy and value is laid out exactly like the parameter it tracks.
  for name in ("policy", "value"):
    for key, (_, _, spec) in layouts[name].items():
      assert layouts["adam_mu"][f"['{name}']{key}"][2] == spec, (name, key)
