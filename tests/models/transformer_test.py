"""Tests for rlhf_jax/transformer.py: KV-cache decoding, left padding, a NumPy reference forward, causality,
parameter axes, config validation and dropout.

The model's default init (std 0.02) gives near-zero logits where a wrong rotation or a wrong head mapping
would change the output by less than any tolerance, so most tests use `_spread_params`: the same pytree
redrawn at scale 1/sqrt(fan_in), which makes every component move the logits by O(1).
"""

from __future__ import annotations

import functools
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.models import presets, transformer

VOCAB = 16
SEQ_LEN = 10  # T of the shared [B, T] batch: one compilation per config
# Left-padded batch: rows with 10, 7 and 4 real tokens.
REAL_LENGTHS = (10, 7, 4)


def _cfg(**overrides) -> transformer.ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=16)
  return transformer.ModelConfig(**{**base, **overrides})


CONFIGS = {
    "rope_mha": _cfg(),
    "rope_gqa": _cfg(n_kv_heads=2),
    "learned_mqa_tied": _cfg(pos_embedding="learned", n_kv_heads=1, tie_embeddings=True),
}


def _spread_params(cfg: transformer.ModelConfig, seed: int = 0) -> transformer.Params:
  """`init`'s pytree redrawn so activations and logits are O(1)."""
  params = transformer.init(jax.random.key(seed), cfg)
  leaves, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for key, (path, leaf) in zip(keys, leaves):
    name = jax.tree_util.keystr(path)
    noise = np.asarray(jax.random.normal(key, leaf.shape, jnp.float32))
    if "norm" in name:
      out.append(1.0 + 0.2 * noise)
    elif "embed" in name and "unembed" not in name:  # token and position tables
      out.append(noise)
    elif "wo" in name:
      out.append(noise / math.sqrt(cfg.d_model))  # fan-in h * e = d
    elif "w_out" in name:
      out.append(noise / math.sqrt(cfg.d_ff))
    else:  # wq, wk, wv, w_in, unembed: fan-in d
      out.append(noise / math.sqrt(cfg.d_model))
  return jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out])


def _left_padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens_bt = rng.integers(1, VOCAB, size=(len(REAL_LENGTHS), SEQ_LEN)).astype(np.int32)
  mask_bt = np.zeros_like(tokens_bt, bool)
  for row, n in enumerate(REAL_LENGTHS):
    mask_bt[row, SEQ_LEN - n:] = True
  tokens_bt[~mask_bt] = 0  # the pad id; its value must not matter anyway
  return tokens_bt, mask_bt


_forward = jax.jit(transformer.forward, static_argnames=("cfg",))


