"""Scalar heads on the Transformer: the reward model and the value model are extra parameters plus a function,
so one backbone serves SFT, the RM and PPO.

Reward model parameters: {"backbone": transformer params, "head": {"w", "b"}, "norm": {"gain", "bias"}[, "read"]};
the score is the head read at the last real token of prompt + response (EOS), or where `read` says (`rm.score_at`:
the token before it, or the mean over the response), and `norm` (set after training) makes the scores of
SFT-policy samples mean 0, std 1. Value model parameters: {"backbone", "head"}, read at the positions
that predict each response token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


SCORE_AT = ("eos", "last", "mean")


def read_weights(score_at: str, loglik_coef: float = 0.0) -> Params:
  """Fixed (never trained: stop_gradient) weights of the three readouts a reward model's score mixes: the head at
  the last real token (`eos`: the EOS of a finished response, a position whose hidden state SFT never trains as an
  input), at the token before it (`last`: the last response token, whose state SFT trains to predict EOS), or its
  mean over the response tokens (`mean`). Kept in the parameters so that every consumer of an exported RM
  (PPO, best-of-n, the judge) reads it where it was trained to be read. loglik_coef != 0 adds a fourth,
  "loglik": that coefficient times the response's log-likelihood under the RM's own backbone and unembedding
  (`response_loglik`), so that the head learns a residual over the likelihood (rm.loglik_coef)."""
  if score_at not in SCORE_AT:
    raise ValueError(f"rm.score_at must be one of {', '.join(SCORE_AT)}, got {score_at!r}")
  read = {m: jnp.asarray(float(m == score_at), jnp.float32) for m in SCORE_AT}
  if loglik_coef:
    read["loglik"] = jnp.asarray(float(loglik_coef), jnp.float32)
  return read


def init_rm_params(rng: jax.Array, model_cfg: ModelConfig, backbone=None, score_at: str | None = "eos",
                   loglik_coef: float = 0.0) -> Params:
  """score_at=None: the layout of exports written before `read` existed (read at EOS)."""
  k1, k2 = jax.random.split(rng)
  params = {"backbone": transformer.init(k1, model_cfg) if backbone is None else backbone,
            "head": init_scalar_head(k2, model_cfg),
            "norm": {"gain": jnp.ones((), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}
  if score_at is not None:
    params["read"] = read_weights(score_at, loglik_coef)
  return params


def rm_param_axes(model_cfg: ModelConfig, with_read: bool = True, loglik: bool = False) -> Params:
  axes = {"backbone": transformer.param_axes(model_cfg), "head": scalar_head_axes(), "norm": {"gain": (), "bias": ()}}
  if with_read:
    axes["read"] = {m: () for m in (*SCORE_AT, *(("loglik",) if loglik else ()))}
  return axes


def read_scores(rm_params, r_bt: jax.Array, mask_bt: jax.Array, response_bt: jax.Array | None) -> jax.Array:
  """The score [b] from per-position head outputs [b, t]: at the last real token, or as `rm_params["read"]`
  mixes it with the token before it and the mean over the response tokens (response_bt [b, t]: True on the
  response's positions; None: every real token)."""
  at = lambda i_b: jnp.take_along_axis(r_bt, jnp.maximum(i_b, 0)[:, None], axis=1)[:, 0]
  last_b = transformer.last_token_index(mask_bt)
  if "read" not in rm_params:
    return at(last_b)
  w = jax.lax.stop_gradient(rm_params["read"])
  resp_bt = mask_bt.astype(bool) if response_bt is None else response_bt & mask_bt.astype(bool)
  n_b = jnp.maximum(resp_bt.sum(axis=1), 1).astype(jnp.float32)
  mean_b = jnp.where(resp_bt, r_bt, 0.0).sum(axis=1) / n_b
  return w["eos"] * at(last_b) + w["last"] * at(last_b - 1) + w["mean"] * mean_b


def raw_scores(rm_params, tokens_bt: jax.Array, mask_bt: jax.Array, model_cfg: ModelConfig,
               response_bt: jax.Array | None = None, *, with_hidden: bool = False):
  """Unnormalised reward [b] (`read_scores`); with_hidden: (reward, the backbone's hidden states [b, t, d])."""
  h_btd, _ = transformer.backbone(rm_params["backbone"], tokens_bt, model_cfg, mask_bt=mask_bt)
  r_b = read_scores(rm_params, scalar_head(rm_params["head"], h_btd), mask_bt, response_bt)
  if "loglik" in rm_params.get("read", {}):
    r_b = r_b + jax.lax.stop_gradient(rm_params["read"]["loglik"]) * response_loglik(
        rm_params["backbone"], h_btd, tokens_bt, mask_bt, response_bt, model_cfg)
  return (r_b, h_btd) if with_hidden else r_b


def response_loglik(backbone: Params, h_btd: jax.Array, tokens_bt: jax.Array, mask_bt: jax.Array,
                    response_bt: jax.Array | None, model_cfg: ModelConfig) -> jax.Array:
  """sum log p(token) [b] over the response's tokens (response_bt; None: every real token after the first) under
  the backbone's own next-token distribution at temperature 1, from its hidden states h_btd."""
  lp_bt = transformer.token_logprobs(transformer.unembed(backbone, h_btd, model_cfg)[:, :-1], tokens_bt[:, 1:])
  keep_bt = mask_bt[:, 1:].astype(bool)  # position i predicts token i + 1
  if response_bt is not None:
    keep_bt = keep_bt & response_bt[:, 1:]
  return jnp.where(keep_bt, lp_bt, 0.0).sum(axis=1)


def ensemble(members: Sequence[Params]) -> Params:
  """A mean ensemble of reward models of one config and parameter tree (Coste et al. 2023): {"members": each
  leaf stacked on a leading axis}; `scores` of it is the mean of the members' normalised scores."""
  if len(members) < 2:
    raise ValueError(f"an ensemble needs at least 2 reward models, got {len(members)}")
  return {"members": jax.tree.map(lambda *xs: jnp.stack(xs), *members)}


def scores(rm_params, tokens_bt, mask_bt, model_cfg: ModelConfig, response_bt=None) -> jax.Array:
  """Normalised reward [b]: gain * raw + bias (mean 0, std 1 on SFT-policy samples); of an `ensemble`, the mean
  of its members' normalised rewards."""
  if "members" in rm_params:
    member_b = jax.vmap(lambda p: scores(p, tokens_bt, mask_bt, model_cfg, response_bt))(rm_params["members"])
    return jnp.mean(member_b, axis=0)
  raw_b = raw_scores(rm_params, tokens_bt, mask_bt, model_cfg, response_bt)
  return rm_params["norm"]["gain"] * raw_b + rm_params["norm"]["bias"]


def response_scores(rm_params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn,
                    model_cfg: ModelConfig) -> jax.Array:
  """Normalised reward [b] of left-padded prompts followed by their responses."""
  tokens_bs = jnp.concatenate([prompt_bp, response_bn], axis=1)
  mask_bs = jnp.concatenate([prompt_mask_bp, response_mask_bn], axis=1)
  response_bs = jnp.arange(tokens_bs.shape[1])[None, :] >= prompt_bp.shape[1]
  return scores(rm_params, tokens_bs, mask_bs, model_cfg, response_bs)


def group_rewards(rm_params, batch, model_cfg: ModelConfig, *, with_hidden: bool = False):
  """Raw rewards [b, k] for groups of k responses: tokens [b, k, t] (prompt + response from position 0, the
  prompt `prompt_len` [b, k] tokens long) are scored as b*k sequences. with_hidden: (rewards, hidden states
  [b*k, t, d])."""
  b, k, t = batch["tokens"].shape
  response_bt = None
  if "prompt_len" in batch:
    response_bt = jnp.arange(t)[None, :] >= batch["prompt_len"].reshape(b * k, 1)
  out = raw_scores(rm_params, batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t), model_cfg,
                   response_bt, with_hidden=with_hidden)
  return (out[0].reshape(b, k), out[1]) if with_hidden else out.reshape(b, k)


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
