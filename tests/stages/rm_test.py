"""Reward-model data arrangement and loss: grouped (InstructGPT) vs shuffled pairs, normalisation, metrics."""

import copy
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from rlhf_jax import configs, feedback, losses, runtime, sharding, tokenizers, training
from rlhf_jax.data import comparisons
from rlhf_jax.evals import rm as rm_evals
from rlhf_jax.models import heads, hf, presets, transformer
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.tasks import suite

from helpers import experiments

CFG = presets.preset("tiny", vocab_size=264, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1, max_len=64)
TOK = tokenizers.ByteTokenizer()


def _records():
  rng = np.random.default_rng(0)
  recs = []
  for i, k in enumerate([4, 6, 9, 2, 5]):
    ranks = rng.integers(0, k, size=k).tolist()  # ties allowed
    if len(set(ranks)) == 1:
      ranks[0] = ranks[0] + 1
    recs.append({"prompt_turns": [{"role": "user", "content": f"question {i}?"}],
                 "responses": [f"answer {i}.{j}" + "!" * j for j in range(k)], "ranks": ranks,
                 "gold_scores": rng.normal(size=k).tolist()})
  return recs


def test_grouped_and_pairs_give_the_same_loss_when_weighted_alike():
  comps, _ = comparisons.tokenize_comparisons(_records(), TOK, seq_len=48, too_long="error", source="test")
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG)
  k = max(len(c.ranks) for c in comps)

  grouped = comparisons.make_groups(comps, grouping="prompt", pair_weighting="uniform")
  gb = comparisons.group_batch(comps, grouped, k=k, seq_len=48, pad_id=TOK.pad_id)
  r_grouped = heads.group_rewards(params, gb, CFG)
  loss_grouped, _ = losses.ranking_loss(r_grouped, gb["ranks"], gb["valid"], weights_b=gb["weight"])

  pairs = comparisons.make_groups(comps, grouping="pairs", pair_weighting="per_prompt")
  perm = np.random.default_rng(1).permutation(len(pairs))  # shuffled, as the ablation trains
  pb = comparisons.group_batch(comps, [pairs[i] for i in perm], k=2, seq_len=48, pad_id=TOK.pad_id)
  r_pairs = heads.group_rewards(params, pb, CFG)
  loss_pairs, _ = losses.ranking_loss(r_pairs, pb["ranks"], pb["valid"], weights_b=pb["weight"])
  np.testing.assert_allclose(float(loss_grouped), float(loss_pairs), rtol=1e-5)

  # Independent reference: per prompt, the mean over strict pairs of -log sigmoid(r_w - r_l), then the mean.
  per_prompt = []
  for row, c in enumerate(comps):
    r = np.asarray(r_grouped[row])
    terms = [np.log1p(np.exp(-(r[a] - r[b]) if c.ranks[a] < c.ranks[b] else -(r[b] - r[a])))
             for a, b in itertools.combinations(range(len(c.ranks)), 2) if c.ranks[a] != c.ranks[b]]
    per_prompt.append(np.mean(terms))
  np.testing.assert_allclose(float(loss_grouped), np.mean(per_prompt), rtol=1e-5)

  # Uniform pair weights (the InstructGPT baseline) are a different objective on ragged K.
  pu = comparisons.group_batch(comps, comparisons.make_groups(comps, grouping="pairs", pair_weighting="uniform"), k=2,
                          seq_len=48, pad_id=TOK.pad_id)
  loss_uniform, _ = losses.ranking_loss(heads.group_rewards(params, pu, CFG), pu["ranks"], pu["valid"],
                                        weights_b=pu["weight"])
  assert abs(float(loss_uniform) - float(loss_grouped)) > 1e-6