# ----------------------------------------------------------------------------------------------------------
# Independent NumPy forward (float64), written from the architecture description: pre-norm RMSNorm blocks,
# GQA where query head j reads kv head j // (h / k), RoPE as a complex rotation of (first half, second half)
# pairs, tanh-GELU MLP, positions counted over real tokens.


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x_bthe, pos_bt, theta):
  e = x_bthe.shape[-1]
  z = x_bthe[..., : e // 2] + 1j * x_bthe[..., e // 2:]
  angle_bte = pos_bt[:, :, None] * theta ** (-np.arange(0, e, 2) / e)[None, None, :]
  z = z * np.exp(1j * angle_bte)[:, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_forward(params, tokens_bt, mask_bt, cfg: transformer.ModelConfig, use_positions: bool = True):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, t = tokens_bt.shape
  g = cfg.n_heads // cfg.n_kv_heads
  pos_bt = np.maximum(np.cumsum(mask_bt, axis=1) - 1, 0).astype(np.float64)
  x = p["embed"][tokens_bt]
  if cfg.pos_embedding == "learned" and use_positions:
    x = x + p["pos_embed"][pos_bt.astype(int)]
  allowed_bts = np.tril(np.ones((t, t), bool))[None] & mask_bt[:, None, :]
  for l in range(cfg.n_layers):
    w = {name: value[l] for name, value in p["layers"].items()}
    h = _np_rms(x, w["attn_norm"], cfg.norm_eps)
    q = np.einsum("btd,dhe->bthe", h, w["wq"])
    k = np.einsum("btd,dke->btke", h, w["wk"])
    v = np.einsum("btd,dke->btke", h, w["wv"])
    if cfg.pos_embedding == "rope" and use_positions:
      q, k = _np_rope(q, pos_bt, cfg.rope_theta), _np_rope(k, pos_bt, cfg.rope_theta)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(cfg.d_head)
    scores = np.where(allowed_bts[:, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bhts,bshe,hed->btd", probs, v, w["wo"])
    h = _np_rms(x, w["mlp_norm"], cfg.norm_eps)
    x = x + _np_gelu(h @ w["w_in"]) @ w["w_out"]
  x = _np_rms(x, p["final_norm"], cfg.norm_eps)
  return x @ (p["embed"].T if cfg.tie_embeddings else p["unembed"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_numpy_reference(name):
  cfg = CONFIGS[name]
  params = _spread_params(cfg)
  tokens_bt, mask_bt = _left_padded_batch()
  logits_btv, cache = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  assert cache is None and logits_btv.dtype == jnp.float32
  expected_btv = _np_forward(params, tokens_bt, mask_bt, cfg)
  np.testing.assert_allclose(np.asarray(logits_btv)[mask_bt], expected_btv[mask_bt], atol=1e-4, rtol=1e-4)
  # The comparison is sharp enough to see the positional signal: dropping it moves the logits by O(1).
  no_pos_btv = _np_forward(params, tokens_bt, mask_bt, cfg, use_positions=False)
  assert np.abs(no_pos_btv - expected_btv)[mask_bt].max() > 1e-2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
  cfg = CONFIGS[name]
  params = _spread_params(cfg)
  tokens_bt, mask_bt = _left_padded_batch()
  full_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)

  # Prefill 4 columns (all padding for the shortest row), then feed one token at a time.
  prefill = 4
  cache = transformer.init_cache(cfg, tokens_bt.shape[0], SEQ_LEN)
  chunks = [_forward(params, tokens_bt[:, :prefill], cfg=cfg, mask_bt=mask_bt[:, :prefill], cache=cache)]
  cache = chunks[0][1]
  for i in range(prefill, SEQ_LEN):
    logits_b1v, cache = _forward(params, tokens_bt[:, i:i + 1], cfg=cfg, mask_bt=mask_bt[:, i:i + 1], cache=cache)
    chunks.append((logits_b1v, cache))
  cached_btv = np.concatenate([np.asarray(c[0]) for c in chunks], axis=1)

  assert np.abs(cached_btv - np.asarray(full_btv))[mask_bt].max() <= 1e-5
  assert int(cache["index"]) == SEQ_LEN
  np.testing.assert_array_equal(np.asarray(cache["lengths"]), mask_bt.sum(1))
  np.testing.assert_array_equal(np.asarray(cache["mask"]), mask_bt)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_matches_cached_backbone_and_keeps_decoding(name):
  cfg = CONFIGS[name]
  params = _spread_params(cfg)
  tokens_bt, mask_bt = _left_padded_batch()
  prompt = 6
  length = SEQ_LEN + 2  # spare slots past the sequence stay empty
  fresh = transformer.init_cache(cfg, tokens_bt.shape[0], length)
  h_ref, cache_ref = jax.jit(functools.partial(transformer.backbone, cfg=cfg))(
      params, tokens_bt[:, :prompt], mask_bt=mask_bt[:, :prompt], cache=fresh)
  h_btd, cache = jax.jit(functools.partial(transformer.prefill, cfg=cfg, length=length))(
      params, tokens_bt[:, :prompt], mask_bt=mask_bt[:, :prompt])

  real_bt = mask_bt[:, :prompt]
  np.testing.assert_allclose(np.asarray(h_btd)[real_bt], np.asarray(h_ref)[real_bt], atol=1e-5, rtol=1e-5)
  assert jax.tree.structure(cache) == jax.tree.structure(cache_ref)
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_ref)):
    assert got.shape == want.shape and got.dtype == want.dtype
  for name_ in ("mask", "index", "lengths"):
    np.testing.assert_array_equal(np.asarray(cache[name_]), np.asarray(cache_ref[name_]), err_msg=name_)
  # Keys and values of real tokens match; pad slots are never attended, so their contents do not matter.
  real_slots_bs = np.asarray(cache["mask"])
  for kv in ("k", "v"):
    for got_bkse, want_bkse in zip(cache[kv], cache_ref[kv]):
      got, want = np.asarray(got_bkse).transpose(0, 2, 1, 3), np.asarray(want_bkse).transpose(0, 2, 1, 3)
      np.testing.assert_allclose(got[real_slots_bs], want[real_slots_bs], atol=1e-5, rtol=1e-5)

  # Decoding on from the prefilled cache matches the full forward pass.
  full_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  for i in range(prompt, SEQ_LEN):
    logits_b1v, cache = _forward(params, tokens_bt[:, i:i + 1], cfg=cfg, mask_bt=mask_bt[:, i:i + 1], cache=cache)
    real_b = mask_bt[:, i]
    np.testing.assert_allclose(np.asarray(logits_b1v)[real_b, 0], np.asarray(full_btv)[real_b, i],
                               atol=1e-5, rtol=1e-5)


def test_unstacked_layers_decode_the_same():
  cfg = CONFIGS["rope_gqa"]
  params = _spread_params(cfg)
  unstacked = transformer.unstack_layers(params)
  assert len(unstacked["layers"]) == cfg.n_layers
  np.testing.assert_array_equal(unstacked["layers"][1]["wq"], params["layers"]["wq"][1])
  tokens_bt, mask_bt = _left_padded_batch()
  cache = transformer.init_cache(cfg, tokens_bt.shape[0], SEQ_LEN)
  cache_u = cache
  for i in range(SEQ_LEN):  # one token at a time
    col = (tokens_bt[:, i:i + 1], mask_bt[:, i:i + 1])
    logits_b1v, cache = _forward(params, col[0], cfg=cfg, mask_bt=col[1], cache=cache)
    logits_u_b1v, cache_u = _forward(unstacked, col[0], cfg=cfg, mask_bt=col[1], cache=cache_u)
    np.testing.assert_allclose(np.asarray(logits_u_b1v), np.asarray(logits_b1v), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", [CONFIGS["rope_gqa"], CONFIGS["learned_mqa_tied"],
                                 _cfg(n_kv_heads=2, qkv_bias=True, qk_norm=True, head_dim=16)],
                         ids=["rope_gqa", "learned_mqa_tied", "gqa_bias_qk_norm_head_dim"])
def test_fused_qkv_gives_the_same_numbers(cfg):
  params = _spread_params(cfg)
  fused = transformer.fuse_qkv(params, cfg)
  l, d, k, e, g = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.d_head, cfg.n_heads // cfg.n_kv_heads
  assert fused["layers"]["wqkv"].shape == (l, d, k, g + 2, e)
  # Query head j sits with its kv head j // g; then that head's key and value.
  np.testing.assert_array_equal(fused["layers"]["wqkv"][1, :, k - 1, g - 1], params["layers"]["wq"][1, :, -1])
  np.testing.assert_array_equal(fused["layers"]["wqkv"][0, :, k - 1, g + 1], params["layers"]["wv"][0, :, -1])
  # Zero the separate projections: whatever matches below came from the fused weights alone.
  separate = [n for n in ("wq", "wk", "wv", "bq", "bk", "bv") if n in params["layers"]]
  fused = {**fused, "layers": {**fused["layers"], **{n: jnp.zeros_like(fused["layers"][n]) for n in separate}}}
  if cfg.qkv_bias:
    assert fused["layers"]["bqkv"].shape == (l, k, g + 2, e)
  tokens_bt, mask_bt = _left_padded_batch()
  full_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  fused_btv, _ = _forward(fused, tokens_bt, cfg=cfg, mask_bt=mask_bt)  # the uncached path (generate's prefill)
  np.testing.assert_allclose(np.asarray(fused_btv), np.asarray(full_btv), atol=1e-5, rtol=1e-5)
  # Decoding with unstacked fused layers, as generate does, token by token.
  unstacked = transformer.unstack_layers(fused)
  cache = transformer.init_cache(cfg, tokens_bt.shape[0], SEQ_LEN)
  for i in range(SEQ_LEN):
    logits_b1v, cache = _forward(unstacked, tokens_bt[:, i:i + 1], cfg=cfg, mask_bt=mask_bt[:, i:i + 1], cache=cache)
    real_b = mask_bt[:, i]
    np.testing.assert_allclose(np.asarray(logits_b1v)[real_b, 0], np.asarray(full_btv)[real_b, i],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["rope_gqa", "learned_mqa_tied"])
def test_left_padding_matches_unpadded(name):
  cfg = CONFIGS[name]
  params = _spread_params(cfg)
  tokens_bt, mask_bt = _left_padded_batch()
  padded_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  row, n = 1, REAL_LENGTHS[1]
  alone_1tv, _ = _forward(params, tokens_bt[row:row + 1, SEQ_LEN - n:], cfg=cfg)
  np.testing.assert_allclose(np.asarray(padded_btv)[row, SEQ_LEN - n:], np.asarray(alone_1tv)[0],
                             atol=1e-5, rtol=1e-5)
  # Changing what sits under the padding changes nothing.
  garbage_bt = np.where(mask_bt, tokens_bt, 7).astype(np.int32)
  garbage_btv, _ = _forward(params, garbage_bt, cfg=cfg, mask_bt=mask_bt)
  np.testing.assert_array_equal(np.asarray(garbage_btv)[mask_bt], np.asarray(padded_btv)[mask_bt])


def test_causality():
  cfg = CONFIGS["rope_gqa"]
  params = _spread_params(cfg)
  tokens_bt, mask_bt = _left_padded_batch()
  before_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  j = 6
  changed_bt = tokens_bt.copy()
  changed_bt[:, j] = (changed_bt[:, j] % (VOCAB - 1)) + 1  # a different real token
  after_btv, _ = _forward(params, changed_bt, cfg=cfg, mask_bt=mask_bt)
  before_btv, after_btv = np.asarray(before_btv), np.asarray(after_btv)
  # Real positions only: a pad query sees no key at all and averages every slot uniformly (never read).
  earlier_bt = mask_bt & (np.arange(SEQ_LEN) < j)[None, :]
  np.testing.assert_array_equal(after_btv[earlier_bt], before_btv[earlier_bt])
  later_bt = mask_bt & (np.arange(SEQ_LEN) >= j)[None, :]
  assert np.abs(after_btv[later_bt] - before_btv[later_bt]).max() > 1e-3  # the change is visible from j on


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_axes_match_params(name):
  cfg = CONFIGS[name]
  params = jax.eval_shape(lambda key: transformer.init(key, cfg), jax.random.key(0))
  axes = transformer.param_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
    assert len(a) == p.ndim, (a, p.shape)
  assert ("pos_embed" in params) == (cfg.pos_embedding == "learned")
  assert ("unembed" in params) == (not cfg.tie_embeddings)
  assert cfg.num_params() == sum(p.size for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(pos_embedding="alibi"), "pos_embedding"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(dtype="int8"), "dtype"),
        (dict(max_len=0), "max_len"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"model\.{field}"):
    _cfg(**overrides)


def test_length_limits():
  cfg = CONFIGS["rope_mha"]
  with pytest.raises(ValueError, match="max_len"):
    transformer.init_cache(cfg, 2, cfg.max_len + 1)
  params = transformer.init(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="max_len"):
    transformer.forward(params, jnp.zeros((1, cfg.max_len + 1), jnp.int32), cfg)


def test_dropout():
  tokens_bt, mask_bt = _left_padded_batch()
  rng = jax.random.key(3)
  cfg0 = CONFIGS["rope_mha"]
  params = _spread_params(cfg0)
  plain_btv, _ = _forward(params, tokens_bt, cfg=cfg0, mask_bt=mask_bt)
  with_rng_btv, _ = _forward(params, tokens_bt, cfg=cfg0, mask_bt=mask_bt, dropout_rng=rng)
  np.testing.assert_array_equal(np.asarray(with_rng_btv), np.asarray(plain_btv))

  cfg1 = _cfg(dropout_rate=0.3)  # same parameter shapes as cfg0
  no_rng_btv, _ = _forward(params, tokens_bt, cfg=cfg1, mask_bt=mask_bt)
  np.testing.assert_array_equal(np.asarray(no_rng_btv), np.asarray(plain_btv))  # no rng: deterministic
  drop_a, _ = _forward(params, tokens_bt, cfg=cfg1, mask_bt=mask_bt, dropout_rng=rng)
  drop_b, _ = _forward(params, tokens_bt, cfg=cfg1, mask_bt=mask_bt, dropout_rng=jax.random.key(4))
  assert np.abs(np.asarray(drop_a) - np.asarray(plain_btv))[mask_bt].max() > 1e-2
  assert np.abs(np.asarray(drop_a) - np.asarray(drop_b))[mask_bt].max() > 1e-2


def _reference_attention(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, rate):
  """The attention as plain jnp ops, differentiated by JAX (what transformer._attention's backward replaces)."""
  b, k, n, e = q_bkne.shape
  scores_bkgts = (jnp.einsum("bkne,bkse->bkns", q_bkne, k_bkse) / math.sqrt(e)).reshape(b, k, g, n // g, -1)
  scores_bkgts = jnp.where(allowed_bts[:, None, None], scores_bkgts, transformer._MASK_VALUE)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1)
  if keep_bkgts is not None:
    probs_bkgts = jnp.where(keep_bkgts, probs_bkgts / (1.0 - rate), 0)
  return jnp.einsum("bkns,bkse->bkne", probs_bkgts.reshape(b, k, n, -1), v_bkse)


def _attention_vjp(fn, g, rate, *, seed, real_rows_only):
  """fn's output and (dq, dk, dv) on a left-padded batch (rows 2 and 3 start with fully masked queries),
  with a random cotangent: on every query, or only on the real ones (as a masked loss gives)."""
  _, mask_bt = _left_padded_batch()
  b, t = mask_bt.shape
  k, e = 2, 8
  allowed_bts = jnp.tril(jnp.ones((t, t), bool))[None] & jnp.asarray(mask_bt)[:, None, :]
  keys = jax.random.split(jax.random.key(seed), 5)
  q_bkne = jax.random.normal(keys[0], (b, k, g * t, e))
  k_bkse = jax.random.normal(keys[1], (b, k, t, e))
  v_bkse = jax.random.normal(keys[2], (b, k, t, e))
  dout_bkne = jax.random.normal(keys[3], (b, k, g * t, e))
  if real_rows_only:
    dout_bkne = dout_bkne * real_query_mask(mask_bt, g)[..., None]
  keep_bkgts = jax.random.bernoulli(keys[4], 1.0 - rate, (b, k, g, t, t)) if rate else None

  def run():
    out, pullback = jax.vjp(lambda q, kk, v: fn(q, kk, v, allowed_bts, keep_bkgts, g, rate), q_bkne, k_bkse, v_bkse)
    return out, pullback(dout_bkne)

  return jax.jit(run)()


def real_query_mask(mask_bt, g, k=2):
  """[b, k, g * t]: which stacked queries of the heads-first layout are real tokens."""
  b, t = mask_bt.shape
  return np.broadcast_to(np.tile(mask_bt, (1, g))[:, None, :], (b, k, g * t))


@pytest.mark.parametrize("g,rate", [(1, 0.0), (2, 0.0), (2, 0.3)])
def test_attention_gradient_matches_autodiff(g, rate):
  out, grads = _attention_vjp(transformer._attention, g, rate, seed=0, real_rows_only=False)  # pad queries too
  ref_out, ref_grads = _attention_vjp(_reference_attention, g, rate, seed=0, real_rows_only=False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-6, rtol=1e-6)
  for name, got, want in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  assert np.abs(np.asarray(ref_grads[0])).max() > 1e-2  # the gradients are not trivially zero


@pytest.mark.parametrize("g,rate,block", [(1, 0.0, 3), (2, 0.0, 4), (2, 0.3, 3)])
def test_causal_attention_in_query_blocks_matches_the_full_attention(g, rate, block):
  # Left-pad queries differ (they average over their block's keys) and get no gradient: their cotangent is
  # zero, as a masked loss makes it, and the real rows are compared.
  blocked = functools.partial(transformer._causal_attention, block=block)
  out, grads = _attention_vjp(blocked, g, rate, seed=1, real_rows_only=True)
  ref_out, ref_grads = _attention_vjp(_reference_attention, g, rate, seed=1, real_rows_only=True)
  real_bkn = real_query_mask(_left_padded_batch()[1], g)
  np.testing.assert_allclose(np.asarray(out)[real_bkn], np.asarray(ref_out)[real_bkn], atol=1e-6, rtol=1e-6)
  for name, got, want in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  assert SEQ_LEN > 2 * block  # several blocks
  assert np.abs(np.asarray(ref_grads[1])).max() > 1e-2


def test_long_sequences_take_the_blocked_path_and_match_numpy():
  cfg = presets.preset("tiny", vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                     max_len=2 * transformer.QUERY_BLOCK + 8)
  params = _spread_params(cfg)
  rng = np.random.default_rng(3)
  t = transformer.QUERY_BLOCK + 37  # two blocks, the second one ragged
  tokens_bt = rng.integers(1, VOCAB, size=(2, t)).astype(np.int32)
  mask_bt = np.ones((2, t), bool)
  mask_bt[1, :50] = False  # a left-padded row whose padding spans into the first block only
  tokens_bt[~mask_bt] = 0
  logits_btv, _ = _forward(params, tokens_bt, cfg=cfg, mask_bt=mask_bt)
  expected_btv = _np_forward(params, tokens_bt, mask_bt, cfg)
  np.testing.assert_allclose(np.asarray(logits_btv)[mask_bt], expected_btv[mask_bt], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan, policy", [(True, "dots_saveable"), (False, "nothing_saveable")],
                         ids=["scanned_dots_saveable", "unrolled_nothing_saveable"])
def test_scanned_layers_equal_the_unrolled_model(scan, policy):
  """model.scan_layers with remat, and remat on the unrolled layers: the same logits, gradients and prefilled cache
  as the unrolled layers without remat (GQA, sliding window and the Qwen 3 switches on, so every per-layer
  parameter kind goes through the scan)."""
  base = _cfg(n_kv_heads=2, mlp="swiglu", qk_norm=True, qkv_bias=True, sliding_window=4)
  scanned = dataclasses.replace(base, scan_layers=scan, remat=True, remat_policy=policy)
  params = _spread_params(base)
  tokens_bt, mask_bt = _left_padded_batch()

  def loss(p, cfg):
    logits, _ = transformer.forward(p, tokens_bt, cfg, mask_bt=mask_bt)
    return jnp.sum(jnp.where(mask_bt[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) * 1e-3

  for fn in (lambda p, c: transformer.forward(p, tokens_bt, c, mask_bt=mask_bt)[0],
             jax.grad(loss)):
    a = jax.jit(fn, static_argnums=1)(params, base)
    b = jax.jit(fn, static_argnums=1)(params, scanned)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5), a, b)
  _, cache_a = transformer.prefill(params, tokens_bt, base, length=SEQ_LEN + 2, mask_bt=mask_bt)
  _, cache_b = transformer.prefill(params, tokens_bt, scanned, length=SEQ_LEN + 2, mask_bt=mask_bt)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5), cache_a, cache_b)


