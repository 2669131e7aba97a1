"""Language modelling: pretraining, SFT and the PPO-ptx term."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.core import _f32, masked_sum
from rlhf_jax.models import transformer

# ----------------------------------------------------------------------------------------------------------
# Language modelling: pretraining, SFT and the PPO-ptx term.


def next_token_loss(
    logits_btv: jax.Array, targets_bt: jax.Array, loss_mask_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Masked mean cross-entropy  -sum_t m_t log p(y_t) / sum_t m_t.

  Args:
    logits_btv: [b, t, v] logits; position t predicts targets_bt[:, t] (the caller shifts).
    targets_bt: [b, t] int token ids.
    loss_mask_bt: [b, t] 1 for tokens that count (SFT: response tokens only).

  Returns:
    (mean_loss, n_tokens): the mean over counted tokens (0 when none count) and their number, float32, so
    that losses of several microbatches can be recombined as a token-weighted mean.
  """
  logp_bt = transformer.token_logprobs(logits_btv, targets_bt)
  n_tokens = jnp.sum(_f32(loss_mask_bt))
  return -masked_sum(logp_bt, loss_mask_bt) / jnp.maximum(n_tokens, 1.0), n_tokens


# The PPO-ptx pretraining term is the plain language-modelling loss on pretraining text (see module docstring).
ptx_loss = next_token_loss


def lm_loss(params, batch, model_cfg: transformer.ModelConfig, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
  """`next_token_loss` of the model on a batch of [b, t+1] `tokens`, `mask` and `loss_mask` (shifted here):
  the objective of pretraining, SFT and PPO-ptx. Returns (mean loss, counted tokens)."""
  inputs_bt = batch["tokens"][:, :-1]
  targets_bt = batch["tokens"][:, 1:]
  logits_btv, _ = transformer.forward(params, inputs_bt, model_cfg, mask_bt=batch["mask"][:, :-1],
                                      dropout_rng=dropout_rng)
  return next_token_loss(logits_btv, targets_bt, batch["loss_mask"][:, 1:])
