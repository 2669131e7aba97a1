"""Scalar heads on the Transformer: the reward model and the value model are extra parameters plus a function,
so one backbone serves SFT, the RM and PPO.

Reward model parameters: {"backbone": transformer params, "head": {"w", "b"}, "norm": {"gain", "bias"}}; the
score is the head read at the last real token of prompt + response, and `norm` (set after training) makes the
scores of SFT-policy samples mean 0, std 1. Value model parameters: {"backbone", "head"}, read at the positions
that predict each response token.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models import transformer
from rlhf_jax.models.transformer import ModelConfig

Params = dict[str, Any]


def init_scalar_head(rng: jax.Array, cfg: ModelConfig, *, zero: bool = False) -> Params:
  """A linear map d_model -> 1. Reward heads: std 1/sqrt(d+1) (Ziegler et al.); value heads: zero, so the
  first value estimates are exactly 0."""
  if zero:
    w = jnp.zeros((cfg.d_model,), jnp.float32)
  else:
    w = jax.random.normal(rng, (cfg.d_model,), jnp.float32) / math.sqrt(cfg.d_model + 1)
  return {"w": w, "b": jnp.zeros((), jnp.float32)}


def scalar_head_axes() -> Params:
  return {"w": ("embed",), "b": ()}


def scalar_head(head: Params, h_btd: jax.Array) -> jax.Array:
  """Per-position scalar, float32: [b, t, d] -> [b, t]."""
  return jnp.einsum("btd,d->bt", h_btd.astype(jnp.float32), head["w"]) + head["b"]


# ----------------------------------------------------------------------------------------------------------
# The reward model: the reward is read at the last real token of prompt + response.


def init_rm_params(rng: jax.Array, model_cfg: ModelConfig, backbone=None) -> Params:
  k1, k2 = jax.random.split(rng)
  return {"backbone": transformer.init(k1, model_cfg) if backbone is None else backbone,
          "head": init_scalar_head(k2, model_cfg),
          "norm": {"gain": jnp.ones((), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}


def rm_param_axes(model_cfg: ModelConfig) -> Params:
  return {"backbone": transformer.param_axes(model_cfg), "head": scalar_head_axes(),
          "norm": {"gain": (), "bias": ()}}


def raw_scores(rm_params, tokens_bt: jax.Array, mask_bt: jax.Array, model_cfg: ModelConfig) -> jax.Array:
  """Unnormalised reward [b]: the scalar head at each row's last real token."""
  h_btd, _ = transformer.backbone(rm_params["backbone"], tokens_bt, model_cfg, mask_bt=mask_bt)
  r_bt = scalar_head(rm_params["head"], h_btd)
  last_b = transformer.last_token_index(mask_bt)
  return jnp.take_along_axis(r_bt, jnp.maximum(last_b, 0)[:, None], axis=1)[:, 0]


def scores(rm_params, tokens_bt, mask_bt, model_cfg: ModelConfig) -> jax.Array:
  """Normalised reward [b]: gain * raw + bias (mean 0, std 1 on SFT-policy samples)."""
  return rm_params["norm"]["gain"] * raw_scores(rm_params, tokens_bt, mask_bt, model_cfg) + rm_params["norm"]["bias"]


def response_scores(rm_params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn,
                    model_cfg: ModelConfig) -> jax.Array:
  """Normalised reward [b] of left-padded prompts followed by their responses."""
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  return scores(rm_params, tokens_bs, mask_bs, model_cfg)


def group_rewards(rm_params, batch, model_cfg: ModelConfig) -> jax.Array:
  """Raw rewards [b, k] for groups of k responses: tokens [b, k, t] are scored as b*k sequences."""
  b, k, t = batch["tokens"].shape
  r = raw_scores(rm_params, batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t), model_cfg)
  return r.reshape(b, k)


# ----------------------------------------------------------------------------------------------------------
# The masked-LM head of a bidirectional encoder (model.causal=False; rlhf_jax/stages/mlm.py).


def mlm_logits(params: Params, tokens_bt: jax.Array, mask_bt: jax.Array, cfg: ModelConfig,
               dropout_rng: jax.Array | None = None) -> jax.Array:
  """Logits [b, t, v] (float32) for the token AT each position (not the next one), given the whole row.

  The head is the backbone's own unembedding (tied to the embedding when cfg.tie_embeddings): BERT adds a
  dense + LayerNorm transform before it; leaving it out keeps the encoder's parameter count equal to the
  decoder's, which the cloze comparison needs.
  """
  if cfg.causal:
    raise ValueError("mlm_logits needs a bidirectional encoder (model.causal=False); a causal model cannot see "
                     "the context right of a masked token")
  h_btd, _ = transformer.backbone(params, tokens_bt, cfg, mask_bt=mask_bt, dropout_rng=dropout_rng)
  return transformer.unembed(params, h_btd, cfg)


# ----------------------------------------------------------------------------------------------------------
# The value model: V(state before each response token).


def value_axes(cfg: ModelConfig) -> Params:
  return {"backbone": transformer.param_axes(cfg), "head": scalar_head_axes()}


def value_estimates(value_params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn,
                    cfg: ModelConfig) -> jax.Array:
  """V(state before each response token) [b, n] from the value model's backbone and head; 0 off the mask."""
  if not cfg.causal:  # a value estimate must not see the tokens it is the baseline for
    raise ValueError("the value model's backbone is a bidirectional encoder (model.causal=False, e.g. a reward "
                     "model with rm.backbone='encoder'); its value at a token would see the later tokens. "
                     "Start the value model from the policy instead (ppo.value_init)")
  h_bnd = transformer.response_hidden(value_params["backbone"], prompt_bp, prompt_mask_bp, response_bn,
                                      response_mask_bn, cfg)
  return jnp.where(response_mask_bn, scalar_head(value_params["head"], h_bnd), 0.0)


def init_value_params(rng: jax.Array, cfg: ModelConfig, backbone=None) -> Params:
  """A value model: a backbone (fresh, or given) and a zero head, so the first value estimates are exactly 0."""
  return {"backbone": transformer.init(rng, cfg) if backbone is None else backbone,
          "head": init_scalar_head(rng, cfg, zero=True)}
