"""A conversation with a trained policy: the chat loop behind `python chat.py --workdir=W`.

`Policy` loads a stage's export (WORKDIR/<stage>/params, export.json and its tokenizer) and answers a dialogue
token by token: the conversation is encoded in the chat format the policy was trained on
(`tokenizers.encode_prompt`), prefilled into a KV cache of the model's context length, then each new token is
sampled and fed back with one jitted step, so the caller can print it as it comes (`Policy.stream`).
`Conversation` keeps the turns inside the model's context: before each answer it drops the oldest turns that no
longer fit beside `max_new_tokens` new tokens (and a single over-long message loses its oldest tokens), and it
says what it dropped. `run_loop` is the interactive loop with /reset and /exit; `compare` answers one prompt
with several policies, shown side by side.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling, sharding, tokenizers, training
from rlhf_jax.data.batching import left_pad
from rlhf_jax.models import transformer

# Prompts are left-padded to a multiple of this many tokens: a few compiled prefill shapes, not one per length.
PROMPT_BUCKET = 32


def policy_stages(workdir: str) -> list[str]:
  """The stage directories of WORKDIR that hold an exported policy, oldest export first."""
  found = []
  for path in glob.glob(os.path.join(workdir, "*", training.EXPORT_MANIFEST)):
    try:
      with open(path) as f:
        kind = json.load(f).get("kind")
    except (OSError, json.JSONDecodeError):
      continue
    if kind == "policy":
      found.append((os.path.getmtime(path), os.path.basename(os.path.dirname(path))))
  return [name for _, name in sorted(found)]


def resolve_stage(workdir: str, stage: str | None) -> str:
  """WORKDIR/<stage>, or the most recently exported policy of WORKDIR; a one-line error naming what is missing."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist; train a policy first, e.g. python run.py "
                            f"--workdir={workdir}")
  if stage:
    stage_dir = os.path.join(workdir, stage)
    if not os.path.isdir(stage_dir):
      have = policy_stages(workdir)
      raise FileNotFoundError(f"--stage={stage}: {stage_dir} does not exist; policies in this workdir: "
                              f"{', '.join(have) or 'none yet'}")
    if not os.path.isfile(os.path.join(stage_dir, training.EXPORT_MANIFEST)):
      raise FileNotFoundError(f"--stage={stage}: {stage_dir} has no {training.EXPORT_MANIFEST}: the stage has not "
                              "finished (rerun the experiment to complete it)")
    return stage_dir
  have = policy_stages(workdir)
  if not have:
    raise FileNotFoundError(f"--workdir={workdir} holds no finished policy (no <stage>/{training.EXPORT_MANIFEST} "
                            "of kind 'policy'); run the pipeline's sft or ppo stage first")
  return os.path.join(workdir, have[-1])