def test_reward_is_read_at_the_last_real_token():
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG)
  toks = jnp.array([[1, 10, 11, 12, 0, 0], [1, 10, 11, 12, 13, 2]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  r = heads.raw_scores(params, toks, mask, CFG)
  h, _ = transformer.backbone(params["backbone"], toks, CFG, mask_bt=mask)
  expect = [float(heads.scalar_head(params["head"], h)[0, 3]), float(heads.scalar_head(params["head"], h)[1, 5])]
  np.testing.assert_allclose(np.asarray(r), expect, rtol=1e-5)
  # Reward head initialised with std 1/sqrt(d+1) (Ziegler et al.): check the scale on a bigger head.
  w = heads.init_scalar_head(jax.random.PRNGKey(3), presets.preset("small", vocab_size=264))["w"]
  assert abs(float(jnp.std(w)) * np.sqrt(128 + 1) - 1.0) < 0.2


def test_pair_metrics_against_hand_counts():
  comps = [comparisons.Comparison([1], [[5, 2], [6, 2], [7, 2]], [0, 1, 2], gold=[1.0, 0.0, 0.9])]
  rewards = [np.array([0.5, 0.7, -1.0])]
  m = rm_evals.pair_metrics(comps, rewards, clear_gold_margin=0.5)
  # labeler pairs: (0>1) wrong, (0>2) right, (1>2) right
  assert m["val_accuracy"] == pytest.approx(2 / 3)
  # clear gold pairs (|diff| > 0.5): (0,1) gold 0>1, rm says 1>0 -> wrong; (1,2) gold 2>1, rm 1>2 -> wrong
  assert m["val_gold_accuracy_clear"] == pytest.approx(0.0)
  # gold vs labeler on labeler pairs: (0>1) yes, (0>2) yes, (1>2) no
  assert m["gold_ceiling_accuracy"] == pytest.approx(2 / 3)
  # Ties: equal gold scores (the gold scorer has no preference) and equal rewards count one half.
  tied = [comparisons.Comparison([1], [[5, 2], [6, 2], [7, 2]], [0, 1, 2], gold=[0.5, 0.5, -1.0])]
  m = rm_evals.pair_metrics(tied, [np.array([0.3, 0.3, 0.9])], clear_gold_margin=0.5)
  assert m["val_accuracy"] == pytest.approx((0.5 + 0 + 0) / 3)
  assert m["gold_ceiling_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
  assert m["val_gold_accuracy_clear"] == pytest.approx(0.0)  # (0,2) and (1,2): the RM ranks 2 first


def test_clear_accuracy_by_group_against_hand_counts():
  c = lambda gold: comparisons.Comparison([1], [[5, 2], [6, 2], [7, 2]], [0, 1, 2], gold=gold)
  comps = [c([1.0, 0.0, -1.0]), c([0.0, 1.0, 0.2]), c([0.1, 0.0, 0.2])]
  rewards = [np.array([3.0, 2.0, 1.0]), np.array([0.0, -1.0, 1.0]), np.array([0.0, 1.0, 2.0])]
  m = rm_evals.clear_accuracy_by_group(comps, rewards, ["fact", "fact", "string"], clear_gold_margin=0.5)
  # fact, first: clear pairs (0,1) (0,2) (1,2), all ordered right. second: (0,1) gold 1>0, rm 0>1 wrong;
  # (1,2) gold 1>2, rm 2>1 wrong; (0,2) differs by 0.2, not clear. 3 right of 5.
  assert m["fact.val_gold_accuracy_clear"] == pytest.approx(3 / 5)
  assert m["fact.val_gold_pairs_clear"] == 5
  assert "string.val_gold_accuracy_clear" not in m  # no pair differs by more than the margin
  with pytest.raises(ValueError, match="2 groups for 3 comparisons"):
    rm_evals.clear_accuracy_by_group(comps, rewards, ["fact", "fact"], clear_gold_margin=0.5)


def test_suite_families_parse_the_prompts_the_suite_generated():
  config = experiments.config("instructgpt", "tiny")
  splits, _ = suite.generate(config.seed, suite.DataConfig.from_config(config.data))
  records = splits["comparisons_val"]
  stored = [r["family"] for r in records]
  assert len(set(stored)) >= 3
  # Policy comparisons carry only the prompt: the family comes from parsing it with the same world.
  parsed = feedback.suite_families(config, "unused", [{k: v for k, v in r.items() if k != "family"} for r in records])
  assert parsed == stored
  config.rm.source = "file"  # a user's rankings: no suite families
  assert feedback.suite_families(config, "unused", records) is None


@pytest.mark.parametrize("bad,match", [
    ({"responses": ["only one"], "ranks": [0]}, "at least 2 responses"),
    ({"responses": ["a", "b"], "ranks": [0]}, "one rank each"),
    ({"responses": ["a", "  "], "ranks": [0, 1]}, r"'responses\[1\]' is empty"),
])
def test_bad_comparisons_name_record_and_field(bad, match):
  rec = {"prompt_turns": [{"role": "user", "content": "q?"}], **bad}
  with pytest.raises(ValueError, match=match):
    comparisons.tokenize_comparisons([rec], TOK, seq_len=48, too_long="error", source="file.jsonl")


def test_too_long_truncates_prompt_or_raises():
  rec = {"prompt_turns": [{"role": "user", "content": "x" * 60}], "responses": ["ok", "no"], "ranks": [0, 1]}
  with pytest.raises(ValueError, match="longer than rm.seq_len=32"):
    comparisons.tokenize_comparisons([rec], TOK, seq_len=32, too_long="error", source="f")
  comps, n = comparisons.tokenize_comparisons([rec], TOK, seq_len=32, too_long="truncate", source="f")
  assert n == 1 and len(comps[0].prompt_ids) + len(comps[0].response_ids[0]) <= 32
  assert comps[0].prompt_ids[0] == TOK.bos_id and comps[0].prompt_ids[-1] == TOK.assistant_id


def test_length_buckets_cut_the_padding_and_keep_the_scores():
  comps, _ = comparisons.tokenize_comparisons(_records(), TOK, seq_len=64, too_long="error", source="test")
  groups = comparisons.make_groups(comps, grouping="prompt", pair_weighting="uniform")
  k = max(len(c.ranks) for c in comps)
  longest = max(len(c.prompt_ids) + len(r) for c in comps for r in c.response_ids)
  assert comparisons.bucketed_len(comps, groups, seq_len=64, bucket=16) == 16 * int(np.ceil(longest / 16))
  assert comparisons.bucketed_len(comps, groups, seq_len=64, bucket=0) == 64
  assert comparisons.bucketed_len(comps, groups, seq_len=longest - 1 + 16, bucket=1000) == longest - 1 + 16

  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG)
  full = heads.group_rewards(params, comparisons.group_batch(comps, groups, k=k, seq_len=64, pad_id=TOK.pad_id), CFG)
  it = comparisons.GroupIterator(comps, groups, batch_size=len(groups), k=k, seq_len=64, pad_id=TOK.pad_id, seed=0,
                            length_bucket=16)
  batch = next(it)
  assert batch["tokens"].shape[-1] < 64
  # The iterator shuffles: its rows are the groups in its first epoch's order.
  order = it._order()  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(heads.group_rewards(params, batch, CFG)), np.asarray(full)[order],
                             rtol=1e-5, atol=1e-6)


def test_response_logprobs_sum_the_response_tokens_of_each_sequence():
  comps, _ = comparisons.tokenize_comparisons(_records(), TOK, seq_len=64, too_long="error", source="test")
  groups = comparisons.make_groups(comps, grouping="prompt", pair_weighting="uniform")
  k = max(len(c.ranks) for c in comps)
  params = transformer.init(jax.random.PRNGKey(1), CFG)
  batch = comparisons.group_batch(comps, groups, k=k, seq_len=64, pad_id=TOK.pad_id)
  got = np.asarray(rm_evals.response_logprobs(params, batch, CFG, 0.7))
  for row, (ci, idx, _) in enumerate(groups[:1]):  # 4 sequences of different lengths
    c = comps[ci]
    seqs = [c.prompt_ids + c.response_ids[r] for r in idx]
    # No padding before a sequence's tokens (the batch left-pads): each starts at position 0, its end padded
    # with token 0, which a causal model's earlier positions never see; one jitted call for all of them.
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    for j, seq in enumerate(seqs):
      tokens[j, :len(seq)] = seq
    logits = np.asarray(jax.jit(transformer.forward, static_argnames="cfg")(params, jnp.asarray(tokens), cfg=CFG)[0])
    for j, seq in enumerate(seqs):
      logp = jax.nn.log_softmax(np.asarray(logits[j], np.float64) / 0.7, axis=-1)
      want = sum(logp[i - 1, seq[i]] for i in range(len(c.prompt_ids), len(seq)))
      np.testing.assert_allclose(got[row, j], want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Where the score is read (rm.score_at) and the auxiliary LM loss (rm.lm_coef): issue #21 item 6.


def _group_batch():
  comps, _ = comparisons.tokenize_comparisons(_records(), TOK, seq_len=48, too_long="error", source="test")
  k = max(len(c.ranks) for c in comps)
  groups = comparisons.make_groups(comps, grouping="prompt", pair_weighting="uniform")
  return comps, comparisons.group_batch(comps, groups, k=k, seq_len=48, pad_id=TOK.pad_id)


@pytest.mark.parametrize("score_at", heads.SCORE_AT)
def test_score_at_reads_eos_last_or_mean_against_numpy(score_at):
  comps, gb = _group_batch()
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG, score_at=score_at)
  r_bk = np.asarray(heads.group_rewards(params, gb, CFG))
  b, k, t = gb["tokens"].shape
  h, _ = transformer.backbone(params["backbone"], gb["tokens"].reshape(b * k, t), CFG,
                              mask_bt=gb["mask"].reshape(b * k, t))
  per_pos = np.asarray(h, np.float64) @ np.asarray(params["head"]["w"], np.float64) + float(params["head"]["b"])
  per_pos = per_pos.reshape(b, k, t)
  for row, c in enumerate(comps):
    for j in range(len(c.ranks)):
      p, n = len(c.prompt_ids), len(c.response_ids[j])  # the response ends with EOS at position p + n - 1
      expect = {"eos": per_pos[row, j, p + n - 1], "last": per_pos[row, j, p + n - 2],
                "mean": per_pos[row, j, p:p + n].mean()}[score_at]
      np.testing.assert_allclose(r_bk[row, j], expect, rtol=1e-4, atol=1e-5)
  # The rollout's left-padded layout reads the same positions: response_scores of the first response.
  c = comps[0]
  pad = 3
  prompt_bp = jnp.asarray([[TOK.pad_id] * pad + list(c.prompt_ids)], jnp.int32)
  prompt_mask_bp = jnp.asarray([[0] * pad + [1] * len(c.prompt_ids)], bool)
  resp = list(c.response_ids[0])
  response_bn = jnp.asarray([resp + [TOK.pad_id] * 2], jnp.int32)
  response_mask_bn = jnp.asarray([[1] * len(resp) + [0] * 2], bool)
  left = heads.response_scores(params, prompt_bp, prompt_mask_bp, response_bn, response_mask_bn, CFG)
  normed = float(params["norm"]["gain"]) * r_bk[0, 0] + float(params["norm"]["bias"])
  np.testing.assert_allclose(float(left[0]), normed, rtol=1e-4, atol=1e-5)


def test_read_weights_are_not_trained_and_bad_score_at_is_named():
  _, gb = _group_batch()
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG, score_at="mean")
  grads = jax.grad(lambda p: heads.group_rewards(p, gb, CFG).sum())(params)
  assert all(float(g) == 0.0 for g in jax.tree.leaves(grads["read"]))
  assert float(jnp.abs(grads["head"]["w"]).sum()) > 0
  with pytest.raises(ValueError, match="rm.score_at"):
    heads.read_weights("middle")


