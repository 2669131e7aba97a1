"""The FLOP counts behind bench/'s MFU and its attainability bounds, against independent counts.

bench/common.py's lower bounds decide whether a missed speed target is reachable on a machine at all
(bench/compare.py: "needs X% of the measured peak"), so they are checked against the model's real parameter
tree, against XLA's own cost analysis of the compiled forward pass, and against a position-by-position recount.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from rlhf_jax.models import presets, transformer


def _bench_model(size):
  sz = common.SIZES[size]
  return sz, presets.preset(size, vocab_size=sz.vocab_size, pos_embedding="learned", dropout_rate=0.0)


@pytest.mark.parametrize("size", ["small", "base"])
def test_matmul_params_match_the_model_parameter_tree(size):
  sz, cfg = _bench_model(size)
  shapes = jax.eval_shape(lambda: transformer.init(jax.random.PRNGKey(0), cfg))
  # Every weight matrix: the per-layer projections and the unembedding; embeddings and norms are not matmuls.
  n = sum(int(np.prod(x.shape)) for name, x in shapes["layers"].items() if not name.endswith("norm"))
  n += int(np.prod(shapes["unembed"].shape))
  assert sz.matmul_params() == n


@pytest.mark.parametrize("seq_len", [64, 128])
def test_min_forward_flops_is_a_tight_lower_bound_on_xla_cost_analysis(seq_len):
  sz, cfg = _bench_model("small")
  params = transformer.init(jax.random.PRNGKey(0), cfg)
  tokens = jnp.zeros((2, seq_len), jnp.int32)
  compiled = jax.jit(lambda p, t: transformer.forward(p, t, cfg)[0]).lower(params, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this backend's compiled executable reports no FLOP count")
  bound = 2 * sz.min_forward_flops(seq_len, common.causal_keys(0, seq_len), seq_len)
  # XLA counts everything the program computes (masked attention blocks, norms, GELU, softmax): never less than
  # the unavoidable matmuls, and for this model not much more.
  assert bound <= cost["flops"] <= 1.25 * bound, (bound, cost["flops"])


def test_causal_keys_counts_each_query_prefix():
  assert common.causal_keys(0, 4) == 1 + 2 + 3 + 4
  assert common.causal_keys(3, 6) == 4 + 5 + 6
  assert common.causal_keys(5, 5) == 0


def _recount_forward(sz, positions, logits_at):
  """Position by position: every layer weight twice, attention over the positions up to this one, logits."""
  layer = sum(2 * sz.d_model * k for k in (sz.d_model,) * 4) + 2 * 2 * sz.d_model * sz.d_ff
  total = 0
  for pos in positions:
    total += sz.n_layers * (layer + 2 * 2 * sz.d_model * (pos + 1))
    if pos in logits_at:
      total += 2 * sz.d_model * sz.vocab_size
  return total


def test_generate_min_flops_against_a_position_by_position_recount():
  sz = common.SIZES["small"]
  b, p, n = 3, 7, 5
  prefill = _recount_forward(sz, range(p), {p - 1})
  decode = _recount_forward(sz, range(p, p + n - 1), set(range(p, p + n - 1)))
  assert common.generate_min_flops(sz, b, p, n) == pytest.approx(b * (prefill + decode), rel=1e-12)


def test_ppo_iteration_min_flops_against_a_recount():
  st = common.Settings(ppo_batch=4, ppo_prompt_len=5, ppo_response_len=3, ppo_epochs=2)
  sz = common.SIZES[st.ppo_size]
  p, n, b = st.ppo_prompt_len, st.ppo_response_len, st.ppo_batch
  seq = range(p + n)
  rollout = b * (_recount_forward(sz, range(p), {p - 1}) + _recount_forward(sz, range(p, p + n - 1),
                                                                            set(range(p, p + n - 1))))
  policy = _recount_forward(sz, seq, set(range(p - 1, p + n - 1)))  # logits predicting the n response tokens
  scalar = _recount_forward(sz, seq, set())
  expected = rollout + b * (policy + 2 * scalar) + st.ppo_epochs * b * 3 * (policy + scalar)
  assert common.ppo_iteration_min_flops(st) == pytest.approx(expected, rel=1e-12)
