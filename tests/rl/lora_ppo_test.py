"""PPO with LoRA (ppo.lora): the frozen base is the reference, fresh adapters give the first ratio 1 and no KL, and
one learner update on the adapters and the value head equals a reference update: the gradient of the same
full-weight PPO loss (jax.grad in the merged weights W' = W + s A @ B) taken to A and B by the chain rule,
then one SGD step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sampling
from rlhf_jax.models import heads, lora, presets, transformer
from rlhf_jax.rl import learner, rollout
from rlhf_jax.stages import rl

pytestmark = pytest.mark.xdist_group("lora_ppo")  # its module fixture is built once, on one worker

CFG = presets.preset("tiny", vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, max_len=32)
LCFG = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "mlp_out"))
EOS, PAD = 2, 0
LR = 0.05


def _settings(**kw):
  base = dict(sampling=sampling.SamplingConfig(max_new_tokens=6, temperature=0.7), eos_id=EOS, pad_id=PAD,
              no_eos_penalty=-3.0, whiten_rewards=False, gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip_eps=0.2,
              vf_coef=0.1, entropy_coef=0.0, ptx_coef=0.0, epochs=1, n_minibatches=1, algorithm="ppo",
              min_whiten=2, lora=LCFG)
  base.update(kw)
  return rollout.PPOSettings(**base)


@pytest.fixture(scope="module")
def setup():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  sft = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, transformer.init(keys[0], CFG))  # diverse samples
  rm = heads.init_rm_params(keys[1], CFG)
  full = {"policy": sft, "value": {"backbone": rm["backbone"], "head": dict(rm["head"])}}  # value_init="rm"
  trainable, axes, frozen = rl.lora_trainable(full, CFG, LCFG, keys[2])
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, CFG.vocab_size, (8, 5)), jnp.int32)
  mask = jnp.ones((8, 5), bool)
  s = _settings()
  fn = jax.jit(rollout.make_rollout(CFG, CFG, s))
  fresh = fn(trainable["policy"], trainable["value"], frozen["policy"], rm, prompt, mask, jax.random.PRNGKey(3),
             jnp.float32(0.05), frozen)
  # Trained-looking adapters (B != 0), so the update's reference has to get A, B and the scale right.
  moved = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(keys[3], x.shape) if x.ndim >= 2 else x, trainable)
  ro, _, _ = fn(moved["policy"], moved["value"], frozen["policy"], rm, prompt, mask, jax.random.PRNGKey(3),
                jnp.float32(0.05), frozen)
  return dict(trainable=trainable, axes=axes, frozen=frozen, rm=rm, sft=sft, s=s, fresh=fresh, moved=moved, ro=ro)


def test_the_trained_state_is_adapters_and_the_value_head_on_shared_frozen_weights(setup):
  t, frozen, sft, rm = setup["trainable"], setup["frozen"], setup["sft"], setup["rm"]
  assert frozen["policy"] is sft and frozen["value"] is rm["backbone"]  # the same buffers: no copies
  assert set(t) == {"policy", "value"} and set(t["value"]) == {"adapters", "head"}
  n_trained = sum(x.size for x in jax.tree.leaves(t))
  assert n_trained == 2 * lora.num_params(CFG, LCFG) + CFG.d_model + 1
  assert jax.tree.structure(setup["axes"], is_leaf=lambda x: isinstance(x, tuple)).num_leaves == len(
      jax.tree.leaves(t))


def test_fresh_adapters_sample_the_base_policy_with_zero_kl_to_the_reference(setup):
  ro, _, stats = setup["fresh"]
  np.testing.assert_allclose(np.asarray(ro.old_logp_bn), np.asarray(ro.ref_logp_bn), atol=1e-6)
  assert abs(float(stats["kl_seq"])) < 1e-5 and float(stats["sampler_logp_maxdiff"]) < 1e-5
  # The values are the reward model's backbone and head (value_init="rm"): its per-token estimates.
  want = heads.value_estimates({"backbone": setup["rm"]["backbone"], "head": setup["rm"]["head"]}, ro.prompt_bp,
                               ro.prompt_mask_bp, ro.response_bn, ro.response_mask_bn, CFG)
  np.testing.assert_allclose(np.asarray(ro.old_values_bn), np.asarray(want), atol=1e-6)


def test_the_moved_policy_is_the_merged_one_and_the_reference_stays_the_base(setup):
  # Separately compiled programs on 8x-scaled weights (logits of tens): float32 rounding of about 1e-5.
  ro = setup["ro"]
  merged = lora.merge(setup["frozen"]["policy"], setup["moved"]["policy"], LCFG)
  logprobs = jax.jit(lambda p: rollout.policy_logprobs(p, ro, CFG, setup["s"].sampling.logprob_temperature))
  np.testing.assert_allclose(np.asarray(logprobs(merged)), np.asarray(ro.old_logp_bn), atol=3e-5)
  np.testing.assert_allclose(np.asarray(logprobs(setup["sft"])), np.asarray(ro.ref_logp_bn), atol=3e-5)
  assert np.abs(np.asarray(ro.old_logp_bn - ro.ref_logp_bn)).max() > 1e-3


def test_one_lora_ppo_update_equals_the_chain_rule_sgd_step(setup):
  s, ro, frozen, moved = setup["s"], setup["ro"], setup["frozen"], setup["moved"]
  optimizer = optax.sgd(LR)
  state = {"params": moved, "opt_state": optimizer.init(moved), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(0)}
  new, m = jax.jit(learner.make_update(optimizer, CFG, s))(state, ro, None, frozen)
  assert bool(m["finite"])

  # The reference: the full-weight loss's gradient in W' (policy and value backbones) and in the value head.
  merged = rollout.with_frozen(moved, frozen, LCFG)
  full_loss = lambda p: learner.ppo_loss(p, ro, None, CFG, dataclasses.replace(s, lora=None))[0]
  g_full = jax.jit(jax.grad(full_loss))(merged)
  sc = LCFG.scale
  for role, adapters, g_w in (("policy", moved["policy"], g_full["policy"]["layers"]),
                              ("value", moved["value"]["adapters"], g_full["value"]["backbone"]["layers"])):
    got = new["params"][role] if role == "policy" else new["params"]["value"]["adapters"]
    for target, ab in adapters["layers"].items():
      a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
      gw = np.asarray(g_w[lora.TARGETS[target][0]], np.float64)
      for i in range(CFG.n_layers):
        a_i, b_i = a[i].reshape(-1, LCFG.rank), b[i].reshape(LCFG.rank, -1)
        gw_i = gw[i].reshape(a_i.shape[0], b_i.shape[1])
        # The steps, compared to 1% of their size: the values A, B are ~1000x larger than a step.
        for name, x, step_want in (("A", a_i, -LR * sc * gw_i @ b_i.T), ("B", b_i, -LR * sc * a_i.T @ gw_i)):
          step_got = np.asarray(got["layers"][target][name.lower()][i], np.float64).reshape(x.shape) - x
          size = np.abs(step_want).max()
          assert size > 1e-5, (role, target, name)  # far above float32 rounding of the values (~1e-7)
          np.testing.assert_allclose(step_got, step_want, rtol=1e-2, atol=1e-2 * size, err_msg=f"{role} {target}")
  want_w = np.asarray(moved["value"]["head"]["w"]) - LR * np.asarray(g_full["value"]["head"]["w"])
  np.testing.assert_allclose(np.asarray(new["params"]["value"]["head"]["w"]), want_w, rtol=1e-5, atol=1e-7)
  # The frozen base is unchanged and nothing but the adapters and head is in the state.
  assert jax.tree.structure(new["params"]) == jax.tree.structure(moved)
  np.testing.assert_array_equal(np.asarray(frozen["policy"]["layers"]["wq"]), np.asarray(setup["sft"]["layers"]["wq"]))
