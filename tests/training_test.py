"""The next-token objective: loss only on real targets (padding never counts), checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses
from rlhf_jax.evals import lm as lm_evals
from rlhf_jax.models import presets, transformer

CFG = presets.preset("tiny", vocab_size=40, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1, max_len=32)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, size=(3, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, 8:] = 0  # right padding
  mask[2, 5:] = 0
  tokens[mask == 0] = 0
  loss_mask = mask.copy()
  loss_mask[:, 0] = 0  # the first token is never a target
  loss_mask[1, :4] = 0  # e.g. a prompt in SFT: not learned
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def test_lm_loss_counts_only_masked_targets_against_numpy():
  params = transformer.init(jax.random.PRNGKey(0), CFG)
  batch = _batch()
  loss, n = losses.lm_loss(params, jax.tree.map(jnp.asarray, batch), CFG)
  logits, _ = transformer.forward(params, jnp.asarray(batch["tokens"][:, :-1]), CFG,
                                  mask_bt=jnp.asarray(batch["mask"][:, :-1]))
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  targets = batch["tokens"][:, 1:]
  lm = batch["loss_mask"][:, 1:].astype(bool)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert int(n) == lm.sum()
  np.testing.assert_allclose(float(loss), nll[lm].mean(), rtol=1e-5)


def test_padding_content_never_changes_the_loss():
  params = transformer.init(jax.random.PRNGKey(1), CFG)
  batch = _batch()
  other = {k: v.copy() for k, v in batch.items()}
  other["tokens"][batch["mask"] == 0] = 7  # garbage under the padding
  a, _ = losses.lm_loss(params, jax.tree.map(jnp.asarray, batch), CFG)
  b, _ = losses.lm_loss(params, jax.tree.map(jnp.asarray, other), CFG)
  assert float(a) == float(b)
  # ...while changing a real target does change it.
  other = {k: v.copy() for k, v in batch.items()}
  other["tokens"][1, 6] = (other["tokens"][1, 6] + 1) % CFG.vocab_size
  c, _ = losses.lm_loss(params, jax.tree.map(jnp.asarray, other), CFG)
  assert float(c) != float(a)


def test_unigram_entropy_against_numpy():
  batch = _batch()
  toks = batch["tokens"][batch["loss_mask"].astype(bool)]
  _, counts = np.unique(toks, return_counts=True)
  p = counts / counts.sum()
  assert abs(lm_evals.unigram_entropy(iter([batch])) - float(-(p * np.log(p)).sum())) < 1e-12
