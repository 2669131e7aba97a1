"""Jitted autoregressive sampling from the policy, and the matching full-pass log-probs.

`generate` prefills a left-padded prompt batch into a KV cache and runs a `lax.while_loop` over the new tokens
(no Python loop per token), stopping early once every row has emitted EOS. Each row stops on its own: the EOS
token belongs to the response (mask 1), every later slot holds `pad_id` with mask 0.

Log-probs. `SampleOutput.logprobs_bn` is log softmax(logits / temperature) of the sampled token over the FULL
vocabulary, before top-k / top-p truncation. That is exactly what the PPO training forward pass recomputes
(`sequence_logprobs`, RLHF_NOTES PPO item 5), so the first PPO ratio is 1 even with truncated sampling. Greedy
decoding (temperature 0) reports log-probs at temperature 1, the model's own distribution.

Shapes: b batch, p prompt length, n new tokens (`max_new_tokens`), v vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import transformer

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. Frozen and hashable: static under jit.

  Filters apply in the usual order: logits / temperature, then top-k, then top-p.
  """

  max_new_tokens: int
  temperature: float = 1.0  # 0.0 means greedy (argmax); top_k / top_p are then irrelevant
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  use_cache: bool = True  # False recomputes a full forward pass per token (benchmarks only)
  # With the cache: the decoding loop runs in up to this many segments, each with a KV cache only as long as
  # its last step needs, so a step attends over the filled slots rounded up to its segment's end instead of
  # all prompt + max_new_tokens (a step at batch 64 is bound by reading the cache). Each segment is one more
  # compiled loop body; 1 = one cache of full length (no segments).
  cache_segments: int = 4
  # With the cache: the decoding loop projects q, k, v with one matmul per layer (transformer.fuse_qkv; the
  # same numbers up to float rounding). False only to measure what it saves.
  fuse_qkv: bool = True

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"sampling.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
    if not math.isfinite(self.temperature) or self.temperature < 0.0:
      raise ValueError(f"sampling.temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"sampling.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if not isinstance(self.use_cache, bool):
      raise ValueError(f"sampling.use_cache must be a bool, got {self.use_cache!r}")
    if not isinstance(self.cache_segments, int) or self.cache_segments < 1:
      raise ValueError(f"sampling.cache_segments must be an int >= 1 (1 = off), got {self.cache_segments!r}")
    if not isinstance(self.fuse_qkv, bool):
      raise ValueError(f"sampling.fuse_qkv must be a bool, got {self.fuse_qkv!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def logprob_temperature(self) -> float:
    """The temperature of the reported log-probs: the sampling one, or 1 for greedy decoding."""
    return 1.0 if self.greedy else self.temperature


class SampleOutput(NamedTuple):
  """What `generate` returns; a pytree.

  tokens_bn:   int32 [b, n] sampled tokens; `pad_id` after a row's EOS.
  logprobs_bn: float32 [b, n] log-prob of each token under the full softmax(logits / T); 0 where mask is 0.
  mask_bn:     bool [b, n] response mask: True on generated tokens up to and including EOS.
  ended_b:     bool [b] the row emitted EOS within max_new_tokens (rows that never stop get a PPO penalty).
  lengths_b:   int32 [b] response length, EOS included (= mask_bn.sum(1)).
  """

  tokens_bn: jax.Array
  logprobs_bn: jax.Array
  mask_bn: jax.Array
  ended_b: jax.Array
  lengths_b: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Filters. Removed logits become the dtype's most negative finite value: it stays finite through the
# subtraction of the max inside softmax (no NaN from -inf - -inf) and its probability underflows to exactly 0.


def _removed_value(dtype) -> float:
  return float(jnp.finfo(dtype).min)


def _scatter_keep(logits_bv: jax.Array, idx_bk: jax.Array, keep_bk: jax.Array | bool) -> jax.Array:
  """Keeps the logits at `idx_bk` where `keep_bk`, removes every other one."""
  rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
  keep_bv = jnp.zeros(logits_bv.shape, jnp.bool_).at[rows_b1, idx_bk].set(keep_bk)
  return jnp.where(keep_bv, logits_bv, _removed_value(logits_bv.dtype))


def apply_top_k(logits_bv: jax.Array, k: int) -> jax.Array:
  """Keeps exactly the k largest logits of each row (ties broken by lowest index); k = 0 or k >= v is a no-op."""
  if k < 0:
    raise ValueError(f"top_k must be >= 0, got {k}")
  if k == 0 or k >= logits_bv.shape[-1]:
    return logits_bv
  _, idx_bk = jax.lax.top_k(logits_bv, k)
  return _scatter_keep(logits_bv, idx_bk, True)


def apply_top_p(logits_bv: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of most probable tokens whose total probability is >= p.

  A token is kept when the probability of all tokens ranked strictly above it is < p, so the top-1 token is
  always kept. p = 1 is a no-op.
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {p}")
  if p >= 1.0:
    return logits_bv
  idx_bv = jnp.argsort(-logits_bv, axis=-1, stable=True)  # most probable first
  sorted_bv = jnp.take_along_axis(logits_bv, idx_bv, axis=-1)
  probs_bv = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)
  mass_above_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  return _scatter_keep(logits_bv, idx_bv, mass_above_bv < p)


def _argmax(x_bv: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum; the first NaN if any), int32 [b], as two plain
  reductions: XLA:CPU runs jnp.argmax's (value, index) reduce element by element, which was the costliest
  single op of a decoding step at batch 64."""
  max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
  hit_bv = (x_bv == max_b1) | jnp.isnan(x_bv)
  v = x_bv.shape[-1]
  return jnp.min(jnp.where(hit_bv, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _rotate_left(x, r: int):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 hash of JAX's default PRNG (Salmon et al. 2011, 20 rounds), unrolled in jnp."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, r) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def gumbel(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """jax.random.gumbel(rng, shape) (float32) bit for bit, faster on XLA:CPU.

  JAX lowers its Threefry hash on CPU as a rolled 5-iteration while loop over the whole array, which was
  about 10% of a decoding step at batch 64; unrolled here it fuses into a few elementwise kernels. This copies
  JAX's bit recipe (partitionable Threefry counters, 23 mantissa bits to [tiny, 1), -log(-log u)), checked
  bit for bit by tests/sampling_test.py; any other PRNG or setting falls back to jax.random.gumbel.
  """
  n = math.prod(shape)
  if (str(jax.random.key_impl(rng)) != "threefry2x32" or not jax.config.jax_threefry_partitionable
      or n >= 2**32):
    return jax.random.gumbel(rng, shape, jnp.float32)
  k1, k2 = jax.random.key_data(rng)
  counts = jax.lax.iota(jnp.uint32, n).reshape(shape)  # the flat index; its high 32 bits are 0
  bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros_like(counts), counts)
  mantissa = ((bits1 ^ bits2) >> np.uint32(9)) | np.uint32(0x3F800000)
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)  # [0, 1)
  tiny = np.float32(np.finfo(np.float32).tiny)
  uniform = jnp.maximum(tiny, floats * (np.float32(1.0) - tiny) + tiny)
  return -jnp.log(-jnp.log(uniform))


def sample_token(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token per row, int32 [b]: argmax when greedy, else a draw from the filtered, tempered softmax."""
  if cfg.greedy:
    return _argmax(logits_bv)
  scaled_bv = logits_bv.astype(jnp.float32) / cfg.temperature
  scaled_bv = apply_top_p(apply_top_k(scaled_bv, cfg.top_k), cfg.top_p)
  # jax.random.categorical(rng, scaled_bv) exactly (the Gumbel-max trick with the same noise), but with the
  # faster argmax and Gumbel noise.
  return _argmax(gumbel(rng, scaled_bv.shape) + scaled_bv)


# ----------------------------------------------------------------------------------------------------------
# The decoding loop. The model state is either a KV cache (use_cache=True) or a full token buffer
# (use_cache=False); `_feed` appends one token per row to it and returns the next-token logits.


class _LoopState(NamedTuple):
  step: jax.Array  # [] index of the token sampled next
  logits_bv: jax.Array  # next-token logits
  model_state: Any  # cache dict, or (tokens_bs, mask_bs) buffers
  tokens_bn: jax.Array
  logprobs_bn: jax.Array
  mask_bn: jax.Array
  done_b: jax.Array  # the row has emitted EOS


def cache_lengths(prompt_len: int, max_new_tokens: int, segments: int) -> tuple[int, ...]:
  """The KV cache lengths of the decoding loop's segments, shortest first (at most `segments` of them).

  The step that samples new token i writes cache slot prompt_len + i, so a segment whose cache has L slots
  runs the steps i < L - prompt_len. The new tokens are split into chunks of ceil(max_new_tokens / segments)
  rounded up to a multiple of 8 slots; the last length is prompt_len + max_new_tokens.
  """
  total = prompt_len + max_new_tokens
  chunk = -(-max_new_tokens // segments)
  chunk = -(-chunk // 8) * 8
  return tuple(range(prompt_len + chunk, total, chunk)) + (total,)


def _prefill(params, prompt_bp, prompt_mask_bp, model_cfg, sampling_cfg, pad_id, length):
  """Runs the prompt; returns the logits after its last column and the initial model state (a cache of
  `length` slots, or token buffers of prompt + max_new_tokens)."""
  b, p = prompt_bp.shape
  total = p + sampling_cfg.max_new_tokens
  if sampling_cfg.use_cache:
    # Prompts are left-padded: the last column holds every row's last real token; only that one is unembedded.
    h_b1d, cache = transformer.prefill(params, prompt_bp, model_cfg, length=length, mask_bt=prompt_mask_bp,
                                       last_only=True)
    return transformer.unembed(params, h_b1d, model_cfg)[:, 0], cache
  tokens_bs = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(prompt_bp)
  mask_bs = jnp.zeros((b, total), jnp.bool_).at[:, :p].set(prompt_mask_bp)
  # Slots after the prompt are masked and causally in the future, so they do not change these logits.
  logits_bsv, _ = transformer.forward(params, tokens_bs, model_cfg, mask_bt=mask_bs)
  return logits_bsv[:, p - 1], (tokens_bs, mask_bs)


def _feed(params, model_state, token_b, step, prompt_len, model_cfg, sampling_cfg):
  """Appends token_b (the token sampled at `step`) and returns (next logits [b, v], new model state)."""
  if sampling_cfg.use_cache:
    logits_b1v, cache = transformer.forward(params, token_b[:, None], model_cfg, cache=model_state)
    return logits_b1v[:, 0], cache
  tokens_bs, mask_bs = model_state
  slot = prompt_len + step
  tokens_bs = jax.lax.dynamic_update_slice_in_dim(tokens_bs, token_b[:, None], slot, 1)
  mask_bs = jax.lax.dynamic_update_slice_in_dim(mask_bs, jnp.ones_like(token_b, jnp.bool_)[:, None], slot, 1)
  # The whole buffer again, on purpose: this path measures what the KV cache saves.
  logits_bsv, _ = transformer.forward(params, tokens_bs, model_cfg, mask_bt=mask_bs)
  logits_bv = jax.lax.dynamic_index_in_dim(logits_bsv, slot, axis=1, keepdims=False)
  return logits_bv, (tokens_bs, mask_bs)


def _decode_step(state: _LoopState, params, rng, *, p, model_cfg, sampling_cfg, eos_id, pad_id) -> _LoopState:
  """Samples the token at `state.step` from the carried logits, records it and feeds it to the model."""
  # fold_in(step) rather than splitting a carried key: the cached and uncached paths (and any cache
  # segmentation) draw the same numbers.
  sampled_b = sample_token(state.logits_bv, jax.random.fold_in(rng, state.step), sampling_cfg)
  logprob_b = transformer.token_logprobs(state.logits_bv[:, None], sampled_b[:, None],
                                         sampling_cfg.logprob_temperature)[:, 0]
  live_b = ~state.done_b
  token_b = jnp.where(live_b, sampled_b, pad_id)
  put = lambda buf_bn, col_b: jax.lax.dynamic_update_slice_in_dim(buf_bn, col_b[:, None], state.step, 1)
  tokens_bn = put(state.tokens_bn, token_b)
  logprobs_bn = put(state.logprobs_bn, jnp.where(live_b, logprob_b, 0.0))
  mask_bn = put(state.mask_bn, live_b)
  done_b = state.done_b | (live_b & (sampled_b == eos_id))
  # Always feed, even after the last token: a lax.cond here would make XLA copy the whole KV cache every
  # step (the untaken branch returns the old buffers), which costs far more than one wasted forward pass.
  logits_bv, model_state = _feed(params, state.model_state, token_b, state.step, p, model_cfg, sampling_cfg)
  return _LoopState(state.step + 1, logits_bv, model_state, tokens_bn, logprobs_bn, mask_bn, done_b)


def _generate(params, prompt_bp, prompt_mask_bp, rng, *, model_cfg, sampling_cfg, eos_id, pad_id):
  b, p = prompt_bp.shape
  n = sampling_cfg.max_new_tokens
  segments = cache_lengths(p, n, sampling_cfg.cache_segments if sampling_cfg.use_cache else 1)
  if sampling_cfg.use_cache:
    # Sliced once here (and attached LoRA adapters merged per layer), not at every step of the loop; the prompt
    # pass reads the same per-layer copies, so no stacked slice copies live beside them.
    params = transformer.unstack_layers(params)
  logits_bv, model_state = _prefill(params, prompt_bp, prompt_mask_bp, model_cfg, sampling_cfg, pad_id,
                                    segments[0])
  if sampling_cfg.use_cache:
    if sampling_cfg.fuse_qkv:
      # Not for the prefill: at [b * p, d] rows the fused output's strided q/k/v slices cost more than the
      # two matmuls saved.
      params = transformer.fuse_qkv(params, model_cfg)
  body = functools.partial(_decode_step, params=params, rng=rng, p=p, model_cfg=model_cfg,
                           sampling_cfg=sampling_cfg, eos_id=eos_id, pad_id=pad_id)

  state = _LoopState(
      step=jnp.zeros((), jnp.int32),
      logits_bv=logits_bv,
      model_state=model_state,
      tokens_bn=jnp.full((b, n), pad_id, jnp.int32),
      logprobs_bn=jnp.zeros((b, n), jnp.float32),
      mask_bn=jnp.zeros((b, n), jnp.bool_),
      done_b=jnp.zeros((b,), jnp.bool_),
  )
  # One while_loop per cache length (static shapes under jit), each stopping early once every row has ended;
  # the later segments then exit at their first test.
  for length in segments:
    if sampling_cfg.use_cache:
      state = state._replace(model_state=transformer.grow_cache(state.model_state, length))
    stop = min(n, length - p)
    state = jax.lax.while_loop(lambda st, stop=stop: (st.step < stop) & ~jnp.all(st.done_b), body, state)
  return SampleOutput(
      tokens_bn=state.tokens_bn,
      logprobs_bn=state.logprobs_bn,
      mask_bn=state.mask_bn,
      ended_b=state.done_b,
      lengths_b=state.mask_bn.sum(axis=1, dtype=jnp.int32),
  )


_generate_jit = jax.jit(_generate, static_argnames=("model_cfg", "sampling_cfg", "eos_id", "pad_id"))


def _check_prompt(prompt_bt, prompt_mask_bt, model_cfg: transformer.ModelConfig, new_tokens: int, what: str):
  if prompt_bt.ndim != 2 or prompt_bt.shape[1] < 1:
    raise ValueError(f"{what}: prompt_bt must be [batch, length>=1], got shape {prompt_bt.shape}")
  if prompt_mask_bt.shape != prompt_bt.shape:
    raise ValueError(f"{what}: prompt_mask_bt shape {prompt_mask_bt.shape} != prompt_bt shape {prompt_bt.shape}")
  total = prompt_bt.shape[1] + new_tokens
  if total > model_cfg.max_len:
    raise ValueError(f"{what}: prompt length {prompt_bt.shape[1]} + {new_tokens} new tokens = {total} exceeds "
                     f"model.max_len={model_cfg.max_len}; shorten the prompts or sampling.max_new_tokens")


def generate(
    params: Params,
    prompt_bt: jax.Array,
    prompt_mask_bt: jax.Array,
    rng: jax.Array,
    model_cfg: transformer.ModelConfig,
    sampling_cfg: SamplingConfig,
    *,
    eos_id: int,
    pad_id: int,
) -> SampleOutput:
  """Samples `sampling_cfg.max_new_tokens` tokens after LEFT-padded prompts (prompt_mask_bt False on padding).

  Every row needs at least one real prompt token. Shapes and ids are checked here, before any tracing; the
  work runs in one jitted function (compiled once per shape and config), so `generate` may also be called
  inside another jit.
  """
  prompt_bt, prompt_mask_bt = jnp.asarray(prompt_bt), jnp.asarray(prompt_mask_bt)
  _check_prompt(prompt_bt, prompt_mask_bt, model_cfg, sampling_cfg.max_new_tokens, "generate")
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if not 0 <= value < model_cfg.vocab_size:
      raise ValueError(f"generate: {name}={value} is outside the vocabulary [0, {model_cfg.vocab_size})")
  if eos_id == pad_id:
    raise ValueError(f"generate: eos_id and pad_id must differ (both {eos_id}); PAD is not a stop token")
  return _generate_jit(params, prompt_bt.astype(jnp.int32), prompt_mask_bt.astype(jnp.bool_), rng,
                       model_cfg=model_cfg, sampling_cfg=sampling_cfg, eos_id=int(eos_id), pad_id=int(pad_id))


# ----------------------------------------------------------------------------------------------------------
# Log-probs of given responses with one full forward pass (PPO's old / reference log-probs).


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _sequence_logprobs(params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, temperature, *,
                       model_cfg):
  p, n = prompt_bp.shape[1], response_bn.shape[1]
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  h_bsd, _ = transformer.backbone(params, tokens_bs, model_cfg, mask_bt=mask_bs)
  # Position p - 1 + i predicts response token i; unembed only those n positions.
  logits_bnv = transformer.unembed(params, h_bsd[:, p - 1:p - 1 + n], model_cfg)
  logprobs_bn = transformer.token_logprobs(logits_bnv, response_bn, temperature)
  return jnp.where(response_mask_bn, logprobs_bn, 0.0)


def sequence_logprobs(
    params: Params,
    prompt_bt: jax.Array,
    prompt_mask_bt: jax.Array,
    response_bn: jax.Array,
    response_mask_bn: jax.Array,
    model_cfg: transformer.ModelConfig,
    *,
    temperature: float | jax.Array,
) -> jax.Array:
  """float32 [b, n]: log softmax(logits / temperature) of each response token, 0 where response_mask is 0.

  One full forward pass (no cache) over the left-padded prompt followed by the response. Pass the sampling
  temperature (1.0 for greedy samples) so the result matches `generate`'s `logprobs_bn` (RLHF_NOTES PPO 4, 5).
  `temperature` is traced, so changing it does not recompile.
  """
  prompt_bt, prompt_mask_bt = jnp.asarray(prompt_bt), jnp.asarray(prompt_mask_bt)
  response_bn, response_mask_bn = jnp.asarray(response_bn), jnp.asarray(response_mask_bn)
  _check_prompt(prompt_bt, prompt_mask_bt, model_cfg, response_bn.shape[-1], "sequence_logprobs")
  if response_bn.shape != response_mask_bn.shape or response_bn.shape[0] != prompt_bt.shape[0]:
    raise ValueError(f"sequence_logprobs: response_bn {response_bn.shape} and response_mask_bn "
                     f"{response_mask_bn.shape} must both be [{prompt_bt.shape[0]}, n]")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"sequence_logprobs: temperature must be > 0 (use 1.0 for greedy samples), got {temperature}")
  return _sequence_logprobs(params, prompt_bt.astype(jnp.int32), prompt_mask_bt.astype(jnp.bool_),
                            response_bn.astype(jnp.int32), response_mask_bn.astype(jnp.bool_),
                            jnp.asarray(temperature, jnp.float32), model_cfg=model_cfg)
