"""A better proxy reward model (issue #21 item 6): one change at a time to the shared reward model, each measured
by its clear-pair gold accuracy, the share of the gold scorer's own best-of-n gain over SFT its best-of-4 and
best-of-16 choices capture, and a PPO run against it. Target: best-of-16 chosen by the RM captures at least half.

  python run.py --experiment=experiments/papers/rm_proxy.py:cpu --seeds=0-2 --workdir=workdirs/papers
  python run.py --experiment=experiments/papers/rm_proxy.py:tiny --workdir=/tmp/papers_tiny   # smoke test

Every reward model trains on the shared `rm` stage's comparisons (WORKDIR/comparisons) from the same SFT model,
with the shared RM's optimizer and epochs; only the named field differs:
  rm           the shared RM, InstructGPT's: the score read at the EOS position (rm.score_at="eos"), no
               log-likelihood term (rm.loglik_coef=0, which this file pins: the default run's is 1)
  rm_last      rm.score_at="last": the token before EOS, the last response token (SFT trained its hidden state
               to predict EOS; the EOS position's own state is never an input SFT trains)
  rm_mean      rm.score_at="mean": the head's mean over the response tokens
  rm_lm        rm.lm_coef=0.5: an auxiliary next-token loss on the responses (Askell et al. 2021)
  rm_loglik    rm.loglik_coef=1: the score adds the response's log-likelihood under the RM's own backbone (SFT's
               at the start), so the head is trained as a residual over it (SFT's own log-likelihood is the
               best best-of-16 picker in this table: experiments/papers/README.md)
  rm_s1, rm_s2 rm.seed_offset 1 and 2: other head initialisations and data orders; with `rm`, the mean ensemble
               rm+rm_s1+rm_s2 (Coste et al. 2023), by best-of-n and by a PPO run whose reward is the
               ensemble's mean score (ppo.rm_ensemble)
  rm_gold      rm.labels="gold": the same prompts and responses ranked by the gold scorer instead of the noisy
               labelers (ties give no pair): the ceiling of this data and RM size with perfect labels, which says
               whether the labels' noise or the amount of data and the RM's capacity hold the proxy back
  rm_half      rm.max_train_prompts: the first half of the shared comparisons' prompts
  rm_more      rm.source="policy+collected": the shared comparisons and as many again from new prompts, the world's
               RL training prompts (800 on cpu), sampled from SFT and ranked by the same labelers (the
               collect_rl_prompts stage, collect.split="prompts"; the world has no more comparison prompts, and
               best-of-n is measured on validation prompts, which no RM sees)
  rm_most      rm_more's comparisons plus a second set of SFT samples of the shared prompts (collect_again): the
               data axis rm_half (500 prompts), rm (1000), rm_more (1800), rm_most (2800 prompts' comparisons);
               with a PPO run
  rm_<size>    a reward model larger than the policy (cpu: `medium`, 3.4x the `small` policy's parameters;
               accelerator: `base`; tiny: `small`), from pretraining and SFT of its own size on the shared
               settings (configs.add_rm_of_size), as the shared RM starts from the shared SFT model
and a 40-iteration PPO run (the shared `ppo` settings) against each single-change RM and the ensemble. The papers
stage (WORKDIR/papers_rm_proxy) writes the table and one verdict per row; best-of-n is on every validation prompt
of the task suite (papers.bon_prompts="all_validation": 300 on cpu), each share with its standard error, and
read as Gao et al. read it: the expectation over every n-subset of a larger pool of SFT candidates a prompt
(papers.bon_estimator="subsets"; 32 candidates on cpu), so that every candidate counts at every n.

Not here: more distinct prompts than the world's comparison and RL prompts (data.n_comparisons, another world).

Presets:
  cpu          the small pipeline; eleven extra RMs (4 epochs of 1000 prompts each; rm_half 500, rm_more 1800, rm_most
               2800) and eight PPO runs (40 iterations, the shared `ppo`'s settings), and the `medium` model's
               pretraining and SFT.
  accelerator  the same runs, best-of-64 too, from 256 candidates a prompt.
  tiny         the tiny pipeline, 2 PPO iterations: a smoke test.
"""

import os

import ml_collections

from rlhf_jax import configs

_INSTRUCTGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "instructgpt", "config.py")
PRESETS = ("cpu", "accelerator", "tiny")

# name -> the rm fields it changes; PPO runs against the ones marked True.
RMS = {"rm_last": ({"score_at": "last"}, True), "rm_mean": ({"score_at": "mean"}, True),
       "rm_lm": ({"lm_coef": 0.5}, True), "rm_s1": ({"seed_offset": 1}, False), "rm_s2": ({"seed_offset": 2}, False),
       "rm_gold": ({"labels": "gold"}, True),
       # The score plus the response's log-likelihood under the RM's own backbone (starting as SFT's): the head
       # learns a residual over the likelihood, which alone picks better at best-of-16 than every RM above.
       "rm_loglik": ({"loglik_coef": 1.0}, True)}


