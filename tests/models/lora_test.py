"""LoRA (rlhf_jax.models.lora) and bfloat16 parameters: the merge against NumPy, a zero B leaves the model as it
was, the adapters' gradient is the chain rule of the full weight's, a merged export equals the weights trained,
bfloat16 parameters and float32 optimizer moments (rlhf_jax.optim.float32_state) against a NumPy Adam step."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from rlhf_jax import configs, optim, sharding
from rlhf_jax.models import hf, lora, presets, transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = presets.preset("tiny", vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=2, max_len=16,
                     mlp="swiglu")
ALL = lora.LoraConfig(rank=3, alpha=6.0, targets=tuple(lora.TARGETS))
_forward = jax.jit(transformer.forward, static_argnames=("cfg",))


def _random_adapters(cfg, lcfg, seed=1, b_std=0.05):
  """Adapters with a non-zero B, so the merge changes every targeted weight."""
  adapters = lora.init_adapters(jax.random.PRNGKey(seed), cfg, lcfg)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + b_std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _numpy_merge(params, adapters, lcfg):
  """W + alpha / r * A @ B per layer, in float64 NumPy, over the flattened input and output dims."""
  out = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
  for target, ab in adapters["layers"].items():
    name, n_in = lora.TARGETS[target]
    w = out[name]
    for i in range(w.shape[0]):
      a = np.asarray(ab["a"][i], np.float64).reshape(-1, lcfg.rank)
      b = np.asarray(ab["b"][i], np.float64).reshape(lcfg.rank, -1)
      w[i] += lcfg.scale * (a @ b).reshape(w.shape[1:])
  return out


def _tokens(b=4, t=10, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_zero_b_adapters_leave_the_model_exactly_as_it_was():
  params = transformer.init(jax.random.PRNGKey(0), CFG)
  adapters = lora.init_adapters(jax.random.PRNGKey(1), CFG, ALL)
  assert all(not np.any(np.asarray(ab["b"])) for ab in adapters["layers"].values())
  assert all(np.asarray(ab["a"]).std() > 0 for ab in adapters["layers"].values())  # A is random, only B is zero
  merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, ALL)
  tokens = _tokens()
  base_logits, _ = _forward(params, tokens, cfg=CFG)
  lora_logits, _ = _forward(merged, tokens, cfg=CFG)
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))
  assert lora.num_params(CFG, ALL) == sum(x.size for x in jax.tree.leaves(adapters))


def test_merge_adds_scaled_a_times_b_to_every_target_and_nothing_else():
  params = transformer.init(jax.random.PRNGKey(0), CFG)
  adapters = _random_adapters(CFG, ALL)
  merged = lora.merge(params, adapters, ALL)
  want = _numpy_merge(params, adapters, ALL)
  for name, w in merged["layers"].items():
    np.testing.assert_allclose(np.asarray(w), want[name], atol=1e-6, err_msg=name)
  changed = {lora.TARGETS[t][0] for t in ALL.targets}
  for name in set(params["layers"]) - changed:  # the norms are untouched
    np.testing.assert_array_equal(np.asarray(merged["layers"][name]), np.asarray(params["layers"][name]))
  for name in changed:
    assert np.abs(np.asarray(merged["layers"][name]) - np.asarray(params["layers"][name])).max() > 1e-4


def test_adapter_gradients_are_the_chain_rule_of_the_full_weight_gradient():
  # dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW' (per layer, inputs and outputs flattened), with dL/dW' the
  # gradient of the same loss in the merged weights W', taken by jax.grad of the full-weight loss.
  lcfg = lora.LoraConfig(rank=2, alpha=5.0, targets=("q", "o", "mlp_out"))
  params = transformer.init(jax.random.PRNGKey(0), CFG)
  adapters = _random_adapters(CFG, lcfg)
  tokens = _tokens()
  loss_full = lambda p: jnp.mean(jax.nn.log_softmax(transformer.forward(p, tokens, CFG)[0])[..., 0] ** 2)
  grads = jax.jit(jax.grad(lambda a: loss_full(lora.merge(params, a, lcfg))))(adapters)
  g_w = jax.jit(jax.grad(loss_full))(lora.merge(params, adapters, lcfg))["layers"]
  for target in lcfg.targets:
    name = lora.TARGETS[target][0]
    a, b = np.asarray(adapters["layers"][target]["a"]), np.asarray(adapters["layers"][target]["b"])
    for i in range(CFG.n_layers):
      gw = np.asarray(g_w[name][i]).reshape(a[i].reshape(-1, 2).shape[0], -1)
      a_i, b_i = a[i].reshape(-1, 2), b[i].reshape(2, -1)
      np.testing.assert_allclose(np.asarray(grads["layers"][target]["a"][i]).reshape(a_i.shape),
                                 lcfg.scale * gw @ b_i.T, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(np.asarray(grads["layers"][target]["b"][i]).reshape(b_i.shape),
                                 lcfg.scale * a_i.T @ gw, rtol=1e-4, atol=1e-6)
      assert np.abs(gw).max() > 0


@pytest.mark.parametrize("scan", [False, True])
def test_attached_adapters_equal_the_merged_weights_in_value_and_gradient(scan):
  # lora.attach (x @ W + s (x @ A) @ B, what the training steps use) against the NumPy-merged weights (a plain
  # forward pass of W + s A @ B): logits and the chain-rule gradients of every target, GQA and SwiGLU, with the
  # layers unrolled and scanned; and against the merge in the cached sampler's forward pass.
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = transformer.init(jax.random.PRNGKey(0), cfg)
  adapters = _random_adapters(cfg, ALL)
  tokens = _tokens()
  merged = {**params, "layers": {k: jnp.asarray(v, jnp.float32) for k, v in _numpy_merge(params, adapters, ALL).items()}}
  attached_logits, _ = jax.jit(lambda p, a: transformer.forward(lora.attach(p, a, ALL), tokens, cfg))(params, adapters)
  merged_logits, _ = _forward(merged, tokens, cfg=cfg)
  np.testing.assert_allclose(np.asarray(attached_logits), np.asarray(merged_logits), atol=2e-5)
  base_logits, _ = _forward(params, tokens, cfg=cfg)
  assert np.abs(np.asarray(base_logits) - np.asarray(merged_logits)).max() > 1e-3  # the adapters matter
  loss = lambda p: jnp.mean(jax.nn.log_softmax(transformer.forward(p, tokens, cfg)[0])[..., 0] ** 2)
  g_attached = jax.jit(jax.grad(lambda a: loss(lora.attach(params, a, ALL))))(adapters)
  g_merged = jax.jit(jax.grad(lambda a: loss(lora.merge(params, a, ALL))))(adapters)
  for path, x in jax.tree_util.tree_leaves_with_path(g_merged):
    y = g_attached
    for k in path:
      y = y[k.key]
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6, err_msg=str(path))
  # The KV-cached decoding path with attached adapters (it unstacks the layers) equals the merged one.
  if not scan:
    h_att, _ = transformer.prefill(lora.attach(params, adapters, ALL), tokens, cfg, length=12)
    h_mer, _ = transformer.prefill(merged, tokens, cfg, length=12)
    np.testing.assert_allclose(np.asarray(h_att), np.asarray(h_mer), atol=2e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_unstacking_merges_attached_adapters_layer_by_layer(scan):
  # transformer.unstack_layers, what sampling.generate does before its prompt pass and decoding loop, merges
  # attached adapters into each layer's weights: the NumPy merge's per-layer weights, no adapter left, and the
  # same prompt pass and cached decoding step as the merged stacked weights (scan_layers or not: an unstacked
  # model is never scanned).
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = transformer.init(jax.random.PRNGKey(0), cfg)
  adapters = _random_adapters(cfg, ALL)
  want = _numpy_merge(params, adapters, ALL)
  unstacked = jax.jit(transformer.unstack_layers)(lora.attach(params, adapters, ALL))
  assert len(unstacked["layers"]) == cfg.n_layers
  for i, layer in enumerate(unstacked["layers"]):
    assert set(layer) == set(params["layers"])  # "lora" and "lora_scale" are gone
    for name, w in layer.items():
      np.testing.assert_allclose(np.asarray(w), want[name][i], atol=1e-6, err_msg=f"layer {i} {name}")
  merged = lora.merge(params, adapters, ALL)
  tokens, mask = _tokens(t=8), jnp.asarray(np.arange(8)[None] >= np.arange(4)[:, None])  # left padding
  prefill = jax.jit(lambda p: transformer.prefill(p, tokens, cfg, length=12, mask_bt=mask))
  (h_u, cache_u), (h_m, cache_m) = prefill(unstacked), prefill(merged)
  np.testing.assert_allclose(np.asarray(h_u), np.asarray(h_m), atol=2e-5)
  step = jax.jit(lambda p, c: transformer.forward(p, tokens[:, :1], cfg, cache=c))
  np.testing.assert_allclose(np.asarray(step(unstacked, cache_u)[0]), np.asarray(step(merged, cache_m)[0]), atol=2e-5)


def test_lora_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"ppo\.lora\.targets=.*'qq'"):
    configs.to_lora_config(configs.lora_config(rank=4, targets=("qq",)), "ppo.lora")
  with pytest.raises(ValueError, match=r"sft\.lora\.rank=-1"):
    configs.to_lora_config(configs.lora_config(rank=-1), "sft.lora")
  with pytest.raises(ValueError, match=r"dpo\.lora\.targets has 'mlp_gate'.*swiglu"):
    lora.check(lora.LoraConfig(rank=2, targets=("mlp_gate",)), presets.preset("tiny"), "dpo.lora")
  assert not configs.to_lora_config(configs.lora_config(), "ppo.lora").enabled  # off by default


def test_merged_export_equals_the_merged_weights_and_the_unmerged_forward(tmp_path):
  # A Qwen2 base (tests/data/hf/qwen2) with adapters on every projection: the Hugging Face folder written from
  # the merged weights reads back as W + s A @ B (NumPy) to 1e-6, and the exported model's logits equal those of
  # the adapters merged inside the jitted forward pass (as training computes them).
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  base, cfg = hf.load_hf(os.path.join(ROOT, "tests", "data", "hf", "qwen2"), mesh)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"))
  adapters = _random_adapters(cfg, lcfg, b_std=0.02)
  merged = jax.jit(lora.merge, static_argnums=2)(base, adapters, lcfg)
  hf.save_hf(merged, cfg, str(tmp_path / "policy"))
  exported, cfg_again = hf.load_hf(str(tmp_path / "policy"), mesh)
  assert cfg_again == cfg
  want = _numpy_merge(base, adapters, lcfg)
  for name, w in exported["layers"].items():
    np.testing.assert_allclose(np.asarray(w), want[name], atol=1e-6, err_msg=name)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  unmerged = jax.jit(lambda b, a, t: transformer.forward(lora.merge(b, a, lcfg), t, cfg)[0])(base, adapters, tokens)
  np.testing.assert_allclose(np.asarray(_forward(exported, tokens, cfg=cfg)[0]), np.asarray(unmerged), atol=1e-5)
  assert np.abs(np.asarray(_forward(base, tokens, cfg=cfg)[0]) - np.asarray(unmerged)).max() > 1e-3


def test_bfloat16_parameters_are_the_float32_init_rounded_and_train_with_float32_moments():
  cfg16 = presets.preset("tiny", param_dtype="bfloat16", dtype="bfloat16")
  p32 = transformer.init(jax.random.PRNGKey(0), presets.preset("tiny"))
  p16 = transformer.init(jax.random.PRNGKey(0), cfg16)
  for x32, x16 in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    assert x16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x16), np.asarray(x32).astype(ml_dtypes.bfloat16))
  logits, _ = _forward(p16, _tokens(), cfg=cfg16)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))

  # Two AdamW steps of rlhf_jax.optim on bfloat16 parameters against NumPy: the moments in float32 (not rounded to
  # bfloat16), the update added in float32 and the sum rounded to bfloat16 once.
  oc = configs.optimizer_config(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.0)
  oc.schedule = "constant"
  oc.param_rounding = "nearest"  # stochastic rounding (the default): tests/optim_test.py
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)
  gs = [jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16) for _ in range(2)]
  opt = optim.make_optimizer(oc, 10)
  state = opt.init({"w": w})
  m = v = np.zeros((8, 4))
  for t, g in enumerate(gs, start=1):
    w_prev = np.asarray(w, np.float64)
    updates, state = opt.update({"w": g}, state, {"w": w})
    w = optax.apply_updates({"w": w}, updates)["w"]
    gn = np.asarray(g, np.float64)
    m, v = 0.9 * m + 0.1 * gn, 0.95 * v + 0.05 * gn ** 2
    step = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8) + 0.1 * w_prev
    want = (w_prev - 1e-2 * step).astype(np.float32)
    assert w.dtype == jnp.bfloat16
    # The same rounding of the same float32 sum, up to float32 rounding of the step before it (one bf16 ulp).
    assert np.all(np.abs(np.asarray(w, np.float64) - want) <= np.abs(want) * 2.0 ** -7)
    assert np.mean(np.asarray(w) == want.astype(ml_dtypes.bfloat16)) > 0.9
  mu, nu = [x for x in jax.tree.leaves(state) if x.ndim == 2]
  assert mu.dtype == nu.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(mu), m, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(nu), v, rtol=1e-6)
  assert np.any(np.asarray(nu) != np.asarray(nu).astype(ml_dtypes.bfloat16).astype(np.float32))  # not bf16 values
