"""Cloze items of the world and their scoring: every item states a true fact of the world; the batched, padded
decoder and encoder scores equal a row-at-a-time NumPy log-softmax; accuracy, chance and the unigram choice
against hand counts."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from rlhf_jax import sharding, tokenizers
from rlhf_jax.evals import cloze as cloze_evals
from rlhf_jax.models import heads, transformer
from rlhf_jax.tasks import cloze
from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks.world import World

WORLD = World.generate(0, n_entities=6, n_unknown_entities=1, n_words=4)
TOK = tokenizers.ByteTokenizer()


def test_items_state_the_world_s_facts():
  items = cloze.items(WORLD)
  kinds = collections.Counter(it.kind for it in items)
  n_statements = sum(len(t) for t in lang.FACT_STATEMENTS.values())
  assert kinds["value"] == len(WORLD.entities) * n_statements
  assert kinds["prompt"] == len(WORLD.entities) * len(lang.ATTRIBUTES)
  statements = {t.format(e=e, v=WORLD.facts[e][a]) for e in WORLD.entities for a in lang.ATTRIBUTES
                for t in lang.FACT_STATEMENTS[a]}
  for it in items:
    filled = [it.prefix + c + it.suffix for c in it.candidates]
    if it.kind == "prompt":  # "Q: <question about e>\nA: <value>": the answer is e's value
      assert it.prefix.startswith("Q: ") and it.prefix.endswith("\nA:")
      task = WORLD.parse(it.prefix[len("Q: "):-len("\nA:")])  # the gold scorer's own parser
      assert (task.family, task.kind) == ("fact", it.attribute)
      assert {i for i, c in enumerate(it.candidates) if c.strip() == task.answer} == set(it.answers)
    else:  # a sentence is a true statement of the world exactly when its filler is an answer
      assert {i for i, s in enumerate(filled) if s in statements} == set(it.answers)
  assert "[MASK]" in items[0].text
  with pytest.raises(ValueError, match="cloze kinds"):
    cloze.items(WORLD, kinds=("values",))
  sub = cloze.subsample(items, 3)
  assert collections.Counter(it.kind for it in sub) == {"value": 3, "entity": 3, "prompt": 3}


def test_accuracy_chance_and_unigram_against_hand_counts():
  a = cloze.ClozeItem("value", "home", "The x lives in the", ".", (" cave", " lake", " hill"), frozenset([1]))
  b = cloze.ClozeItem("entity", "home", "The", " lives in the cave.", (" x", " y"), frozenset([0, 1]))
  counts = cloze.word_counts(["The lake, the LAKE and a cave.", "x y y"])
  assert cloze.unigram_choices([a, b], counts) == [1, 1]
  assert cloze.accuracy([a, b], [0, 1]) == {"value": 0.0, "entity": 1.0, "all": 0.5}
  np.testing.assert_allclose(cloze.chance([a, b])["all"], (1 / 3 + 1) / 2)


def _np_logp(logits):
  logits = np.asarray(logits, np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)


def test_batched_scores_equal_one_row_at_a_time():
  items = cloze.subsample(cloze.items(WORLD), 2)
  decoder = transformer.ModelConfig(vocab_size=264, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                                    max_len=64)
  encoder = transformer.ModelConfig(**{**decoder.__dict__, "causal": False})
  params = transformer.init(jax.random.PRNGKey(0), decoder)
  params = jax.tree.map(lambda x: x * 20.0 if x.ndim >= 2 else x, params)  # logits far from uniform
  mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  kw = dict(batch_size=5, mesh=mesh, rules=sharding.DEFAULT_RULES)  # padded to 6 rows, a ragged last batch
  dec = cloze_evals.score_items(jax.jit(lambda p, b: cloze_evals.decoder_scores(p, b, decoder)), params, TOK,
                                items, mask_id=None, **kw)
  enc = cloze_evals.score_items(jax.jit(lambda p, b: cloze_evals.encoder_scores(p, b, encoder)), params, TOK,
                                items, mask_id=262, **kw)
  # Reference: each row alone (batch 1, one device), LEFT-padded to one length (one compilation per model; the
  # batches above are right-padded), NumPy log-softmax, sums by hand.
  dec_fn = jax.jit(lambda p, r, m: transformer.forward(p, r, decoder, mask_bt=m)[0])
  enc_fn = jax.jit(lambda p, r, m: heads.mlm_logits(p, r, m, encoder))
  width = 64
  for it, d_scores, e_scores in zip(items, dec, enc):
    assert d_scores.shape == e_scores.shape == (len(it.candidates),)
    for j, cand in enumerate(it.candidates):
      head, ids, tail = [TOK.bos_id] + TOK.encode(it.prefix), TOK.encode(cand), TOK.encode(it.suffix)
      n, pad = len(head) + len(ids) + len(tail), width - len(head) - len(ids) - len(tail)
      row = np.zeros((1, width), np.int32)
      row[0, pad:] = head + ids + tail
      real = (np.arange(width) >= pad)[None].astype(np.int32)
      lp = _np_logp(dec_fn(params, row, real))[0]
      want_dec = sum(lp[t - 1, row[0, t]] for t in range(pad + 1, width))
      masked = row.copy()
      span = range(pad + len(head), pad + len(head) + len(ids))
      masked[0, list(span)] = 262
      lp = _np_logp(enc_fn(params, masked, real))[0]
      want_enc = sum(lp[t, row[0, t]] for t in span)
      assert n < width
      np.testing.assert_allclose(d_scores[j], want_dec, rtol=1e-4, atol=1e-3)
      np.testing.assert_allclose(e_scores[j], want_enc, rtol=1e-4, atol=1e-3)
  assert np.ptp(np.concatenate(dec)) > 1.0  # the scores tell candidates apart
  assert cloze_evals.choices([np.array([0.0, 2.0, 2.0])]) == [1]