def test_lm_coef_adds_the_response_next_token_loss_against_numpy():
  comps, gb = _group_batch()
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG)
  batch = {key: jnp.asarray(v) for key, v in gb.items()}
  base, _ = rm_stage.ranking_loss_fn(CFG)(params, batch, None)
  with_lm, m = rm_stage.ranking_loss_fn(CFG, lm_coef=0.5)(params, batch, None)
  # Reference: the model's log-softmax over each response token given everything before it, in NumPy.
  h, _ = transformer.backbone(params["backbone"], gb["tokens"].reshape(-1, gb["tokens"].shape[-1]), CFG,
                              mask_bt=gb["mask"].reshape(-1, gb["mask"].shape[-1]))
  logits = np.asarray(transformer.unembed(params["backbone"], h, CFG), np.float64)
  k = gb["tokens"].shape[1]
  nll = []
  for row, c in enumerate(comps):
    for j in range(len(c.ranks)):
      lg = logits[row * k + j]
      ids = list(c.prompt_ids) + list(c.response_ids[j])
      for pos in range(len(c.prompt_ids), len(ids)):  # every response token, EOS included
        z = lg[pos - 1]
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[pos]])
  np.testing.assert_allclose(float(m["lm_loss"]), np.mean(nll), rtol=1e-4)
  np.testing.assert_allclose(float(with_lm), float(base) + 0.5 * np.mean(nll), rtol=1e-4)


