"""Config blocks with the library's defaults, and their conversion to typed objects.

An experiment file (experiments/<name>/config.py) starts from `base_config()`, which holds one block per stage
(`pretrain`, `sft`, `rm`, `ppo`, `dpo`) beside the shared ones (`data`, `tokenizer`, `model`, `mesh`, `checkpoint`,
`guard`, `eval`), and sets the values it was tuned with. Every field exists up front, so `run.py` with
`lock_config=True` rejects unknown keys and mistyped values before any work starts.

The defaults here are the papers' where a paper gives one (InstructGPT, lm-human-preferences) and laptop-sized
otherwise; an experiment's tuned values and the results behind them live in that experiment's folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from rlhf_jax.models import lora, presets, transformer
from rlhf_jax.tasks import suite

ConfigDict = ml_collections.ConfigDict


# ----------------------------------------------------------------------------------------------------------
# Shared blocks.


def model_config(size: str = "tiny", **overrides) -> ConfigDict:
  """All ModelConfig fields of a named size; vocab_size 0 means "take it from the tokenizer"."""
  fields = dataclasses.asdict(presets.preset(size, **overrides))
  fields["vocab_size"] = overrides.get("vocab_size", 0)
  return ConfigDict(fields)


def to_model_config(model_cd: ConfigDict, vocab_size: int) -> transformer.ModelConfig:
  fields = dict(model_cd)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = vocab_size
  elif fields["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
  return transformer.ModelConfig(**fields)


def optimizer_config(lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.01,
                     grad_clip: float = 1.0) -> ConfigDict:
  return ConfigDict(dict(
      lr=lr, warmup_steps=warmup_steps, schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
      eps_convention="pytorch", weight_decay=weight_decay, grad_clip=grad_clip,
      # bfloat16 parameters only (model.param_dtype): "stochastic" or "nearest" rounding of w + update
      # (rlhf_jax.optim.float32_state: to nearest, small updates are lost)
      param_rounding="stochastic"))


def lora_config(rank: int = 0, alpha: float = 16.0, targets: tuple[str, ...] = ("q", "v")) -> ConfigDict:
  """LoRA for a trained stage (sft, dpo, ppo; rlhf_jax/models/lora.py): rank 0 is off (every weight trained);
  rank r > 0 trains adapters scaled by alpha / r on the target projections ("q", "k", "v", "o", "mlp_in",
  "mlp_gate", "mlp_out") of a frozen base, which in PPO is also the reference policy."""
  return ConfigDict(dict(rank=rank, alpha=alpha, targets=tuple(targets)))


def to_lora_config(lora_cd: ConfigDict, field: str) -> lora.LoraConfig:
  """The typed LoraConfig of a stage's `lora` block; an error names `field` (e.g. "ppo.lora")."""
  try:
    return lora.LoraConfig(rank=int(lora_cd.rank), alpha=float(lora_cd.alpha), targets=tuple(lora_cd.targets))
  except ValueError as e:
    raise ValueError(str(e).replace("lora.", f"{field}.", 1)) from None


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ConfigDict:
  return ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def checkpoint_config(save_every: int = 50, max_to_keep: int = 2, async_save: bool = True) -> ConfigDict:
  return ConfigDict(dict(save_every=save_every, max_to_keep=max_to_keep, async_save=async_save))


def tokenizer_config(kind: str = "byte", vocab_size: int = 512) -> ConfigDict:
  # path "" = <data_dir>/tokenizer-<vocab_size>.model for SentencePiece (trained from the pretraining corpus once).
  return ConfigDict(dict(kind=kind, vocab_size=vocab_size, path=""))


def guard_config() -> ConfigDict:
  """Non-finite guard: 'stop' raises naming the step and metric, 'skip' drops that update.
  inject_nan_at_step >= 0 plants a NaN in the loss at that step (to test the guard)."""
  return ConfigDict(dict(on_nonfinite="stop", inject_nan_at_step=-1))


def train_config(steps: int, batch_size: int, seq_len: int, *, log_every: int = 10, eval_every: int = 100,
                 eval_batches: int = 8) -> ConfigDict:
  return ConfigDict(dict(steps=steps, batch_size=batch_size, seq_len=seq_len, log_every=log_every,
                         eval_every=eval_every, eval_batches=eval_batches))


