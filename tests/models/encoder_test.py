"""model.causal=False: the same Transformer as a bidirectional encoder (BERT), on every attention path.

A future token changes the encoder's output at an earlier position and leaves the decoder's unchanged (same
parameters); the encoder's logits match a NumPy forward whose attention sees every real key; the blocked path
(with its hand-written backward) and jax.nn.dot_product_attention agree, also beyond one query block; the KV
cache refuses an encoder.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import heads, hf, transformer

VOCAB = 16


def _cfg(**overrides) -> transformer.ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=32,
              max_len=transformer.QUERY_BLOCK + 16)
  return transformer.ModelConfig(**{**base, **overrides})


def _params(cfg, seed=0):
  """init's pytree redrawn at scale 1/sqrt(fan_in), so every component moves the logits by O(1)."""
  params = transformer.init(jax.random.key(seed), cfg)
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=leaf.shape)
    if "norm" in name:
      out.append(1.0 + 0.2 * noise)
    elif "embed" in name and "unembed" not in name:
      out.append(noise)
    else:
      fan_in = cfg.d_ff if "w_out" in name else cfg.d_model
      out.append(noise / math.sqrt(fan_in))
  return jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out])


def _batch(t, seed=0):
  rng = np.random.default_rng(seed)
  tokens_bt = rng.integers(1, VOCAB, size=(2, t)).astype(np.int32)
  mask_bt = np.ones((2, t), bool)
  mask_bt[1, :3] = False  # a left-padded row
  tokens_bt[~mask_bt] = 0
  return tokens_bt, mask_bt


def _np_encoder(params, tokens_bt, mask_bt, cfg):
  """float64 forward: pre-norm RMSNorm blocks, GQA, RoPE, tanh-GELU; attention over every real key."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  g = cfg.n_heads // cfg.n_kv_heads
  pos_bt = np.maximum(np.cumsum(mask_bt, axis=1) - 1, 0).astype(np.float64)
  rms = lambda x, s: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

  def rope(x):
    e = x.shape[-1]
    z = x[..., :e // 2] + 1j * x[..., e // 2:]
    z = z * np.exp(1j * pos_bt[:, :, None] * cfg.rope_theta ** (-np.arange(0, e, 2) / e))[:, :, None, :]
    return np.concatenate([z.real, z.imag], -1)

  x = p["embed"][tokens_bt]
  for l in range(cfg.n_layers):
    w = {k: v[l] for k, v in p["layers"].items()}
    h = rms(x, w["attn_norm"])
    q = rope(np.einsum("btd,dhe->bthe", h, w["wq"]))
    k = np.repeat(rope(np.einsum("btd,dke->btke", h, w["wk"])), g, axis=2)
    v = np.repeat(np.einsum("btd,dke->btke", h, w["wv"]), g, axis=2)
    scores = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(cfg.d_head)
    scores = np.where(mask_bt[:, None, None, :], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bhts,bshe,hed->btd", probs, v, w["wo"])
    h = rms(x, w["mlp_norm"])
    u = h @ w["w_in"]
    x = x + 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))) @ w["w_out"]
  return rms(x, p["final_norm"]) @ p["unembed"]


_forward = jax.jit(transformer.forward, static_argnames=("cfg",))


@pytest.mark.parametrize("attention", ["blocked", "xla", "splash"])
def test_a_future_token_changes_the_encoder_not_the_decoder(attention, t=10):
  """(Beyond one query block the blocked path is compared with the library's in the next test.)"""
  decoder = _cfg(attention=attention)
  encoder = dataclasses.replace(decoder, causal=False)
  params = _params(decoder)
  tokens_bt, mask_bt = _batch(t)
  j = t - 2  # the changed position; every real position before it is "earlier"
  changed_bt = tokens_bt.copy()
  changed_bt[:, j] = changed_bt[:, j] % (VOCAB - 1) + 1
  earlier_bt = mask_bt & (np.arange(t) < j)[None]
  for cfg, moves in ((decoder, False), (encoder, True)):
    before, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
    after, _ = _forward(params, changed_bt, cfg=cfg, mask_bt=mask_bt)
    diff = np.abs(np.asarray(after) - np.asarray(before))[earlier_bt]
    if moves:
      assert diff.min() > 1e-6 and diff.max() > 1e-2  # every earlier position sees the change
    else:
      np.testing.assert_array_equal(diff, 0.0)
  logits, _ = _forward(params, tokens_bt, cfg=encoder, mask_bt=mask_bt)
  want = _np_encoder(params, tokens_bt, mask_bt, encoder)
  np.testing.assert_allclose(np.asarray(logits)[mask_bt], want[mask_bt], atol=1e-4, rtol=1e-4)
  first_only = _np_encoder(params, tokens_bt[:, :1], mask_bt[:, :1], encoder)  # the reference is sharp enough
  assert np.abs(first_only[0, 0] - want[0, 0]).max() > 1e-2


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_blocked_and_library_attention_agree_on_the_encoder_forward_and_backward(attention):
  t = transformer.QUERY_BLOCK + 9  # beyond one query block: the blocked path must not skip "upper" blocks
  encoder = _cfg(causal=False)
  library = dataclasses.replace(encoder, attention=attention)
  params = _params(encoder, seed=1)
  tokens_bt, mask_bt = _batch(t, seed=1)

  def loss(p, cfg):
    logits = heads.mlm_logits(p, tokens_bt, mask_bt, cfg)
    return jnp.sum(jnp.where(mask_bt[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) * 1e-3

  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in (encoder, library))
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5), ga, gb)
  assert np.abs(np.asarray(ga["layers"]["wk"])).max() > 1e-3  # keys get a gradient: the comparison is not empty


def test_the_kv_cache_and_the_causal_only_switches_refuse_an_encoder():
  encoder = _cfg(causal=False)
  params = _params(encoder)
  tokens_bt, mask_bt = _batch(6)
  with pytest.raises(ValueError, match="causal=False.*no KV-cache"):
    transformer.init_cache(encoder, 2, 8)
  with pytest.raises(ValueError, match="causal=False.*no KV-cache"):
    transformer.prefill(params, tokens_bt, encoder, length=8, mask_bt=mask_bt)
  cache = transformer.init_cache(dataclasses.replace(encoder, causal=True), 2, 8)
  with pytest.raises(ValueError, match="causal=False.*no KV-cache"):
    transformer.forward(params, tokens_bt, encoder, mask_bt=mask_bt, cache=cache)
  with pytest.raises(ValueError, match="sliding_window needs model.causal=True"):
    _cfg(causal=False, sliding_window=4)
  with pytest.raises(ValueError, match="needs a bidirectional encoder"):
    heads.mlm_logits(params, tokens_bt, mask_bt, _cfg())
  with pytest.raises(ValueError, match="value model's backbone is a bidirectional encoder"):
    heads.value_estimates({"backbone": params, "head": heads.init_scalar_head(None, encoder, zero=True)},
                          tokens_bt, mask_bt, tokens_bt, mask_bt, encoder)
  with pytest.raises(ValueError, match="save_hf: a bidirectional encoder"):
    hf.save_hf(params, encoder, "/nonexistent/never-written")