def test_loglik_coef_adds_the_response_log_likelihood_against_numpy(tmp_path):
  # rm.loglik_coef: the score is the head's plus c x sum log p(response token) under the RM's own backbone; the
  # coefficient is not trained but the backbone gets its gradient; exports keep it and read at EOS.
  comps, gb = _group_batch()
  plain = heads.init_rm_params(jax.random.PRNGKey(0), CFG)
  params = heads.init_rm_params(jax.random.PRNGKey(0), CFG, loglik_coef=2.0)
  assert "loglik" not in plain["read"] and float(params["read"]["loglik"]) == 2.0
  r_plain, r = (np.asarray(heads.group_rewards(p, gb, CFG)) for p in (plain, params))
  k = gb["tokens"].shape[1]
  h, _ = transformer.backbone(params["backbone"], gb["tokens"].reshape(-1, gb["tokens"].shape[-1]), CFG,
                              mask_bt=gb["mask"].reshape(-1, gb["mask"].shape[-1]))
  logits = np.asarray(transformer.unembed(params["backbone"], h, CFG), np.float64)
  for row, c in enumerate(comps):
    for j in range(len(c.ranks)):
      lg, ids = logits[row * k + j], list(c.prompt_ids) + list(c.response_ids[j])
      ll = sum(lg[pos - 1][ids[pos]] - np.log(np.exp(lg[pos - 1] - lg[pos - 1].max()).sum()) - lg[pos - 1].max()
               for pos in range(len(c.prompt_ids), len(ids)))  # every response token, EOS included
      np.testing.assert_allclose(r[row, j], r_plain[row, j] + 2.0 * ll, rtol=1e-4, atol=1e-4)
  # PPO's reward reads the rollout's left-padded layout: the same log-likelihood term over the same tokens.
  c, pad = comps[0], 3
  resp = list(c.response_ids[0])
  left = heads.response_scores(params, jnp.asarray([[TOK.pad_id] * pad + list(c.prompt_ids)], jnp.int32),
                               jnp.asarray([[0] * pad + [1] * len(c.prompt_ids)], bool),
                               jnp.asarray([resp + [TOK.pad_id] * 2], jnp.int32),
                               jnp.asarray([[1] * len(resp) + [0] * 2], bool), CFG)
  normed = float(params["norm"]["gain"]) * r[0, 0] + float(params["norm"]["bias"])
  np.testing.assert_allclose(float(left[0]), normed, rtol=1e-4, atol=1e-4)
  grads = jax.grad(lambda p: heads.group_rewards(p, gb, CFG).sum())(params)
  assert float(grads["read"]["loglik"]) == 0.0
  emb = "embed" if CFG.tie_embeddings else "unembed"
  g_plain = jax.grad(lambda p: heads.group_rewards(p, gb, CFG).sum())(plain)
  assert float(jnp.abs(grads["backbone"][emb] - g_plain["backbone"][emb]).sum()) > 0
  # Exported and loaded: the same scores, the manifest names its readout (EOS, though 2.0 > 1.0) and coefficient.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  training.export_params(str(tmp_path / "ll"), params, model_cfg=CFG, kind="reward_model")
  loaded, cfg, manifest = training.load_export(str(tmp_path / "ll"), mesh, sharding.DEFAULT_RULES)
  assert manifest["score_at"] == "eos" and manifest["loglik_coef"] == 2.0
  np.testing.assert_allclose(np.asarray(heads.group_rewards(loaded, gb, cfg)), r, rtol=1e-6)
  with pytest.raises(ValueError, match="rm.loglik_coef"):  # transformers' classifier has no such term
    hf.save_hf(loaded, CFG, str(tmp_path / "hf"), kind="reward", pad_token_id=TOK.pad_id)
  c = configs.base_config()
  rm_stage.check(c)
  c.rm.loglik_coef = -1.0
  with pytest.raises(ValueError, match="rm.loglik_coef=-1.0: expected >= 0"):
    rm_stage.check(c)
  c.rm.loglik_coef, c.rm.backbone = 1.0, "encoder"
  with pytest.raises(ValueError, match="0 with rm.backbone='encoder'"):
    rm_stage.check(c)