# Task-suite sizes of the generated world; every other knob keeps rlhf_jax.tasks.suite.DataConfig's default.
DATA_PRESETS = {
    # A laptop-sized world: 64 animals x 4 facts, sums to 20, products to 10, 48 game words.
    "small": dict(
        n_entities=64, n_unknown_entities=32, n_words=48, max_number=20, max_factor=10,
        n_pretrain_docs=5000, n_pretrain_val_docs=250, n_benchmark_arithmetic=100,
        # 1000 comparison prompts: about all the world's prompt space leaves after SFT and RL (20 unused).
        n_sft=1000, n_sft_val=100, n_prompts=800, n_prompts_val=100, n_comparisons=1000, n_comparisons_val=100,
        max_prompts_per_user=20, n_heavy_users=3, heavy_user_prompts=50,
    ),
    # For smoke tests: everything in about a second.
    "tiny": dict(
        n_entities=24, n_unknown_entities=12, n_words=24, max_number=10, max_factor=5,
        n_pretrain_docs=600, n_pretrain_val_docs=50, n_benchmark_arithmetic=30,
        n_sft=200, n_sft_val=40, n_prompts=160, n_prompts_val=40, n_comparisons=120, n_comparisons_val=40,
        max_prompts_per_user=8, n_heavy_users=2, heavy_user_prompts=14,
    ),
}


def data_config(preset: str) -> ConfigDict:
  """The task suite's knobs (rlhf_jax/tasks/suite.py DataConfig) for a preset, plus data_dir ("" = WORKDIR/data)
  and overwrite (replace a suite generated from another config in the same folder)."""
  if preset not in DATA_PRESETS:
    raise ValueError(f"unknown data preset {preset!r}; expected one of {sorted(DATA_PRESETS)}")
  fields = suite.DataConfig(**DATA_PRESETS[preset]).to_json()
  fields["family_weights"] = ConfigDict(fields["family_weights"])
  fields.update({k: v for k, v in suite.OPT_IN_FIELDS.items() if k not in fields})  # settable, off by default
  fields["data_dir"] = ""
  fields["overwrite"] = False
  return ConfigDict(fields)


def eval_config(n_prompts: int = 100, batch_size: int = 50) -> ConfigDict:
  """Held-out evaluation: n_prompts prompts; the SFT stage samples one response per prompt at `temperature`
  with up to `max_new_tokens` tokens; PPO's evaluation draws samples_per_prompt responses of the policy and of
  SFT per prompt at the RL sampling settings (ppo.temperature, ppo.max_new_tokens)."""
  # judge: who scores responses, "gold" (the suite's simulated humans) or "rm" (a held-out reward model in
  # WORKDIR/<judge_rm_from>, trained on other comparisons, standing in for the gold labeler as in Gao et al.
  # 2022: the judge of runs on user data, config.files).
  return ConfigDict(dict(n_prompts=n_prompts, batch_size=batch_size, temperature=1.0, max_new_tokens=32,
                         samples_per_prompt=4, n_benchmark=100, n_samples_table=24, best_of_n=(4, 16),
                         judge="gold", judge_rm_from="rm_judge"))


# ----------------------------------------------------------------------------------------------------------
# One block per stage. `stage_dir` is where the stage writes under WORKDIR (and its summary keys' prefix);
# `init_from` / `rm_from` name the stage directories it reads.


def pretrain_config() -> ConfigDict:
  """Next-token pretraining on the task suite's corpus."""
  return ConfigDict(dict(
      stage_dir="pretrain",
      train=train_config(steps=300, batch_size=16, seq_len=127, log_every=25, eval_every=100, eval_batches=4),
      optimizer=optimizer_config(lr=3e-3, warmup_steps=30)))


def sft_config() -> ConfigDict:
  """Supervised fine-tuning on demonstrations: loss on assistant tokens; pretrain_mix is the fraction of each
  batch that is pretraining text; too_long: "truncate" or "error" for an over-long demonstration."""
  return ConfigDict(dict(
      stage_dir="sft", init_from="pretrain",
      train=train_config(steps=60, batch_size=16, seq_len=127, log_every=20, eval_every=60, eval_batches=2),
      optimizer=optimizer_config(lr=5e-4, warmup_steps=10), pretrain_mix=0.0, too_long="truncate",
      lora=lora_config(),
      # exclude_families: task families whose demonstrations SFT leaves out (a record is dropped when any of its
      # user turns is of one), for the held-out-family test of instruction tuning (experiments/icl).
      exclude_families=()))