def get_config(arg: str | None = None):
  preset = arg or "cpu"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} of experiments/papers/rm_proxy.py; expected one of "
                     f"{', '.join(PRESETS)}")
  c = configs.experiment_config(_INSTRUCTGPT, "tiny" if preset == "tiny" else "small")
  c.rm.loglik_coef = 0.0  # InstructGPT's reward model, as these results were measured (README.md)
  no_bon = {"best_of_n": []}  # best-of-n is the papers stage's, on one set of candidates for every RM
  c.variants = ml_collections.ConfigDict()
  rms, runs, rm_stages, ppo_stages = [c.rm.stage_dir], [c.ppo.stage_dir], [], []
  for name, (fields, with_ppo) in RMS.items():
    c.variants[name] = {"rm": {"stage_dir": name, **fields}}
    rm_stages.append(f"rm:{name}")
    rms.append(name)
    run = ""
    if with_ppo:
      run = f"ppo_{name}"
      c.variants[run] = {"ppo": {"stage_dir": run, "rm_from": name}, "eval": no_bon}
      ppo_stages.append(f"ppo:{run}")
    runs.append(run)
  # Fewer comparisons: the shared RM on the first half of the prompts (gao.py's rm_half, the same stage). The
  # world has no more comparison prompts than the shared set, so this is the data axis this workdir can measure.
  c.variants["rm_half"] = {"rm": {"stage_dir": "rm_half", "max_train_prompts": c.rm.n_prompts // 2}}
  rm_stages.append("rm:rm_half")
  rms.append("rm_half")
  runs.append("")
  # More comparisons than the world's comparison prompts: SFT's samples of the 800 RL training prompts, ranked by
  # the same labelers (collect.split="prompts"), after the shared ones (rm_more); and with them a second set of
  # SFT samples of the shared prompts (rm_most). The data axis continues from rm_half through rm.
  rc = c.rm
  sample = {"policy_from": rc.init_from, "k_min": rc.k_min, "k_max": rc.k_max, "n_val_prompts": 1,
            "sample_temperature": rc.sample_temperature, "max_new_tokens": rc.max_new_tokens}
  c.variants["collect_rl_prompts"] = {"collect": {"stage_dir": "collect_rl_prompts", "split": "prompts",
                                                  "n_prompts": c.data.n_prompts, **sample}}
  c.variants["collect_again"] = {"collect": {"stage_dir": "collect_again", "n_prompts": rc.n_prompts, **sample}}
  collect_stages = ["collect:collect_rl_prompts", "collect:collect_again"]
  for name, dirs in (("rm_more", ("collect_rl_prompts",)), ("rm_most", ("collect_rl_prompts", "collect_again"))):
    c.variants[name] = {"rm": {"stage_dir": name, "source": "policy+collected", "collected": dirs}}
    rm_stages.append(f"rm:{name}")
    rms.append(name)
    runs.append("")
  c.variants["ppo_rm_most"] = {"ppo": {"stage_dir": "ppo_rm_most", "rm_from": "rm_most"}, "eval": no_bon}
  ppo_stages.append("ppo:ppo_rm_most")
  runs[-1] = "ppo_rm_most"
  # A reward model larger than the policy, from pretraining and SFT of its own size.
  size = {"cpu": "medium", "accelerator": "base", "tiny": "small"}[preset]
  name, size_stages = configs.add_rm_of_size(c, size)
  rm_stages.append(size_stages[-1])
  rms.append(name)
  c.variants[f"ppo_{name}"] = {"ppo": {"stage_dir": f"ppo_{name}", "rm_from": name}, "eval": no_bon}
  ppo_stages.append(f"ppo:ppo_{name}")
  runs.append(f"ppo_{name}")
  c.papers.stage_dir = "papers_rm_proxy"
  c.papers.experiment = "rm_proxy"
  c.papers.rms = tuple(rms)
  c.papers.ensembles = ((c.rm.stage_dir, "rm_s1", "rm_s2"),)
  # PPO against the mean ensemble (ppo.rm_ensemble): its row is the first after the single RMs.
  c.variants["ppo_ensemble"] = {"ppo": {"stage_dir": "ppo_ensemble", "rm_ensemble": ("rm_s1", "rm_s2")},
                                "eval": no_bon}
  ppo_stages.append("ppo:ppo_ensemble")
  c.papers.runs = (*runs, "ppo_ensemble")
  c.papers.best_of_n = {"cpu": (1, 4, 16), "accelerator": (1, 4, 16, 64), "tiny": (1, 2, 4)}[preset]
  # Every validation prompt (300 on cpu, not the RL ones' 100): a best-of-16 share's standard error was ~0.2 a
  # row on 100, wider than the differences between the rows.
  c.papers.bon_prompts = "all_validation"
  # Each best-of-n is the mean over every n-subset of the pool: on 300 prompts, best-of-16 from the first 16
  # candidates had a standard error of ~0.1 a row; from 32 candidates, about half that (the pool: 2x sampling).
  c.papers.bon_estimator = "subsets"
  c.papers.bon_candidates = {"cpu": 32, "accelerator": 256, "tiny": 0}[preset]
  c.stages = ("data", "pretrain", "sft", *size_stages[:-1], "rm", *collect_stages, *rm_stages, "ppo", *ppo_stages,
              "papers", "report")
  return c