def test_reward_model_exports_load_with_and_without_read(tmp_path):
  # An export written before rm.score_at (no "read") still loads, read at EOS; a "mean" one keeps its readout.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, gb = _group_batch()
  for name, score_at in (("old", None), ("mean", "mean")):
    params = heads.init_rm_params(jax.random.PRNGKey(1), CFG, score_at=score_at)
    training.export_params(str(tmp_path / name), params, model_cfg=CFG, kind="reward_model")
    loaded, cfg, manifest = training.load_export(str(tmp_path / name), mesh, sharding.DEFAULT_RULES)
    assert manifest.get("score_at") == score_at and ("read" in loaded) == (score_at is not None)
    np.testing.assert_allclose(np.asarray(heads.group_rewards(loaded, gb, cfg)),
                               np.asarray(heads.group_rewards(params, gb, CFG)), rtol=1e-6)
  with pytest.raises(ValueError, match="score_at"):  # transformers' classifier reads the last token only
    hf.save_hf(loaded, CFG, str(tmp_path / "hf"), kind="reward", pad_token_id=TOK.pad_id)
  # An ensemble's members must share the parameter tree: an EOS-only export beside a "mean" one is named.
  with pytest.raises(ValueError, match="'mean' is not the same kind of reward model as 'old'"):
    runtime.load_reward_models(str(tmp_path), ["old", "mean"], mesh, sharding.DEFAULT_RULES, field="ppo.rm_ensemble")


