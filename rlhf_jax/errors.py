"""Errors that speak to the user: one line naming the field, file or flag and what was expected.

The library raises ValueError (a bad setting, a malformed record), FileNotFoundError / OSError (a missing file
or folder) and FloatingPointError (training went non-finite) for what the user can fix; the command lines
(run.py, chat.py) print those as `error: <message>` and exit 2, and show the traceback only with --verbose.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# What the command lines report as one `error:` line.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_CODE = 2


def one_line(error: BaseException | str) -> str:
  """The message of an error on one line (continuation lines joined with "; ")."""
  text = str(error).strip()
  if isinstance(error, BaseException) and not text:
    text = type(error).__name__
  parts = [p.strip() for p in text.splitlines() if p.strip()]
  return "; ".join(parts)


def fail(message: str) -> None:
  """Prints `error: <message>` on one line to stderr and exits with status 2."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_CODE)


def reporting(fn: Callable[[], Any], *, verbose: bool) -> Any:
  """fn(), with a user error (USER_ERRORS) reported by `fail`; with `verbose` it propagates, traceback and all."""
  try:
    return fn()
  except USER_ERRORS as e:
    if verbose:
      raise
    fail(one_line(e))


def flat_keys(tree: Any, prefix: str = "") -> list[str]:
  """Every leaf key of a nested mapping (a ConfigDict) as a dotted path: ["ppo.kl.target", ...]."""
  items = tree.items() if isinstance(tree, Mapping) or hasattr(tree, "items") else ()
  out = []
  for k, v in items:
    path = f"{prefix}{k}"
    if isinstance(v, Mapping) or (hasattr(v, "items") and hasattr(v, "keys")):
      out.append(path)
      out += flat_keys(v, path + ".")
    else:
      out.append(path)
  return out


def closest(name: str, candidates: Iterable[str]) -> str | None:
  """The candidate most like `name` (difflib's ratio, at least 0.6), or None: "ppo.kl.targt" finds
  "ppo.kl.target"."""
  found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  return found[0] if found else None


def missing_key(tree: Any, dotted: str) -> str | None:
  """The first part of `dotted` that `tree` does not have ("ppo.kl.targt" -> "ppo.kl.targt"), or None when every
  part exists. Stops at a leaf: a key below a value that is not a mapping is missing too."""
  node, walked = tree, []
  for part in dotted.split("."):
    walked.append(part)
    if not (hasattr(node, "keys") and part in node.keys()):
      return ".".join(walked)
    node = node[part]
  return None


def unknown_key_message(tree: Any, dotted: str, *, flag: str = "experiment") -> str | None:
  """None when `dotted` names a field of `tree`; else the message for the flag that named it, with the
  closest valid key: "--experiment.ppo.kl.targt: no such key; did you mean ppo.kl.target?"."""
  missing = missing_key(tree, dotted)
  if missing is None:
    return None
  suggestion = closest(dotted, flat_keys(tree))
  hint = f"; did you mean {suggestion}?" if suggestion else "; the experiment's config has no such field"
  where = "" if missing == dotted else f" ({missing} does not exist)"
  return f"--{flag}.{dotted}: no such key{where}{hint}"
