"""Held-out language-modelling metrics: token-weighted loss and perplexity, and the unigram yardstick."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from rlhf_jax import losses, sharding
from rlhf_jax.models import transformer

Batch = dict[str, Any]


def lm_fields(batch: Batch) -> Batch:
  """The arrays a next-token batch feeds to the model (a loader's rows may carry more)."""
  return {k: np.asarray(batch[k]) for k in ("tokens", "mask", "loss_mask")}


def make_eval_step(model_cfg: transformer.ModelConfig) -> Callable:
  """eval_step(params, batch) -> (summed loss, counted tokens)."""

  def eval_step(params, batch):
    loss, n_tokens = losses.lm_loss(params, batch, model_cfg)
    return loss * n_tokens, n_tokens

  return eval_step


def evaluate(eval_step, params, batches: Iterator[Batch], mesh, rules, max_batches: int = 0) -> dict[str, float]:
  """Token-weighted held-out loss and perplexity over at most `max_batches` batches (0: all)."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    s, n = eval_step(params, sharding.put_batch(lm_fields(batch), mesh, rules))
    total += float(s)
    count += float(n)
  loss = total / max(count, 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _eval_step(params, batch, cfg):
  return make_eval_step(cfg)(params, batch)


def held_out_loss(params, cfg: transformer.ModelConfig, batches: Iterator[Batch], mesh, rules,
                  max_batches: int = 0) -> float:
  """`evaluate`'s val_loss of one set of parameters (one compiled eval step per config and shape, shared by
  every call: the policy's and SFT's losses compile once)."""
  step = functools.partial(_eval_step, cfg=cfg)
  return evaluate(step, params, batches, mesh, rules, max_batches)["val_loss"]


def unigram_entropy(token_batches: Iterator[Batch], max_batches: int = 20) -> float:
  """Entropy (nats) of the token frequencies over loss-masked targets: the loss of the best
  context-free model, a yardstick for the held-out loss."""
  counts: dict[int, int] = {}
  for i, batch in enumerate(token_batches):
    if i >= max_batches:
      break
    toks = np.asarray(batch["tokens"])[np.asarray(batch["loss_mask"]).astype(bool)]
    ids, c = np.unique(toks, return_counts=True)
    for a, b in zip(ids.tolist(), c.tolist()):
      counts[a] = counts.get(a, 0) + b
  p = np.array(list(counts.values()), dtype=np.float64)
  p /= p.sum()
  return float(-(p * np.log(p)).sum())
