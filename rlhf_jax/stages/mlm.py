"""The masked-LM encoder (BERT, arXiv 1810.04805): the policy's Transformer with bidirectional attention
(model.causal=False), trained with BERT's objective on the pretraining corpus, then the cloze evaluation.

The same data, batch, sequence length, sharding, checkpoints and metrics as pretraining (the shared loop in
rlhf_jax.training); the same parameter count as the decoder (the MLM head is the unembedding,
rlhf_jax.models.heads.mlm_logits). Of each row's real, non-special tokens `mlm.select_rate` are selected; of
those `mask_fraction` become [MASK], `random_fraction` a random token, the rest stay (rlhf_jax.losses.mlm).

[MASK]: the byte tokenizer's id 262, one of the two ids that pad its vocabulary to 264 and that no text encodes
to; SentencePiece vocabularies have no spare id, so it reuses SYSTEM (5), a control id the generated world never
writes (its chats have no system turn), which keeps every token id of the default run as it is.

Then, with `mlm.compare_from` naming a decoder stage (default "pretrain"), the cloze evaluation
(rlhf_jax.tasks.cloze, rlhf_jax.evals.cloze): top-1 accuracy of the encoder, the decoder, the corpus's most
frequent candidate (unigram) and chance, per kind. WORKDIR/<mlm.stage_dir>/{checkpoints, params, export.json
(kind "policy" with model.causal=False), metrics.jsonl, cloze.jsonl, report_section.md, summary.json}.
Feeding the encoder to the reward model is `rm.backbone="encoder"` (rlhf_jax/stages/rm.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections

from rlhf_jax import metrics, optim, runtime, sharding, tokenizers, training
from rlhf_jax.data import sources
from rlhf_jax.evals import cloze as cloze_evals
from rlhf_jax.evals import lm as lm_evals
from rlhf_jax.losses import mlm as mlm_losses
from rlhf_jax.models import transformer
from rlhf_jax.tasks import cloze, suite

BYTE_MASK_ID = tokenizers.NUM_SPECIALS + 256  # 262: the first id past the bytes, never produced by encode


def encoder_config(decoder_cfg: transformer.ModelConfig) -> transformer.ModelConfig:
  """The decoder's architecture and size with bidirectional attention."""
  return dataclasses.replace(decoder_cfg, causal=False)


def mask_token(tok: tokenizers.Tokenizer) -> tuple[int, int]:
  """([MASK] id, end of the ordinary ids random replacements are drawn from: [NUM_SPECIALS, end))."""
  if isinstance(tok, tokenizers.ByteTokenizer):
    return BYTE_MASK_ID, BYTE_MASK_ID
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    return tokenizers.SYSTEM_ID, tok.vocab_size
  raise ValueError(f"mlm: tokenizer {tok!r} has no id to use as [MASK]; use tokenizer.kind='byte' or "
                   "'sentencepiece'")


def check(config: ml_collections.ConfigDict) -> None:
  runtime.check_lm_block(config, "mlm")
  mc = config.mlm
  runtime.check_choice(config.tokenizer.kind, "tokenizer.kind (for mlm's [MASK] id)", ("byte", "sentencepiece"))
  for name in ("select_rate", "mask_fraction", "random_fraction"):
    if not 0.0 <= mc[name] <= 1.0:
      raise ValueError(f"mlm.{name}={mc[name]}: expected a probability in [0, 1]")
  if mc.select_rate == 0.0:
    raise ValueError("mlm.select_rate=0: no token would be predicted; BERT selects 0.15")
  if mc.mask_fraction + mc.random_fraction > 1.0:
    raise ValueError(f"mlm.mask_fraction={mc.mask_fraction} + mlm.random_fraction={mc.random_fraction} exceeds 1")
  if mc.cloze_batch_size < 1:
    raise ValueError(f"mlm.cloze_batch_size={mc.cloze_batch_size}: expected >= 1")
  try:
    encoder_config(runtime.check_shared(config))
  except ValueError as e:
    raise ValueError(f"mlm: the encoder is config.model with causal=False: {e}") from None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  t0 = time.time()
  mc, tc = config.mlm, config.mlm.train
  stage_dir = runtime.stage_dir(config, workdir, "mlm")
  tok = sources.tokenizer(config, workdir)
  decoder_cfg = runtime.policy_config(config, tok.vocab_size)
  model_cfg = encoder_config(decoder_cfg)
  runtime.check_seq_len(tc.seq_len, model_cfg, "mlm.train.seq_len")
  mask_id, random_high = mask_token(tok)
  mask_kw = dict(mask_id=mask_id, random_low=tokenizers.NUM_SPECIALS, random_high=random_high,
                 select_rate=mc.select_rate, mask_fraction=mc.mask_fraction, random_fraction=mc.random_fraction)
  train_iter_fn, eval_iter_fn = sources.pretrain_iters(config, workdir, tok, stage_cfg=mc)
  entropy = lm_evals.unigram_entropy(eval_iter_fn())
  mesh, rules = runtime.mesh_and_rules(config)
  sharding.check_batch(tc.batch_size, mesh, rules, field="mlm.train.batch_size")

  axes = transformer.param_axes(model_cfg)
  optimizer = optim.make_optimizer(mc.optimizer, tc.steps, optim.decay_mask_from_axes(axes))
  # The pretrain stage's seed: the encoder starts from the decoder's initial weights.
  state, state_sh = optim.create_state(lambda k: transformer.init(k, model_cfg), axes, optimizer,
                                       jax.random.PRNGKey(config.seed), mesh, rules)
  ckpt = training.make_checkpointer(config.checkpoint, stage_dir)
  meta = {"model": dataclasses.asdict(model_cfg), "stage": "mlm"}
  train_iter = train_iter_fn(jax.process_index(), jax.process_count())
  state, start = training.resume(ckpt, state, state_sh, meta, train_iter, stage="mlm")

  def loss_fn(params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, 1) if model_cfg.dropout_rate > 0 else None
    loss, n, acc = mlm_losses.mlm_loss(params, batch, model_cfg, rng, dropout_rng=dropout_rng, **mask_kw)
    return loss, {"n_tokens": n, "accuracy": acc}

  def eval_step(params, batch, key):
    loss, n, acc = mlm_losses.mlm_loss(params, batch, model_cfg, key, **mask_kw)
    return loss * n, n, acc * n

  step_fn = training.make_train_step(loss_fn, optimizer, inject_nan_at_step=config.guard.inject_nan_at_step,
                                     skip_nonfinite=config.guard.on_nonfinite == "skip")
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in ("tokens", "mask", "loss_mask")}
  eval_key = jax.random.PRNGKey(config.seed + 7)  # the same masks at every evaluation

  def evaluate(params):
    total, count, correct = 0.0, 0.0, 0.0
    for i, batch in enumerate(eval_iter_fn()):
      if tc.eval_batches and i >= tc.eval_batches:
        break
      s, n, c = jit_eval(params, sharding.put_batch(lm_evals.lm_fields(batch), mesh, rules),
                         jax.random.fold_in(eval_key, i))
      total, count, correct = total + float(s), count + float(n), correct + float(c)
    return {"val_mlm_loss": total / max(count, 1.0), "val_mlm_accuracy": correct / max(count, 1.0),
            "val_masked_tokens": count}

  schedule = optim.learning_rate_schedule(mc.optimizer, tc.steps)
  writer = metrics.MetricsWriter(stage_dir, stage="mlm", total_steps=tc.steps, start_step=start,
                                 tokens_per_step=tc.batch_size * tc.seq_len)
  with sharding.activate(mesh, rules):
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                         donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(state_sh["params"], batch_sh, None))
    state, last = training.fit(
        state, stage="mlm", train_step=train_step, batches=train_iter,
        put=lambda b: sharding.put_batch(lm_evals.lm_fields(b), mesh, rules), steps=tc.steps, start=start,
        log_every=tc.log_every, eval_every=tc.eval_every, on_nonfinite=config.guard.on_nonfinite, ckpt=ckpt,
        meta=meta, writer=writer, evaluate=evaluate,
        log_row=lambda done, m, _: {"loss": m["loss"], "accuracy": m["accuracy"], "grad_norm": m["grad_norm"],
                                    "lr": schedule(done)})
    final_eval = evaluate(state["params"])
    params = state["params"]
    training.export_params(stage_dir, params, model_cfg=model_cfg, tokenizer=tok)
    cloze_summary = _cloze(config, workdir, stage_dir, tok, params, model_cfg, decoder_cfg, mask_id, mesh, rules)
  if not last and os.path.exists(writer.jsonl_path):  # resumed after the last step: report the logged loss
    rows = metrics.read_jsonl(writer.jsonl_path)
    last = rows[-1] if rows else {}
  summary = {"step": tc.steps, "train_loss": last.get("loss"), **final_eval, **cloze_summary,
             "unigram_entropy": entropy, "mask_id": mask_id, "num_params": model_cfg.num_params(),
             "wall_s": time.time() - t0, "devices": jax.device_count()}
  summary = writer.summary(summary)
  writer.close()
  ckpt.close()
  return summary


def _cloze(config, workdir, stage_dir, tok, params, model_cfg, decoder_cfg, mask_id, mesh, rules) -> dict[str, Any]:
  """Cloze accuracies (encoder, decoder from mlm.compare_from, unigram, chance), cloze.jsonl and the report
  section."""
  mc = config.mlm
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  items = cloze.subsample(cloze.items(world), mc.cloze_items_per_kind)
  corpus = sources.split(config, workdir, "pretrain")
  counts = cloze.word_counts(corpus[i]["text"] for i in range(len(corpus)))
  kw = dict(batch_size=mc.cloze_batch_size, mesh=mesh, rules=rules)
  picks = {"encoder": cloze_evals.choices(cloze_evals.score_items(
      jax.jit(lambda p, b: cloze_evals.encoder_scores(p, b, model_cfg)), params, tok, items, mask_id=mask_id, **kw))}
  if mc.compare_from:
    decoder, _ = runtime.load_policy(workdir, mc.compare_from, mesh, rules, expect=decoder_cfg,
                                     field="mlm.compare_from")
    picks["decoder"] = cloze_evals.choices(cloze_evals.score_items(
        jax.jit(lambda p, b: cloze_evals.decoder_scores(p, b, decoder_cfg)), decoder, tok, items, mask_id=None,
        **kw))
  picks["unigram"] = cloze.unigram_choices(items, counts)
  table = {name: cloze.accuracy(items, c) for name, c in picks.items()}
  table["chance"] = cloze.chance(items)
  out = {f"cloze_{name}_{kind}": acc for name, by_kind in table.items() for kind, acc in by_kind.items()}
  out["n_cloze_items"] = len(items)
  if jax.process_index() == 0:
    rows = [{"kind": it.kind, "text": it.text, "answers": sorted(it.candidates[a].strip() for a in it.answers),
             **{name: it.candidates[c[i]].strip() for name, c in picks.items()}} for i, it in enumerate(items)]
    with open(os.path.join(stage_dir, "cloze.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    _write_section(stage_dir, table, len(items), mc.compare_from)
  return out


def _write_section(stage_dir: str, table, n_items: int, compare_from: str) -> None:
  kinds = [k for k in ("value", "entity", "prompt", "all") if k in table["chance"]]
  lines = ["## Masked-LM encoder: cloze accuracy", "",
           f"Top-1 accuracy on {n_items} cloze items about the world's facts (rlhf_jax/tasks/cloze.py); the "
           f"decoder is WORKDIR/{compare_from or '(none)'}, unigram the corpus's most frequent candidate.", "",
           "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
  for name, by_kind in table.items():
    lines.append(f"| {name} | " + " | ".join(f"{by_kind[k]:.3f}" for k in kinds) + " |")
  with open(os.path.join(stage_dir, "report_section.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