def rm_config() -> ConfigDict:
  """The reward model stage (InstructGPT: 1 epoch, batch 64 prompts, K = 4..9)."""
  return ConfigDict(dict(
      stage_dir="rm",
      # "policy" (rank SFT samples), "offline" (suite comparisons), "policy+offline", "file", "collected",
      # "policy+collected"
      source="policy",
      file="",  # with source="file": a K-way rankings .jsonl, or a folder of rlhf_jax.data.real.prepare_rankings
      # file_schema: how to read a file (not a folder) given as rm.file: a comparison schema of rlhf_jax.data.real
      # ("rankings", "hh", "summarize_from_feedback", "ultrafeedback", "pairs"); converted once, cached by hash.
      file_schema="rankings",
      init_from="sft",
      # backbone: "decoder" (the policy's, from init_from) or "encoder" (the masked-LM stage's bidirectional
      # encoder in WORKDIR/<encoder_from>, rlhf_jax/stages/mlm.py; the policy's size, model.causal=False).
      backbone="decoder", encoder_from="mlm",
      model_size="",  # "" = the policy's config (backbone from SFT); else a preset name (fresh backbone)
      # backbone_from: a stage directory whose model (of the RM's config) the backbone starts from, e.g. a
      # pretrain/SFT variant of rm.model_size's size (experiments/papers/gao.py); "" = rm.init_from's model when
      # the RM has the policy's size, else a fresh init. rm.init_from stays the policy whose samples are ranked.
      backbone_from="",
      n_prompts=256, n_val_prompts=64, k_min=4, k_max=9, sample_temperature=1.0, max_new_tokens=32,
      # length_bucket: batches are cut to their longest sequence rounded up to this (0: always seq_len).
      seq_len=128, length_bucket=32, too_long="truncate", grouping="prompt", pair_weighting="uniform",
      clear_gold_margin=0.5,
      # target: "rankings" (the K-way loss) or "elo", a regression onto per-prompt normalised Elo ratings of each
      # ranking's pairwise outcomes (rlhf_jax.data.comparisons.rating_targets).
      target="rankings",
      # score_at: where the score is read, "eos" (the last real token), "last" (the token before it: the last
      # response token) or "mean" (over the response tokens); lm_coef: an auxiliary next-token loss on the
      # responses, 0 = off (experiments/papers/rm_proxy.py); loglik_coef: the score adds this times the response's
      # log-likelihood under the RM's own backbone, so the head learns a residual over it, 0 = off.
      score_at="eos", lm_coef=0.0, loglik_coef=0.0,
      seed_offset=0,  # > 0: another head initialisation and data order (the members of an RM ensemble)
      # labels: "labelers" (their rankings) or "gold": the training comparisons' responses re-ranked by the gold
      # scorer (ties give no pair), an oracle-label RM on the same data (experiments/papers/rm_proxy.py)
      labels="labelers",
      # > 0: train on the first N prompts' comparisons only (the shared comparisons are sampled once a workdir)
      max_train_prompts=0,
      # with source="collected" (or "policy+collected": after the shared SFT samples' comparisons): the collect
      # stage directories whose training comparisons it trains on
      collected=(),
      finetune_from="",  # a reward-model stage directory whose backbone and head this one starts from
      # evals_per_epoch > 0: evaluate (with the validation ranking loss) that many times an epoch instead of every
      # eval_every steps (experiments/papers/rm_batching.py: per-epoch curves of the two arrangements).
      train=ConfigDict(dict(steps=0, epochs=1.0, batch_size=16, log_every=10, eval_every=50, evals_per_epoch=0)),
      optimizer=optimizer_config(lr=1e-4, warmup_steps=10, weight_decay=0.0),
  ))


