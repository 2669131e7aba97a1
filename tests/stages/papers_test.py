"""The papers stage (rlhf_jax/stages/papers.py): its three report sections, from files other stages write.

The KL frontier and the RM batching read only summary.json and metrics.jsonl, so they are checked on files
written here. Gao's best-of-n curve samples: it runs once, through run.py, on the shared tiny reference run, and
its numbers are checked against what that run's PPO stage measured and against a NumPy least-squares fit.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import configs, feedback, losses, pipeline, sharding, tokenizers, training
from rlhf_jax.data import sources
from rlhf_jax.data.comparisons import Comparison
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.models import transformer
from rlhf_jax.stages import collect, papers, rm

from helpers import stage_runner  # tests/ is on sys.path (tests/conftest.py)


def _write(workdir, run, summary, rows):
  os.makedirs(os.path.join(workdir, run), exist_ok=True)
  with open(os.path.join(workdir, run, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(workdir, run, "metrics.jsonl"), "w") as f:
    for i, r in enumerate(rows):
      f.write(json.dumps({"step": i + 1, **r}) + "\n")


def _config(experiment, runs):
  c = configs.base_config()
  c.papers.stage_dir = f"papers_{experiment}"
  c.papers.experiment = experiment
  c.papers.runs = tuple(runs)
  return c


def test_kl_frontier_section_finds_the_interior_beta(tmp_path):
  wd = str(tmp_path)
  # (beta, KL, gold): the middle beta is best; one adaptive run beside them.
  for run, beta, kl, gold in (("b1", 0.3, 0.2, 0.05), ("b2", 0.03, 1.4, 0.21), ("b3", 0.003, 9.0, -0.4)):
    _write(wd, run, {"gold_score": gold, "kl_to_sft": kl, "rm_score": 1.0, "win_rate_vs_sft": 0.5,
                     "win_rate_vs_sft_se": 0.02, "final_beta": beta, "sft_gold_score": 0.0},
           [{"beta": beta}, {"beta": beta}])
  _write(wd, "ad", {"gold_score": 0.5, "kl_to_sft": 1.5, "rm_score": 1.0, "win_rate_vs_sft": 0.6,
                    "win_rate_vs_sft_se": 0.02, "final_beta": 0.08}, [{"beta": 0.05}, {"beta": 0.08}])
  s = papers.run(_config("kl_frontier", ("b1", "b2", "b3", "ad")), wd)
  # The adaptive run has the highest gold but is not a fixed beta: the verdict is over b1..b3 only.
  assert s["interior_optimum_held"] == 1.0 and s["best_fixed_beta"] == 0.03 and s["n_fixed_betas"] == 3
  text = open(tmp_path / "papers_kl_frontier" / papers.SECTION_FILE).read()
  assert "| ad | adaptive (0.05 -> 0.08) | 1.50 | +0.500 |" in text and "**Held**" in text
  assert open(tmp_path / "papers_kl_frontier" / "kl_frontier.png", "rb").read(4) == b"\x89PNG"
  _write(wd, "b2", {"gold_score": -0.9, "kl_to_sft": 1.4}, [{"beta": 0.03}])
  assert papers.run(_config("kl_frontier", ("b1", "b2", "b3")), wd)["interior_optimum_held"] == 0.0


def test_a_finished_section_is_redone_when_its_settings_change(tmp_path, caplog):
  # The pipeline skips a finished stage, but a papers section whose experiment gained a run is redone.
  wd = str(tmp_path)
  for run, beta, kl, gold in (("b1", 0.3, 0.2, 0.05), ("b2", 0.03, 1.4, 0.21), ("b3", 0.003, 9.0, -0.4)):
    _write(wd, run, {"gold_score": gold, "kl_to_sft": kl, "rm_score": 1.0, "win_rate_vs_sft": 0.5,
                     "win_rate_vs_sft_se": 0.02, "final_beta": beta}, [{"beta": beta}])
  two, three = _config("kl_frontier", ("b1", "b2")), _config("kl_frontier", ("b1", "b2", "b3"))
  assert pipeline.run_stage(two, wd, "papers")["n_fixed_betas"] == 2
  assert papers.is_current(two, wd) is None and "papers.runs" in papers.is_current(three, wd)
  with caplog.at_level("INFO"):
    assert pipeline.run_stage(two, wd, "papers")["n_fixed_betas"] == 2
    assert "is complete" in caplog.text
    assert pipeline.run_stage(three, wd, "papers")["n_fixed_betas"] == 3
    assert "redone, its settings changed since it ran (papers.runs)" in caplog.text
  # A section recorded before a setting was added is current at the value that computes what it computed (the
  # "first" best-of-n estimator), and redone at another.
  path = tmp_path / "papers_kl_frontier" / "inputs.json"
  stored = json.load(open(path))
  del stored["papers"]["bon_estimator"], stored["papers"]["bon_candidates"]
  json.dump(stored, open(path, "w"))
  assert papers.is_current(three, wd) is None
  three.papers.bon_estimator = "subsets"
  assert "papers.bon_estimator" in papers.is_current(three, wd)
  # A section written before the settings were recorded is redone once.
  os.remove(tmp_path / "papers_kl_frontier" / "inputs.json")
  assert "is missing" in papers.is_current(three, wd)


def test_rm_batching_section_compares_the_two_arrangements(tmp_path):
  wd = str(tmp_path)
  epochs = [0.5, 1.0, 1.5, 2.0]
  pairs, grouped = [0.66, 0.61, 0.65, 0.70], [0.67, 0.63, 0.62, 0.62]
  _write(wd, "rm_pairs", {"grouping": "pairs"},
         [{"epoch": e, "val_loss": v, "val_accuracy": 0.6, "loss": 0.1} for e, v in zip(epochs, pairs)]
         + [{"loss": 0.1, "epoch": 2.0}])  # a training row without an evaluation is skipped
  _write(wd, "rm_grouped", {"grouping": "prompt"},
         [{"epoch": e, "val_loss": v, "val_accuracy": 0.6} for e, v in zip(epochs, grouped)])
  s = papers.run(_config("rm_batching", ("rm_grouped", "rm_pairs")), wd)
  assert s["pairs_overfit_held"] == 1.0
  assert s["pairs_val_loss_epoch1"] == 0.61 and s["pairs_val_loss_final"] == 0.70
  assert s["grouped_val_loss_min_epoch"] == 1.5 and s["pairs_val_loss_min_epoch"] == 1.0
  text = open(tmp_path / "papers_rm_batching" / papers.SECTION_FILE).read()
  assert "| shuffled pairs | rm_pairs | 2.00 | 0.7000 | 0.600 |" in text and "rise +0.0900" in text
  _write(wd, "rm_pairs", {"grouping": "prompt"}, [{"epoch": 1.0, "val_loss": 0.5, "val_accuracy": 0.6}])
  with pytest.raises(ValueError, match="one of shuffled pairs"):
    papers.run(_config("rm_batching", ("rm_grouped", "rm_pairs")), wd)


def test_papers_check_rejects_bad_settings():
  with pytest.raises(ValueError, match="papers.runs is empty"):
    papers.check(_config("gao", ()))
  c = _config("gao", ("ppo",))
  c.papers.best_of_n = (2, 4)
  with pytest.raises(ValueError, match="including 1"):
    papers.check(c)
  c.papers.best_of_n, c.papers.rms = (1, 4), ("rm", "rm2")
  with pytest.raises(ValueError, match="one reward-model directory per papers.runs entry"):
    papers.check(c)
  with pytest.raises(ValueError, match="compares two reward-model runs"):
    papers.check(_config("rm_batching", ("rm",)))
  c = _config("rm_proxy", ("ppo", "", "ppo_ensemble"))  # a run for each RM, then one for the ensemble
  c.papers.rms, c.papers.best_of_n, c.papers.ensembles = ("rm", "rm_s1"), (1, 4), (("rm", "rm_s1"),)
  papers.check(c)
  c.papers.runs = ("ppo", "", "ppo_ensemble", "ppo_extra")
  with pytest.raises(ValueError, match="one PPO run per reward model"):
    papers.check(c)
  c.papers.runs, c.papers.bon_candidates = ("ppo", "", "ppo_ensemble"), 8
  with pytest.raises(ValueError, match="papers.bon_candidates=8: expected 0 .* with papers.bon_estimator='subsets'"):
    papers.check(c)  # the "first" estimator reads the first max(n) candidates only
  c.papers.bon_estimator = "subsets"
  papers.check(c)
  c.papers.bon_candidates = 2
  with pytest.raises(ValueError, match=r"papers.bon_candidates=2: .*at least max\(papers.best_of_n\)=4"):
    papers.check(c)
  c.papers.bon_estimator = "mean"
  with pytest.raises(ValueError, match="papers.bon_estimator='mean': expected 'first' or 'subsets'"):
    papers.check(c)


def test_gao_section_on_the_tiny_run_matches_ppo_best_of_n_and_numpy(tmp_path_factory, tmp_path):
  reference, cache = stage_runner.shared_reference(tmp_path_factory)
  wd = stage_runner.copy_workdir(reference, str(tmp_path / "w"))
  flags = (f"--experiment={os.path.join(stage_runner.ROOT, 'experiments', 'papers', 'gao.py')}:tiny",
           *stage_runner.TINY_FLAGS[1:], "--experiment.stage=papers", "--experiment.papers.runs=ppo",
           "--experiment.papers.rms=rm", "--experiment.papers.best_of_n=1", "--experiment.papers.best_of_n=2")
  proc = stage_runner.run(wd, cache_dir=cache, base_flags=flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = json.load(open(os.path.join(wd, "papers_gao", "summary.json")))
  ref = json.load(open(os.path.join(wd, "summary.json")))
  # The same candidates, RM, prompts and SFT baseline as the PPO stage's best-of-2.
  for k in ("gold_score", "rm_score", "oracle_gold_score", "win_rate_vs_sft"):
    assert s[f"rm_bon2_{k}"] == pytest.approx(ref[f"ppo.bon2.{k}"], abs=1e-6), k
  # The RL fit against NumPy's least squares on the points read back from the PPO stage's metrics.
  rows = [json.loads(line) for line in open(os.path.join(wd, "ppo", "metrics.jsonl"))]
  assert rows[0]["step"] == 1
  d = np.sqrt(np.maximum([r["kl_seq"] for r in rows], 0.0))
  x = np.stack([d, -np.where(d > 0, d * np.log(np.maximum(d, 1e-300)), 0.0)], axis=1)
  gain = np.array([r["gold_score"] for r in rows]) - rows[0]["gold_score"]
  (a, b), *_ = np.linalg.lstsq(x, gain, rcond=None)
  assert s["rm_rl_gold_a"] == pytest.approx(a, rel=1e-6, abs=1e-9)
  assert s["rm_rl_gold_b"] == pytest.approx(b, rel=1e-6, abs=1e-9)
  # Best-of-n's two points: the origin and n = 2 at KL log 2 - 1/2, a two-parameter fit through both exactly.
  assert s["rm_bon2_kl_to_sft"] == pytest.approx(losses.best_of_n_kl(2))
  assert s["rm_bon_gold_n_points"] == 2
  text = open(os.path.join(wd, "papers_gao", papers.SECTION_FILE)).read()
  assert "![gold and proxy against sqrt(KL)](gao.png)" in text and "| rm | RL | gold |" in text
  assert "Verdicts" in text and s["n_verdicts"] == 2
  assert open(os.path.join(wd, "papers_gao", "gao.png"), "rb").read(4) == b"\x89PNG"
  shutil.rmtree(wd)


def test_an_rm_of_another_size_starts_from_the_sft_model_of_its_size(tmp_path_factory, tmp_path):
  # gao.py's size axis: rm_small (the tiny policy's run) starts from sft_small, itself from pretrain_small, both
  # the shared stages' settings with the `small` model. At lr 0 the exported RM backbone is sft_small's model.
  reference, cache = stage_runner.shared_reference(tmp_path_factory)
  wd = stage_runner.copy_workdir(reference, str(tmp_path / "w"))
  flags = (f"--experiment={os.path.join(stage_runner.ROOT, 'experiments', 'papers', 'gao.py')}:tiny",
           *stage_runner.TINY_FLAGS[1:], "--experiment.stages=pretrain:pretrain_small",
           "--experiment.stages=sft:sft_small", "--experiment.stages=rm:rm_small", "--experiment.rm.optimizer.lr=0.0")
  proc = stage_runner.run(wd, cache_dir=cache, base_flags=flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  load = lambda d: training.load_export(os.path.join(wd, d), mesh, sharding.DEFAULT_RULES)
  sft_small, small_cfg, _ = load("sft_small")
  pretrain_small, _, _ = load("pretrain_small")
  rm_small, rm_cfg, manifest = load("rm_small")
  _, tiny_cfg, _ = load("sft")
  assert manifest["kind"] == "reward_model" and rm_cfg == small_cfg
  assert (small_cfg.d_model, small_cfg.n_layers, tiny_cfg.d_model) == (128, 4, 64)
  for a, b in zip(jax.tree.leaves(rm_small["backbone"]), jax.tree.leaves(sft_small), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(sft_small), jax.tree.leaves(pretrain_small), strict=True)]
  assert max(moved) > 0  # SFT trained the small model it started from
  # A backbone of another config is a one-line error naming the field and both configs.
  proc = stage_runner.run(wd, "--experiment.variants.rm_small.rm.backbone_from=sft",
                          "--experiment.variants.rm_small.rm.stage_dir=rm_bad", cache_dir=cache, base_flags=flags)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: rm.backbone_from='sft'" in proc.stderr and "d_model: 64 there, 128 here" in proc.stderr
  assert not os.path.exists(os.path.join(wd, "rm_bad", training.EXPORT_MANIFEST))
  # Without rm.backbone_from an RM of another size starts from a fresh initialisation, with a warning: at lr 0 its
  # backbone is transformer.init under the RM stage's key (seed + 1, split as optim.create_state and
  # heads.init_rm_params split it), neither model of its size.
  proc = stage_runner.run(wd, "--experiment.variants.rm_small.rm.backbone_from=",
                          "--experiment.variants.rm_small.rm.stage_dir=rm_scratch", "--experiment.seed=0",
                          cache_dir=cache, base_flags=flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rm.backbone_from is empty: its backbone starts from scratch" in proc.stderr
  rm_scratch, scratch_cfg, _ = load("rm_scratch")
  assert scratch_cfg == small_cfg
  init_key, _ = jax.random.split(jax.random.PRNGKey(0 + 1))
  expected = transformer.init(jax.random.split(init_key)[0], small_cfg)
  for a, b, c in zip(jax.tree.leaves(rm_scratch["backbone"]), jax.tree.leaves(expected), jax.tree.leaves(sft_small),
                     strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
             for a, c in zip(jax.tree.leaves(rm_scratch["backbone"]), jax.tree.leaves(sft_small), strict=True)) > 0
  shutil.rmtree(wd)


def test_rm_proxy_section_on_the_tiny_run(tmp_path_factory, tmp_path):
  # A second RM read at the response mean with the auxiliary LM loss and a residual over its log-likelihood
  # (rm.loglik_coef), then the rm_proxy section over both and
  # their ensemble: the shared RM's best-of-2 is the PPO stage's, and each share is the formula's.
  reference, cache = stage_runner.shared_reference(tmp_path_factory)
  wd = stage_runner.copy_workdir(reference, str(tmp_path / "w"))
  exp = f"--experiment={os.path.join(stage_runner.ROOT, 'experiments', 'papers', 'rm_proxy.py')}:tiny"
  proc = stage_runner.run(wd, cache_dir=cache, base_flags=(
      exp, *stage_runner.TINY_FLAGS[1:], "--experiment.stage=rm", "--experiment.rm.stage_dir=rm_mean",
      "--experiment.rm.score_at=mean", "--experiment.rm.lm_coef=0.5", "--experiment.rm.max_train_prompts=10",
      "--experiment.rm.loglik_coef=0.5"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  manifest = json.load(open(os.path.join(wd, "rm_mean", "export.json")))
  assert manifest["score_at"] == "mean" and manifest["loglik_coef"] == 0.5  # the residual over the likelihood
  s_rm = json.load(open(os.path.join(wd, "rm_mean", "summary.json")))
  assert s_rm["score_at"] == "mean" and s_rm["lm_coef"] == 0.5 and s_rm["loglik_coef"] == 0.5
  assert s_rm["n_train_comparisons"] == 10  # rm.max_train_prompts: the first 10 of the shared comparisons
  # The labelers rank without ties: every comparison gives all its C(K, 2) pairs (rm.labels="gold" is not run
  # here: the tiny SFT's samples all score the same gold, so gold labels leave no pair; rm_test has its test).
  assert s_rm["labels"] == "labelers" and s_rm["n_train_pairs"] >= 10 * 6
  rows = [json.loads(line) for line in open(os.path.join(wd, "rm_mean", "metrics.jsonl"))]
  assert any(np.isfinite(r.get("lm_loss", np.nan)) for r in rows)
  proc = stage_runner.run(wd, cache_dir=cache, base_flags=(
      exp, *stage_runner.TINY_FLAGS[1:], "--experiment.stage=papers", "--experiment.papers.rms=rm",
      "--experiment.papers.rms=rm_mean", "--experiment.papers.runs=ppo", "--experiment.papers.runs=",
      "--experiment.papers.best_of_n=1", "--experiment.papers.best_of_n=2", "--experiment.papers.bon_prompts=rl",
      "--experiment.papers.ensembles=(('rm', 'rm_mean'),)"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = json.load(open(os.path.join(wd, "papers_rm_proxy", "summary.json")))
  ref = json.load(open(os.path.join(wd, "summary.json")))
  assert s["rm_bon2_gold_score"] == pytest.approx(ref["ppo.bon2.gold_score"], abs=1e-6)
  assert s["rm_bon2_oracle_gold_score"] == pytest.approx(ref["ppo.bon2.oracle_gold_score"], abs=1e-6)
  # rm_proxy reads best-of-n by Gao et al.'s estimator, here over the two candidates, so best-of-2 is the PPO
  # stage's. The share's SFT baseline is best-of-1, the candidates' mean, which the PPO stage does not record;
  # the share and the two gold scores must agree with the formula for one baseline common to all three rows.
  assert json.load(open(os.path.join(wd, "papers_rm_proxy", "inputs.json")))["papers"]["bon_estimator"] == "subsets"
  sft = {key: s[f"{key}_bon2_gold_score"] - s[f"{key}_bon2_share"] * (s[f"{key}_bon2_oracle_gold_score"] -
                                                                          s[f"{key}_bon2_gold_score"]) / (1 - s[f"{key}_bon2_share"])
         for key in ("rm", "rm_mean", "rm_rm_mean") if abs(1 - s[f"{key}_bon2_share"]) > 1e-6}
  assert len(set(round(v, 6) for v in sft.values())) <= 1, sft
  assert all(np.isfinite(s[f"{key}_bon2_share_se"]) or np.isnan(s[f"{key}_bon2_share"])
             for key in ("rm", "rm_mean", "rm_rm_mean"))
  assert s["rm_mean_labeler_accuracy"] == pytest.approx(s_rm["val_accuracy"])
  assert s["rm_mean_gold_accuracy_clear"] == pytest.approx(s_rm.get("val_gold_accuracy_clear", np.nan), nan_ok=True)
  assert s["rm_ppo_gold_score"] == pytest.approx(ref["ppo.gold_score"], abs=1e-9)
  assert "rm_mean_ppo_gold_score" not in s
  # The scores the section was read from are kept: the ensemble's are its members' mean, every prompt has its
  # family, and reading them again gives the section's numbers, overall and per family.
  with np.load(os.path.join(wd, "papers_rm_proxy", papers.SCORES_FILE)) as z:
    saved = {k: z[k] for k in z.files}
  # Then SFT's own log-likelihood (a sum of log-probabilities: at most 0) and the first RM plus it, each
  # standardised over every candidate.
  assert saved["models"].tolist() == ["rm", "rm_mean", "rm+rm_mean", "sft_logprob", "rm+sft_logprob"]
  assert saved["rm"].shape == (5, 2, len(saved["prompts"])) == (5, *saved["gold"].shape)
  np.testing.assert_allclose(saved["rm"][2], saved["rm"][:2].mean(axis=0))
  lp = saved["rm"][3]
  assert np.all(lp <= 0) and np.all(np.isfinite(lp))
  zs = lambda x: (x - x.mean()) / (x.std() + 1e-12)  # noqa: E731  (a constant score standardises to 0)
  np.testing.assert_allclose(saved["rm"][4], zs(saved["rm"][0]) + zs(lp), rtol=1e-5, atol=1e-6)
  gold_scorer = sources.gold_scorer(configs.experiment_config(exp.split("=", 1)[1].split(":")[0], "tiny"), wd)
  prompts = saved["prompts"].tolist()
  assert saved["family"].tolist() == [gold_scorer.family(t) for t in prompts]
  for j in range(2):  # each candidate's text, gold score and correctness, from the gold scorer again
    texts = saved["text"][j].tolist()
    np.testing.assert_allclose(saved["gold"][j], gold_scorer.score_batch(prompts, texts))
    assert saved["correct"][j].tolist() == [gold_scorer.is_correct(p, t) for p, t in zip(prompts, texts)]
  again = policy_evals.curves_from_scores(saved, [1, 2], "subsets")
  for key, curve in zip(("rm", "rm_mean", "rm_rm_mean", "sft_logprob", "rm_sft_logprob"), again):
    assert curve[2]["gold_score"] == pytest.approx(s[f"{key}_bon2_gold_score"])
    for f in set(saved["family"].tolist()):
      assert curve[2][f"{f}.share"] == pytest.approx(s[f"{key}_bon2_{f}_share"], nan_ok=True)
      assert curve[2][f"{f}.correct_frac"] == pytest.approx(s[f"{key}_bon2_{f}_correct_frac"])
  text = open(os.path.join(wd, "papers_rm_proxy", papers.SECTION_FILE)).read()
  assert "Best-of-2 by task family" in text and "| sft_logprob |" in text
  verdicts = [line for line in text.splitlines() if line.startswith("- **")]
  assert len(verdicts) == 4 and "chosen by rm+sft_logprob" in verdicts[-1]  # SFT's log-likelihood alone: none
  # The backbone's parameter count by hand: embedding and unembedding, per layer q/k/v/o, the GELU MLP's two
  # matrices and two norm scales, and the final norm.
  cfg = json.load(open(os.path.join(wd, "rm_mean", "export.json")))["model"]
  d, f, v, l = cfg["d_model"], cfg["d_ff"], cfg["vocab_size"], cfg["n_layers"]
  assert (cfg["mlp"], cfg["tie_embeddings"], cfg["n_heads"] * (cfg["head_dim"] or d // cfg["n_heads"])) == ("gelu", False, d)
  assert s["rm_mean_backbone_params"] == 2 * v * d + l * (4 * d * d + 2 * d * f + 2 * d) + d
  mparams = f"{s['rm_mean_backbone_params'] / 1e6:.2f}M"
  assert f"| rm_mean | {mparams} | 10 | mean | 0.5 | 0.5 | labelers |" in text
  assert "| rm+rm_mean |  |  | mean of members |" in text and s["rm_mean_train_comparisons"] == 10
  assert s["n_verdicts"] == 4  # rm, rm_mean, their ensemble and rm + SFT's log-likelihood
  shutil.rmtree(wd)


def test_more_comparisons_from_the_rl_prompts_follow_the_shared_ones(tmp_path_factory, tmp_path):
  # rm_proxy.py's rm_more: SFT's samples of the RL training prompts (collect.split="prompts"), ranked by the
  # labelers, trained on after the shared comparisons (rm.source="policy+collected"); validation stays on the
  # shared SFT samples, so its numbers compare with the shared RM's.
  reference, cache = stage_runner.shared_reference(tmp_path_factory)
  wd = stage_runner.copy_workdir(reference, str(tmp_path / "w"))
  path = os.path.join(stage_runner.ROOT, "experiments", "papers", "rm_proxy.py")
  proc = stage_runner.run(wd, cache_dir=cache, base_flags=(
      f"--experiment={path}:tiny", *stage_runner.TINY_FLAGS[1:], "--experiment.stages=collect:collect_rl_prompts",
      "--experiment.stages=rm:rm_more", "--experiment.variants.collect_rl_prompts.collect.n_prompts=6"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(wd, "collect_rl_prompts", "comparisons.jsonl"))]
  c = configs.experiment_config(path, "tiny")
  rl = [r["prompt"] for r in sources.rl_prompts(c, wd, sources.tokenizer(c, wd))[:6]]
  shared = sources.split(c, wd, "comparisons")
  assert [r["prompt"] for r in records] == rl and not set(rl) & {shared[i]["prompt"] for i in range(len(shared))}
  gold = sources.gold_scorer(c, wd)
  for r in records:  # K = rm.k_min..k_max responses, scored by the gold scorer, ranked by one labeler
    assert c.rm.k_min <= len(r["responses"]) == len(r["ranks"]) <= c.rm.k_max
    np.testing.assert_allclose(r["gold_scores"], gold.score_batch([r["prompt"]] * len(r["responses"]),
                                                                  r["responses"]), rtol=1e-6)
  s_rm = json.load(open(os.path.join(wd, "rm", "summary.json")))
  s_more = json.load(open(os.path.join(wd, "rm_more", "summary.json")))
  assert s_more["n_train_comparisons"] == s_rm["n_train_comparisons"] + 6
  # The same validation comparisons: the SFT policy's log-likelihood ranks them the same.
  assert s_more["val_policy_logprob_accuracy"] == s_rm["val_policy_logprob_accuracy"]
  shutil.rmtree(wd)
  c.collect.split = "rl"
  with pytest.raises(ValueError, match="collect.split='rl': expected 'comparisons' or 'prompts'"):
    collect.check(c)
  c.collect.split, c.collect.n_prompts = "prompts", c.data.n_prompts + 1
  with pytest.raises(ValueError, match=f"n_prompts={c.data.n_prompts + 1}: the task suite has only "
                                       f"data.n_prompts={c.data.n_prompts}"):
    collect.check(c)
  c.rm.source, c.rm.collected = "policy+collected", ()
  with pytest.raises(ValueError, match=r"rm.collected=\(\): rm.source='policy\+collected' needs"):
    feedback.check(c)


def test_every_validation_prompt_and_none_trained_on(tmp_path_factory):
  # papers.bon_prompts="all_validation": the RL validation prompts first (the PPO stage's), then the comparison and
  # SFT validation prompts, none of which a training split holds.
  reference, _ = stage_runner.shared_reference(tmp_path_factory)
  c = configs.experiment_config(os.path.join(stage_runner.ROOT, "experiments", "papers", "rm_proxy.py"), "tiny")
  assert c.papers.bon_prompts == "all_validation"
  tok = sources.tokenizer(c, reference)
  got = sources.validation_prompts(c, reference, tok)
  rl = sources.rl_prompts(c, reference, tok, which="validation")
  assert len(got) == c.data.n_prompts_val + c.data.n_comparisons_val + c.data.n_sft_val
  assert [p["prompt"] for p in got[:len(rl)]] == [p["prompt"] for p in rl]
  cmp_val, sft_val = sources.split(c, reference, "comparisons_val"), sources.split(c, reference, "sft_val")
  want_cmp = [cmp_val[i]["prompt"] for i in range(len(cmp_val))]
  assert [p["prompt"] for p in got[len(rl):len(rl) + len(cmp_val)]] == want_cmp
  for p, i in zip(got[len(rl) + len(cmp_val):], range(len(sft_val))):
    turns = sft_val[i]["turns"]
    assert turns[-1]["role"] == "assistant" and p["turns"] == turns[:-1] and p["prompt"] == turns[-2]["content"]
    assert p["ids"] == list(tokenizers.encode_prompt(tok, turns[:-1]))
  trained = {sources.prompt_text(r["turns"]) for r in sources.rl_prompts(c, reference, tok)}
  cmp, sft = sources.split(c, reference, "comparisons"), sources.split(c, reference, "sft")
  trained |= {sources.prompt_text(list(cmp[i]["prompt_turns"])) for i in range(len(cmp))}
  trained |= {sources.prompt_text(sft[i]["turns"][:-1]) for i in range(len(sft))}
  assert not {sources.prompt_text(p["turns"]) for p in got} & trained
  c.papers.bon_prompts = "every"
  with pytest.raises(ValueError, match="papers.bon_prompts='every': expected 'rl' or 'all_validation'"):
    papers.check(c)


def test_rm_validation_loss_is_the_grouped_ranking_loss():
  # rm.val_ranking_loss (the per-epoch curves' loss) against losses.ranking_loss, InstructGPT eq. 1, on ragged K
  # with ties: the same number from a padded batch.
  rng = np.random.default_rng(0)
  comps, rewards = [], []
  for k, ranks in ((4, [0, 1, 1, 3]), (2, [1, 0]), (3, [0, 0, 0]), (5, [4, 0, 2, 1, 3])):
    comps.append(Comparison(prompt_ids=[1], response_ids=[[2]] * k, ranks=ranks))
    rewards.append(rng.normal(size=k))
  pad = lambda rows, v: np.array([list(r) + [v] * (5 - len(r)) for r in rows])  # noqa: E731
  ref, _ = losses.ranking_loss(pad(rewards, 0.0), pad([c.ranks for c in comps], 0),
                               pad([[True] * len(c.ranks) for c in comps], False))
  assert rm.val_ranking_loss(comps, rewards) == pytest.approx(float(ref), rel=1e-5)


def _eval_summary(gold, kl, wr=0.55, **extra):
  return {"gold_score": gold, "kl_to_sft": kl, "rm_score": 0.3, "win_rate_vs_sft": wr, "win_rate_vs_sft_se": 0.02,
          "sft_gold_score": 0.1, "sft_pretrain_val_loss": 1.4, **extra}


def test_alignment_tax_section(tmp_path):
  wd = str(tmp_path)
  for run, loss, skill, wr in (("ppo", 1.5, 0.7, 0.59), ("ppo_ptx", 0.7, 0.9, 0.62), ("ppo_ptx0_3", 1.0, 0.8, 0.6)):
    _write(wd, run, _eval_summary(0.2, 4.0, wr, pretrain_val_loss=loss, benchmark_accuracy=skill), [{"beta": 0.05}])
  c = _config("alignment_tax", ("ppo", "ppo_ptx0_3", "ppo_ptx"))
  c.papers.ptx_coefs = (0.0, 0.3, 1.0)
  s = papers.run(c, wd)
  assert (s["tax_held"], s["recovered_held"], s["win_rate_kept_held"]) == (1.0, 1.0, 1.0)
  assert s["ppo_ptx0_3_pretrain_val_loss"] == 1.0 and s["sft_pretrain_val_loss"] == 1.4
  text = open(tmp_path / "papers_alignment_tax" / papers.SECTION_FILE).read()
  assert "| ppo_ptx0_3 | 0.3 | 1.000 | 0.800 | +0.200 | 4.00 | 0.600 +- 0.020 |" in text
  assert "| sft | - | 1.400 |" in text and text.count("**Held**") == 3
  assert open(tmp_path / "papers_alignment_tax" / "alignment_tax.png", "rb").read(4) == b"\x89PNG"
  c.papers.ptx_coefs = (0.3, 1.0, 3.0)
  with pytest.raises(ValueError, match="0 .plain PPO. among them"):
    papers.check(c)
  _write(wd, "ppo", {"gold_score": 0.1}, [{"beta": 0.05}])
  c.papers.ptx_coefs = (0.0, 0.3, 1.0)
  with pytest.raises(ValueError, match="no kl_to_sft, win_rate_vs_sft"):
    papers.run(c, wd)


def test_dpo_vs_ppo_section(tmp_path):
  wd = str(tmp_path)
  for run, beta, kl, gold in (("ppo_beta0_1", 0.1, 1.0, 0.3), ("ppo_beta0_01", 0.01, 5.0, 0.2)):
    _write(wd, run, _eval_summary(gold, kl, final_beta=beta), [{"beta": beta}, {"beta": beta}])
  _write(wd, "ppo_target", _eval_summary(0.28, 2.0, final_beta=0.07), [{"beta": 0.05}, {"beta": 0.07}])
  _write(wd, "dpo", _eval_summary(0.32, 0.6), [{"loss": 0.6}])  # a summary from before DPO wrote its beta
  _write(wd, "dpo_beta1", _eval_summary(0.35, 2.5, beta=1.0), [{"loss": 0.6}])
  c = _config("dpo_vs_ppo", ("ppo_beta0_1", "ppo_beta0_01", "ppo_target"))
  c.papers.dpo_runs = ("dpo", "dpo_beta1")
  s = papers.run(c, wd)
  # PPO's envelope: (0, 0.1), (1, 0.3), (2, 0.28), (5, 0.2). DPO at 0.6 (+0.32 vs 0.22) and 2.5 (+0.35 vs 0.3).
  assert s["dpo_dominates_held"] == 1.0 and s["best_gold_dpo"] == 0.35 and s["best_gold_ppo"] == 0.3
  text = open(tmp_path / "papers_dpo_vs_ppo" / papers.SECTION_FILE).read()
  assert "| DPO | dpo | 0.1 | 0.60 | +0.320 |" in text  # beta from config.dpo.beta (the default stage)
  assert "| PPO | ppo_target | adaptive | 2.00 | +0.280 |" in text and "KL 0.60: DPO +0.320 vs PPO +0.220" in text
  _write(wd, "dpo_beta1", _eval_summary(0.25, 2.5, beta=1.0), [{"loss": 0.6}])
  assert papers.run(c, wd)["dpo_dominates_held"] == 0.0
  c.papers.dpo_runs = ()
  with pytest.raises(ValueError, match="papers.dpo_runs is empty"):
    papers.check(c)


@pytest.mark.parametrize("name,preset", [
    *((n, p) for n in ("gao", "kl_frontier", "rm_batching", "alignment_tax", "dpo_vs_ppo", "rm_proxy")
      for p in ("cpu", "accelerator", "tiny")), ("gao", "cpu_sizes")])
def test_every_run_a_papers_experiment_reads_is_written_by_one_of_its_stages(name, preset):
  c = configs.experiment_config(os.path.join(stage_runner.ROOT, "experiments", "papers", f"{name}.py"), preset)
  papers.check(c)
  written = {pipeline.stage_dir_name(cfg, stage) for _, stage, cfg in pipeline.stages_to_run(c)}
  wanted = (set(c.papers.runs) | set(c.papers.dpo_runs) | set(c.papers.rms)) - {""}
  wanted |= {m for e in c.papers.ensembles for m in e}
  assert wanted <= written, sorted(wanted - written)


def test_gao_peak_verdicts_per_axis_and_rm_subset_check():
  # RMs differing in size and in comparisons: one "peak moves out" verdict per axis, each over the right RMs.
  peaks = [("rm", 2.0), ("rm_big", 3.0), ("rm_half", 2.5)]
  sizes = {"rm": 10, "rm_big": 20, "rm_half": 10}
  comps = {"rm": 100, "rm_big": 100, "rm_half": 50}
  v = papers.peak_verdicts(peaks, sizes, comps)
  assert set(v) == {"rm_size_peak_moves_out_held", "rm_data_peak_moves_out_held"}
  assert v["rm_size_peak_moves_out_held"].held  # 10 -> 20 parameters: 2.0 -> 3.0
  assert not v["rm_data_peak_moves_out_held"].held  # 50 -> 100 comparisons: 2.5 -> 2.0, moves in
  assert "50: KL* 2.5" in v["rm_data_peak_moves_out_held"].evidence and "20: KL* 3" in v["rm_size_peak_moves_out_held"].evidence
  assert papers.peak_verdicts([("rm", 1.0)], {"rm": 10}, {"rm": 100}) == {}
  c = configs.base_config()
  c.rm.max_train_prompts = -1
  with pytest.raises(ValueError, match="rm.max_train_prompts"):
    rm.check(c)
  c = configs.base_config()
  c.rm.backbone_from, c.rm.finetune_from = "sft_small", "rm"
  with pytest.raises(ValueError, match=r"rm.backbone_from='sft_small' .* rm.finetune_from='rm'"):
    rm.check(c)



def test_over_seeds_pools_each_seeds_standard_error_and_counts_the_held_seeds():
  # Three seeds' flat summaries as a --seeds sweep aggregates them; rm_x is missing on seed 1.
  from rlhf_jax import sweep
  p = "papers_rm_proxy."
  runs = {
      "seed 0": {p + "rm_bon4_share": 0.40, p + "rm_bon4_share_se": 0.03, p + "rm_bon16_share": 0.60,
                 p + "rm_bon16_share_se": 0.05, p + "rm_gold_accuracy_clear": 0.70, p + "rm_ppo_win_rate_vs_sft": 0.6,
                 p + "rm_ppo_win_rate_vs_sft_se": 0.02, p + "rm_ppo_gold_score": 0.25, p + "rm_ppo_kl_to_sft": 1.5,
                 p + "rm_x_bon4_share": 0.1, p + "rm_x_bon4_share_se": 0.01,
                 p + "rm_x_bon16_share": 0.2, p + "rm_x_bon16_share_se": 0.04, p + "rm_bon16_fact_share": 0.9,
                 "papers_kl_frontier.interior_optimum_held": 1, "papers_kl_frontier.n_verdicts_held": 1},
      "seed 1": {p + "rm_bon4_share": 0.30, p + "rm_bon4_share_se": 0.04, p + "rm_bon16_share": 0.45,
                 p + "rm_bon16_share_se": 0.06, p + "rm_gold_accuracy_clear": 0.80, p + "rm_ppo_win_rate_vs_sft": 0.7,
                 p + "rm_ppo_win_rate_vs_sft_se": 0.03, p + "rm_ppo_gold_score": 0.35, p + "rm_ppo_kl_to_sft": 2.5,
                 p + "rm_bon16_fact_share": 0.1,
                 "papers_kl_frontier.interior_optimum_held": 0, "papers_kl_frontier.n_verdicts_held": 0},
      "seed 2": {p + "rm_bon4_share": 0.50, p + "rm_bon4_share_se": 0.02, p + "rm_bon16_share": 0.51,
                 p + "rm_bon16_share_se": 0.04, p + "rm_gold_accuracy_clear": 0.90, p + "rm_x_bon4_share": 0.3,
                 p + "rm_x_bon4_share_se": 0.02, p + "rm_x_bon16_share": 0.7, p + "rm_x_bon16_share_se": 0.03,
                 "papers_kl_frontier.interior_optimum_held": 1, "papers_kl_frontier.n_verdicts_held": 1},
  }
  agg = sweep.aggregate(runs)
  lines = papers.over_seeds(agg)
  rows = {ln[2:-2].split(" | ")[0]: ln[2:-2].split(" | ") for ln in lines if ln.startswith("| ")}
  assert rows["kl_frontier"] == ["kl_frontier", "interior_optimum", "2 of 3 (seed 0, seed 2)"]
  assert not any("n_verdicts" in ln for ln in lines)
  rm_row, x_row = rows["rm"], rows["rm_x"]
  assert rm_row[1] == "0, 1, 2" and x_row[1] == "0, 2"
  assert rm_row[2] == f"{np.mean([0.7, 0.8, 0.9]):.3f} (0.700, 0.800, 0.900)"
  se4 = np.sqrt(0.03 ** 2 + 0.04 ** 2 + 0.02 ** 2) / 3
  assert rm_row[3] == f"{np.mean([0.4, 0.3, 0.5]):.2f} +- {se4:.2f} (0.40, 0.30, 0.50)"
  se16 = np.sqrt(0.05 ** 2 + 0.06 ** 2 + 0.04 ** 2) / 3
  assert rm_row[4] == f"{np.mean([0.6, 0.45, 0.51]):.2f} +- {se16:.2f} (0.60, 0.45, 0.51)"
  assert rm_row[5] == "2 of 3"  # 0.60 and 0.51 reach half, 0.45 does not
  win_se = np.sqrt(0.02 ** 2 + 0.03 ** 2) / 2
  assert rm_row[6] == f"{0.65:.3f} +- {win_se:.3f} (0.600, 0.700)"
  assert rm_row[7:] == ["+0.300 (+0.250, +0.350)", "2.00 (1.50, 2.50)"]
  assert x_row[2] == "" and x_row[4] == f"{0.45:.2f} +- {np.sqrt(0.04 ** 2 + 0.03 ** 2) / 2:.2f} (0.20, 0.70)"
  assert x_row[5] == "1 of 2" and x_row[6:] == ["", "", ""]
  assert "fact" not in "".join(rows)  # the per-family keys are not rows
  assert "## A better proxy reward model over seeds" in sweep.markdown(agg)
