"""BERT masking against its specification (within 3 standard errors over many draws) and the masked-token loss
against NumPy."""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.losses import mlm
from rlhf_jax.models import heads, transformer

MASK_ID, LOW, HIGH = 3, 6, 26  # a [MASK] id outside the range random replacements come from


def _within_3se(count, n, p, what):
  se = np.sqrt(p * (1 - p) / n)
  assert abs(count / n - p) < 3 * se, f"{what}: {count / n:.4f} vs {p:.4f} (3 SE = {3 * se:.4f}, n={n})"


def test_masking_statistics_match_the_bert_specification():
  rng = np.random.default_rng(0)
  tokens_bt = rng.integers(LOW, HIGH, size=(400, 500)).astype(np.int32)
  maskable_bt = rng.random(tokens_bt.shape) < 0.9  # 10% of positions (padding, specials) must never be drawn
  inputs_bt, selected_bt = jax.jit(lambda k, t, m: mlm.bert_mask(k, t, m, mask_id=MASK_ID, random_low=LOW,
                                                                 random_high=HIGH))(
      jax.random.PRNGKey(1), tokens_bt, maskable_bt)
  inputs_bt, selected_bt = np.asarray(inputs_bt), np.asarray(selected_bt)
  assert not selected_bt[~maskable_bt].any()
  np.testing.assert_array_equal(inputs_bt[~selected_bt], tokens_bt[~selected_bt])  # unselected: untouched
  n_maskable, n_sel = int(maskable_bt.sum()), int(selected_bt.sum())
  _within_3se(n_sel, n_maskable, 0.15, "selected among maskable")
  got, orig = inputs_bt[selected_bt], tokens_bt[selected_bt]
  r = HIGH - LOW  # a random replacement equals the original with probability 1/r
  _within_3se(int((got == MASK_ID).sum()), n_sel, 0.8, "[MASK] among selected")
  _within_3se(int((got == orig).sum()), n_sel, 0.1 + 0.1 / r, "unchanged among selected")
  replaced = (got != MASK_ID) & (got != orig)
  _within_3se(int(replaced.sum()), n_sel, 0.1 * (1 - 1 / r), "random token among selected")
  # Random replacements are uniform over [LOW, HIGH): a draw that differs from the original is uniform over the
  # r - 1 other ids, so id j's share of them is mean over those positions of [orig != j] / (r - 1).
  draws, draw_orig = got[replaced], orig[replaced]
  assert draws.min() >= LOW and draws.max() < HIGH
  hist = np.bincount(draws - LOW, minlength=r)
  for j in range(r):
    expected = float(np.mean(draw_orig != LOW + j)) / (r - 1)
    _within_3se(int(hist[j]), len(draws), expected, f"random id {LOW + j}")


def test_masked_token_loss_matches_numpy():
  rng = np.random.default_rng(2)
  logits_btv = rng.normal(size=(3, 7, 11)).astype(np.float32)
  targets_bt = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
  selected_bt = rng.random((3, 7)) < 0.4
  loss, n, acc = jax.jit(mlm.masked_token_loss)(logits_btv, targets_bt, selected_bt)
  logp = logits_btv - np.log(np.exp(logits_btv).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets_bt[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[selected_bt].mean(), rtol=1e-5)
  assert float(n) == selected_bt.sum()
  np.testing.assert_allclose(float(acc), (logits_btv.argmax(-1) == targets_bt)[selected_bt].mean(), rtol=1e-6)
  empty, n0, _ = jax.jit(mlm.masked_token_loss)(logits_btv, targets_bt, np.zeros((3, 7), bool))
  assert float(empty) == 0.0 and float(n0) == 0.0


def test_mlm_loss_scores_the_original_tokens_at_the_selected_positions_only():
  cfg = transformer.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                                max_len=16, causal=False)
  params = transformer.init(jax.random.PRNGKey(0), cfg)
  rng = np.random.default_rng(3)
  tokens = rng.integers(LOW, 32, size=(4, 13)).astype(np.int32)
  tokens[:, 0] = 1  # BOS: a special, never selected
  mask = np.ones_like(tokens)
  mask[3, 9:] = 0  # padding, never selected
  batch = {"tokens": tokens, "mask": mask}
  key = jax.random.PRNGKey(5)
  kw = dict(mask_id=MASK_ID, random_low=LOW, random_high=32, select_rate=0.5)
  loss, n, _ = jax.jit(lambda p, b, k: mlm.mlm_loss(p, b, cfg, k, **kw))(params, batch, key)
  # Reference: the same draw, the encoder's logits on the corrupted row, NumPy cross-entropy on the originals.
  t_bt, m_bt = tokens[:, :-1], mask[:, :-1].astype(bool)
  inputs, selected = jax.jit(lambda k, t, m: mlm.bert_mask(k, t, m, **kw))(key, t_bt, m_bt & (t_bt >= LOW))
  selected = np.asarray(selected)
  assert selected.any() and not selected[:, 0].any() and not selected[~m_bt].any()
  logits = np.asarray(jax.jit(heads.mlm_logits, static_argnums=3)(params, inputs, m_bt, cfg), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, t_bt[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[selected].mean(), rtol=1e-5)
  assert float(n) == selected.sum()
