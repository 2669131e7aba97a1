"""A pure-function decoder-only Transformer: init, forward, KV cache.

The parameters are a plain pytree of arrays; every function here is a pure function of them and of a frozen
`ModelConfig`, which is static under `jax.jit`. One backbone serves pretraining, SFT, the reward model (a scalar
head read at the last real token) and PPO (policy logits plus a value head).

Shapes are named by their axes: b batch, t query time, s key time, d model width, h query heads, k key/value
heads, g query heads per kv head, e head width, f MLP width, v vocabulary, l layers.

Layers are stored stacked along a leading `layers` axis (checkpoints and shardings keep that layout) and
applied unrolled, each layer's weights sliced inside the jitted function: XLA:CPU copies a layer's slice of a
stacked array before every matmul that reads it under `lax.scan`. Decoding with a KV cache keeps one cache
array per layer (see `backbone`), and `prefill` fills a fresh cache from the uncached pass over the prompt.
Every parameter carries logical axis names (`param_axes`), mapped to mesh axes by one rules table
(`rlhf_jax.sharding`).

Left padding: positions are counted over real tokens only (`cumsum(mask) - 1`), and padded keys are masked,
so a left-padded prompt produces the same logits on its real tokens as the unpadded prompt.

Architecture switches (all off by default: the default model is RMSNorm, RoPE, a tanh-GELU MLP, no biases):
`norm="layer"` (LayerNorm with bias), `pos_embedding="learned"`, `mlp="swiglu"` (silu(x W_gate) * x W_in),
`qkv_bias`, `proj_bias` (attention output and MLP biases), `qk_norm` (per-head RMSNorm of q and k before RoPE),
`head_dim` (a head width other than d_model / n_heads), `rope_scaling="llama3"`, `sliding_window`. Together they
give the open-weight families (GPT-2, Llama 3, Qwen 2.5/3, Mistral; see `rlhf_jax.models.hf`). `causal=False`
makes the same Transformer a bidirectional encoder (BERT; the masked-LM stage), with no KV-cache decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from rlhf_jax import sharding

Params = dict[str, Any]
Cache = dict[str, jax.Array]

# A finite "minus infinity": a fully masked attention row (a left-pad query) then gives a uniform average
# instead of NaN, and its output is never used.
_MASK_VALUE = -1e9

_REMAT_POLICIES = {"nothing_saveable": jax.checkpoint_policies.nothing_saveable,
                   "dots_saveable": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and choices of the Transformer. Frozen and hashable: static under jit."""

  vocab_size: int = 264
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4  # < n_heads gives grouped-query attention
  d_ff: int = 256
  max_len: int = 128
  pos_embedding: str = "rope"  # "rope" or "learned"
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  norm: str = "rms"  # "rms" (RMSNorm, scale only) or "layer" (LayerNorm with scale and bias)
  mlp: str = "gelu"  # "gelu" (tanh approximation: GPT-2's gelu_new) or "swiglu" (silu(x W_gate) * x W_in)
  qkv_bias: bool = False  # biases on the q, k, v projections (GPT-2, Qwen 2.5)
  proj_bias: bool = False  # biases on the attention output and the MLP projections (GPT-2)
  qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen 3)
  head_dim: int = 0  # 0: d_model / n_heads
  rope_scaling: str = ""  # "" or "llama3" (Llama 3.1's frequency-dependent scaling of the RoPE frequencies)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  sliding_window: int = 0  # > 0: a query sees only the last `sliding_window` keys, itself included (Mistral)
  family: str = ""  # the Hugging Face family the weights follow ("" = this project's own; see models.hf)
  dropout_rate: float = 0.0  # no dropout unless asked (RL needs a first ratio of exactly 1)
  dtype: str = "float32"  # compute dtype
  # storage dtype of the parameters ("float32" or "bfloat16"); optimizer moments stay float32 (rlhf_jax.optim)
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass
  remat_policy: str = "nothing_saveable"  # with remat: "nothing_saveable" or "dots_saveable" (keep matmul outputs)
  scan_layers: bool = False  # the uncached pass as one lax.scan over the stacked layers (compiles once per model)
  # "blocked": this file's attention (query blocks, the hand-written backward; the fastest on XLA:CPU);
  # "xla" / "cudnn": jax.nn.dot_product_attention with that implementation (cuDNN flash attention on NVIDIA
  # GPUs); "splash": Pallas splash attention for TPUs (block-sparse causal / sliding-window masks, padding as
  # segment ids; elsewhere it runs in Pallas's interpreter, for tests) on uncached passes, "xla" for cached
  # decoding; "auto": on a GPU cudnn where cuDNN has a kernel (bfloat16 or float16, a head width a multiple of 8
  # up to 128, 256 from Hopper on) and xla otherwise, splash on a TPU, blocked elsewhere.
  attention: str = "blocked"
  # False: bidirectional attention (a BERT-style encoder, rlhf_jax/stages/mlm.py): every real token sees every
  # real token of its row. Such a model has no left-to-right KV cache (init_cache, prefill refuse it).
  causal: bool = True

  def __post_init__(self):
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
    if self.pos_embedding not in ("rope", "learned"):
      raise ValueError(f"model.pos_embedding must be 'rope' or 'learned', got {self.pos_embedding!r}")
    if self.pos_embedding == "rope" and self.d_head % 2:
      raise ValueError(f"RoPE needs an even head width, got d_model/n_heads={self.d_head}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.norm not in ("rms", "layer"):
      raise ValueError(f"model.norm must be 'rms' or 'layer', got {self.norm!r}")
    if self.mlp not in ("gelu", "swiglu"):
      raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
    if self.rope_scaling not in ("", "llama3"):
      raise ValueError(f"model.rope_scaling must be '' or 'llama3', got {self.rope_scaling!r}")
    if self.rope_scaling and self.pos_embedding != "rope":
      raise ValueError("model.rope_scaling needs model.pos_embedding='rope'")
    if self.sliding_window and not self.causal:
      raise ValueError("model.sliding_window needs model.causal=True (a window is defined over the past)")
    if self.head_dim < 0 or self.sliding_window < 0:
      raise ValueError(f"model.head_dim and model.sliding_window must be >= 0, got {self.head_dim}, "
                       f"{self.sliding_window}")
    if self.attention not in ("blocked", "xla", "cudnn", "splash", "auto"):
      raise ValueError(f"model.attention must be 'blocked', 'xla', 'cudnn', 'splash' or 'auto', got "
                       f"{self.attention!r}")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' or 'float16' (cuDNN flash attention "
                       "has no float32 kernel); use 'xla' or 'auto' for float32")
    if self.attention == "cudnn" and (self.d_head % 8 or self.d_head > 256):
      raise ValueError(f"model.attention='cudnn' needs a head width that is a multiple of 8 and at most 256 "
                       f"(128 before Hopper), got {self.d_head}; use 'xla' or 'auto'")
    if self.attention in ("xla", "cudnn", "splash") and self.dropout_rate > 0:
      raise ValueError(f"model.attention={self.attention!r} has no attention dropout; use 'blocked' with "
                       "model.dropout_rate > 0")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"model.remat_policy must be one of {sorted(_REMAT_POLICIES)}, got {self.remat_policy!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if self.param_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
    for name in ("vocab_size", "d_model", "n_layers", "d_ff", "max_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")

  @property
  def d_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    return sum(math.prod(s) for s, _, _ in _param_specs(self).values())


