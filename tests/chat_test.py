"""The chat command driven through a pseudo-terminal, as a person would use it: a two-turn conversation, /reset,
the context limit, --prompt, --compare, and a missing workdir or unfinished stage.

The policies are small random models exported as the stages export them, biased towards lower-case letters so
their greedy answers are readable ASCII; every answer the chat prints is checked against the project's jitted
`sampling.generate` (one compiled while-loop, not the chat's token-by-token steps) on the prompt the
conversation should have built, so a wrong history, a lost turn or a broken KV cache shows as a different answer.
"""

import os
import pty
import re
import select
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import sampling, tokenizers, training
from rlhf_jax.chat import PROMPT_BUCKET, Conversation, side_by_side
from rlhf_jax.data.batching import left_pad
from rlhf_jax.models import presets, transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizers.ByteTokenizer()
CFG = presets.preset("tiny", vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1,
                     max_len=96)
NEW = 12  # --max_new_tokens of every session below
LETTERS = [TOK.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz "]


def _policy(seed: int):
  params = transformer.init(jax.random.PRNGKey(seed), CFG)
  # Larger layer weights make the answer depend on the whole dialogue, not only on its last tokens.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 3 else x, params)
  keep = np.zeros((TOK.vocab_size,), np.float32)
  keep[LETTERS] = 1.0
  keep[TOK.eos_id] = 0.3  # so some answers end before NEW tokens
  params["unembed"] = params["unembed"] * 40.0 * jnp.asarray(keep)  # other tokens' logits are exactly 0
  return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("chat_workdir"))
  for seed, name in enumerate(("sft", "ppo")):
    training.export_params(os.path.join(root, name), _policy(seed), model_cfg=CFG, tokenizer=TOK)
  os.makedirs(os.path.join(root, "rm"))  # a stage that has not finished: no export.json
  return root