def ppo_config(ptx_coef: float = 0.0) -> ConfigDict:
  """The RL stage (InstructGPT / lm-human-preferences values where they carry over).

  algorithm: "ppo", "a2c" (value model, GAE), "grpo" or "rloo" (no value model: group_size samples per prompt
  are each other's baseline). kl.mode: "reward" (a per-token penalty, the KL controller steering beta) or
  "loss" (GRPO's k3 term). grpo: scale_rewards and length_norm both False is Dr. GRPO.
  """
  return ConfigDict(dict(
      # ref_from: the KL's (and the evaluation's) reference policy, "" = init_from's (online rounds: "sft").
      # rm_ensemble: more reward-model stage directories; the reward is then the mean of their and rm_from's
      # normalised scores (Coste et al. 2023), the value model still rm_from's.
      stage_dir="ppo", init_from="sft", rm_from="rm", rm_ensemble=(), ref_from="", value_init="rm", algorithm="ppo",
      iterations=100, batch_size=64, n_minibatches=4, epochs=4, min_whiten=8, group_size=1,
      max_prompt_len=64, max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0,
      clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0, gamma=1.0, lam=0.95,
      whiten_rewards=True, no_eos_penalty=-1.0, log_every=5,
      # old_logp: the PPO ratio's denominator, "recompute" (a forward pass of the policy over the rollout) or
      # "sampler" (the sampler's own log-probs, one pass fewer); either way the update logs their mismatch with
      # the training pass on its first minibatch (first_logratio_absmax).
      old_logp="recompute",
      kl=ConfigDict(dict(adaptive=True, init_beta=0.02, target=6.0, horizon=10_000, mode="reward")),
      grpo=ConfigDict(dict(scale_rewards=True, length_norm=True)),
      ptx=ConfigDict(dict(coef=ptx_coef, ratio=1, seq_len=64)),
      optimizer=optimizer_config(lr=1e-5, warmup_steps=0, weight_decay=0.0),
      lora=lora_config(),  # LoRA on the policy and the value model; the frozen base is the reference
  ))


def dpo_config() -> ConfigDict:
  """Direct preference optimisation from SFT on the RM's comparisons (Rafailov et al.: beta 0.1).

  loss: "dpo" or "ipo" (beta is IPO's tau); label_smoothing: conservative DPO's eps; pairs: "all" ranked pairs
  of a K-way ranking (weighted as the grouped RM loss) or "best_vs_rest"; rm_from: a reward model scoring the
  policy's samples in the evaluation ("" for none; DPO itself needs none).
  """
  return ConfigDict(dict(
      stage_dir="dpo", init_from="sft", rm_from="rm", loss="dpo", beta=0.1, label_smoothing=0.0, pairs="all",
      train=ConfigDict(dict(steps=0, epochs=1.0, batch_size=16, log_every=10, eval_every=0)),
      optimizer=optimizer_config(lr=1e-5, warmup_steps=10, weight_decay=0.0),
      lora=lora_config(),
  ))


def collect_config() -> ConfigDict:
  """Online feedback (rlhf_jax/stages/collect.py): K responses per prompt from the policy in `policy_from`,
  ranked by the simulated labelers, on the suite's prompts [prompt_offset, prompt_offset + n_prompts) of
  `split` ("comparisons", or "prompts": the RL training prompts) and the first n_val_prompts validation
  comparison prompts."""
  return ConfigDict(dict(stage_dir="collect", policy_from="sft", split="comparisons", n_prompts=256,
                         n_val_prompts=64, prompt_offset=0, k_min=4, k_max=9, sample_temperature=1.0,
                         max_new_tokens=32))


def elo_config() -> ConfigDict:
  """A cross-model Elo table (rlhf_jax/stages/elo.py): every policy in `snapshots` (stage directories) answers
  n_prompts held-out prompts samples_per_prompt times at the RL sampling settings, every pair plays a labeler's
  game on each, and Elo (k_factor, the 400-point scale) and Bradley-Terry rate them beside their gold scores."""
  return ConfigDict(dict(stage_dir="elo", snapshots=("pretrain", "sft", "ppo"), n_prompts=100, samples_per_prompt=2,
                         k_factor=16.0))