# ----------------------------------------------------------------------------------------------------------
# Parameters: one table of (shape, logical axes, initialiser) drives init, sharding and the parameter count.


def _normal(std):
  return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def _ones(key, shape):
  del key
  return jnp.ones(shape, jnp.float32)


def _zeros(key, shape):
  del key
  return jnp.zeros(shape, jnp.float32)


def _param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...], Any]]:
  d, l, h, k, e, f, v = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_ff, cfg.vocab_size
  std = 0.02
  out_std = std / math.sqrt(2 * l)  # GPT-2: residual projections scaled by depth
  specs = {
      "embed": ((v, d), ("vocab", "embed"), _normal(std)),
      "layers/attn_norm": ((l, d), ("layers", "norm"), _ones),
      "layers/wq": ((l, d, h, e), ("layers", "embed", "heads", "head_dim"), _normal(std)),
      "layers/wk": ((l, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), _normal(std)),
      "layers/wv": ((l, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), _normal(std)),
      "layers/wo": ((l, h, e, d), ("layers", "heads", "head_dim", "embed"), _normal(out_std)),
      "layers/mlp_norm": ((l, d), ("layers", "norm"), _ones),
      "layers/w_in": ((l, d, f), ("layers", "embed", "mlp"), _normal(std)),
      "layers/w_out": ((l, f, d), ("layers", "mlp", "embed"), _normal(out_std)),
      "final_norm": ((d,), ("norm",), _ones),
  }
  if cfg.norm == "layer":
    specs["layers/attn_norm_bias"] = ((l, d), ("layers", "norm"), _zeros)
    specs["layers/mlp_norm_bias"] = ((l, d), ("layers", "norm"), _zeros)
    specs["final_norm_bias"] = ((d,), ("norm",), _zeros)
  if cfg.mlp == "swiglu":
    specs["layers/w_gate"] = ((l, d, f), ("layers", "embed", "mlp"), _normal(std))
  if cfg.qkv_bias:
    specs["layers/bq"] = ((l, h, e), ("layers", "heads", "head_dim"), _zeros)
    specs["layers/bk"] = ((l, k, e), ("layers", "kv_heads", "head_dim"), _zeros)
    specs["layers/bv"] = ((l, k, e), ("layers", "kv_heads", "head_dim"), _zeros)
  if cfg.proj_bias:
    specs["layers/bo"] = ((l, d), ("layers", "norm"), _zeros)
    specs["layers/b_in"] = ((l, f), ("layers", "mlp"), _zeros)
    specs["layers/b_out"] = ((l, d), ("layers", "norm"), _zeros)
  if cfg.qk_norm:
    specs["layers/q_norm"] = ((l, e), ("layers", "norm"), _ones)
    specs["layers/k_norm"] = ((l, e), ("layers", "norm"), _ones)
  if cfg.pos_embedding == "learned":
    specs["pos_embed"] = ((cfg.max_len, d), ("length", "embed"), _normal(std))
  if not cfg.tie_embeddings:
    specs["unembed"] = ((d, v), ("embed", "vocab"), _normal(std))
  return specs


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def init(rng: jax.Array, cfg: ModelConfig) -> Params:
  """Fresh parameters in model.param_dtype (drawn in float32, then cast). Wrap in `jax.jit(...,
  out_shardings=...)` to create them already sharded."""
  specs = _param_specs(cfg)
  keys = jax.random.split(rng, len(specs))
  dt = jnp.dtype(cfg.param_dtype)
  return _unflatten({name: fn(key, shape).astype(dt)
                     for key, (name, (shape, _, fn)) in zip(keys, sorted(specs.items()))})


def param_axes(cfg: ModelConfig) -> Params:
  """The logical axis names of every parameter, as a pytree shaped like `init`'s output."""
  return _unflatten({name: axes for name, (_, axes, _) in _param_specs(cfg).items()})


# ----------------------------------------------------------------------------------------------------------
# Forward pass.


def _rms_norm(x_btd, scale_d, eps):
  x32 = x_btd.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale_d).astype(x_btd.dtype)


def _layer_norm(x_btd, scale_d, bias_d, eps):
  x32 = x_btd.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale_d + bias_d).astype(x_btd.dtype)


def _norm(cfg: ModelConfig, x_btd, params, name):
  """The configured pre-norm: params[name] (scale) and, for LayerNorm, params[name + "_bias"]."""
  if cfg.norm == "layer":
    return _layer_norm(x_btd, params[name], params[name + "_bias"], cfg.norm_eps)
  return _rms_norm(x_btd, params[name], cfg.norm_eps)


def rope_frequencies(cfg: ModelConfig):
  """The RoPE angular frequencies [e/2]: theta^(-2i/e), rescaled by Llama 3.1's rule when
  `rope_scaling="llama3"`: wavelengths above original_max_len / low_freq_factor are divided by `rope_factor`,
  those below original_max_len / high_freq_factor kept, and the band between interpolated smoothly."""
  e = cfg.d_head
  freq_e = cfg.rope_theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  if cfg.rope_scaling == "llama3":
    old, lo, hi = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen_e = 2 * math.pi / freq_e
    scaled_e = jnp.where(wavelen_e > old / lo, freq_e / cfg.rope_factor, freq_e)
    smooth_e = (old / wavelen_e - lo) / (hi - lo)
    smoothed_e = (1 - smooth_e) * scaled_e / cfg.rope_factor + smooth_e * scaled_e
    medium_e = (wavelen_e >= old / hi) & (wavelen_e <= old / lo)
    freq_e = jnp.where(medium_e, smoothed_e, scaled_e)
  return freq_e


