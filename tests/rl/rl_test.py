"""PPO pieces on a tiny model: rollout log-probs, first ratio, reward placement, EOS penalty, the update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import configs, sampling
from rlhf_jax.models import heads, presets, transformer
from rlhf_jax.rl import learner, rollout
from rlhf_jax.stages import rl

pytestmark = pytest.mark.xdist_group("rl")  # its module fixture is built once, on one worker

CFG = presets.preset("tiny", vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1, max_len=32)
EOS, PAD = 2, 0


def _settings(**kw):
  base = dict(sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=0.7), eos_id=EOS, pad_id=PAD,
              no_eos_penalty=-3.0, whiten_rewards=False, gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip_eps=0.2,
              vf_coef=0.1, entropy_coef=0.0, ptx_coef=0.0, epochs=2, n_minibatches=2, algorithm="ppo",
              min_whiten=2)
  base.update(kw)
  return rollout.PPOSettings(**base)


def _params(eos_bias: float = 0.0):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  policy = transformer.init(keys[0], CFG)
  # Scale weights up so samples are diverse and some rows emit EOS early.
  policy = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, policy)
  policy["unembed"] = policy["unembed"].at[:, EOS].add(eos_bias)
  ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(keys[1], x.shape), policy)
  rm = heads.init_rm_params(keys[2], CFG)
  value = {"backbone": policy, "head": heads.init_scalar_head(keys[3], CFG, zero=True)}
  return policy, ref, rm, value


def _prompts(b=8, p=6):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, size=(b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  for i in range(b):
    mask[i, :i % 3] = False  # left padding of different lengths
  tokens[~mask] = PAD
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def rollout_out():
  policy, ref, rm, value = _params(eos_bias=0.5)
  s = _settings()
  fn = jax.jit(rollout.make_rollout(CFG, CFG, s))
  prompt, mask = _prompts()
  ro, rm_b, stats = fn(policy, value, ref, rm, prompt, mask, jax.random.PRNGKey(3), jnp.float32(0.05))
  return (policy, ref, rm, value), s, ro, rm_b, stats


def test_rollout_logprobs_equal_training_forward_pass(rollout_out):
  _, _, ro, _, stats = rollout_out
  assert float(stats["sampler_logp_maxdiff"]) < 1e-5
  assert 0 < int(ro.response_mask_bn.sum()) < ro.response_mask_bn.size  # some rows stopped early


def test_first_ppo_ratio_is_one(rollout_out):
  # No dropout, the same temperature and the same function: the first ratio is 1 up to float32 rounding
  # between separately compiled programs (here: the update's value_and_grad program vs the rollout's).
  (policy, _, _, value), s, ro, _, _ = rollout_out
  grad_fn = jax.jit(jax.value_and_grad(lambda t: learner.ppo_loss(t, ro, None, CFG, s), has_aux=True))
  (_, m), _ = grad_fn({"policy": policy, "value": value})
  assert abs(float(m["ratio_mean"]) - 1.0) < 1e-5
  assert float(m["clip_frac"]) == 0.0 and float(m["approx_kl"]) < 1e-10
  logp = jax.jit(lambda p: rollout.policy_logprobs(p, ro, CFG, s.sampling.logprob_temperature))(policy)
  np.testing.assert_allclose(np.asarray(logp), np.asarray(ro.old_logp_bn), atol=2e-6)


def test_rewards_kl_per_token_and_score_at_last_token(rollout_out):
  (policy, ref, rm, _), s, ro, rm_b, _ = rollout_out
  mask = np.asarray(ro.response_mask_bn)
  kl = np.asarray(ro.old_logp_bn - ro.ref_logp_bn)
  ended = mask[:, -1] == 0  # a row that stopped has padding at the end
  ended |= np.asarray(ro.response_bn)[np.arange(len(mask)), mask.sum(1) - 1] == EOS
  expect = -0.05 * kl * mask
  last = mask.sum(1) - 1
  score = np.where(ended, np.asarray(rm_b), s.no_eos_penalty)
  expect[np.arange(len(mask)), last] += score
  np.testing.assert_allclose(np.asarray(ro.rewards_bn), expect, rtol=1e-5, atol=1e-6)
  # The RM score equals a direct call on prompt + response.
  direct = heads.scores(rm, jnp.concatenate([ro.prompt_bp, ro.response_bn], 1),
                         jnp.concatenate([ro.prompt_mask_bp, ro.response_mask_bn], 1), CFG)
  np.testing.assert_allclose(np.asarray(rm_b), np.asarray(direct), rtol=1e-5)


def test_no_eos_penalty_replaces_the_score_of_unfinished_responses(rollout_out):
  _, s, ro, rm_b, stats = rollout_out
  assert 0.0 < float(stats["ended_frac"]) < 1.0  # both kinds of rows are present
  mask = np.asarray(ro.response_mask_bn)
  unfinished = mask[:, -1].astype(bool) & (np.asarray(ro.response_bn)[:, -1] != EOS)
  assert unfinished.any() and not unfinished.all()
  expect_score = np.where(unfinished, s.no_eos_penalty, np.asarray(rm_b))
  assert float(stats["score"]) == pytest.approx(float(expect_score.mean()), rel=1e-5)


def test_zero_value_head_gives_zero_values_and_gae_returns(rollout_out):
  _, _, ro, _, _ = rollout_out
  np.testing.assert_array_equal(np.asarray(ro.old_values_bn), 0.0)
  # With values 0 and gamma 1, the return of each token is the sum of the rewards from it to the end.
  rewards = np.asarray(ro.rewards_bn)
  mask = np.asarray(ro.response_mask_bn)
  expect = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1) * mask
  gae = np.asarray(ro.returns_bn)
  # lambda < 1 with V = 0 still sums the rewards: delta_t = r_t and advantages discount by gamma * lambda.
  lam_expect = np.zeros_like(rewards)
  for i in range(len(mask)):
    acc = 0.0
    for t in reversed(range(mask.shape[1])):
      if mask[i, t]:
        acc = rewards[i, t] + 0.95 * acc
        lam_expect[i, t] = acc
  np.testing.assert_allclose(gae, lam_expect, rtol=1e-5, atol=1e-6)
  assert np.abs(expect - lam_expect).max() > 0  # the two differ, so the check above is informative


@pytest.mark.parametrize("algorithm", ["ppo", "a2c"])
def test_update_improves_the_clipped_objective(rollout_out, algorithm):
  (policy, _, _, value), s, ro, _, _ = rollout_out
  import optax
  s = dataclasses.replace(s, algorithm=algorithm, epochs=2 if algorithm == "ppo" else 1)
  optimizer = optax.adam(1e-3)
  trainable = {"policy": policy, "value": value}
  state = {"params": trainable, "opt_state": optimizer.init(trainable), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(0)}
  loss_before, _ = learner.ppo_loss(trainable, ro, None, CFG, s)
  new_state, m = jax.jit(learner.make_update(optimizer, CFG, s))(state, ro, None)
  loss_after, m_after = learner.ppo_loss(new_state["params"], ro, None, CFG, s)
  assert float(loss_after) < float(loss_before)
  assert int(new_state["step"]) == 1
  if algorithm == "ppo":
    assert float(m_after["approx_kl"]) > 0  # the policy moved


def test_settings_reject_bad_config():
  from rlhf_jax import tokenizers
  cfg = configs.ppo_config()
  cfg.batch_size, cfg.n_minibatches = 10, 4
  with pytest.raises(ValueError, match="must divide into ppo.n_minibatches"):
    rl.settings_from_config(cfg, tokenizers.ByteTokenizer())
  cfg = configs.ppo_config()
  cfg.batch_size, cfg.n_minibatches = 8, 4  # minibatch of 2: too small to whiten
  with pytest.raises(ValueError, match="minibatch"):
    rl.settings_from_config(cfg, tokenizers.ByteTokenizer())
  cfg = configs.ppo_config()
  cfg.algorithm = "trpo"
  with pytest.raises(ValueError, match="ppo.algorithm"):
    rl.settings_from_config(cfg, tokenizers.ByteTokenizer())


def _group_prompts(groups=4, g=2):
  prompt, mask = _prompts(b=groups)
  return jnp.repeat(prompt, g, axis=0), jnp.repeat(mask, g, axis=0)


@pytest.mark.parametrize("algorithm, kl_in_loss", [("grpo", True), ("grpo", False), ("rloo", False)])
def test_critic_free_rollout_advantages_and_first_ratio(algorithm, kl_in_loss):
  """GRPO and RLOO: no value model; every token of a response carries its group-relative sequence advantage,
  recomputed here with NumPy from the rollout's own scores and KL; the first update's ratio is 1."""
  policy, ref, rm, _ = _params(eos_bias=0.5)
  g = 2
  s = _settings(algorithm=algorithm, group_size=g, kl_in_loss=kl_in_loss, aggregation="sequence")
  prompt, mask = _group_prompts(4, g)
  beta = 0.05
  ro, rm_b, stats = jax.jit(rollout.make_rollout(CFG, CFG, s))(policy, None, ref, rm, prompt, mask,
                                                               jax.random.PRNGKey(3), jnp.float32(beta))
  resp_mask = np.asarray(ro.response_mask_bn)
  ended = resp_mask[np.arange(resp_mask.shape[0]), resp_mask.sum(1) - 1] & (
      np.asarray(ro.response_bn)[np.arange(resp_mask.shape[0]), resp_mask.sum(1) - 1] == EOS)
  score = np.where(ended, np.asarray(rm_b), s.no_eos_penalty)
  kl = ((np.asarray(ro.old_logp_bn) - np.asarray(ro.ref_logp_bn)) * resp_mask).sum(1)
  seq = score if kl_in_loss else score - beta * kl
  r = seq.reshape(-1, g)
  if algorithm == "grpo":
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  else:
    adv = r - (r.sum(1, keepdims=True) - r) / (g - 1)
  np.testing.assert_allclose(np.asarray(ro.advantages_bn), np.where(resp_mask, adv.reshape(-1, 1), 0.0),
                             rtol=2e-4, atol=2e-5)
  assert np.all(np.asarray(ro.old_values_bn) == 0)  # no critic
  grad_fn = jax.jit(jax.value_and_grad(lambda t: learner.ppo_loss(t, ro, None, CFG, s, beta), has_aux=True))
  (_, m), grads = grad_fn({"policy": policy})
  assert abs(float(m["ratio_mean"]) - 1.0) < 1e-5 and float(m["clip_frac"]) == 0.0
  assert "value_loss" not in m and ("kl_k3" in m) == kl_in_loss
  if kl_in_loss:  # the k3 term of the policy's own samples against the reference: small but positive
    assert float(m["kl_k3"]) > 0
  assert float(optax_norm(grads)) > 0


def optax_norm(tree):
  import optax
  return optax.tree.norm(tree)


@pytest.mark.parametrize("change, message", [
    (dict(algorithm="grpo", group_size=1), "needs ppo.group_size >= 2"),
    (dict(algorithm="rloo", group_size=3), "ppo.group_size=3: expected a number of samples per prompt that divides"),
    (dict(algorithm="grpo", group_size=4, kl_init_beta=-0.1), "ppo.kl.init_beta=-0.1: expected a KL coefficient >= 0"),
    (dict(algorithm="ppo", kl_mode="loss"), "ppo.kl.mode='loss' (GRPO's k3 KL term) needs ppo.algorithm='grpo'"),
])
def test_critic_free_settings_reject_bad_config(change, message):
  from rlhf_jax import tokenizers
  cfg = configs.ppo_config()
  cfg.batch_size, cfg.n_minibatches = 16, 2
  cfg.algorithm, cfg.group_size = change["algorithm"], change.get("group_size", 1)
  cfg.kl.init_beta = change.get("kl_init_beta", cfg.kl.init_beta)
  cfg.kl.mode = change.get("kl_mode", "reward")
  with pytest.raises(ValueError) as e:
    rl.settings_from_config(cfg, tokenizers.ByteTokenizer())
  assert message in str(e.value)


def test_sampler_logprobs_as_the_old_logprobs_and_the_mismatch_the_update_logs(rollout_out):
  # ppo.old_logp="sampler": the same samples (same rng) with the sampler's own log-probs as the ratio's
  # denominator instead of a recomputed forward pass (equal to float32 rounding).
  import optax
  (policy, ref, rm, value), s, ro_re, _, _ = rollout_out
  s_sa = dataclasses.replace(s, old_logp="sampler")
  prompt, mask = _prompts()
  ro_sa, _, stats = jax.jit(rollout.make_rollout(CFG, CFG, s_sa))(policy, value, ref, rm, prompt, mask,
                                                                  jax.random.PRNGKey(3), jnp.float32(0.05))
  np.testing.assert_array_equal(np.asarray(ro_sa.response_bn), np.asarray(ro_re.response_bn))
  out = sampling.generate(policy, prompt, mask, jax.random.PRNGKey(3), CFG, s.sampling, eos_id=EOS, pad_id=PAD)
  np.testing.assert_allclose(np.asarray(ro_sa.old_logp_bn), np.asarray(out.logprobs_bn), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ro_sa.old_logp_bn), np.asarray(ro_re.old_logp_bn), atol=1e-5)
  assert "sampler_logp_maxdiff" not in stats
  # The update's first_logratio_absmax is max |training pass - old log-probs| over its first minibatch, before
  # any step: with old log-probs off the policy's by known amounts (as a stale or mismatched sampler's would
  # be), it is the largest of them over that minibatch's rows (NumPy), and ~0 for the recomputed ones.
  noise = np.random.default_rng(1).uniform(-0.3, 0.3, ro_re.old_logp_bn.shape) * np.asarray(ro_re.response_mask_bn)
  optimizer = optax.sgd(0.1)
  state = {"params": {"policy": policy, "value": value}, "step": jnp.zeros((), jnp.int32),
           "opt_state": optimizer.init({"policy": policy, "value": value}), "rng": jax.random.PRNGKey(0)}
  update = jax.jit(learner.make_update(optimizer, CFG, s))
  _, m_re = update(state, ro_re, None)
  _, m_off = update(state, ro_re._replace(old_logp_bn=ro_re.old_logp_bn + noise), None)
  rng = jax.random.fold_in(state["rng"], state["step"])  # the first epoch's permutation (learner.ppo_epoch)
  first_rows = np.asarray(jax.random.permutation(jax.random.split(rng, s.epochs)[0], 8)).reshape(
      s.n_minibatches, -1)[0]
  assert float(m_re["first_logratio_absmax"]) < 2e-6
  np.testing.assert_allclose(float(m_off["first_logratio_absmax"]), np.abs(noise[first_rows]).max(), atol=2e-6)
  assert np.abs(noise[first_rows]).max() != np.abs(noise).max()  # the first minibatch, not the whole batch
  cfg = configs.ppo_config()
  cfg.old_logp = "cached"
  from rlhf_jax import tokenizers
  with pytest.raises(ValueError, match=r"ppo.old_logp='cached': expected 'recompute' or 'sampler'"):
    rl.settings_from_config(cfg, tokenizers.ByteTokenizer())


def test_an_ensemble_reward_is_the_mean_of_its_members_in_the_rollout(rollout_out):
  """ppo.rm_ensemble: the same rollout (same policy and key) scored by heads.ensemble([rm, other]) gets the mean
  of the two members' scores (the no-EOS penalty, the same for both, included)."""
  (policy, ref, rm, value), s, ro, rm_b, _ = rollout_out
  other = heads.init_rm_params(jax.random.PRNGKey(9), CFG)
  other["norm"] = {"gain": jnp.asarray(2.0), "bias": jnp.asarray(0.5)}
  fn = jax.jit(rollout.make_rollout(CFG, CFG, s))
  prompt, mask = _prompts()
  args = (prompt, mask, jax.random.PRNGKey(3), jnp.float32(0.05))
  ro_ens, ens_b, _ = fn(policy, value, ref, heads.ensemble([rm, other]), *args)
  _, other_b, _ = fn(policy, value, ref, other, *args)
  np.testing.assert_array_equal(np.asarray(ro_ens.response_bn), np.asarray(ro.response_bn))
  assert np.abs(np.asarray(other_b) - np.asarray(rm_b)).max() > 1e-2  # the members differ
  np.testing.assert_allclose(np.asarray(ens_b), (np.asarray(rm_b) + np.asarray(other_b)) / 2, rtol=1e-5, atol=1e-6)
