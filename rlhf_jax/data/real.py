"""Convert user-supplied JSONL files (nothing is downloaded) into TFDS ArrayRecord datasets.

Three formats, one JSON object per line (blank lines are skipped):

* Anthropic HH-RLHF pairs (`prepare_hh_pairs`):
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}
  The two dialogues share every turn but the last assistant reply.
* K-way rankings (`prepare_rankings`), as InstructGPT collects them:
    {"prompt": "text" or [{"role", "content"}, ...], "responses": [str, ...], "ranking": [int, ...]}
  ranking[i] is the rank of responses[i]; 0 is best, equal ranks are ties.
* SFT demonstrations (`prepare_sft`): {"prompt": str, "response": str} or {"turns": [{"role", "content"}, ...]}.

Comparison datasets have records {prompt_turns: json, responses: text_seq, ranks: int32_seq} (lower rank is
better; HH gives ranks [0, 1]); SFT datasets have records {turns: json}. Each function takes one file or a
dict split -> file and returns the dataset folder (`tfds_io.prepare_dataset`, cached; the file's SHA-256 is the
cache fingerprint, so an edited file is noticed).

Bad input raises ValueError naming the file, the 1-based line, the field and what was expected, before the
dataset is published. `on_error="skip"` instead skips lines whose fields are invalid (real dumps have a few)
and records how many, with the first messages, in the dataset metadata; a line that is not UTF-8 JSON still
raises, since it means the file itself is damaged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rlhf_jax import tokenizers as tokenizers_lib
from rlhf_jax.checkpoint import file_sha256
from rlhf_jax.data import tfds_io

COMPARISON_FEATURES = {"prompt_turns": "json", "responses": "text_seq", "ranks": "int32_seq"}
SFT_FEATURES = {"turns": "json"}

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_MAX_KEPT_ERRORS = 20


class _LineError(ValueError):
  """A problem with one field of one line; `_read_jsonl` adds the file and line number."""


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _iter_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(1-based line number, parsed JSON object) for each non-blank line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  count = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); expected UTF-8 text") \
            from e
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON "
                         "object per line") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      count += 1
      yield lineno, obj
  if count == 0:
    raise ValueError(f"{path}: the file has no records; expected one JSON object per line")


def _require(obj: Mapping[str, Any], field: str, kind: type | tuple[type, ...], expected: str) -> Any:
  if field not in obj:
    raise _LineError(f"missing field {field!r}; expected {expected}")
  value = obj[field]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise _LineError(f"field {field!r}: expected {expected}, got {type(value).__name__}")
  return value


def _parse_turns(value: Any, field: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise _LineError(f"field {field!r}: expected a non-empty list of {{\"role\", \"content\"}} turns")
  turns = []
  for i, turn in enumerate(value):
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
        not isinstance(turn.get("content"), str):
      raise _LineError(f"field {field!r}, turn {i}: expected {{\"role\": str, \"content\": str}}, got {turn!r:.100}")
    if turn["role"] not in tokenizers_lib.ROLES:
      raise _LineError(f"field {field!r}, turn {i}: unknown role {turn['role']!r}; expected one of "
                       f"{list(tokenizers_lib.ROLES)}")
    turns.append({"role": turn["role"], "content": turn["content"]})
  return turns


def _parse_prompt(obj: Mapping[str, Any]) -> list[dict[str, str]]:
  if "prompt" not in obj:
    raise _LineError("missing field 'prompt'; expected a string or a list of turns")
  prompt = obj["prompt"]
  if isinstance(prompt, str):
    if not prompt.strip():
      raise _LineError("field 'prompt': expected non-empty text")
    return [{"role": "user", "content": prompt}]
  turns = _parse_turns(prompt, "prompt")
  if turns[-1]["role"] != "user":
    raise _LineError(f"field 'prompt': the last turn must be a 'user' turn (the policy replies to it), got "
                     f"{turns[-1]['role']!r}")
  return turns


def _parse_hh_dialogue(text: Any, field: str) -> list[dict[str, str]]:
  if not isinstance(text, str):
    raise _LineError(f"field {field!r}: expected a string, got {type(text).__name__}")
  parts = _HH_MARKER.split(text)
  # parts = [before first marker, role, content, role, content, ...]
  if parts[0].strip():
    raise _LineError(f"field {field!r}: expected the dialogue to start with '\\n\\nHuman:', got {text[:40]!r}")
  if len(parts) < 3:
    raise _LineError(f"field {field!r}: no '\\n\\nHuman:' or '\\n\\nAssistant:' turn found")
  turns = [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
  if turns[-1]["role"] != "assistant":
    raise _LineError(f"field {field!r}: the dialogue must end with an Assistant turn (the reply being "
                     "compared), but it ends with a Human turn")
  if len(turns) < 2:
    raise _LineError(f"field {field!r}: expected at least one Human turn before the final Assistant reply")
  return turns


def _hh_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  for field in ("chosen", "rejected"):
    if field not in obj:
      raise _LineError(f"missing field {field!r}; expected an HH dialogue string")
  chosen = _parse_hh_dialogue(obj["chosen"], "chosen")
  rejected = _parse_hh_dialogue(obj["rejected"], "rejected")
  if chosen[:-1] != rejected[:-1]:
    raise _LineError("fields 'chosen' and 'rejected': expected the same dialogue before the final Assistant "
                     "reply, but they differ")
  responses = [chosen[-1]["content"], rejected[-1]["content"]]
  for field, text in zip(("chosen", "rejected"), responses):
    if not text:
      raise _LineError(f"field {field!r}: the final Assistant reply is empty; expected non-empty text")
  return {"prompt_turns": chosen[:-1], "responses": responses, "ranks": [0, 1]}


def _ranking_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  prompt_turns = _parse_prompt(obj)
  responses = _require(obj, "responses", list, "a list of at least 2 response strings")
  if len(responses) < 2:
    raise _LineError(f"field 'responses': expected at least 2 responses to compare, got {len(responses)}")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise _LineError(f"field 'responses', item {i}: expected a string, got {type(r).__name__}")
    if not r.strip():
      raise _LineError(f"field 'responses', item {i}: the response is empty; expected non-empty text")
  ranking = _require(obj, "ranking", list, "a list of integer ranks, one per response (0 = best)")
  if len(ranking) != len(responses):
    raise _LineError(f"field 'ranking': has {len(ranking)} ranks but 'responses' has {len(responses)}; "
                     "expected one rank per response")
  for i, r in enumerate(ranking):
    if not _is_int(r) or r < 0:
      raise _LineError(f"field 'ranking', item {i}: expected a non-negative integer rank, got {r!r}")
  if len(set(ranking)) < 2:
    raise _LineError("field 'ranking': all responses are tied; expected at least one strict preference")
  return {"prompt_turns": prompt_turns, "responses": list(responses), "ranks": list(ranking)}


def _sft_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  if "turns" in obj:
    turns = _parse_turns(obj["turns"], "turns")
  elif "prompt" in obj or "response" in obj:
    prompt = _require(obj, "prompt", str, "a string")
    response = _require(obj, "response", str, "a string")
    if not prompt.strip():
      raise _LineError("field 'prompt': expected non-empty text")
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  else:
    raise _LineError("missing field 'turns' (or 'prompt' and 'response'); expected one of the two SFT formats")
  if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
    raise _LineError("expected at least one non-empty assistant turn (the demonstration to learn)")
  return {"turns": turns}


def _prepare(
    kind: str,
    parse: Callable[[Mapping[str, Any]], dict[str, Any]],
    features: Mapping[str, str],
    jsonl_paths: str | Mapping[str, str],
    data_dir: str,
    name: str,
    version: str,
    on_error: str,
    overwrite: bool,
) -> str:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
  paths = {"train": jsonl_paths} if isinstance(jsonl_paths, (str, os.PathLike)) else dict(jsonl_paths)
  paths = {split: os.fspath(p) for split, p in paths.items()}
  stats: dict[str, Any] = {"format": kind, "on_error": on_error, "splits": {}}

  def records(split: str, path: str) -> Iterator[dict[str, Any]]:
    split_stats = {"source": os.path.abspath(path), "records": 0, "skipped": 0, "errors": []}
    stats["splits"][split] = split_stats
    for lineno, obj in _iter_lines(path):
      try:
        record = parse(obj)
      except _LineError as e:
        message = f"{path}:{lineno}: {e}"
        if on_error == "raise":
          raise ValueError(message) from None
        split_stats["skipped"] += 1
        if len(split_stats["errors"]) < _MAX_KEPT_ERRORS:
          split_stats["errors"].append(message)
        continue
      split_stats["records"] += 1
      yield record

  # prepare_dataset writes the metadata after the generators ran, so the counts are filled in by then.
  splits = {split: (lambda s=split, p=path: records(s, p)) for split, path in paths.items()}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: file not found")
  fingerprint = ",".join(f"{split}={file_sha256(p)}" for split, p in sorted(paths.items()))
  return tfds_io.prepare_dataset(
      name, data_dir, features, splits, version=version, metadata=stats, overwrite=overwrite,
      fingerprint=f"{kind}:{on_error}:{fingerprint}",
      description=f"rlhf_jax {kind} data converted from {sorted(paths.values())}")


def prepare_hh_pairs(
    jsonl_paths: str | Mapping[str, str],
    data_dir: str,
    *,
    name: str = "hh_pairs",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """Anthropic HH-RLHF JSONL ({"chosen", "rejected"}) -> comparison records with ranks [0, 1]."""
  return _prepare("hh_pairs", _hh_record, COMPARISON_FEATURES, jsonl_paths, data_dir, name, version, on_error,
                  overwrite)


def prepare_rankings(
    jsonl_paths: str | Mapping[str, str],
    data_dir: str,
    *,
    name: str = "rankings",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """K-way ranking JSONL ({"prompt", "responses", "ranking"}) -> comparison records."""
  return _prepare("rankings", _ranking_record, COMPARISON_FEATURES, jsonl_paths, data_dir, name, version,
                  on_error, overwrite)


def check_rankings(path: str) -> int:
  """Parses every line of a K-way ranking JSONL file as `prepare_rankings` would, writing nothing; returns the
  number of records. A bad line raises ValueError naming file:line, the field and what was expected."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  n = 0
  for lineno, obj in _iter_lines(path):
    try:
      _ranking_record(obj)
    except _LineError as e:
      raise ValueError(f"{path}:{lineno}: {e}") from None
    n += 1
  if not n:
    raise ValueError(f"{path}: no records; expected one JSON object per line with 'prompt', 'responses' and "
                     "'ranking'")
  return n


def prepare_sft(
    jsonl_paths: str | Mapping[str, str],
    data_dir: str,
    *,
    name: str = "sft",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """SFT JSONL ({"prompt", "response"} or {"turns"}) -> records {turns}."""
  return _prepare("sft", _sft_record, SFT_FEATURES, jsonl_paths, data_dir, name, version, on_error, overwrite)