@pytest.mark.parametrize("attention,window", [("xla", 3), ("splash", 3), ("splash", 0)])
def test_library_attention_equals_the_blocked_path(attention, window):
  """model.attention="xla" (jax.nn.dot_product_attention) and "splash" (Pallas splash attention, in Pallas's
  interpreter off TPU) against the blocked attention: the same logits and gradients with left padding, GQA and a
  sliding window (or none: the causal mask), and the same logits when decoding with the KV cache."""
  base = _cfg(n_kv_heads=2, sliding_window=window)
  library = dataclasses.replace(base, attention=attention)
  params = _spread_params(base)
  tokens_bt, mask_bt = _left_padded_batch()
  real = mask_bt.astype(bool)

  def loss(p, cfg):
    logits, _ = transformer.forward(p, tokens_bt, cfg, mask_bt=mask_bt)
    return jnp.sum(jnp.where(mask_bt[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) * 1e-3

  a, _ = _forward(params, tokens_bt, cfg=base, mask_bt=mask_bt)
  b, _ = _forward(params, tokens_bt, cfg=library, mask_bt=mask_bt)
  np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-5, rtol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda p: transformer.forward(p, tokens_bt, library, mask_bt=mask_bt))(params))
  assert ("pallas_call" in jaxpr) == (attention == "splash")  # the kernel runs; no silent fallback
  ga, gb = (jax.jit(jax.grad(loss), static_argnums=1)(params, c) for c in (base, library))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-5), ga, gb)
  p = SEQ_LEN - 3
  _, cache = transformer.prefill(params, tokens_bt[:, :p], library, length=SEQ_LEN, mask_bt=mask_bt[:, :p])
  for i in range(p, SEQ_LEN):
    step, cache = _forward(params, tokens_bt[:, i:i + 1], cfg=library, mask_bt=mask_bt[:, i:i + 1], cache=cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(a[:, i]), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="no attention dropout"):
    dataclasses.replace(base, attention=attention, dropout_rate=0.1)