def test_a_mean_ensemble_scores_the_mean_of_its_members_normalised_scores(tmp_path):
  """heads.ensemble (ppo.rm_ensemble, Coste et al. 2023): the mean over members of gain * raw + bias, each
  member scored alone; loaded from exports by runtime.load_reward_models, the first member kept apart."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  comps, gb = _group_batch()
  members = []
  for i in range(3):
    params = heads.init_rm_params(jax.random.PRNGKey(10 + i), CFG, score_at="last")
    params["norm"] = {"gain": jnp.asarray(0.5 + i, jnp.float32), "bias": jnp.asarray(i - 1.0, jnp.float32)}
    training.export_params(str(tmp_path / f"m{i}"), params, model_cfg=CFG, kind="reward_model")
    members.append(params)
  tokens_bt = gb["tokens"].reshape(-1, gb["tokens"].shape[-1])
  mask_bt = gb["mask"].reshape(tokens_bt.shape)
  each = [np.asarray(heads.scores(p, tokens_bt, mask_bt, CFG)) for p in members]
  assert np.std(each, axis=0).max() > 1e-2  # the members disagree: the mean is not any one of them
  np.testing.assert_allclose(np.asarray(heads.scores(heads.ensemble(members), tokens_bt, mask_bt, CFG)),
                             np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
  scoring, cfg, first = runtime.load_reward_models(str(tmp_path), ["m0", "m1", "m2"], mesh, sharding.DEFAULT_RULES,
                                                   field="ppo.rm_ensemble")
  assert cfg == CFG and "members" not in first
  np.testing.assert_allclose(np.asarray(heads.scores(scoring, tokens_bt, mask_bt, CFG)), np.mean(each, axis=0),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="at least 2"):
    heads.ensemble(members[:1])
  with pytest.raises(ValueError, match="ppo.rm_ensemble='m9': .* holds no finished reward model"):
    runtime.load_reward_models(str(tmp_path), ["m0", "m9"], mesh, sharding.DEFAULT_RULES, field="ppo.rm_ensemble")


def test_gold_labels_rank_by_the_gold_scores_with_ties_and_keep_the_subset():
  """rm.labels="gold": each training comparison re-ranked by its gold scores (scipy's dense ranks; equal gold
  is a tie, which gives no pair), after rm.max_train_prompts; comparisons without gold scores are named."""
  rng = np.random.default_rng(3)
  comps = []
  for _ in range(12):
    k = int(rng.integers(4, 10))
    gold = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=k)  # few values: ties in most comparisons
    comps.append(comparisons.Comparison([1], [[2, 3]] * k, list(rng.permutation(k)), gold=list(gold)))
  rc = experiments.config("instructgpt", "tiny").rm
  rc.labels, rc.max_train_prompts = "gold", 9
  original = [list(c.ranks) for c in comps]
  train = rm_stage.training_comparisons(copy.deepcopy(comps), rc)
  assert len(train) == 9
  for c in train:
    want = scipy.stats.rankdata(-np.asarray(c.gold), method="dense") - 1
    np.testing.assert_array_equal(c.ranks, want)
    ties = sum(a == b for a, b in itertools.combinations(c.gold, 2))
    assert comparisons.num_strict_pairs(c.ranks) == len(c.gold) * (len(c.gold) - 1) // 2 - ties
  with pytest.raises(ValueError, match="rm.labels='gold': comparison 0 has no gold scores"):
    comparisons.relabel_by_gold([comparisons.Comparison([1], [[2], [3]], [0, 1])])
  tied, rc.max_train_prompts = [comparisons.Comparison([1], [[2], [3]], [1, 0], gold=[-2.0, -2.0])], 0
  with pytest.raises(ValueError, match="rm.labels='gold': the gold scorer ties every response of all 1 training"):
    rm_stage.training_comparisons(tied, rc)
  rc.labels, rc.max_train_prompts = "labelers", 9
  assert [c.ranks for c in rm_stage.training_comparisons(copy.deepcopy(comps), rc)] == original[:9]