def expected_answer(seed: int, turns) -> str:
  """The greedy answer of policy `seed` to the dialogue `turns`, by `sampling.generate`."""
  ids = tokenizers.encode_prompt(TOK, turns)
  padded = min(CFG.max_len - NEW, -(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET)
  prompt, mask = left_pad([ids], TOK.pad_id, padded)
  out = sampling.generate(_policy(seed), prompt, mask, jax.random.PRNGKey(0), CFG,
                          sampling.SamplingConfig(max_new_tokens=NEW, temperature=0.0), eos_id=TOK.eos_id,
                          pad_id=TOK.pad_id)
  tokens = [int(t) for t, m in zip(np.asarray(out.tokens_bn[0]), np.asarray(out.mask_bn[0])) if m]
  return TOK.decode([t for t in tokens if t != TOK.eos_id])


def chat_env(workdir: str) -> dict[str, str]:
  """chat.py's environment: one CPU device, the tests' XLA settings (as the expected answers here are computed),
  and a compilation cache shared by this module's sessions, which compile the same programs."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "COLUMNS": "100",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {helpers.FAST_COMPILE_XLA_FLAGS}",
          "JAX_COMPILATION_CACHE_DIR": workdir.rstrip("/") + "_xla_cache",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


class Terminal:
  """chat.py in a pseudo-terminal: `expect` reads until a pattern, `send` types a line."""

  def __init__(self, workdir, *args):
    self.master, slave = pty.openpty()
    env = chat_env(workdir)
    args = (f"--workdir={workdir}", *args)
    self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), *args], stdin=slave, stdout=slave,
                                 stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    self.buffer = ""

  def expect(self, pattern: str, timeout: float = 120.0) -> str:
    """Everything read up to and including the first match of `pattern` (a regex) after what was read before."""
    deadline = time.time() + timeout
    while True:
      m = re.search(pattern, self.buffer)
      if m:
        text, self.buffer = self.buffer[:m.end()], self.buffer[m.end():]
        return text
      left = deadline - time.time()
      if left <= 0:
        raise AssertionError(f"no {pattern!r} within {timeout} s; read: {self.buffer!r}")
      ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
      if ready:
        try:
          chunk = os.read(self.master, 4096)
        except OSError:  # the child closed the terminal
          chunk = b""
        if not chunk and self.proc.poll() is not None:
          raise AssertionError(f"chat.py exited ({self.proc.returncode}) before {pattern!r}; read: {self.buffer!r}")
        self.buffer += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

  def send(self, line: str) -> None:
    os.write(self.master, (line + "\n").encode())

  def answer_to(self, line: str, name: str = "ppo") -> str:
    """Types `line` and returns the answer the policy printed (the terminal echoes the typed line first)."""
    self.send(line)
    self.expect(re.escape(f"{name}> "))
    return self.expect(r"\nyou> ")[:-len("\nyou> ")]

  def close(self) -> int:
    try:
      return self.proc.wait(timeout=60)
    finally:
      os.close(self.master)


def test_two_turns_then_reset(workdir):
  term = Terminal(workdir, "--stage=ppo", f"--max_new_tokens={NEW}", "--temperature=0")
  banner = term.expect(r"you> ")
  assert "Chatting with ppo" in banner and "/reset" in banner
  first = term.answer_to("hello there")
  turns = [{"role": "user", "content": "hello there"}]
  assert first == expected_answer(1, turns)
  second = term.answer_to("and then?")
  turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
  assert second == expected_answer(1, turns)  # the second answer continues the first turn
  assert second != expected_answer(1, turns[-1:])  # ... and differs from a fresh conversation's
  term.send("/reset")
  assert "(conversation reset)" in term.expect(r"you> ")
  assert term.answer_to("and then?") == expected_answer(1, turns[-1:])  # a new conversation after /reset
  term.send("/exit")
  assert term.close() == 0


def test_the_oldest_turns_are_dropped_at_the_context_limit_and_the_chat_says_so(workdir):
  term = Terminal(workdir, "--stage=sft", f"--max_new_tokens={NEW}", "--temperature=0")
  term.expect(r"you> ")
  long_a, long_b = "tell me about " + "cats " * 8, "and now about " + "dogs " * 8  # ~55 bytes each
  answer_a = term.answer_to(long_a, "sft")
  assert answer_a == expected_answer(0, [{"role": "user", "content": long_a}])
  term.send(long_b)
  out = term.expect(r"\nyou> ")
  # Both messages and the first answer exceed 96 - 12 prompt tokens: the first exchange (2 turns) goes.
  assert "(dropped the 2 oldest turns to stay within the model's context (84 prompt tokens))" in out, out
  assert out.index("(dropped") < out.index("sft> ")  # the note comes before the answer
  answer_b = out.split("sft> ", 1)[1][:-len("\nyou> ")]
  assert answer_b == expected_answer(0, [{"role": "user", "content": long_b}])
  term.send("x" * 200)  # one message longer than the context keeps its last tokens
  assert "its first" in term.expect(r"\nyou> ")
  term.send("/exit")
  assert term.close() == 0


def test_prompt_answers_once_and_compare_shows_both_policies(workdir):
  env = chat_env(workdir)

  def run(*args):
    return subprocess.run([sys.executable, "chat.py", f"--workdir={workdir}", f"--max_new_tokens={NEW}",
                           "--temperature=0", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

  out = run("--stage=ppo", "--prompt=hi")
  assert out.returncode == 0, out.stderr
  assert out.stdout == expected_answer(1, [{"role": "user", "content": "hi"}]) + "\n"
  out = run("--compare=sft,ppo", "--prompt=hi")
  assert out.returncode == 0, out.stderr
  answers = [expected_answer(s, [{"role": "user", "content": "hi"}]) for s in (0, 1)]
  assert out.stdout.strip("\n") == side_by_side([("sft", answers[0]), ("ppo", answers[1])], 100).strip("\n")
  assert out.stdout.splitlines()[0].split() == ["sft", "|", "ppo"]


@pytest.mark.parametrize("args, message", [
    (["--workdir=/nonexistent/workdir"], "error: --workdir=/nonexistent/workdir does not exist"),
    (["--stage=rm"], "has no export.json: the stage has not finished"),
    (["--stage=dpo"], "--stage=dpo: "),
    (["--compare=sft"], "--compare=sft: expected two or more stages"),
])
def test_a_missing_workdir_or_stage_is_one_error_line(workdir, args, message):
  if not any(a.startswith("--workdir") for a in args):
    args = [f"--workdir={workdir}", *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run([sys.executable, "chat.py", *args, "--prompt=hi"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
  assert "Traceback" not in out.stderr


def test_conversation_keeps_a_reply_with_the_message_it_answered():
  conv = Conversation([{"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 40},
                       {"role": "user", "content": "c" * 10}])
  ids, note = conv.prompt(TOK, budget=60)
  assert [t["content"][0] for t in conv.turns] == ["c"]
  assert ids == tokenizers.encode_prompt(TOK, conv.turns) and "2 oldest turns" in note
  conv = Conversation([{"role": "user", "content": "hi"}])
  assert conv.prompt(TOK, budget=60) == (tokenizers.encode_prompt(TOK, conv.turns), None)
