"""What a stage derives from (config, workdir): its directory, the mesh and rules, model configs, the exports
of earlier stages, and the preflight checks several stages share.

This is the one L3 module that reads an experiment config: the shared loops and evaluations
(rlhf_jax.training, rlhf_jax.rl, rlhf_jax.evals) take parameters, data and settings as arguments, and the
stages (rlhf_jax/stages/) use these helpers to build them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from rlhf_jax import configs, sampling, sharding, training
from rlhf_jax.data import sources
from rlhf_jax.evals import judge as judge_lib
from rlhf_jax.evals import lm as lm_evals
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.models import heads, hf, transformer


def stage_dir(config: ml_collections.ConfigDict, workdir: str, block: str) -> str:
  """WORKDIR/<config.<block>.stage_dir>: where the stage of that config block writes."""
  return os.path.join(workdir, config[block].stage_dir)


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The device mesh of config.mesh and the logical-axis rules of config.sharding_rules."""
  return sharding.mesh_from_config(config.mesh), sharding.rules_from_config(config)


# ModelConfig fields that say how to run a model, not what it is: an imported model takes them from config.model.
RUNTIME_FIELDS = ("dtype", "remat", "dropout_rate", "param_dtype")


def policy_config(config: ml_collections.ConfigDict, vocab_size: int) -> transformer.ModelConfig:
  """The policy's ModelConfig: config.model with the vocabulary from the tokenizer, or, with init.hf_path, the
  imported model's architecture (its config.json) with config.model's runtime fields."""
  if not config.init.hf_path:
    return configs.to_model_config(config.model, vocab_size)
  cfg, _ = hf.read_config(config.init.hf_path)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"init.hf_path={config.init.hf_path}: the model's vocab_size={cfg.vocab_size} is smaller "
                     f"than the tokenizer's {vocab_size}")
  return dataclasses.replace(cfg, **{k: config.model[k] for k in RUNTIME_FIELDS})


def check_seq_len(seq_len: int, model_cfg: transformer.ModelConfig, field: str, extra: int = 1) -> None:
  """A sequence of seq_len tokens (+ extra, 1 for the shifted target of next-token batches) fits the model."""
  if seq_len + extra > model_cfg.max_len:
    raise ValueError(f"{field}={seq_len}{' (+1 for the shifted target)' if extra else ''} exceeds "
                     f"model.max_len={model_cfg.max_len}")


def check_choice(value: Any, field: str, choices: tuple[Any, ...]) -> None:
  """`value` is one of `choices`, or an error naming the field: "rm.grouping='x': expected 'prompt' or 'pairs'"."""
  if value not in choices:
    names = [repr(c) for c in choices]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"{field}={value!r}: expected {listed}")


def check_shared(config: ml_collections.ConfigDict) -> transformer.ModelConfig:
  """The blocks every trained stage uses (model, mesh, rules, guard), checked from the config alone; returns
  the policy's ModelConfig with a stand-in vocabulary when config.model.vocab_size is 0 (from the tokenizer)."""
  check_choice(config.guard.on_nonfinite, "guard.on_nonfinite", ("stop", "skip"))
  mesh_and_rules(config)
  if config.init.hf_path:
    hf.check_folder(config.init.hf_path)  # every tensor's name and shape, before any stage writes
  sources.check_files(config)
  check_judge(config)
  return policy_config(config, config.model.vocab_size or 1)


def check_lm_block(config: ml_collections.ConfigDict, block: str, *, allow_zero_steps: bool = False) -> None:
  """A next-token stage's block (pretrain, sft): positive steps (or 0 where allowed), a batch that divides over
  the devices and sequences that fit the model."""
  policy = check_shared(config)
  mesh, rules = mesh_and_rules(config)
  tc = config[block].train
  if tc.steps < (0 if allow_zero_steps else 1):
    raise ValueError(f"{block}.train.steps={tc.steps}: expected a positive number of steps"
                     + (" (or 0 to import init.hf_path without pretraining)" if allow_zero_steps else ""))
  sharding.check_batch(tc.batch_size, mesh, rules, field=f"{block}.train.batch_size")
  check_seq_len(tc.seq_len, policy, f"{block}.train.seq_len")