def _rope(x_bthe, positions_bt, freq_e):
  angle_bte = positions_bt[..., None].astype(jnp.float32) * freq_e  # [b, t, e/2]
  sin, cos = jnp.sin(angle_bte)[:, :, None, :], jnp.cos(angle_bte)[:, :, None, :]
  x1, x2 = jnp.split(x_bthe.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthe.dtype)


def _dropout(x, rate, rng):
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, rate):
  """Masked softmax attention, heads-first: [b, k, n, e] outputs for n = g * t queries (the g query heads of
  each kv head stacked along time) over s keys.

  The numbers of `jax.nn.softmax(jnp.where(allowed, q k / sqrt(e), _MASK_VALUE))` (float32), cast to the
  compute dtype, dropped out where `keep_bkgts` is False (None: no dropout) at `rate`, times v. The backward
  is written out (FlashAttention's): the score gradient is p * (dp - D) with D = rowsum(do * o) taken over the
  head width instead of the keys, and the 1/sqrt(e) scale is applied to dq and dk ([b, k, n, e], t/e times
  smaller than the scores). Differentiating the masking, scaling and normalisation step by step made
  XLA:CPU run several more passes over [b, k, g, t, s] arrays in both directions.
  """
  return _attention_fwd(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, rate)[0]


def _attention_fwd(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, rate):
  b, k, n, e = q_bkne.shape
  scores_bkns = jnp.einsum("bkne,bkse->bkns", q_bkne, k_bkse).astype(jnp.float32) / math.sqrt(e)
  scores_bkgts = jnp.where(allowed_bts[:, None, None], scores_bkns.reshape(b, k, g, n // g, -1), _MASK_VALUE)
  unnormalized_bkgts = jnp.exp(scores_bkgts - jnp.max(scores_bkgts, axis=-1, keepdims=True))
  probs_bkgts = (unnormalized_bkgts / jnp.sum(unnormalized_bkgts, axis=-1, keepdims=True)).astype(q_bkne.dtype)
  dropped_bkgts = probs_bkgts if keep_bkgts is None else jnp.where(keep_bkgts, probs_bkgts / (1.0 - rate), 0)
  out_bkne = jnp.einsum("bkns,bkse->bkne", dropped_bkgts.reshape(b, k, n, -1), v_bkse)
  return out_bkne, (q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, probs_bkgts, out_bkne)


def _attention_bwd(g, rate, res, dout_bkne):
  q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, probs_bkgts, out_bkne = res
  b, k, n, e = q_bkne.shape
  dt = q_bkne.dtype
  dropped_bkns = probs_bkgts if keep_bkgts is None else jnp.where(keep_bkgts, probs_bkgts / (1.0 - rate), 0)
  dropped_bkns = dropped_bkns.reshape(b, k, n, -1)
  dv_bkse = jnp.einsum("bkns,bkne->bkse", dropped_bkns, dout_bkne)
  dprobs_bkgts = jnp.einsum("bkne,bkse->bkns", dout_bkne, v_bkse).reshape(probs_bkgts.shape)
  if keep_bkgts is not None:
    dprobs_bkgts = jnp.where(keep_bkgts, dprobs_bkgts / (1.0 - rate), 0)
  # sum_s p * dp = sum_e do * o: the softmax's row term from [b, k, n, e] instead of the [.., t, s] scores.
  rows_bkn = jnp.sum(dout_bkne.astype(jnp.float32) * out_bkne.astype(jnp.float32), axis=-1)
  rows_bkgt1 = rows_bkn.reshape(b, k, g, n // g, 1)
  dscores_bkgts = probs_bkgts.astype(jnp.float32) * (dprobs_bkgts.astype(jnp.float32) - rows_bkgt1)
  dscores_bkns = dscores_bkgts.reshape(b, k, n, -1).astype(dt)
  # Masked keys have weight exactly 0, hence gradient 0, except in a row with no allowed key (a left-pad
  # query: uniform weights), where the masking select passes no gradient to the scores; those rows are zeroed
  # on the [b, k, n, e] side instead of the scores.
  row_ok_bkn1 = jnp.tile(jnp.any(allowed_bts, axis=-1), (1, g))[:, None, :, None]
  scale = 1.0 / math.sqrt(e)
  dq_bkne = jnp.where(row_ok_bkn1, jnp.einsum("bkns,bkse->bkne", dscores_bkns, k_bkse) * scale, 0)
  dk_bkse = jnp.einsum("bkns,bkne->bkse", dscores_bkns, jnp.where(row_ok_bkn1, q_bkne, 0)) * scale
  return dq_bkne.astype(dt), dk_bkse.astype(dt), dv_bkse.astype(dt), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

# Causal self-attention over more than this many positions runs in query blocks (see _causal_attention).
QUERY_BLOCK = 64


def _causal_attention(q_bkne, k_bkte, v_bkte, allowed_bts, keep_bkgts, g, rate, block=QUERY_BLOCK):
  """`_attention` for causal self-attention (queries = keys = t positions), skipping the masked upper blocks:
  the queries of block [a, b) attend over keys [0, b) only. With t = 256 and blocks of 64 that is 10/16 of the
  score, softmax and value work, forward and backward. Real queries get the same numbers (their keys beyond b
  are masked); a query with no allowed key at all (a left-pad position) averages over its block's keys
  instead of all t, and its gradient is zero either way."""
  b, k, n, e = q_bkne.shape
  t = n // g
  if t <= block:
    return _attention(q_bkne, k_bkte, v_bkte, allowed_bts, keep_bkgts, g, rate)
  q_bkgte = q_bkne.reshape(b, k, g, t, e)
  outs = []
  for lo in range(0, t, block):
    hi = min(t, lo + block)
    keep = None if keep_bkgts is None else keep_bkgts[:, :, :, lo:hi, :hi]
    out_bkne = _attention(q_bkgte[:, :, :, lo:hi].reshape(b, k, g * (hi - lo), e), k_bkte[:, :, :hi],
                          v_bkte[:, :, :hi], allowed_bts[:, lo:hi, :hi], keep, g, rate)
    outs.append(out_bkne.reshape(b, k, g, hi - lo, e))
  return jnp.concatenate(outs, axis=3).reshape(b, k, n, e)


def _constrain(x, axes):
  # A no-op unless a mesh and logical rules are active (see rlhf_jax.sharding.activate).
  return sharding.constrain(x, axes)


def _lora(y, x, layer, name, dt):
  """y + scale * (x @ A) @ B when layer["lora"] adapts weight `name` (lora.attach): LoRA without the merged
  weight W + scale * A @ B, so neither it nor its gradient is ever formed (the adapters' gradients come from
  the activations). x's trailing dims are the weight's inputs, y's its outputs."""
  ab = layer.get("lora", {}).get(name)
  if ab is None:
    return y
  a, b = ab["a"], ab["b"]
  n_in, r = a.ndim - 1, a.shape[-1]
  lead = x.shape[:x.ndim - n_in]
  xa = x.reshape(*lead, -1) @ a.reshape(-1, r).astype(dt)
  delta = (xa @ b.reshape(r, -1).astype(dt)).reshape(*lead, *b.shape[1:])
  return y + (layer["lora_scale"] * delta).astype(y.dtype)


def _block(cfg: ModelConfig, x_btd, layer, positions_bt, allowed_bts, kv_cache, rng, last_query_only=False,
           key_mask_bt=None):
  """One pre-norm Transformer block.

  kv_cache is None (attend over the block's own keys) or (k_cache_bkse, v_cache_bkse, write_at), this layer's
  cache: the new keys/values are written at slot `write_at` and the attention runs over the whole cache.
  Returns the new x and the updated cache, or without one the block's own keys and values [b, k, t, e].
  last_query_only (without a cache): keys and values of all t positions, but the new x [b, 1, d] of the last
  position only (the last layer of a prefill, where only the last column is unembedded).
  key_mask_bt: the real tokens of an uncached pass (splash attention reads padding from it, not allowed_bts).
  """
  dt = cfg.compute_dtype
  b, t, _ = x_btd.shape
  g = cfg.n_heads // cfg.n_kv_heads
  rngs = (None, None) if rng is None else tuple(jax.random.split(rng))

  h_btd = _norm(cfg, x_btd, layer, "attn_norm")
  if "wqkv" in layer:  # fused by fuse_qkv: one matmul, then the same q, k, v
    qkv_btkne = jnp.einsum("btd,dkne->btkne", h_btd, layer["wqkv"].astype(dt))
    if cfg.qkv_bias:
      qkv_btkne = qkv_btkne + layer["bqkv"].astype(dt)
    q_bthe = qkv_btkne[:, :, :, :g].reshape(b, t, cfg.n_heads, cfg.d_head)
    k_btke, v_btke = qkv_btkne[:, :, :, g], qkv_btkne[:, :, :, g + 1]
  else:
    q_bthe = _lora(jnp.einsum("btd,dhe->bthe", h_btd, layer["wq"].astype(dt)), h_btd, layer, "wq", dt)
    k_btke = _lora(jnp.einsum("btd,dke->btke", h_btd, layer["wk"].astype(dt)), h_btd, layer, "wk", dt)
    v_btke = _lora(jnp.einsum("btd,dke->btke", h_btd, layer["wv"].astype(dt)), h_btd, layer, "wv", dt)
    if cfg.qkv_bias:
      q_bthe = q_bthe + layer["bq"].astype(dt)
      k_btke = k_btke + layer["bk"].astype(dt)
      v_btke = v_btke + layer["bv"].astype(dt)
  if cfg.qk_norm:
    q_bthe = _rms_norm(q_bthe, layer["q_norm"], cfg.norm_eps)
    k_btke = _rms_norm(k_btke, layer["k_norm"], cfg.norm_eps)
  if cfg.pos_embedding == "rope":
    freq_e = rope_frequencies(cfg)
    q_bthe = _rope(q_bthe, positions_bt, freq_e)
    k_btke = _rope(k_btke, positions_bt, freq_e)
  q_bthe = _constrain(q_bthe, ("batch", "length", "heads", "head_dim"))
  k_bkte, v_bkte = k_btke.transpose(0, 2, 1, 3), v_btke.transpose(0, 2, 1, 3)

  # Over the block's own t positions, causal: the blocked path skips the masked upper blocks.
  self_attention = kv_cache is None and not last_query_only
  causal_self_attention = self_attention and cfg.causal
  if last_query_only:
    q_bthe, x_btd, allowed_bts = q_bthe[:, -1:], x_btd[:, -1:], allowed_bts[:, -1:]
    t = 1
  if kv_cache is not None:
    k_cache_bkse, v_cache_bkse, write_at = kv_cache
    k_cache_bkse = jax.lax.dynamic_update_slice_in_dim(k_cache_bkse, k_bkte.astype(k_cache_bkse.dtype), write_at, 2)
    v_cache_bkse = jax.lax.dynamic_update_slice_in_dim(v_cache_bkse, v_bkte.astype(v_cache_bkse.dtype), write_at, 2)
    k_bkse, v_bkse = k_cache_bkse.astype(dt), v_cache_bkse.astype(dt)
    kv_cache = (k_cache_bkse, v_cache_bkse)
  else:
    k_bkse, v_bkse = k_bkte, v_bkte
    kv_cache = (k_bkte, v_bkte)

  # Heads-first batched matmuls ([b, k, g*t, e] x [b, k, s, e]): the layout XLA:CPU runs fastest; the g query
  # heads of one kv head share its keys without copying them. The cache is stored in this layout too.
  q_bkne = q_bthe.reshape(b, t, cfg.n_kv_heads, g, cfg.d_head).transpose(0, 2, 3, 1, 4).reshape(
      b, cfg.n_kv_heads, g * t, cfg.d_head)
  implementation = _attention_implementation(cfg)
  if implementation == "splash":
    if self_attention and key_mask_bt is not None:
      return _block_out(cfg, x_btd, _splash_attention(q_bthe, k_bkse, v_bkse, key_mask_bt, cfg), layer,
                        rngs), kv_cache
    implementation = "xla"  # a query against a KV cache (decoding, the prefill's last column)
  if implementation is not None:
    attn_bthe = _library_attention(q_bthe, k_bkse, v_bkse, allowed_bts, implementation, causal_self_attention)
    return _block_out(cfg, x_btd, attn_bthe, layer, rngs), kv_cache
  keep_bkgts = None
  if rngs[0] is not None and cfg.dropout_rate > 0.0:
    keep_bkgts = jax.random.bernoulli(rngs[0], 1.0 - cfg.dropout_rate, (b, cfg.n_kv_heads, g, t, k_bkse.shape[2]))
  if causal_self_attention:
    attn_bkne = _causal_attention(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, cfg.dropout_rate)
  else:
    attn_bkne = _attention(q_bkne, k_bkse, v_bkse, allowed_bts, keep_bkgts, g, cfg.dropout_rate)
  attn_bthe = attn_bkne.reshape(b, cfg.n_kv_heads, g, t, cfg.d_head).transpose(0, 3, 1, 2, 4).reshape(
      b, t, cfg.n_heads, cfg.d_head)
  return _block_out(cfg, x_btd, attn_bthe, layer, rngs), kv_cache


def _attention_implementation(cfg: ModelConfig) -> str | None:
  """jax.nn.dot_product_attention's implementation for cfg.attention, "splash", or None for the blocked path."""
  if cfg.attention == "auto":
    if cfg.dropout_rate > 0:
      return None
    backend = jax.default_backend()
    if backend == "gpu":
      return "cudnn" if _cudnn_has_kernel(cfg) else "xla"
    return "splash" if backend == "tpu" else None
  return None if cfg.attention == "blocked" else cfg.attention


def _cudnn_has_kernel(cfg: ModelConfig) -> bool:
  """Whether cuDNN flash attention runs this model on the default GPU (the limits jax checks before calling it:
  16-bit inputs, a head width that is a multiple of 8, up to 128 before Hopper and 256 from it)."""
  if cfg.dtype == "float32" or cfg.d_head % 8:
    return False
  major = str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0]
  return cfg.d_head <= (256 if major.isdigit() and int(major) >= 9 else 128)


def _library_attention(q_bthe, k_bkse, v_bkse, allowed_bts, implementation: str, causal_self: bool = False):
  """jax.nn.dot_product_attention on [b, t, h, e] queries and [b, k, s, e] keys and values: [b, t, h, e].

  Our mask (causal, window, padding) goes to XLA as the mask and to cuDNN as a bias (its boolean masks cannot
  express left padding). For causal self-attention (causal_self: queries = keys, no cache) cuDNN is also told
  the mask is causal, which adds nothing to the bias but lets it skip the blocks above the diagonal. cuDNN's
  training kernel with a bias needs an even number of queries and keys, so for it an odd t or s gets one more
  position, masked out as a key, and the extra query's output is dropped."""
  t, s = q_bthe.shape[1], k_bkse.shape[2]
  k_bske, v_bske = k_bkse.transpose(0, 2, 1, 3), v_bkse.transpose(0, 2, 1, 3)
  if implementation != "cudnn":
    return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, mask=allowed_bts[:, None], implementation="xla")
  return _padded_bias_attention(q_bthe, k_bske, v_bske, allowed_bts, implementation, causal_self)[:, :t]


def _padded_bias_attention(q_bthe, k_bske, v_bske, allowed_bts, implementation, causal_self, multiple: int = 2):
  """The cuDNN branch of _library_attention with t and s padded up to `multiple` (a parameter so that tests
  can run the padding through implementation="xla" off a GPU). Returns [b, t_padded, h, e]."""
  t, s = q_bthe.shape[1], k_bske.shape[1]
  pt, ps = -t % multiple, -s % multiple
  q_bthe = jnp.pad(q_bthe, ((0, 0), (0, pt), (0, 0), (0, 0)))
  k_bske = jnp.pad(k_bske, ((0, 0), (0, ps), (0, 0), (0, 0)))
  v_bske = jnp.pad(v_bske, ((0, 0), (0, ps), (0, 0), (0, 0)))
  allowed_bts = jnp.pad(allowed_bts, ((0, 0), (0, pt), (0, ps)))  # the extra key is never allowed
  # A large finite negative in the compute dtype (float16 overflows at -1e9; -inf would make a row with no
  # allowed key, a left-pad query, NaN instead of a uniform average).
  mask_value = -3e4 if q_bthe.dtype == jnp.float16 else _MASK_VALUE
  bias_b1ts = jnp.where(allowed_bts[:, None], 0.0, mask_value).astype(q_bthe.dtype)
  return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, bias=bias_b1ts, is_causal=causal_self,
                                      implementation=implementation)