def mlm_config() -> ConfigDict:
  """The masked-LM encoder (rlhf_jax/stages/mlm.py): the policy's Transformer with model.causal=False trained
  with BERT's objective on the pretraining corpus (select_rate of the tokens; of those mask_fraction [MASK],
  random_fraction a random token, the rest unchanged), then the cloze evaluation beside the decoder exported
  in WORKDIR/<compare_from> ("" skips it). Not in any default pipeline."""
  return ConfigDict(dict(
      stage_dir="mlm", compare_from="pretrain", select_rate=0.15, mask_fraction=0.8, random_fraction=0.1,
      cloze_batch_size=64, cloze_items_per_kind=0,  # 0: every cloze item; n: n evenly spaced items of each kind
      train=train_config(steps=300, batch_size=16, seq_len=127, log_every=25, eval_every=100, eval_batches=4),
      optimizer=optimizer_config(lr=3e-3, warmup_steps=30)))


def icl_config() -> ConfigDict:
  """In-context learning (rlhf_jax/stages/icl.py): n_items items of each family, posed with k shots for every k
  of `ks` in each style ("prompt": the corpus's Q&A completion; "instruction": a chat turn with options; "chat": the turn
  without them) to every
  policy of `policies` present in the workdir, answered greedily with up to max_new_tokens tokens; shots drawn
  from `seed`. held_out_from: SFTs each without the family at the same place of `held_out_family`
  (sft.exclude_families), compared zero-shot with sft_from and with pretrained_from's few-shot accuracy (() skips
  it). Not in any default pipeline."""
  return ConfigDict(dict(
      stage_dir="icl", policies=("pretrain", "sft", "ppo"), ks=(0, 1, 2, 4, 8),
      styles=("prompt", "instruction", "chat"),
      families=("fact", "arithmetic", "string", "unanswerable", "harmful"), n_items=48, batch_size=64,
      max_new_tokens=16, seed=0, held_out_from=(), held_out_family=(), sft_from="sft",
      pretrained_from="pretrain"))


def cot_config() -> ConfigDict:
  """Chain of thought (rlhf_jax/stages/cot.py): the pretrained models in `pretrained` (stage directories) answer
  n_items held-out multi-step items of each kind few-shot (`shots` demonstrations, direct or worked), the SFT
  models in `sft` zero-shot, greedily with up to max_new_tokens (worked) or max_new_tokens_direct (direct, one-step)
  new tokens; too_long: "error" or "truncate" (keep the prompt's end) for a prompt past model.max_len. Not in
  any default pipeline (experiments/cot)."""
  return ConfigDict(dict(stage_dir="cot", pretrained=("pretrain",), sft=(), n_items=48, shots=3, max_new_tokens=48,
                         max_new_tokens_direct=16, batch_size=64, too_long="error"))


def experiment_config(path: str, preset: str | None = None) -> ConfigDict:
  """get_config(preset) of the experiment file at `path`, loaded as run.py's --experiment loads it (experiments/
  is not a package): how one experiment starts from another's presets (experiments/baselines from
  experiments/instructgpt, say)."""
  spec = importlib.util.spec_from_file_location(f"experiment_{abs(hash(path))}", path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f"{path}: no experiment file there")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def add_rm_of_size(c: ConfigDict, size: str) -> tuple[str, list[str]]:
  """Adds to experiment config `c` a reward model of another model size (a models/presets.py name) that starts
  from an SFT model of that size, as the policy-sized RM starts from the shared SFT model: variants
  pretrain_<size> and sft_<size> (the shared pretraining and SFT settings with that model) and rm_<size>
  (rm.model_size, rm.backbone_from; the shared comparisons of the policy's samples). Returns (the RM's stage
  directory, the stages entries to run, in order). experiments/papers/gao.py and rm_proxy.py use it."""
  model = model_config(size).to_dict()
  name = f"rm_{size}"
  c.variants[f"pretrain_{size}"] = {"model": model, "pretrain": {"stage_dir": f"pretrain_{size}"}}
  c.variants[f"sft_{size}"] = {"model": model, "sft": {"stage_dir": f"sft_{size}", "init_from": f"pretrain_{size}"}}
  c.variants[name] = {"rm": {"stage_dir": name, "model_size": size, "backbone_from": f"sft_{size}"}}
  return name, [f"pretrain:pretrain_{size}", f"sft:sft_{size}", f"rm:{name}"]