def load_policy(workdir: str, name: str, mesh, rules, *, expect: transformer.ModelConfig | None = None,
                field: str = "init_from"):
  """The parameters the stage in WORKDIR/<name> exported, on this run's mesh. With `expect`, a model config
  other than the one this run uses is an error naming both (`field` is the config field that chose `name`);
  the RUNTIME_FIELDS say how to run a model, not which model it is, so they come from `expect` (an export in
  another model.param_dtype is cast to this run's: a float32 SFT model starts a bfloat16 PPO run)."""
  params, cfg, _ = training.load_export(os.path.join(workdir, name), mesh, rules)
  if expect is not None:
    if cfg.param_dtype != expect.param_dtype:
      params = jax.tree.map(lambda x: x.astype(expect.param_dtype), params)
    cfg = dataclasses.replace(cfg, **{k: getattr(expect, k) for k in RUNTIME_FIELDS})
  if expect is not None and cfg != expect:
    diffs = {k: (v, getattr(expect, k)) for k, v in dataclasses.asdict(cfg).items() if getattr(expect, k) != v}
    detail = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(diffs.items()))
    raise ValueError(f"{field}={name!r}: {os.path.join(workdir, name)} holds a model of another config "
                     f"({detail}); use the same model config or another workdir")
  return params, cfg


def load_reward_model(workdir: str, name: str, mesh, rules, *, field: str):
  """(params, model config) of the reward model WORKDIR/<name> exported; another kind of export is an error."""
  if not os.path.exists(os.path.join(workdir, name, training.EXPORT_MANIFEST)):
    raise ValueError(f"{field}={name!r}: {os.path.join(workdir, name)} holds no finished reward model; run the "
                     "stage that trains it first")
  params, cfg, manifest = training.load_export(os.path.join(workdir, name), mesh, rules)
  if manifest["kind"] != "reward_model":
    raise ValueError(f"{field}={name!r}: {os.path.join(workdir, name)} holds a {manifest['kind']}, not a reward "
                     "model")
  return params, cfg


def load_reward_models(workdir: str, names: Sequence[str], mesh, rules, *, field: str):
  """(scoring params, model config, the first model's params): the reward model WORKDIR/<names[0]>, or with more
  names the mean ensemble of all of them (heads.ensemble), which must share one config and parameter tree."""
  first, cfg = load_reward_model(workdir, names[0], mesh, rules, field=field)
  if len(names) == 1:
    return first, cfg, first
  members = [first]
  for name in names[1:]:
    params, member_cfg = load_reward_model(workdir, name, mesh, rules, field=field)
    if member_cfg != cfg or jax.tree.structure(params) != jax.tree.structure(first):
      raise ValueError(f"{field}: {name!r} is not the same kind of reward model as {names[0]!r} (model config equal: "
                       f"{member_cfg == cfg}; an ensemble's members need one config and the same rm.score_at)")
    members.append(params)
  return heads.ensemble(members), cfg, first


def check_judge(config) -> None:
  """eval.judge against the data: the simulated humans exist only on the task suite."""
  if "eval" not in config:
    return
  check_choice(config.eval.judge, "eval.judge", ("gold", "rm"))
  if sources.on_user_data(config) and config.eval.judge != "rm":
    raise ValueError("eval.judge='gold' on a user's files (config.files): there are no simulated humans; set "
                     "eval.judge='rm' and train the judge, a held-out reward model, into WORKDIR/<eval.judge_rm_from>")
  if config.eval.judge == "rm" and not config.eval.judge_rm_from:
    raise ValueError("eval.judge='rm' needs eval.judge_rm_from: the stage directory of the held-out reward model")


