"""A held-out reward model as the judge of a run on a user's data: the gold scorer's methods, a model's scores.

Runs on the task suite score responses with the simulated humans' hidden preference (rlhf_jax.tasks.gold). A
user's data has none; as in Gao et al. 2022, where a larger "gold" reward model trained on other comparisons
plays the human, a second reward model (a stage directory of its own, `eval.judge_rm_from`) stands in for it:
its normalised score is the "gold score" of every table, win rates are decided by it, and the reference replies
of the validation demonstrations (TL;DR's human summaries) stand in for the gold references. It knows no task
families (one family, "all") and no right answers (`is_correct` is NaN).

A response is judged as text, the way a labeler reads it: re-encoded, with the end-of-turn token appended, after
the prompt as the tokenizer's chat template renders it (so a response the policy sampled in a non-canonical
tokenisation scores as its canonical form).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.data.batching import fit_prompt, left_pad
from rlhf_jax.evals import policy as policy_evals


class RewardModelJudge:
  """score_batch / reference / family / is_correct, as rlhf_jax.tasks.gold.GoldScorer, from a reward model.

  turns_of: prompt text -> its chat turns (the prompts the evaluation poses); references: prompt text -> the
  reference reply (prompts without one have no reference, `reference` returns None); max_prompt_len and
  max_response_len: prompts keep their last max_prompt_len tokens behind BOS (as RL prompts do), responses their
  first max_response_len tokens.
  """

  def __init__(self, rm_params, rm_cfg, tok, turns_of: Mapping[str, Sequence[dict]], references: Mapping[str, str],
               *, batch_size: int, max_prompt_len: int, max_response_len: int, mesh, rules):
    self.rm_params, self.rm_cfg, self.tok = rm_params, rm_cfg, tok
    self.turns_of, self.references = dict(turns_of), dict(references)
    self.batch_size, self.max_prompt_len, self.max_response_len = batch_size, max_prompt_len, max_response_len
    self.mesh, self.rules = mesh, rules

  def _prompt_ids(self, prompt: str) -> list[int]:
    if prompt not in self.turns_of:
      raise KeyError(f"the judge has no chat turns for the prompt {prompt[:60]!r}; expected one of the prompts "
                     "it was built with")
    return fit_prompt(tokenizers.encode_prompt(self.tok, self.turns_of[prompt]), self.max_prompt_len)

  def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"score_batch: {len(prompts)} prompts but {len(responses)} responses; expected equal lengths")
    if not prompts:
      return np.zeros((0,), np.float64)
    tokens_bp, mask_bp = left_pad([self._prompt_ids(p) for p in prompts], self.tok.pad_id)
    resp = [(self.tok.encode(r) + [self.tok.eos_id])[:self.max_response_len] for r in responses]
    n = max(len(r) for r in resp)
    response_bn = np.full((len(resp), n), self.tok.pad_id, np.int32)
    response_mask_bn = np.zeros((len(resp), n), bool)
    for i, r in enumerate(resp):
      response_bn[i, :len(r)], response_mask_bn[i, :len(r)] = r, True
    # Rows padded to a multiple of the batch so every batch has the same shape (one compilation); cut after.
    pad = -len(resp) % self.batch_size
    samples = {"prompt_bp": np.concatenate([tokens_bp, np.repeat(tokens_bp[:1], pad, 0)]),
               "prompt_mask_bp": np.concatenate([mask_bp, np.repeat(mask_bp[:1], pad, 0)]),
               "response_bn": np.concatenate([response_bn, np.repeat(response_bn[:1], pad, 0)]),
               "response_mask_bn": np.concatenate([response_mask_bn, np.repeat(response_mask_bn[:1], pad, 0)])}
    s = policy_evals.rm_scores(self.rm_params, self.rm_cfg, samples, batch_size=self.batch_size, mesh=self.mesh,
                               rules=self.rules)
    return np.asarray(s, np.float64)[:len(resp)]

  def score(self, prompt: str, response: str) -> float:
    return float(self.score_batch([prompt], [response])[0])

  def reference(self, prompt: str) -> str | None:
    return self.references.get(prompt)

  def family(self, prompt: str) -> str:
    del prompt
    return "all"

  def is_correct(self, prompt: str, response: str) -> float:
    del prompt, response
    return float("nan")