def test_cudnn_is_refused_where_it_has_no_kernel_and_auto_avoids_it(monkeypatch):
  """cuDNN flash attention has no float32 kernel and needs a head width that is a multiple of 8: asking for it
  there is a config error; "auto" on a GPU takes it only where it runs (the device's compute capability decides
  the widest head: 128 before Hopper, 256 from it) and jax.nn's XLA attention otherwise."""
  with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype"):
    _cfg(attention="cudnn")
  with pytest.raises(ValueError, match="multiple of 8 and at most 256"):
    _cfg(attention="cudnn", dtype="bfloat16", d_model=24, n_heads=2, n_kv_heads=2)  # head width 12
  _cfg(attention="cudnn", dtype="bfloat16")  # head width 8: accepted

  class Device:
    def __init__(self, capability):
      self.compute_capability = capability

  def resolved(backend, capability="9.0", **overrides):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [Device(capability)])
    return transformer._attention_implementation(_cfg(attention="auto", **overrides))

  assert resolved("gpu", dtype="bfloat16") == "cudnn"
  assert resolved("gpu", dtype="float16") == "cudnn"
  assert resolved("gpu") == "xla"  # float32
  assert resolved("gpu", dtype="bfloat16", d_model=24, n_heads=2, n_kv_heads=2) == "xla"  # head width 12
  assert resolved("gpu", dtype="bfloat16", head_dim=192) == "cudnn"
  assert resolved("gpu", "8.0", dtype="bfloat16", head_dim=192) == "xla"  # an A100: 128 at most
  assert resolved("gpu", dtype="bfloat16", dropout_rate=0.1) is None  # the blocked path has dropout
  assert resolved("tpu") == "splash"
  assert resolved("cpu") is None


@pytest.mark.parametrize("dtype,multiple,causal_self", [("float32", 2, False), ("float32", 4, False),
                                                       ("float16", 2, False), ("float32", 2, True)])
def test_cudnn_padding_to_even_lengths_keeps_the_attention(dtype, multiple, causal_self):
  """cuDNN's training kernel with a bias needs even query and key counts: _padded_bias_attention pads t and s
  (odd: 7 queries over 9 keys, as in decoding a segment against a cache, or 7 over 7 in causal self-attention,
  where cuDNN is also told the mask is causal) with a masked key and a dropped query. Run through XLA's
  implementation (no GPU here): the outputs and the q/k/v gradients of the real positions equal the unpadded
  attention's, and a row whose keys are all masked (a left-pad query) stays finite in float16 (where -1e9
  would overflow to -inf and give NaN)."""
  b, t, h, k, e = 2, 7, 4, 2, 8
  s = t if causal_self else 9
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=shape), dtype)
              for shape in ((b, t, h, e), (b, s, k, e), (b, s, k, e)))
  allowed_bts = np.tril(np.ones((t, s), bool), s - t)[None].repeat(b, 0)
  allowed_bts[1, :, :4] = False  # row 1: four left-pad keys ...
  allowed_bts[1, 0] = False  # ... and a query that sees no key at all
  allowed_bts = jnp.asarray(allowed_bts)
  weights = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.float32)

  def padded(q, kk, v):
    out = transformer._padded_bias_attention(q, kk, v, allowed_bts, "xla", causal_self, multiple)
    assert out.shape[1] == -(-t // multiple) * multiple
    return out[:, :t]

  def reference(q, kk, v):
    return jax.nn.dot_product_attention(q, kk, v, mask=allowed_bts[:, None], implementation="xla")

  real = np.asarray(allowed_bts).any(-1)  # queries with at least one key
  got, want = padded(q, kk, v), reference(q, kk, v)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  tol = 1e-5 if dtype == "float32" else 2e-3
  np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], atol=tol,
                             rtol=tol)
  if dtype == "float32":
    grads = [jax.grad(lambda *x, f=f: jnp.sum(jnp.where(real[..., None, None], f(*x), 0) * weights),
                      argnums=(0, 1, 2))(q, kk, v) for f in (padded, reference)]
    for a, c in zip(*grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)