def judge(config, workdir: str, tok, mesh, rules):
  """Who scores responses in the evaluations: the task suite's gold scorer, or with eval.judge='rm' the held-out
  reward model in WORKDIR/<eval.judge_rm_from> (rlhf_jax.evals.judge), over this run's RL and held-out prompts."""
  if config.eval.judge == "gold":
    return sources.gold_scorer(config, workdir)
  rm_params, rm_cfg = load_reward_model(workdir, config.eval.judge_rm_from, mesh, rules, field="eval.judge_rm_from")
  turns_of = {p["prompt"]: p["turns"] for which in ("train", "validation")
              for p in sources.rl_prompts(config, workdir, tok, which=which)}
  references = sources.user_references(config, workdir) if sources.on_user_data(config) else {}
  pc = config.ppo
  return judge_lib.RewardModelJudge(rm_params, rm_cfg, tok, turns_of, references, batch_size=config.eval.batch_size,
                                    max_prompt_len=pc.max_prompt_len, max_response_len=pc.max_new_tokens + 1,
                                    mesh=mesh, rules=rules)


def _sft_baseline_key(seed: int) -> jax.Array:
  """The key of the SFT samples every win rate compares with (the same samples for PPO and best-of-n)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed + 11), 1)


def evaluate_policy(config, workdir: str, tok, policy_cfg, policy_params, sft_params, rm_params, rm_cfg, mesh, rules,
                    *, stage_dir: str, best_of_n: bool = False) -> dict[str, Any]:
  """A trained policy against SFT on held-out prompts (rlhf_jax.evals.policy), and with best_of_n, best-of-n of
  SFT for each eval.best_of_n; at the RL stage's sampling settings (ppo.temperature, ppo.max_new_tokens) whatever
  trained the policy, so every policy is compared alike. The first samples go to STAGE_DIR/samples.jsonl.
  rm_params None leaves out the reward model's score."""
  ec, pc = config.eval, config.ppo
  prompts = sources.rl_prompts(config, workdir, tok, which="validation")[:ec.n_prompts]
  gold = judge(config, workdir, tok, mesh, rules)
  # The evaluation samples at the RL temperature without top-k / top-p, as the evaluation always has.
  scfg = sampling.SamplingConfig(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature)
  has_text = not sources.on_user_data(config) or bool(config.files.pretrain)  # a user's run may have no LM text
  _, pretrain_eval = sources.pretrain_iters(config, workdir, tok) if has_text else (None, None)
  kw = dict(batch_size=ec.batch_size, mesh=mesh, rules=rules)

  def pretrain_loss(params) -> float:
    if pretrain_eval is None:
      return float("nan")
    return lm_evals.held_out_loss(params, policy_cfg, pretrain_eval(), mesh, rules, config.pretrain.train.eval_batches)

  summary, rows = policy_evals.policy_eval(
      policy_params, sft_params, policy_cfg, tok, prompts, gold, rm_params=rm_params, rm_cfg=rm_cfg, scfg=scfg,
      samples_per_prompt=ec.samples_per_prompt, rng=jax.random.PRNGKey(config.seed + 11),
      sft_rng=_sft_baseline_key(config.seed), benchmark=sources.benchmark(config, workdir)[:ec.n_benchmark],
      pretrain_loss=pretrain_loss, n_samples_table=ec.n_samples_table, **kw)
  summary["judge"] = "gold" if ec.judge == "gold" else f"rm:{ec.judge_rm_from}"
  if jax.process_index() == 0:
    policy_evals.write_samples(os.path.join(stage_dir, "samples.jsonl"), rows)
  for n in (ec.best_of_n if best_of_n else ()):  # the cheapest baseline, on the same prompts and RM
    bon = policy_evals.best_of_n_eval(
        sft_params, policy_cfg, tok, prompts, gold, rm_params=rm_params, rm_cfg=rm_cfg, scfg=scfg,
        candidate_rngs=[jax.random.PRNGKey(config.seed + 100 + i) for i in range(n)],
        samples_per_prompt=ec.samples_per_prompt, sft_rng=_sft_baseline_key(config.seed),
        no_eos_penalty=pc.no_eos_penalty, **kw)
    summary.update({f"bon{n}.{k}": v for k, v in bon.items() if k != "n"})
  return summary