def files_config() -> ConfigDict:
  """A user's data files in place of the task suite (rlhf_jax/data/sources.py; schemas of rlhf_jax/data/real.py).

  With `sft` set the run is on user data: the data stage converts each file once (cached by its hash) and the
  stages read them where they read the suite's splits: `sft` for SFT (and, without `prompts`, its prompts for
  RL and evaluation, its replies as the references), `prompts` for RL, `pretrain` ({"text"} documents) for
  PPO-ptx, continued pretraining and the held-out LM loss. A file without a validation split keeps its last
  `val_fraction` of records for validation. There are no simulated humans then: comparisons come from
  rm.source="file" and the evaluation's judge is a held-out reward model (eval.judge="rm").
  """
  return ConfigDict(dict(sft="", sft_schema="sft", prompts="", prompts_schema="prompts", pretrain="",
                         pretrain_schema="text", on_error="raise", val_fraction=0.1))


def base_config(model_size: str = "tiny", world: str = "tiny") -> ConfigDict:
  """Every block with the library's defaults, a `model_size` model and a `world` task suite.

  The whole pipeline lives in one config so a pipeline experiment and a single-stage experiment accept the
  same overrides (`--experiment.ppo.kl.target=3`), and the lock rejects anything else. `stage` names one
  stage or "pipeline", in which case `stages` lists them in order (rlhf_jax/pipeline.py).
  """
  c = ConfigDict()
  c.stage = "pipeline"
  c.stages = ("data", "pretrain", "sft", "rm", "ppo")  # a tuple: --experiment.stages=data --experiment.stages=sft
  c.seed = 0
  c.data = data_config(world)
  c.tokenizer = tokenizer_config()
  c.model = model_config(model_size)
  # hf_path: a Hugging Face folder (rlhf_jax.models.hf) whose architecture and weights the pretrain stage starts
  # from instead of config.model's fresh weights; every later stage inherits them. The config's runtime fields
  # (dtype, remat, dropout_rate) still apply.
  c.init = ConfigDict(dict(hf_path=""))
  c.files = files_config()
  c.mesh = mesh_config()
  c.checkpoint = checkpoint_config()
  c.guard = guard_config()
  c.sharding_rules = ()  # empty = rlhf_jax.sharding.DEFAULT_RULES
  c.pretrain = pretrain_config()
  c.sft = sft_config()
  c.rm = rm_config()
  c.ppo = ppo_config()
  c.dpo = dpo_config()
  c.mlm = mlm_config()
  c.cot = cot_config()
  c.collect = collect_config()
  c.elo = elo_config()
  c.icl = icl_config()
  # The "export" stage: policy_from / rm_from name the stage directories written as Hugging Face folders
  # ("" skips one); only for models imported with init.hf_path (rlhf_jax/stages/export.py).
  c.export = ConfigDict(dict(stage_dir="export", policy_from="ppo", rm_from="rm", max_shard_bytes=5 * 2**30))
  c.eval = eval_config()
  # name -> a partial config: the stages entry "ppo:name" runs the ppo stage with these values (pipeline.py).
  c.variants = ConfigDict()
  # The "papers" stage (rlhf_jax/stages/papers.py): a paper's ablation read from the stages named in `runs`,
  # written as WORKDIR/<stage_dir>/report_section.md with its figures, table and verdict (experiments/papers/).
  # ptx_coefs: alignment_tax's PPO-ptx coefficient of each run; dpo_runs: dpo_vs_ppo's DPO runs (`runs`: PPO).
  # rm_proxy: `rms` the reward models compared, `runs` the PPO run against each ("" = none), `ensembles` groups
  # of `rms` entries whose mean score chooses as one more row. bon_prompts: best-of-n's prompts, "rl" (the first
  # eval.n_prompts RL validation prompts, the PPO stage's) or "all_validation" (every validation prompt of the
  # task suite: the RL, comparison and SFT ones, each unseen by every stage's training). bon_estimator: "first"
  # (best-of-n is each prompt's first n candidates, the PPO stage's bon<n> at the same n) or "subsets" (Gao et
  # al.'s: its expectation over every n-subset of bon_candidates candidates a prompt, 0 = max(best_of_n)).
  c.papers = ConfigDict(dict(stage_dir="papers", experiment="gao", runs=(), rms=(), sft_from="sft",
                             best_of_n=(1, 2, 4, 8, 16, 32, 64), ptx_coefs=(), dpo_runs=(), ensembles=(),
                             bon_prompts="rl", bon_estimator="first", bon_candidates=0))
  return c