def test_splash_attention_on_a_mesh_equals_the_blocked_path_on_one_device():
  """On a data x fsdp x tensor = 2 x 2 x 2 mesh the kernel runs per device under jax.shard_map (a Mosaic call
  cannot be partitioned by XLA): batch rows split over data x fsdp, kv heads over tensor; logits and gradients
  equal one device's blocked attention."""
  base = _cfg(n_kv_heads=2, sliding_window=4)
  splash_cfg = dataclasses.replace(base, attention="splash")
  params = _spread_params(base)
  tokens_bt, mask_bt = _left_padded_batch()
  tokens_bt, mask_bt = np.concatenate([tokens_bt, tokens_bt[:1]]), np.concatenate([mask_bt, mask_bt[:1]])  # 4 rows
  real = mask_bt.astype(bool)

  def loss(p, cfg):
    logits, _ = transformer.forward(p, tokens_bt, cfg, mask_bt=mask_bt)
    return jnp.sum(jnp.where(mask_bt[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) * 1e-3

  want, _ = _forward(params, tokens_bt, cfg=base, mask_bt=mask_bt)
  want_grad = jax.jit(jax.grad(loss), static_argnums=1)(params, base)
  with sharding.activate(sharding.make_mesh(2, 2, 2), sharding.DEFAULT_RULES):
    fwd = jax.jit(lambda p: transformer.forward(p, tokens_bt, splash_cfg, mask_bt=mask_bt)[0])
    assert "shard_map" in str(jax.make_jaxpr(fwd)(params))
    got, got_grad = fwd(params), jax.jit(jax.grad(loss), static_argnums=1)(params, splash_cfg)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-5),
               want_grad, got_grad)
