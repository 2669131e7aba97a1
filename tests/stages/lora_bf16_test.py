"""The PPO stage with LoRA on every attention and MLP projection and bfloat16 parameters and compute, in a
subprocess from the shared tiny reference's float32 data, SFT and reward models (tests/helpers/stage_runner.py):
it finishes with finite losses, the reference is the frozen base (no KL before the adapters move), checkpoints
hold the adapters and the value head only, and the export is the SFT weights with the checkpoint's adapters
merged in, in bfloat16."""

import json
import os

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import stage_runner
from rlhf_jax import metrics
from rlhf_jax.models import lora

pytestmark = pytest.mark.xdist_group("lora_bf16")  # its module fixture is built once, on one worker

LCFG = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "mlp_in", "mlp_out"))
FLAGS = ("--experiment.stage=ppo", "--experiment.model.param_dtype=bfloat16", "--experiment.model.dtype=bfloat16",
         f"--experiment.ppo.lora.rank={LCFG.rank}", f"--experiment.ppo.lora.alpha={LCFG.alpha}",
         f"--experiment.ppo.lora.targets={LCFG.targets!r}", "--experiment.ppo.optimizer.lr=1e-3",
         # One iteration: a second one recompiles the rollout and the update (as every PPO run does today), ~10 s.
         "--experiment.ppo.iterations=1", "--experiment.eval.best_of_n=(2,)",
         # The reward from a mean ensemble (ppo.rm_ensemble; its numbers: rl_test), here rm with itself.
         "--experiment.ppo.rm_ensemble=('rm',)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  ref_dir, cache = stage_runner.shared_reference(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp("lora_bf16") / "w")
  for d in ("data", "pretrain", "sft", "rm"):
    stage_runner.copy_workdir(os.path.join(ref_dir, d), os.path.join(workdir, d))
  proc = stage_runner.run(workdir, *FLAGS, cache_dir=cache, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def test_bf16_lora_ppo_finishes_with_finite_losses_and_no_first_kl(run):
  rows = metrics.read_jsonl(os.path.join(run, "ppo", "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1]
  for key in ("loss", "policy_loss", "value_loss", "grad_norm", "kl_seq", "entropy", "ratio_mean"):
    assert np.isfinite(rows[0][key]), key
  assert rows[0]["kl_seq"] == 0.0  # fresh adapters (B = 0): the policy is exactly its reference, the base
  assert abs(rows[0]["ratio_mean"] - 1.0) < 0.05 and rows[0]["grad_norm"] > 0
  summary = json.load(open(os.path.join(run, "ppo", "summary.json")))
  assert summary["lora_params"] == lora.num_params(_cfg(run), LCFG) and summary["rm_members"] == 2


def _cfg(workdir):
  from rlhf_jax import training  # pylint: disable=g-import-not-at-top
  return training.read_manifest(os.path.join(workdir, "ppo"))["model"]


def test_checkpoint_holds_adapters_and_export_is_the_merged_bf16_policy(run):
  cfg = _cfg(run)
  assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
  state = ocp.StandardCheckpointer().restore(os.path.join(run, "ppo", "checkpoints", "1", "state"))
  params = state["params"]
  assert set(params["policy"]["layers"]) == set(LCFG.targets)  # no full weights in the checkpoint
  assert set(params["value"]) == {"adapters", "head"}
  n_ckpt = sum(np.asarray(x).size for x in _leaves(params))
  assert n_ckpt == 2 * lora.num_params(cfg, LCFG) + cfg.d_model + 1

  sft = stage_runner.load_params(os.path.join(run, "sft", "params"))  # float32
  exported = stage_runner.load_params(os.path.join(run, "ppo", "params"))
  assert all(v.dtype == ml_dtypes.bfloat16 for v in exported.values())
  for target in LCFG.targets:
    name = lora.TARGETS[target][0]
    key = f"['layers']['{name}']"
    a, b = (np.asarray(params["policy"]["layers"][target][k], np.float32) for k in ("a", "b"))
    w = sft[key].astype(ml_dtypes.bfloat16).astype(np.float32)  # the run's base: SFT cast to bfloat16
    delta = np.stack([(a[i].reshape(-1, LCFG.rank) @ b[i].reshape(LCFG.rank, -1)).reshape(w.shape[1:])
                      for i in range(w.shape[0])])
    want = (w + LCFG.scale * delta).astype(ml_dtypes.bfloat16).astype(np.float32)
    got = exported[key].astype(np.float32)
    # The same float32 sum rounded to bfloat16; XLA's and NumPy's float32 products may round a tie differently.
    assert np.mean(got == want) > 0.99, target
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-8)
    assert np.any(got != w), target  # the adapters changed the weights
  untouched = "['layers']['attn_norm']"
  np.testing.assert_array_equal(exported[untouched], sft[untouched].astype(ml_dtypes.bfloat16))


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree
