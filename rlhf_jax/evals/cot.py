"""Chain-of-thought evaluation: exact-match accuracy of greedy answers to multi-step and one-step questions.

A condition is a list of prompts (token ids) with the answer expected of each; the model decodes greedily
(`rlhf_jax.sampling`, temperature 0) and `rlhf_jax.tasks.multistep.final_answer` reads the answer from the first
line of the response (a pretrained model continues a few-shot prompt with the next "Q:" line). Prompts are
built by the caller: plain text after BOS for a pretrained model (`plain_ids`, few-shot), a chat turn for an
SFT model (`chat_ids`, zero-shot). Every function takes parameters, prompts and answers as arguments.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import sampling, sharding, tokenizers
from rlhf_jax.data.batching import decode_responses
from rlhf_jax.evals import policy as policy_evals
from rlhf_jax.models import transformer
from rlhf_jax.tasks import multistep


@dataclasses.dataclass(frozen=True)
class Query:
  """One question asked in one condition: the prompt's ids and what a right answer is.

  group: what the accuracy is averaged over ("direct", "worked", "one_step"); kind: the multi-step kind;
  item: the index of the multi-step item among the held-out items of its kind (sub-questions share it).
  """

  group: str
  kind: str
  item: int
  ids: tuple[int, ...]
  answer: str
  domain: str


def plain_ids(tok: tokenizers.Tokenizer, text: str) -> tuple[int, ...]:
  """A pretrained model's prompt: BOS and the text."""
  return (tok.bos_id, *tok.encode(text))


def chat_ids(tok: tokenizers.Tokenizer, question: str) -> tuple[int, ...]:
  """An SFT model's prompt: one user turn and the assistant's turn marker."""
  return tuple(tokenizers.encode_prompt(tok, [{"role": "user", "content": question}]))


def greedy_responses(params, cfg: transformer.ModelConfig, tok, prompt_ids: Sequence[Sequence[int]], *,
                     max_new_tokens: int, batch_size: int, mesh, rules) -> list[str]:
  """The greedy continuation of every prompt, decoded to text (up to max_new_tokens tokens or EOS)."""
  scfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
  with sharding.activate(mesh, rules):
    out = policy_evals.sample(params, cfg, [list(p) for p in prompt_ids], tok, scfg, jax.random.PRNGKey(0),
                              batch_size=batch_size, mesh=mesh, rules=rules)
  return decode_responses(tok, out["response_bn"], out["response_mask_bn"])


def first_line(text: str) -> str:
  return text.strip().split("\n", 1)[0].strip()


def answer_queries(params, cfg: transformer.ModelConfig, tok, queries: Sequence[Query], entities: Sequence[str], *,
                   max_new_tokens: dict[str, int], batch_size: int, mesh, rules) -> list[dict[str, Any]]:
  """One row per query: {group, kind, item, response (its first line), parsed, answer, correct}. Queries are
  decoded per group with max_new_tokens[group] new tokens (one compiled decoder per group and model)."""
  rows: list[dict[str, Any] | None] = [None] * len(queries)
  by_group: dict[str, list[int]] = collections.defaultdict(list)
  for i, q in enumerate(queries):
    by_group[q.group].append(i)
  for group, idx in by_group.items():
    texts = greedy_responses(params, cfg, tok, [queries[i].ids for i in idx], max_new_tokens=max_new_tokens[group],
                             batch_size=batch_size, mesh=mesh, rules=rules)
    for i, text in zip(idx, texts):
      q = queries[i]
      line = first_line(text)
      parsed = multistep.final_answer(line, q.domain, entities)
      rows[i] = {"group": q.group, "kind": q.kind, "item": q.item, "response": line, "parsed": parsed,
                 "answer": q.answer, "correct": parsed == q.answer.lower()}
  return rows


def accuracies(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """{"<group>.<kind>": accuracy} and "<group>.all" (items of every kind alike), plus "all_steps.<kind>": the
  fraction of items whose every one-step sub-question is answered right (what a perfect chain could reach; its
  gap to "direct" is Press et al.'s compositionality gap, arXiv 2210.03350)."""
  groups: dict[str, list[bool]] = collections.defaultdict(list)
  steps: dict[tuple[str, int], list[bool]] = collections.defaultdict(list)
  for r in rows:
    groups[f"{r['group']}.{r['kind']}"].append(bool(r["correct"]))
    groups[f"{r['group']}.all"].append(bool(r["correct"]))
    if r["group"] == "one_step":
      steps[(r["kind"], r["item"])].append(bool(r["correct"]))
  out = {k: float(np.mean(v)) for k, v in groups.items()}
  chains: dict[str, list[bool]] = collections.defaultdict(list)
  for (kind, _), ok in steps.items():
    chains[kind].append(all(ok))
    chains["all"].append(all(ok))
  out.update({f"all_steps.{k}": float(np.mean(v)) for k, v in chains.items()})
  return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------------------
# The queries of the two settings.


def _shots(train: Sequence[multistep.Item], k: int, rng: np.random.Generator) -> list[multistep.Item]:
  return [train[int(i)] for i in rng.choice(len(train), size=min(k, len(train)), replace=False)] if k else []


def few_shot_queries(tok, world, *, n_items: int, shots: int, seed: int) -> list[Query]:
  """A pretrained model's queries on the first n_items held-out items of every kind: "direct" and "worked" (k
  training items of the same kind as demonstrations, answered directly or with worked steps: the same
  demonstrations in both) and "one_step" (each sub-question after the same items' same sub-questions)."""
  out = []
  for j, kind in enumerate(multistep.KINDS):
    train, held_out = multistep.split(world, kind)
    for i, item in enumerate(held_out[:n_items]):
      demos = _shots(train, shots, np.random.default_rng([seed, j, i]))
      for group, answer_of in (("direct", lambda d: d.direct), ("worked", lambda d: d.worked)):
        text = multistep.few_shot_prompt(item.question, [(d.question, answer_of(d)) for d in demos])
        out.append(Query(group, kind, i, plain_ids(tok, text), item.answer, item.domain))
      for s, (q, a, domain) in enumerate(item.sub_questions):
        sub_demos = [(d.sub_questions[s][0], multistep.ANSWER_DIRECT.format(answer=d.sub_questions[s][1]))
                     for d in demos]
        out.append(Query("one_step", kind, i, plain_ids(tok, multistep.few_shot_prompt(q, sub_demos)), a, domain))
  return out


def zero_shot_queries(tok, world, *, n_items: int) -> list[Query]:
  """An SFT model's queries on the same held-out items, as one user turn: "direct" (the question), "worked" (the
  question and multistep.STEP_TRIGGER) and "one_step" (each sub-question)."""
  out = []
  for kind in multistep.KINDS:
    _, held_out = multistep.split(world, kind)
    for i, item in enumerate(held_out[:n_items]):
      out.append(Query("direct", kind, i, chat_ids(tok, item.question), item.answer, item.domain))
      out.append(Query("worked", kind, i, chat_ids(tok, item.question + multistep.STEP_TRIGGER), item.answer,
                       item.domain))
      out += [Query("one_step", kind, i, chat_ids(tok, q), a, domain) for q, a, domain in item.sub_questions]
  return out
