"""Chat with a trained policy: parse flags, load the policy, run the conversation (rlhf_jax/chat.py).

  python chat.py --workdir=workdirs/instructgpt_small                 # the latest policy of the workdir
  python chat.py --workdir=W --stage=sft --temperature=0.7 --top_p=0.9
  python chat.py --workdir=W --prompt="In which place does the wumblat live?"   # answer once, for scripts
  python chat.py --workdir=W --compare=sft,ppo                         # two policies side by side

In the conversation: /reset starts over, /exit (or Ctrl-D) leaves. Answers stream as they are sampled; when the
conversation outgrows the model's context the oldest turns are dropped, and the chat says so. A missing
workdir or unfinished stage is one `error: ...` line (exit status 2).
"""

import os
import sys

from absl import app, flags, logging

from rlhf_jax import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of run.py holding a finished sft or ppo stage.")
_STAGE = flags.DEFINE_string("stage", None, "The policy's stage directory (sft, ppo, ppo_ptx, ...); default: "
                             "the most recently exported policy of the workdir.")
_COMPARE = flags.DEFINE_list("compare", None, "Two or more stages answering side by side, e.g. sft,ppo.")
_PROMPT = flags.DEFINE_string("prompt", None, "Answer this one message and exit.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest set of tokens with this mass.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "The longest answer, in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "The sampling seed.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")


def main(argv):
  if len(argv) > 1:
    errors.fail(f"unexpected arguments: {argv[1:]}; flags take the form --name=value")
  errors.reporting(_chat, verbose=_VERBOSE.value)


def _chat():
  if not _WORKDIR.value:
    raise ValueError("--workdir is required: the workdir of a run.py experiment with a finished sft or ppo stage")
  # After flag parsing, so --help stays fast and XLA flags in the environment apply.
  from rlhf_jax import chat, sampling  # lazy: they import jax

  workdir = os.path.abspath(_WORKDIR.value)
  stages = _COMPARE.value or [_STAGE.value]
  if _COMPARE.value and len(_COMPARE.value) < 2:
    raise ValueError(f"--compare={','.join(_COMPARE.value)}: expected two or more stages, e.g. --compare=sft,ppo")
  scfg = sampling.SamplingConfig(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                                 top_p=_TOP_P.value)
  policies = [chat.Policy(chat.resolve_stage(workdir, s), scfg, seed=_SEED.value) for s in stages]
  if _PROMPT.value is not None:
    conversations = [chat.Conversation() for _ in policies]
    if len(policies) == 1:
      conversations[0].reply(policies[0], _PROMPT.value, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
      print(flush=True)
    else:
      chat.compare(policies, conversations, _PROMPT.value, sys.stdout.write)
    return
  chat.run_loop(policies, read=input, out=sys.stdout)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)  # the conversation, not the libraries' progress lines
  app.run(main)
