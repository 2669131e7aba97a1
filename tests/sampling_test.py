"""Tests for rlhf_jax/sampling.py against step-by-step full forward passes and NumPy references.

The model is tiny (vocab 16) with parameters redrawn at scale 1/sqrt(fan_in), so next-token distributions are
far from uniform and temperature or filtering mistakes move the sampled frequencies by many standard errors.
Distribution tests draw the first token of 4096 copies of one prompt in a single batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling
from rlhf_jax.models import transformer

VOCAB = 16
PAD = 0
PROMPT_LEN = 6
NEW = 8
CFG = transformer.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=16)
REMOVED = float(np.finfo(np.float32).min)


def _spread_params(cfg: transformer.ModelConfig, seed: int = 0) -> transformer.Params:
  """`init`'s pytree with weights at std 1/sqrt(fan_in) (embeddings std 1), so logits are O(1)."""
  params = transformer.init(jax.random.key(seed), cfg)
  d, f = cfg.d_model, cfg.d_ff
  fan_in = {"wq": d, "wk": d, "wv": d, "wo": d, "w_in": d, "w_out": f}
  layers = {name: (w / 0.02 / math.sqrt(fan_in[name]) if name in fan_in else w)
            for name, w in params["layers"].items()}
  layers["wo"] = layers["wo"] * math.sqrt(2 * cfg.n_layers)  # undo the depth scaling of the init
  layers["w_out"] = layers["w_out"] * math.sqrt(2 * cfg.n_layers)
  return {**params, "layers": layers, "embed": params["embed"] / 0.02,
          "unembed": params["unembed"] / 0.02 / math.sqrt(d)}


PARAMS = _spread_params(CFG)


