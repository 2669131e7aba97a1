"""Masked language modelling (BERT, Devlin et al., arXiv 1810.04805, sec. 3.1 "Task #1: Masked LM").

`bert_mask` draws which positions are predicted and what the encoder sees there; `masked_token_loss` is the
cross-entropy on those positions only; `mlm_loss` is both on a batch, the objective of the mlm stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.core import _f32, masked_sum
from rlhf_jax.models import heads, transformer


def bert_mask(
    rng: jax.Array,
    tokens_bt: jax.Array,
    maskable_bt: jax.Array,
    *,
    mask_id: int,
    random_low: int,
    random_high: int,
    select_rate: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
  """BERT's corruption: (inputs [b, t], selected [b, t] bool).

  Each maskable position is selected independently with probability `select_rate` (BERT: 15%). A selected
  position's input is `mask_id` with probability `mask_fraction` (80%), a token drawn uniformly from
  [random_low, random_high) with probability `random_fraction` (10%; may equal the original), else the original
  token (10%). Unselected positions keep their token. The loss is taken at the selected positions, against the
  original tokens.

  Args:
    rng: a PRNG key (the train step's fold_in(rng, step), so a resumed run draws the same masks).
    tokens_bt: [b, t] int token ids.
    maskable_bt: [b, t] which positions may be selected (real, non-special tokens).
    mask_id, random_low, random_high: the [MASK] id and the range of ordinary token ids random ones come from.
  """
  k_select, k_how, k_random = jax.random.split(rng, 3)
  selected_bt = jax.random.bernoulli(k_select, select_rate, tokens_bt.shape) & maskable_bt.astype(bool)
  u_bt = jax.random.uniform(k_how, tokens_bt.shape)
  random_bt = jax.random.randint(k_random, tokens_bt.shape, random_low, random_high, dtype=tokens_bt.dtype)
  corrupted_bt = jnp.where(u_bt < mask_fraction, jnp.asarray(mask_id, tokens_bt.dtype),
                           jnp.where(u_bt < mask_fraction + random_fraction, random_bt, tokens_bt))
  return jnp.where(selected_bt, corrupted_bt, tokens_bt), selected_bt


def masked_token_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                      selected_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-sum_t s_t log p(x_t | corrupted x) / sum_t s_t over the selected positions s (no shift: position t's
  logits predict token t). Returns (mean loss, number of selected tokens, top-1 accuracy on them), float32."""
  logp_bt = transformer.token_logprobs(logits_btv, targets_bt)
  n_tokens = jnp.sum(_f32(selected_bt))
  loss = -masked_sum(logp_bt, selected_bt) / jnp.maximum(n_tokens, 1.0)
  correct_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
  accuracy = masked_sum(_f32(correct_bt), selected_bt) / jnp.maximum(n_tokens, 1.0)
  return loss, n_tokens, accuracy


def mlm_loss(params, batch, model_cfg: transformer.ModelConfig, rng: jax.Array, *, mask_id: int,
             random_low: int, random_high: int, select_rate: float = 0.15, mask_fraction: float = 0.8,
             random_fraction: float = 0.1, dropout_rng=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`masked_token_loss` of the encoder on a next-token batch ([b, t+1] `tokens`, `mask`; the first t positions
  are used, the same t the decoder is trained on), corrupted by `bert_mask` from `rng`. Maskable: real tokens
  with ids >= random_low (BOS, EOS and the other specials are never selected, as BERT never masks [CLS]/[SEP]).
  Returns (mean loss, selected tokens, accuracy)."""
  tokens_bt = batch["tokens"][:, :-1]
  mask_bt = batch["mask"][:, :-1].astype(bool)
  inputs_bt, selected_bt = bert_mask(rng, tokens_bt, mask_bt & (tokens_bt >= random_low), mask_id=mask_id,
                                     random_low=random_low, random_high=random_high, select_rate=select_rate,
                                     mask_fraction=mask_fraction, random_fraction=random_fraction)
  logits_btv = heads.mlm_logits(params, inputs_bt, mask_bt, model_cfg, dropout_rng=dropout_rng)
  return masked_token_loss(logits_btv, tokens_bt, selected_bt)