SPLASH_LANES = 128  # splash blocks are multiples of the TPU's 128 lanes; sequences are padded up to one


def _splash_attention(q_bthe, k_bkte, v_bkte, key_mask_bt, cfg: ModelConfig):
  """Self-attention over t positions by Pallas splash attention: [b, t, h, e] outputs.

  The causal (or sliding-window, or full for an encoder) mask is the kernel's static block-sparse mask, so
  blocks above the diagonal or outside the window are skipped; padding is a segment id (real tokens 1, pads 0)
  so a real query sees only real keys, as allowed_bts says. t is padded at the end to a multiple of 128 with
  pad tokens (after every real token: no real query sees them). Grouped-query attention runs the MQA kernel per
  kv head (its g query heads share one k, v); batch and kv heads are vmapped, and on a mesh of several devices
  each device runs the kernel on its shards (sharding.per_device). Outputs at pad queries differ from
  the blocked path's (they attend other pads there, not a uniform average): every caller masks them.
  """
  b, t, h, e = q_bthe.shape
  k = k_bkte.shape[1]
  g = h // k
  padded = -(-t // SPLASH_LANES) * SPLASH_LANES
  block = next(size for size in (512, 256, SPLASH_LANES) if padded % size == 0)
  pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
  q_bkgte = (q_bthe / math.sqrt(e)).reshape(b, t, k, g, e).transpose(0, 2, 3, 1, 4)
  q_bkgte = jnp.pad(q_bkgte, ((0, 0),) + pad)
  k_bkte, v_bkte = jnp.pad(k_bkte, pad), jnp.pad(v_bkte, pad)
  segment_bt = jnp.pad(key_mask_bt.astype(jnp.int32), ((0, 0), (0, padded - t)))
  shape = (padded, padded)
  if not cfg.causal:
    mask = splash.FullMask(shape)
  elif cfg.sliding_window:
    mask = splash.LocalMask(shape, window_size=(cfg.sliding_window - 1, 0), offset=0)
  else:
    mask = splash.CausalMask(shape)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa(splash.MultiHeadMask([mask] * g), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=jax.default_backend() != "tpu")

  def one_kv_head(q_gte, k_te, v_te, segment_t):
    return kernel(q_gte, k_te, v_te, segment_ids=splash.SegmentIds(q=segment_t, kv=segment_t))

  per_row = jax.vmap(jax.vmap(one_kv_head, in_axes=(0, 0, 0, None)))  # over batch, then kv heads
  qkv_axes = ("batch", "kv_heads", "length", "head_dim")
  out_bkgte = sharding.per_device(
      per_row, (q_bkgte, k_bkte.astype(q_bkgte.dtype), v_bkte.astype(q_bkgte.dtype), segment_bt),
      (qkv_axes[:2] + (None,) + qkv_axes[2:], qkv_axes, qkv_axes, ("batch", "length")))
  return out_bkgte[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def _block_out(cfg: ModelConfig, x_btd, attn_bthe, layer, rngs):
  """The rest of a block after attention: output projection, residual, the MLP and its residual."""
  dt = cfg.compute_dtype
  b, t, _ = x_btd.shape
  out_btd = _lora(jnp.einsum("bthe,hed->btd", attn_bthe, layer["wo"].astype(dt)), attn_bthe, layer, "wo", dt)
  if cfg.proj_bias:
    out_btd = out_btd + layer["bo"].astype(dt)
  x_btd = x_btd + out_btd
  x_btd = _constrain(x_btd, ("batch", "length", "embed"))

  h_btd = _norm(cfg, x_btd, layer, "mlp_norm")
  # The MLP on [b*t, d] rows: plain 2-D matmuls give XLA:CPU better layouts for the backward pass.
  h_nd = h_btd.reshape(b * t, -1)
  h_nf = _lora(h_nd @ layer["w_in"].astype(dt), h_nd, layer, "w_in", dt)
  if cfg.proj_bias:
    h_nf = h_nf + layer["b_in"].astype(dt)
  if cfg.mlp == "swiglu":
    h_nf = jax.nn.silu(_lora(h_nd @ layer["w_gate"].astype(dt), h_nd, layer, "w_gate", dt)) * h_nf
  else:
    h_nf = jax.nn.gelu(h_nf)
  h_nf = _constrain(h_nf.reshape(b, t, -1), ("batch", "length", "mlp")).reshape(b * t, -1)
  h_nd = _lora(h_nf @ layer["w_out"].astype(dt), h_nf, layer, "w_out", dt)
  if cfg.proj_bias:
    h_nd = h_nd + layer["b_out"].astype(dt)
  h_btd = h_nd.reshape(b, t, -1)
  x_btd = x_btd + _dropout(h_btd, cfg.dropout_rate, rngs[1])
  return _constrain(x_btd, ("batch", "length", "embed"))


def _check_causal_for_cache(cfg: ModelConfig) -> None:
  if not cfg.causal:
    raise ValueError("model.causal=False (a bidirectional encoder) has no KV-cache decoding: a cache holds the "
                     "keys of earlier tokens only, while every encoder position attends to later ones; run the "
                     "uncached forward pass over the whole sequence, or decode with a causal model")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache for `length` positions (prompt plus new tokens).

  k, v:    one [b, k, s, e] array per layer (a tuple of n_layers): keys and values written so far, heads-first
           (the layout attention reads).
  mask:    [b, s] which cache slots hold a real (non-pad) token.
  index:   [] the next slot to write (the same for every row: prompts are left-padded).
  lengths: [b] how many real tokens each row has seen, so the next position is known.
  """
  _check_causal_for_cache(cfg)
  if length > cfg.max_len:
    raise ValueError(f"a KV cache of {length} positions exceeds model.max_len={cfg.max_len}")
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.n_kv_heads, length, cfg.d_head)
  return {
      "k": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
      "v": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
      "mask": jnp.zeros((batch, length), jnp.bool_),
      "index": jnp.zeros((), jnp.int32),
      "lengths": jnp.zeros((batch,), jnp.int32),
  }


def backbone(
    params: Params,
    tokens_bt: jax.Array,
    cfg: ModelConfig,
    *,
    mask_bt: jax.Array | None = None,
    cache: Cache | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, Cache | None]:
  """Final-normed hidden states [b, t, d] (compute dtype) and the updated cache.

  mask_bt marks real tokens (1) against padding (0); it defaults to all ones. With a cache, the tokens are
  appended after what the cache holds and attend to it. `params` may have unstacked layers (`unstack_layers`).
  """
  h_btd, new_cache, _ = _backbone(params, tokens_bt, cfg, mask_bt, cache, dropout_rng, keep_kv=False,
                                  last_only=False)
  return h_btd, new_cache


def prefill(
    params: Params,
    tokens_bt: jax.Array,
    cfg: ModelConfig,
    *,
    length: int,
    mask_bt: jax.Array | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
  """Hidden states [b, t, d] of a prompt and a new cache of `length` slots holding it.

  The same as `backbone(..., cache=init_cache(cfg, b, length))`, but cheaper: the prompt attends over its own
  t keys (the uncached path) instead of all `length` slots, most of them still empty. last_only: the hidden
  state of the last column only, [b, 1, d] (what decoding unembeds), skipping the last layer's attention
  output and MLP at every other position (about 1/l of the prefill).
  """
  b, t = tokens_bt.shape
  _check_causal_for_cache(cfg)
  if t > length:
    raise ValueError(f"{t} prompt tokens do not fit a KV cache of {length} positions")
  cache = init_cache(cfg, b, length)
  mask_bt = jnp.ones((b, t), jnp.bool_) if mask_bt is None else mask_bt.astype(jnp.bool_)
  h_btd, _, (k_lbkte, v_lbkte) = _backbone(params, tokens_bt, cfg, mask_bt, None, None, keep_kv=True,
                                           last_only=last_only)
  # The prompt fills slots [0, t), as backbone with the empty cache would write them; the rest stay zero.
  fill = lambda x_bkte: jnp.pad(x_bkte.astype(cache["k"][0].dtype), ((0, 0), (0, 0), (0, length - t), (0, 0)))
  cache["k"] = tuple(fill(k_lbkte[i]) for i in range(cfg.n_layers))
  cache["v"] = tuple(fill(v_lbkte[i]) for i in range(cfg.n_layers))
  cache["mask"] = jnp.pad(mask_bt, ((0, 0), (0, length - t)))
  cache["index"] = jnp.asarray(t, jnp.int32)
  cache["lengths"] = mask_bt.sum(axis=1, dtype=jnp.int32)
  return h_btd, cache


def grow_cache(cache: Cache, length: int) -> Cache:
  """`cache` with room for `length` slots: the slots it has keep their keys, values and mask, the new ones
  are empty (zero, masked). `generate` grows its cache bucket by bucket so that each decoding step attends over
  the slots filled so far rounded up to a bucket, not over the whole prompt + max_new_tokens."""
  s = cache["mask"].shape[1]
  if length < s:
    raise ValueError(f"grow_cache: a cache of {s} slots cannot shrink to {length}")
  if length == s:
    return cache
  pad_slots = lambda x_bkse: jnp.pad(x_bkse, ((0, 0), (0, 0), (0, length - s), (0, 0)))
  return {**cache, "k": tuple(pad_slots(k) for k in cache["k"]), "v": tuple(pad_slots(v) for v in cache["v"]),
          "mask": jnp.pad(cache["mask"], ((0, 0), (0, length - s)))}


def unstack_layers(params: Params) -> Params:
  """`params` with "layers" as a tuple of per-layer dicts instead of arrays stacked along a leading axis.

  `generate` unstacks once before the prompt pass and its decoding loop: XLA:CPU would otherwise copy every
  layer's weights out of the stacked arrays at every step. Costs one copy of the layer weights while it lives.
  Adapters attached by lora.attach are merged into each layer's weights on the way (W + scale * A @ B, in
  float32, cast to W's dtype): one per-layer copy of the merged model, never a stacked one beside it.
  """
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = tuple(merge_attached_lora(jax.tree.map(lambda w, i=i: w[i], params["layers"])) for i in range(n_layers))
  return {**params, "layers": layers}


def merge_attached_lora(layer: Params) -> Params:
  """One layer's dict with its attached LoRA adapters (layer["lora"], lora.attach) merged into the weights
  (lora.merge vmaps it over the stacked layers)."""
  if "lora" not in layer:
    return layer
  out = {k: v for k, v in layer.items() if k not in ("lora", "lora_scale")}
  for name, ab in layer["lora"].items():
    a, b, w = ab["a"], ab["b"], layer[name]
    r = a.shape[-1]
    delta = (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(w.shape)
    out[name] = (w.astype(jnp.float32) + layer["lora_scale"] * delta).astype(w.dtype)
  return out


def fuse_qkv(params: Params, cfg: ModelConfig) -> Params:
  """`params` with each layer's q, k and v projections also as one weight "wqkv" [d, k, g + 2, e] (and biases
  "bqkv" [k, g + 2, e]): for each kv head, its g query heads, its key and its value. `_block` then projects
  with one matmul instead of three and gets the same q, k, v up to float rounding. Grouped by kv head so that
  a mesh sharding the heads keeps each device's q, k, v local.

  For inference: `generate` fuses its unstacked layers once before the decoding loop; the stored layout,
  checkpoints, HF import/export, LoRA targets and gradients keep the separate wq, wk, wv. Works on stacked or
  unstacked (`unstack_layers`) layers; costs one copy of the attention input weights while it lives.
  """
  g = cfg.n_heads // cfg.n_kv_heads

  def fuse(layer):
    if any(n in layer.get("lora", {}) for n in ("wq", "wk", "wv")):
      return layer  # attached adapters on q/k/v (lora.attach): the separate projections add them
    # [..., d, h, e] -> [..., d, k, g, e]: query head j belongs to kv head j // g (as in _block).
    wq = layer["wq"].reshape(*layer["wq"].shape[:-2], cfg.n_kv_heads, g, cfg.d_head)
    out = {**layer, "wqkv": jnp.concatenate([wq, layer["wk"][..., None, :], layer["wv"][..., None, :]], axis=-2)}
    if cfg.qkv_bias:
      bq = layer["bq"].reshape(*layer["bq"].shape[:-2], cfg.n_kv_heads, g, cfg.d_head)
      out["bqkv"] = jnp.concatenate([bq, layer["bk"][..., None, :], layer["bv"][..., None, :]], axis=-2)
    return out

  layers = params["layers"]
  return {**params, "layers": tuple(map(fuse, layers)) if isinstance(layers, tuple) else fuse(layers)}


def _backbone(params, tokens_bt, cfg, mask_bt, cache, dropout_rng, *, keep_kv, last_only):
  """backbone, plus (without a cache and with keep_kv) every layer's keys and values [l, b, k, t, e].
  last_only (without a cache): the hidden state of the last position only, [b, 1, d]."""
  b, t = tokens_bt.shape
  mask_bt = jnp.ones((b, t), jnp.bool_) if mask_bt is None else mask_bt.astype(jnp.bool_)
  seen_b = jnp.zeros((b,), jnp.int32) if cache is None else cache["lengths"]
  positions_bt = seen_b[:, None] + jnp.cumsum(mask_bt, axis=1, dtype=jnp.int32) - 1
  positions_bt = jnp.maximum(positions_bt, 0)

  if cache is None:
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds model.max_len={cfg.max_len}")
    causal_ts = jnp.ones((t, t), jnp.bool_)
    if cfg.causal:
      causal_ts = jnp.tril(causal_ts)
    if cfg.sliding_window:
      causal_ts &= ~jnp.tril(causal_ts, -cfg.sliding_window)  # query i sees keys i - window < j <= i
    allowed_bts = causal_ts[None] & mask_bt[:, None, :]
    write_at = None
  else:
    _check_causal_for_cache(cfg)
    s = cache["mask"].shape[1]
    if t > s:
      raise ValueError(f"{t} new tokens do not fit a KV cache of {s} positions")
    # The caller keeps index + t <= s (generate sizes its cache so); a traced index cannot be checked here.
    write_at = cache["index"]
    key_mask_bs = jax.lax.dynamic_update_slice_in_dim(cache["mask"], mask_bt, write_at, 1)
    # Query i (cache slot write_at + i) may see slots <= write_at + i that hold real tokens.
    query_slot_t1 = (write_at + jnp.arange(t))[:, None]
    causal_ts = jnp.arange(s)[None, :] <= query_slot_t1
    if cfg.sliding_window:
      # Slots stand for positions: a row's real tokens are contiguous (left padding, then decoded tokens).
      causal_ts &= jnp.arange(s)[None, :] > query_slot_t1 - cfg.sliding_window
    allowed_bts = causal_ts[None] & key_mask_bs[:, None, :]

  x_btd = params["embed"].astype(cfg.compute_dtype)[tokens_bt]
  if cfg.pos_embedding == "learned":
    x_btd = x_btd + params["pos_embed"].astype(cfg.compute_dtype)[positions_bt]
  x_btd = _constrain(x_btd, ("batch", "length", "embed"))

  layer_rngs = (None if dropout_rng is None or cfg.dropout_rate == 0.0
                else jax.random.split(dropout_rng, cfg.n_layers))

  kv = None
  if cache is None:
    unstacked = isinstance(params["layers"], tuple)  # unstack_layers' (generate's prompt pass): never scanned

    def step(x, layer, rng):
      return _block(cfg, x, layer, positions_bt, allowed_bts, None, rng, key_mask_bt=mask_bt)

    scanned = cfg.scan_layers and not unstacked
    if cfg.remat:
      # prevent_cse=False only under the scan (which already keeps XLA from merging the recomputation with the
      # forward pass); unrolled, XLA's CSE would undo the rematerialisation and keep every activation.
      step = jax.checkpoint(step, prevent_cse=not scanned, policy=_REMAT_POLICIES[cfg.remat_policy])
    if scanned:
      # One compiled block applied by lax.scan: compile time independent of depth (accelerators; on XLA:CPU the
      # unrolled loop below runs faster, see the note there).
      def scan_step(x, layer_and_rng):
        layer, rng = layer_and_rng
        x, kv_bkte = step(x, layer, rng)
        return x, kv_bkte if keep_kv else None

      x_btd, kv = jax.lax.scan(scan_step, x_btd, (params["layers"], layer_rngs))
    else:
      # Unrolled over the layers, sliced from the stacked parameters inside the jitted function (the stored
      # layout keeps its "layers" axis). Under a scan, XLA:CPU copies each layer's slice of the stacked weights
      # before the matmuls that read it, and stacks every layer's activations for the backward pass.
      kvs = []
      for i in range(cfg.n_layers):
        layer = (params["layers"][i] if unstacked
                 else jax.tree.map(lambda w, i=i: w[i], params["layers"]))
        rng = None if layer_rngs is None else layer_rngs[i]
        if last_only and i == cfg.n_layers - 1:
          x_btd, kv_bkte = _block(cfg, x_btd, layer, positions_bt, allowed_bts, None, rng, last_query_only=True)
        else:
          x_btd, kv_bkte = step(x_btd, layer, rng)
        kvs.append(kv_bkte)
      if keep_kv:
        kv = jax.tree.map(lambda *xs: jnp.stack(xs), *kvs)
  else:
    # Unrolled, with one cache array per layer. A scan would have to stack the layers' caches, and XLA:CPU
    # copies a layer's slice of a stacked array before every matmul that reads it (or, scanning over the cache
    # as xs / ys, the whole cache): at batch 64 those copies cost several times the attention itself. Each
    # layer's arrays are loop carries of the decoding loop, so the one-slot write is done in place.
    k_out, v_out = list(cache["k"]), list(cache["v"])
    layers = params["layers"]
    for i in range(cfg.n_layers):
      layer = layers[i] if isinstance(layers, tuple) else jax.tree.map(lambda w, i=i: w[i], layers)
      rng = None if layer_rngs is None else layer_rngs[i]
      x_btd, (k_out[i], v_out[i]) = _block(cfg, x_btd, layer, positions_bt, allowed_bts,
                                           (k_out[i], v_out[i], write_at), rng)
    k_out, v_out = tuple(k_out), tuple(v_out)
  if last_only:
    x_btd = x_btd[:, -1:]  # a no-op after the unrolled loop's last layer; the scanned one computed every position
  h_btd = _norm(cfg, x_btd, params, "final_norm")

  new_cache = None
  if cache is not None:
    new_cache = {
        "k": k_out,
        "v": v_out,
        "mask": key_mask_bs,
        "index": cache["index"] + t,
        "lengths": cache["lengths"] + mask_bt.sum(axis=1, dtype=jnp.int32),
    }
  return h_btd, new_cache, kv


def unembed(params: Params, h_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Logits [b, t, v] in float32."""
  w_dv = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  if cfg.compute_dtype == jnp.float32:
    logits_btv = jnp.einsum("btd,dv->btv", h_btd, w_dv.astype(cfg.compute_dtype))
  else:  # accumulated and returned in float32: log-probs and the PPO ratio need more than bfloat16's 8 bits
    logits_btv = jnp.einsum("btd,dv->btv", h_btd, w_dv.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
  return _constrain(logits_btv.astype(jnp.float32), ("batch", "length", "vocab"))


def forward(
    params: Params,
    tokens_bt: jax.Array,
    cfg: ModelConfig,
    *,
    mask_bt: jax.Array | None = None,
    cache: Cache | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, Cache | None]:
  """Next-token logits [b, t, v] (float32) and the updated cache (None without one)."""
  h_btd, cache = backbone(params, tokens_bt, cfg, mask_bt=mask_bt, cache=cache, dropout_rng=dropout_rng)
  return unembed(params, h_btd, cfg), cache


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log p(target) under softmax(logits / temperature), float32 [b, t]."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]


def response_hidden(params: Params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn,
                    cfg: ModelConfig) -> jax.Array:
  """Hidden states [b, n, d] at the positions that predict each response token (position p - 1 + i) of a
  left-padded prompt followed by its response."""
  p, n = prompt_bp.shape[1], response_bn.shape[1]
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  h_bsd, _ = backbone(params, tokens_bs, cfg, mask_bt=mask_bs)
  return h_bsd[:, p - 1:p - 1 + n]


def last_token_index(mask_bt: jax.Array) -> jax.Array:
  """Index of the last real token of each row [b] (right- or left-padded)."""
  t = mask_bt.shape[1]
  idx_bt = jnp.where(mask_bt.astype(bool), jnp.arange(t)[None, :], -1)
  return jnp.max(idx_bt, axis=1)