def _prompts(seed: int = 0, lengths=(6, 4, 3, 1)) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts of different lengths (PAD never appears as a real token)."""
  rng = np.random.default_rng(seed)
  tokens_bp = rng.integers(1, VOCAB, size=(len(lengths), PROMPT_LEN)).astype(np.int32)
  mask_bp = np.arange(PROMPT_LEN)[None, :] >= PROMPT_LEN - np.asarray(lengths)[:, None]
  return np.where(mask_bp, tokens_bp, PAD).astype(np.int32), mask_bp


PROMPTS_BP, PROMPT_MASK_BP = _prompts()
_forward = jax.jit(transformer.forward, static_argnames=("cfg",))


def _reference_greedy(prompt_bp, mask_bp, steps):
  """Greedy decoding with one full forward pass per token (no cache), driven from NumPy.

  The buffer has a fixed width so `forward` compiles once; slots to the right of the current token are masked
  and causally in the future, so they do not affect the logits read.
  """
  b, p = prompt_bp.shape
  tokens_bs = np.full((b, p + steps), PAD, np.int32)
  mask_bs = np.zeros((b, p + steps), bool)
  tokens_bs[:, :p], mask_bs[:, :p] = prompt_bp, mask_bp
  logprobs_bn = np.zeros((b, steps))
  for i in range(steps):
    logits_bsv, _ = _forward(PARAMS, tokens_bs, cfg=CFG, mask_bt=mask_bs)
    logits_bv = np.asarray(logits_bsv, np.float64)[:, p + i - 1]
    token_b = logits_bv.argmax(-1)
    logp_bv = logits_bv - logits_bv.max(-1, keepdims=True)
    logp_bv -= np.log(np.exp(logp_bv).sum(-1, keepdims=True))
    logprobs_bn[:, i] = logp_bv[np.arange(b), token_b]
    tokens_bs[:, p + i], mask_bs[:, p + i] = token_b, True
  return tokens_bs[:, p:], logprobs_bn


REF_TOKENS_BN, REF_LOGPROBS_BN = _reference_greedy(PROMPTS_BP, PROMPT_MASK_BP, NEW)
GREEDY = sampling.SamplingConfig(max_new_tokens=NEW, temperature=0.0)


def _generate(sampling_cfg, eos_id, prompt_bp=PROMPTS_BP, mask_bp=PROMPT_MASK_BP, seed=0):
  out = sampling.generate(PARAMS, prompt_bp, mask_bp, jax.random.key(seed), CFG, sampling_cfg,
                          eos_id=eos_id, pad_id=PAD)
  return jax.tree.map(np.asarray, out)


def _expected_after_eos(ref_tokens_bn, eos_id):
  """What per-row stopping must turn a non-stopping greedy output into."""
  b, n = ref_tokens_bn.shape
  tokens_bn, mask_bn, ended_b = ref_tokens_bn.copy(), np.ones((b, n), bool), np.zeros(b, bool)
  for row in range(b):
    hits = np.flatnonzero(ref_tokens_bn[row] == eos_id)
    if hits.size:
      stop = hits[0]
      tokens_bn[row, stop + 1:], mask_bn[row, stop + 1:], ended_b[row] = PAD, False, True
  return tokens_bn, mask_bn, ended_b


def _check_against_reference(out, eos_id, ref_tokens_bn=REF_TOKENS_BN, ref_logprobs_bn=REF_LOGPROBS_BN):
  tokens_bn, mask_bn, ended_b = _expected_after_eos(ref_tokens_bn, eos_id)
  np.testing.assert_array_equal(out.tokens_bn, tokens_bn)
  np.testing.assert_array_equal(out.mask_bn, mask_bn)
  np.testing.assert_array_equal(out.ended_b, ended_b)
  np.testing.assert_array_equal(out.lengths_b, mask_bn.sum(1))
  np.testing.assert_allclose(out.logprobs_bn, np.where(mask_bn, ref_logprobs_bn, 0.0), atol=1e-5)
  assert out.tokens_bn.dtype == np.int32 and out.logprobs_bn.dtype == np.float32


def _unused_token():
  unused = sorted(set(range(1, VOCAB)) - set(REF_TOKENS_BN.ravel().tolist()))
  assert unused, "every token appears in the greedy reference; pick another seed"
  return unused[0]


# ----------------------------------------------------------------------------------------------------------
# Greedy decoding and EOS handling.


def test_greedy_matches_stepwise_argmax():
  out = _generate(GREEDY, eos_id=_unused_token())
  assert not out.ended_b.any()
  _check_against_reference(out, eos_id=_unused_token())


def test_eos_stops_each_row_separately():
  # The EOS id whose first greedy occurrence gives the most varied stop points (a row may never stop).
  def stops(eos):
    return tuple(int(np.flatnonzero(r == eos)[0]) if (r == eos).any() else None for r in REF_TOKENS_BN)

  eos_id = max(range(1, VOCAB), key=lambda e: len(set(stops(e))))
  stop_points = stops(eos_id)
  assert len({s for s in stop_points if s is not None}) >= 2, stop_points  # the test needs different stops
  out = _generate(GREEDY, eos_id=eos_id)
  _check_against_reference(out, eos_id)
  for row, stop in enumerate(stop_points):
    if stop is not None:
      assert out.tokens_bn[row, stop] == eos_id and out.mask_bn[row, stop]  # EOS is part of the response
      assert (out.tokens_bn[row, stop + 1:] == PAD).all() and not out.mask_bn[row, stop + 1:].any()


def test_all_rows_stop_early():
  # Four copies of one prompt stop at the same step: the loop exits early and the rest stays PAD.
  same_bp, same_mask_bp = np.repeat(PROMPTS_BP[:1], 4, 0), np.repeat(PROMPT_MASK_BP[:1], 4, 0)
  ref_bn, ref_lp_bn = np.repeat(REF_TOKENS_BN[:1], 4, 0), np.repeat(REF_LOGPROBS_BN[:1], 4, 0)
  eos_id = int(ref_bn[0, 2])
  out = _generate(GREEDY, eos_id=eos_id, prompt_bp=same_bp, mask_bp=same_mask_bp)
  assert out.ended_b.all() and (out.lengths_b <= 3).all()
  _check_against_reference(out, eos_id, ref_bn, ref_lp_bn)


def test_top_k_1_is_greedy():
  # Sampling at temperature 1 from the top-1 token is argmax, and its log-probs are the T=1 ones greedy reports.
  out = _generate(sampling.SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_k=1), eos_id=_unused_token())
  _check_against_reference(out, eos_id=_unused_token())


def test_sample_token_is_jax_categorical_and_argmax():
  # sample_token reimplements jax.random.categorical (same Gumbel noise) and jnp.argmax with a faster
  # reduction; the draws must be the same numbers, ties and NaNs included.
  rng = np.random.default_rng(3)
  logits_bv = (rng.normal(size=(64, 512)) * rng.uniform(0.1, 5.0, size=(64, 1))).astype(np.float32)
  logits_bv[0, [5, 9, 300]] = 50.0  # a tie at the top: the first index wins
  logits_bv[1, [7, 11]] = np.nan  # the first NaN wins, as in jnp.argmax
  logits_bv[2] = 0.0  # all tied
  greedy = sampling.SamplingConfig(max_new_tokens=1, temperature=0.0)
  np.testing.assert_array_equal(sampling.sample_token(jnp.asarray(logits_bv), jax.random.key(0), greedy),
                                np.argmax(logits_bv, axis=-1))
  for temperature in (1.0, 0.7):
    cfg = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature)
    finite_bv = jnp.asarray(logits_bv[2:])
    for seed in range(3):
      key = jax.random.key(seed)
      expected_b = jax.random.categorical(key, finite_bv / temperature, axis=-1)
      np.testing.assert_array_equal(sampling.sample_token(finite_bv, key, cfg), expected_b)


@pytest.mark.parametrize("shape", [(64, 512), (1, 16), (3, 5, 2)])
def test_gumbel_is_jax_random_gumbel_bit_for_bit(shape):
  # sampling.gumbel copies JAX's Threefry bit recipe unrolled; a JAX upgrade that changes the recipe must fail
  # here, not silently change every sample. Raw and typed keys, folded ones, eager and under jit.
  keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(2**31 + 5), jax.random.key(7),
          jax.random.fold_in(jax.random.key(3), 11), jax.random.fold_in(jax.random.PRNGKey(1), 2**31)]
  for key in keys:
    want = np.asarray(jax.random.gumbel(key, shape, jnp.float32))
    np.testing.assert_array_equal(np.asarray(sampling.gumbel(key, shape)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling.gumbel, static_argnums=1)(key, shape)), want)
  # Another PRNG falls back to jax.random.gumbel itself.
  rbg = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(np.asarray(sampling.gumbel(rbg, shape)), np.asarray(jax.random.gumbel(rbg, shape)))


# ----------------------------------------------------------------------------------------------------------
# Filters.


def _np_softmax(logits_v):
  z = np.exp(logits_v - logits_v.max())
  return z / z.sum()


def _np_nucleus(logits_v, p):
  """Indices of the smallest highest-probability set with total probability >= p."""
  order = np.argsort(-logits_v, kind="stable")
  cum = np.cumsum(_np_softmax(logits_v.astype(np.float64))[order])
  return set(order[: int(np.searchsorted(cum, p)) + 1].tolist())


def test_apply_top_k():
  rng = np.random.default_rng(1)
  logits_bv = rng.normal(size=(8, 50)).astype(np.float32) * 3
  logits_bv[0, [3, 7, 9]] = 10.0  # ties at the top: still exactly k kept
  for k in (1, 3, 10):
    out_bv = np.asarray(sampling.apply_top_k(jnp.asarray(logits_bv), k))
    kept_bv = out_bv > REMOVED
    assert (kept_bv.sum(-1) == k).all()
    np.testing.assert_array_equal(out_bv[kept_bv], logits_bv[kept_bv])  # kept logits are untouched
    for row in range(1, 8):
      assert set(np.flatnonzero(kept_bv[row])) == set(np.argsort(-logits_bv[row])[:k])
    assert kept_bv[0, [3, 7, 9]][: min(k, 3)].all()
  for k in (0, 50, 80):
    np.testing.assert_array_equal(np.asarray(sampling.apply_top_k(jnp.asarray(logits_bv), k)), logits_bv)


def test_apply_top_p():
  rng = np.random.default_rng(2)
  logits_bv = rng.normal(size=(16, 40)).astype(np.float32) * rng.uniform(0.3, 4.0, size=(16, 1))
  logits_bv = logits_bv.astype(np.float32)
  for p in (0.05, 0.3, 0.7, 0.95):
    out_bv = np.asarray(sampling.apply_top_p(jnp.asarray(logits_bv), p))
    kept_bv = out_bv > REMOVED
    np.testing.assert_array_equal(out_bv[kept_bv], logits_bv[kept_bv])
    for row in range(16):
      assert set(np.flatnonzero(kept_bv[row]).tolist()) == _np_nucleus(logits_bv[row], p), (p, row)
  sizes = [len(_np_nucleus(l, 0.7)) for l in logits_bv]
  assert min(sizes) < max(sizes)  # the rows exercise nuclei of different sizes
  np.testing.assert_array_equal(np.asarray(sampling.apply_top_p(jnp.asarray(logits_bv), 1.0)), logits_bv)


# ----------------------------------------------------------------------------------------------------------
# Empirical distributions of the first sampled token over many copies of one prompt.

MANY = 4096
ROW = 1  # a prompt with left padding


def _first_logits_v():
  logits_bsv, _ = _forward(PARAMS, PROMPTS_BP, cfg=CFG, mask_bt=PROMPT_MASK_BP)
  return np.asarray(logits_bsv, np.float64)[ROW, -1]


def _first_token_counts(sampling_cfg):
  prompt_bp = np.repeat(PROMPTS_BP[ROW:ROW + 1], MANY, 0)
  mask_bp = np.repeat(PROMPT_MASK_BP[ROW:ROW + 1], MANY, 0)
  out = _generate(sampling_cfg, eos_id=_unused_token(), prompt_bp=prompt_bp, mask_bp=mask_bp, seed=7)
  assert out.tokens_bn.shape == (MANY, 1)
  return np.bincount(out.tokens_bn[:, 0], minlength=VOCAB)


def _max_z(counts_v, probs_v):
  """Largest per-token deviation of counts from MANY * probs, in binomial standard errors (+1 count slack)."""
  sd_v = np.sqrt(MANY * probs_v * (1 - probs_v))
  return np.max(np.abs(counts_v - MANY * probs_v) / (sd_v + 1.0))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_distribution(temperature):
  logits_v = _first_logits_v()
  counts_v = _first_token_counts(sampling.SamplingConfig(max_new_tokens=1, temperature=temperature))
  assert _max_z(counts_v, _np_softmax(logits_v / temperature)) < 4.5
  # The test can tell temperatures apart: the T=1 distribution is rejected by far.
  assert _max_z(counts_v, _np_softmax(logits_v)) > 10


def test_top_k_distribution():
  k = 3
  logits_v = _first_logits_v()
  counts_v = _first_token_counts(sampling.SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=k))
  top_k = np.argsort(-logits_v)[:k]
  assert set(np.flatnonzero(counts_v)) == set(top_k)  # never outside the top k; each of them drawn
  probs_v = np.zeros(VOCAB)
  probs_v[top_k] = _np_softmax(logits_v[top_k])
  assert _max_z(counts_v, probs_v) < 4.5


def test_top_p_distribution():
  # Temperature 1.5 first, then the nucleus of the tempered distribution.
  temperature, p = 1.5, 0.6
  scaled_v = _first_logits_v() / temperature
  nucleus = sorted(_np_nucleus(scaled_v, p))
  assert 2 <= len(nucleus) < VOCAB - 2
  counts_v = _first_token_counts(sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=p))
  assert set(np.flatnonzero(counts_v)) <= set(nucleus)
  probs_v = np.zeros(VOCAB)
  probs_v[nucleus] = _np_softmax(scaled_v[nucleus])
  assert _max_z(counts_v, probs_v) < 4.5


# ----------------------------------------------------------------------------------------------------------
# Log-probs and the uncached path.

SAMPLED_EOS = 5  # at seed 3 and temperature 0.7 some rows emit it and some do not (asserted below)


def test_logprobs_match_full_forward_and_uncached_path():
  temperature = 0.7
  prompts_bp, mask_bp = _prompts(seed=3, lengths=(6, 5, 4, 3, 2, 1))
  cached = _generate(sampling.SamplingConfig(max_new_tokens=NEW, temperature=temperature), SAMPLED_EOS,
                     prompt_bp=prompts_bp, mask_bp=mask_bp, seed=3)
  assert cached.ended_b.any() and not cached.ended_b.all(), cached.ended_b  # rows stop at different points

  full_bn = np.asarray(sampling.sequence_logprobs(PARAMS, prompts_bp, mask_bp, cached.tokens_bn, cached.mask_bn,
                                                  CFG, temperature=temperature))
  np.testing.assert_allclose(full_bn, cached.logprobs_bn, atol=1e-5)
  assert (full_bn[~cached.mask_bn] == 0).all() and (full_bn[cached.mask_bn] < 0).all()
  # It is the tempered distribution: at T=1 the same tokens score differently.
  t1_bn = np.asarray(sampling.sequence_logprobs(PARAMS, prompts_bp, mask_bp, cached.tokens_bn, cached.mask_bn,
                                                CFG, temperature=1.0))
  assert np.abs(t1_bn - full_bn)[cached.mask_bn].max() > 1e-2

  uncached = _generate(sampling.SamplingConfig(max_new_tokens=NEW, temperature=temperature, use_cache=False),
                       SAMPLED_EOS, prompt_bp=prompts_bp, mask_bp=mask_bp, seed=3)
  for name in ("tokens_bn", "mask_bn", "ended_b", "lengths_b"):
    np.testing.assert_array_equal(getattr(uncached, name), getattr(cached, name), err_msg=name)
  np.testing.assert_allclose(uncached.logprobs_bn, cached.logprobs_bn, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# A segmented KV cache (cache_segments > 1): each loop segment attends over a cache only as long as it needs.


def test_cache_lengths():
  assert sampling.cache_lengths(64, 64, 4) == (80, 96, 112, 128)
  assert sampling.cache_lengths(64, 64, 1) == (128,)
  assert sampling.cache_lengths(6, 40, 4) == (22, 38, 46)  # chunks of ceil(40 / 4) = 10 rounded up to 16
  assert sampling.cache_lengths(6, 2, 4) == (8,)
  for p, n, k in ((1, 1, 1), (5, 50, 4), (64, 768, 4), (7, 9, 8)):
    lengths = sampling.cache_lengths(p, n, k)
    assert len(lengths) <= k and lengths[-1] == p + n and lengths[0] > p and list(lengths) == sorted(set(lengths))


# GQA (4 query heads over 2 kv heads) and a sliding window of 5 keys, far shorter than the 46 slots.
WINDOWED = transformer.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_len=64, sliding_window=5)
SEGMENTED_NEW = 40  # 4 segments: caches of 22, 38 and 46 slots, so the loop crosses two segment boundaries


# Each way of sampling once, each model with greedy decoding and one sampling mode (the segments change the cache
# the attention reads, not how a token is drawn).
@pytest.mark.parametrize("model, temperature, top_k", [("gqa", 0.0, 0), ("gqa", 0.8, 5), ("gqa_window", 0.0, 0),
                                                       ("gqa_window", 1.0, 0)])
def test_segmented_cache_equals_one_cache(model, temperature, top_k):
  cfg = WINDOWED if model == "gqa_window" else dataclasses.replace(WINDOWED, sliding_window=0)
  params = _spread_params(cfg, seed=1)
  prompts_bp, mask_bp = _prompts(seed=4, lengths=(6, 5, 4, 3, 2, 1, 6, 3))  # left padding
  run = lambda segments, eos_id: sampling.generate(
      params, prompts_bp, mask_bp, jax.random.key(7), cfg,
      sampling.SamplingConfig(max_new_tokens=SEGMENTED_NEW, temperature=temperature, top_k=top_k,
                              cache_segments=segments), eos_id=eos_id, pad_id=PAD)
  # The EOS token: the first whose one-cache run has a row decoding past the last boundary (new token 32) and,
  # when sampling, some row stopped, so the segments' early exits are exercised too.
  chosen = None
  for eos_id in range(1, VOCAB):
    one = run(1, eos_id)
    if one.lengths_b.max() > 32 and (temperature == 0.0 or one.ended_b.any()):
      chosen = eos_id
      break
  assert chosen is not None
  seg = run(4, chosen)
  for name in ("tokens_bn", "mask_bn", "ended_b", "lengths_b"):
    np.testing.assert_array_equal(getattr(seg, name), getattr(one, name), err_msg=name)
  np.testing.assert_allclose(seg.logprobs_bn, one.logprobs_bn, atol=1e-5)
  # And both are the training forward pass's numbers.
  full_bn = sampling.sequence_logprobs(params, prompts_bp, mask_bp, seg.tokens_bn, seg.mask_bn, cfg,
                                       temperature=1.0 if temperature == 0.0 else temperature)
  np.testing.assert_allclose(seg.logprobs_bn, full_bn, atol=1e-5)


def test_segmented_cache_all_rows_stop_in_first_segment():
  # Every row ends within the first segment: the later segments only grow the cache and exit at once.
  params = _spread_params(WINDOWED, seed=1)
  same_bp, same_mask_bp = _prompts(seed=4, lengths=(6, 6, 6))
  same_bp, same_mask_bp = np.repeat(same_bp[:1], 3, 0), np.repeat(same_mask_bp[:1], 3, 0)
  greedy = sampling.SamplingConfig(max_new_tokens=SEGMENTED_NEW, temperature=0.0, cache_segments=1)
  ref = sampling.generate(params, same_bp, same_mask_bp, jax.random.key(0), WINDOWED, greedy, eos_id=3, pad_id=PAD)
  eos_id = int(ref.tokens_bn[0, 4])
  outs = [sampling.generate(params, same_bp, same_mask_bp, jax.random.key(0), WINDOWED,
                            dataclasses.replace(greedy, cache_segments=k), eos_id=eos_id, pad_id=PAD)
          for k in (1, 4)]
  assert outs[1].ended_b.all() and (outs[1].lengths_b <= 5).all()
  for name in ("tokens_bn", "mask_bn", "ended_b", "lengths_b", "logprobs_bn"):
    np.testing.assert_allclose(getattr(outs[1], name), getattr(outs[0], name), atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------------------
# The fused q/k/v projection (sampling.fuse_qkv, transformer.fuse_qkv) gives the separate projections' numbers.

FUSED_MODELS = {
    "gqa": dataclasses.replace(WINDOWED, sliding_window=0),
    "gqa_bias_qk_norm": dataclasses.replace(WINDOWED, sliding_window=0, qkv_bias=True, qk_norm=True),
    "mqa_bfloat16": dataclasses.replace(WINDOWED, sliding_window=0, n_kv_heads=1, dtype="bfloat16"),
}


# Each model once, each way of sampling once (the fusion changes q, k and v, not how a token is drawn).
@pytest.mark.parametrize("model, temperature, top_k", [("gqa", 0.0, 0), ("gqa_bias_qk_norm", 0.8, 5),
                                                       ("mqa_bfloat16", 1.0, 0)])
def test_fused_qkv_equals_separate_projections(model, temperature, top_k):
  cfg = FUSED_MODELS[model]
  params = _spread_params(cfg, seed=2)
  if cfg.qkv_bias:  # init's biases are zero: draw them, so a bias in the wrong head would show
    keys = jax.random.split(jax.random.key(5), 3)
    params["layers"] = {**params["layers"], **{name: 0.5 * jax.random.normal(key, params["layers"][name].shape)
                                               for key, name in zip(keys, ("bq", "bk", "bv"))}}
  prompts_bp, mask_bp = _prompts(seed=4, lengths=(6, 5, 4, 3, 2, 1, 6, 3))
  run = lambda fuse: sampling.generate(
      params, prompts_bp, mask_bp, jax.random.key(9), cfg,
      sampling.SamplingConfig(max_new_tokens=SEGMENTED_NEW, temperature=temperature, top_k=top_k, fuse_qkv=fuse),
      eos_id=_unused_token(), pad_id=PAD)
  fused, separate = run(True), run(False)
  for name in ("tokens_bn", "mask_bn", "ended_b", "lengths_b"):
    np.testing.assert_array_equal(getattr(fused, name), getattr(separate, name), err_msg=name)
  np.testing.assert_allclose(fused.logprobs_bn, separate.logprobs_bn, atol=1e-5)
  assert len(np.unique(np.asarray(fused.tokens_bn))) > 3  # the samples are not degenerate


# ----------------------------------------------------------------------------------------------------------
# Errors, raised before any tracing: params=None would fail inside jit, so reaching the ValueError proves it.


def test_too_long_raises_before_compute():
  with pytest.raises(ValueError, match="max_len=16"):
    sampling.generate(None, PROMPTS_BP, PROMPT_MASK_BP, None, CFG,
                      sampling.SamplingConfig(max_new_tokens=CFG.max_len - PROMPT_LEN + 1), eos_id=1, pad_id=PAD)
  too_long_bn = np.zeros((PROMPTS_BP.shape[0], CFG.max_len - PROMPT_LEN + 1), np.int32)
  with pytest.raises(ValueError, match="max_len=16"):
    sampling.sequence_logprobs(None, PROMPTS_BP, PROMPT_MASK_BP, too_long_bn, too_long_bn > 0, CFG, temperature=1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=4, top_k=-1), "top_k"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, cache_segments=0), "cache_segments"),
        (dict(max_new_tokens=4, fuse_qkv=1), "fuse_qkv"),
    ],
)
def test_sampling_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=rf"sampling\.{field}"):
    sampling.SamplingConfig(**kwargs)


@pytest.mark.parametrize("eos_id, pad_id, match", [(3, 3, "must differ"), (VOCAB, PAD, "eos_id"),
                                                   (1, -1, "pad_id")])
def test_bad_ids_raise(eos_id, pad_id, match):
  with pytest.raises(ValueError, match=match):
    sampling.generate(None, PROMPTS_BP, PROMPT_MASK_BP, None, CFG, GREEDY, eos_id=eos_id, pad_id=pad_id)