class Policy:
  """An exported policy on one device, answering token by token with a KV cache."""

  def __init__(self, stage_dir: str, scfg: sampling.SamplingConfig, *, seed: int = 0):
    manifest = training.read_manifest(stage_dir)
    if manifest["kind"] != "policy":
      raise ValueError(f"{stage_dir} holds a {manifest['kind']}, not a policy; choose a policy stage (sft, ppo)")
    if "tokenizer" not in manifest:
      raise ValueError(f"{stage_dir}/{training.EXPORT_MANIFEST} records no tokenizer; re-export the stage")
    self.name = os.path.basename(os.path.normpath(stage_dir))
    self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.params, self.cfg, _ = training.load_export(stage_dir, self.mesh, sharding.DEFAULT_RULES)
    self.tok = tokenizers.load_from_dir(stage_dir, manifest["tokenizer"])
    if scfg.max_new_tokens >= self.cfg.max_len:
      raise ValueError(f"--max_new_tokens={scfg.max_new_tokens} leaves no room for the prompt in the model's "
                       f"context of {self.cfg.max_len} tokens")
    self.scfg = scfg
    self.rng = jax.random.PRNGKey(seed)
    self.calls = 0
    cfg, length = self.cfg, self.cfg.max_len
    # The decoding step reads per-layer weights (as sampling.generate does: no per-step slicing of the stack).
    self._unstacked = jax.jit(transformer.unstack_layers)(self.params)

    def prefill(params, prompt_bp, mask_bp):
      h_bpd, cache = transformer.prefill(params, prompt_bp, cfg, length=length, mask_bt=mask_bp)
      return transformer.unembed(params, h_bpd[:, -1:], cfg)[:, 0], cache

    def step(params, cache, logits_bv, rng):
      token_b = sampling.sample_token(logits_bv, rng, scfg)
      logits_b1v, cache = transformer.forward(params, token_b[:, None], cfg, cache=cache)
      return token_b, logits_b1v[:, 0], cache

    self._prefill = jax.jit(prefill)
    self._step = jax.jit(step, donate_argnums=1)

  @property
  def prompt_budget(self) -> int:
    """How many prompt tokens fit beside max_new_tokens new ones."""
    return self.cfg.max_len - self.scfg.max_new_tokens

  def tokens(self, prompt_ids: Sequence[int]) -> Iterator[int]:
    """The response's token ids as they are sampled, until EOS (not yielded) or max_new_tokens."""
    if len(prompt_ids) > self.prompt_budget:
      raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit beside {self.scfg.max_new_tokens} new "
                       f"tokens in the model's context of {self.cfg.max_len}")
    padded = min(self.prompt_budget, -(-len(prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET)
    prompt_bp, mask_bp = left_pad([list(prompt_ids)], self.tok.pad_id, padded)
    rng = jax.random.fold_in(self.rng, self.calls)
    self.calls += 1
    logits_bv, cache = self._prefill(self.params, jnp.asarray(prompt_bp), jnp.asarray(mask_bp))
    for i in range(self.scfg.max_new_tokens):
      token_b, logits_bv, cache = self._step(self._unstacked, cache, logits_bv, jax.random.fold_in(rng, i))
      token = int(np.asarray(token_b)[0])
      if token == self.tok.eos_id:
        return
      yield token

  def stream(self, prompt_ids: Sequence[int], ids_out: list[int] | None = None) -> Iterator[str]:
    """The response's text in pieces as it is sampled: each piece is what the new token added to the decoded
    text (a token that only starts a character shows with the next). `ids_out` collects the token ids."""
    ids = [] if ids_out is None else ids_out
    shown = ""
    for token in self.tokens(prompt_ids):
      ids.append(token)
      text = self.tok.decode(ids)
      if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
        shown = text

  def answer(self, prompt_ids: Sequence[int]) -> str:
    ids: list[int] = []
    for _ in self.stream(prompt_ids, ids):
      pass
    return self.tok.decode(ids)


@dataclasses.dataclass
class Conversation:
  """The turns of one dialogue, kept inside a policy's context."""

  turns: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def reset(self) -> None:
    self.turns = []

  def prompt(self, tok, budget: int) -> tuple[list[int], str | None]:
    """The ids to continue (the turns so far, then the assistant's role token) within `budget` tokens, and a
    note of what was dropped to fit, or None. The oldest turns go first, a user turn with the reply to it;
    a single message longer than the budget keeps its last tokens."""
    dropped = 0
    ids = tokenizers.encode_prompt(tok, self.turns)
    while len(ids) > budget and len(self.turns) > 1:
      self.turns.pop(0)
      dropped += 1
      if self.turns and self.turns[0]["role"] == "assistant":  # a reply goes with the message it answered
        self.turns.pop(0)
        dropped += 1
      ids = tokenizers.encode_prompt(tok, self.turns)
    note = None
    if dropped:
      note = (f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to stay within the model's context "
              f"({budget} prompt tokens)")
    if len(ids) > budget:  # one message alone is too long: keep BOS and its last tokens
      cut = len(ids) - budget
      ids = ids[:1] + ids[1 + cut:]
      note = (note + "; " if note else "") + f"the message is longer than the context: its first {cut} tokens " \
             "are left out"
    return ids, note

  def reply(self, policy: Policy, message: str, write: Callable[[str], None], prefix: str = "") -> str:
    """Adds the user's message, streams the policy's answer through `write` (after a note of what was dropped
    to fit, if anything, and `prefix`), and keeps it as the next turn."""
    self.turns.append({"role": "user", "content": message})
    ids, note = self.prompt(policy.tok, policy.prompt_budget)
    if note:
      write(f"({note})\n")
    write(prefix)
    response_ids: list[int] = []
    for piece in policy.stream(ids, response_ids):
      write(piece)
    text = policy.tok.decode(response_ids)  # what the next turn holds: the whole decoded response
    self.turns.append({"role": "assistant", "content": text})
    return text


def side_by_side(columns: Sequence[tuple[str, str]], width: int) -> str:
  """Texts in labelled columns of equal width, separated by " | "."""
  col = max(12, (width - 3 * (len(columns) - 1)) // len(columns))
  wrapped = [[name] + ["-" * min(col, max(len(name), 3))] + (textwrap.wrap(text, col) or ["(empty)"])
             for name, text in columns]
  rows = max(len(w) for w in wrapped)
  lines = []
  for i in range(rows):
    lines.append(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped).rstrip())
  return "\n".join(lines)


def compare(policies: Sequence[Policy], conversations: Sequence[Conversation], message: str,
            write: Callable[[str], None]) -> list[str]:
  """Each policy answers `message` in its own conversation; the answers are written side by side."""
  answers, notes = [], []
  for policy, conv in zip(policies, conversations):
    conv.turns.append({"role": "user", "content": message})
    ids, note = conv.prompt(policy.tok, policy.prompt_budget)
    if note:
      notes.append(f"({policy.name}: {note})\n")
    answers.append(policy.answer(ids))
    conv.turns.append({"role": "assistant", "content": answers[-1]})
  for note in notes:
    write(note)
  width = shutil.get_terminal_size((100, 24)).columns
  write(side_by_side([(p.name, a) for p, a in zip(policies, answers)], width) + "\n")
  return answers


HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) leaves."


def run_loop(policies: Sequence[Policy], *, read: Callable[[str], str], out: TextIO) -> None:
  """The interactive loop: one conversation per policy, /reset, /exit; a single policy's answer is streamed."""
  write = lambda s: (out.write(s), out.flush())  # noqa: E731
  names = ", ".join(f"{p.name} ({p.cfg.num_params():,} parameters, context {p.cfg.max_len} tokens)"
                    for p in policies)
  write(f"Chatting with {names}. {HELP}\n")
  conversations = [Conversation() for _ in policies]
  while True:
    try:
      message = read("you> ")
    except EOFError:
      write("\n")
      return
    message = message.strip()
    if not message:
      continue
    if message in ("/exit", "/quit"):
      return
    if message == "/reset":
      for conv in conversations:
        conv.reset()
      write("(conversation reset)\n")
      continue
    if message.startswith("/"):
      write(f"(unknown command {message.split()[0]}; {HELP})\n")
      continue
    if len(policies) == 1:
      conversations[0].reply(policies[0], message, write, prefix=f"{policies[0].name}> ")
      write("\n")
    else:
      compare(policies, conversations, message, write)
