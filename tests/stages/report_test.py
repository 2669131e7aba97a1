"""The report stage's tables, from summary keys alone."""

import numpy as np

from rlhf_jax.stages import report
from rlhf_jax.tasks.world import FAMILIES


def test_report_family_table_lists_each_policy_and_family():
  summary = {}
  for pre, base in [("sft.pretrain_", -1.0), ("sft.", 0.0), ("ppo.sft_", 0.1), ("ppo.", 0.5), ("ppo_ptx.", 0.4)]:
    summary[f"{pre}top_response_frac"] = 0.25
    for i, fam in enumerate(FAMILIES):
      summary[f"{pre}{fam}.gold_score"] = base + i / 10
      summary[f"{pre}{fam}.correct_frac"] = 0.5
  summary["ppo.win_rate_vs_sft"] = summary["ppo_ptx.win_rate_vs_sft"] = 0.6  # the policies evaluated against SFT
  lines = report.family_table(summary).splitlines()
  assert lines[0] == "| family | pretrained | SFT | SFT at the RL temperature | ppo | ppo_ptx |"
  assert len(lines) == 2 + len(FAMILIES) + 1
  second = lines[2 + 1].split(" | ")
  assert second[0] == f"| {FAMILIES[1]}" and second[4] == "+0.60 (50%)"
  assert lines[-1] == "| most common response | 25% | 25% | 25% | 25% | 25% |"


def test_policies_table_has_a_row_per_policy_beside_sft_pretrained_and_best_of_n():
  summary = {"sft.pretrain_gold_score": -1.4, "sft.pretrain_top_response_frac": 0.1}
  for d, g in (("ppo", 0.3), ("dpo", 0.1), ("grpo", 0.2)):
    summary.update({f"{d}.gold_score": g, f"{d}.win_rate_vs_sft": 0.5 + g / 2, f"{d}.win_rate_vs_sft_se": 0.02,
                    f"{d}.kl_to_sft": 1.0 + g, f"{d}.rm_score": g * 2, f"{d}.pretrain_val_loss": 1.4,
                    f"{d}.top_response_frac": 0.3, f"{d}.wall_s": 100.0, f"{d}.sft_gold_score": 0.05,
                    f"{d}.sft_pretrain_val_loss": 1.3, f"{d}.sft_top_response_frac": 0.2})
  summary.update({"ppo.bon4.gold_score": 0.15, "ppo.bon4.win_rate_vs_sft": 0.55, "ppo.bon4.kl_to_sft": 0.636,
                  "ppo.bon4.rm_score": 0.5})
  rows = report.policies_table(summary).splitlines()[2:]
  names = [r.split(" | ")[0].lstrip("| ") for r in rows]
  assert names == ["pretrained (eval.temperature)", "SFT", "dpo", "grpo", "ppo", "best-of-4 (RM picks)"]
  assert rows[4] == "| ppo | +0.30 | 0.650 +- 0.020 | 1.30 | +0.60 | 1.400 | 30% | 100 s |"
  assert rows[1].startswith("| SFT | +0.05 | 0.50 | 0 |")
  assert report.policies_table({"sft.gold_score": 0.1}) == ""


def test_report_rm_family_table_puts_the_likelihood_beside_the_rm():
  summary = {"rm.val_gold_pairs_clear": 30, "rm.val_gold_accuracy_clear": 0.7,
             "rm.val_policy_logprob_gold_accuracy_clear": 0.8,
             "rm.fact.val_gold_pairs_clear": 20, "rm.fact.val_gold_accuracy_clear": 0.75,
             "rm.fact.val_policy_logprob_gold_accuracy_clear": 0.9,
             "rm.unanswerable.val_gold_pairs_clear": 10, "rm.unanswerable.val_gold_accuracy_clear": 0.6}
  rows = report.rm_family_table(summary).splitlines()
  assert rows[0] == "| family | clear pairs | RM | SFT log-likelihood |"
  assert rows[2:] == ["| fact | 20 | 0.75 | 0.90 |", "| unanswerable | 10 | 0.60 | - |", "| all | 30 | 0.70 | 0.80 |"]
  assert report.rm_family_table({"rm.val_gold_pairs_clear": 0}) == ""


def test_report_best_of_n_table_puts_the_oracle_beside_the_rm():
  summary = {"ppo.kl_to_sft": 1.2, "ppo.gold_score": 0.4, "ppo.win_rate_vs_sft": 0.57,
             "ppo.bon4.kl_to_sft": float(np.log(4) - 0.75), "ppo.bon4.gold_score": 0.46,
             "ppo.bon4.win_rate_vs_sft": 0.57, "ppo.bon4.oracle_gold_score": 0.63,
             "ppo.bon4.oracle_win_rate_vs_sft": 0.635, "ppo.reference_win_rate_vs_sft": 0.73}
  rows = report.best_of_n_table(summary).splitlines()
  assert rows[2] == "| ppo | 1.20 | +0.40 | 0.57 |"
  assert rows[3] == "| best-of-4, RM picks | 0.64 | +0.46 | 0.57 |"
  assert rows[4] == "| best-of-4, gold picks (oracle) | 0.64 | +0.63 | 0.64 |"
  assert rows[5] == "| the reference answer to every prompt | - | - | 0.73 |"
  assert report.best_of_n_table({"ppo.gold_score": 0.4}) == ""


def test_stage_sections_are_included_in_directory_order_with_links_rewritten(tmp_path):
  for d, text in (("online", "## Elo per round\n\n![elo](elo.png) and [table](/abs/t.md)\n"),
                  ("gao", "## Over-optimisation\n\n[fit](https://example.org/x) ![g](figs/gold.png)"),
                  ("empty", "  \n")):
    (tmp_path / d).mkdir()
    (tmp_path / d / report.SECTION_FILE).write_text(text)
  (tmp_path / "ppo").mkdir()  # a stage without a section adds nothing
  out = report.stage_sections(str(tmp_path))
  assert out == ["", "## Over-optimisation\n\n[fit](https://example.org/x) ![g](gao/figs/gold.png)",
                 "", "## Elo per round\n\n![elo](online/elo.png) and [table](/abs/t.md)"]
  assert report.stage_sections(str(tmp_path / "missing")) == []
