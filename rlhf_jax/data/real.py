"""Convert user-supplied data files (nothing is downloaded) into TFDS ArrayRecord datasets.

`prepare(schema, paths, data_dir)` converts once and returns the dataset folder; `check(schema, path)` parses
every record and writes nothing, so a pipeline can reject a bad file before any stage runs. Schemas (`SCHEMAS`):

* "hh": Anthropic HH-RLHF pairs (also `prepare_hh_pairs`):
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}
  The two dialogues share every turn but the last assistant reply.
* "rankings": K-way rankings (also `prepare_rankings`), as InstructGPT collects them:
    {"prompt": "text" or [{"role", "content"}, ...], "responses": [str, ...], "ranking": [int, ...]}
  ranking[i] is the rank of responses[i]; 0 is best, equal ranks are ties.
* "sft": demonstrations (also `prepare_sft`): {"prompt": str, "response": str} or {"turns": [{"role", "content"}]}.
* "summarize_from_feedback": OpenAI's TL;DR comparisons (Stiennon et al. 2020):
    {"info": {"post": str, "title"?: str, "subreddit"?: str, ...}, "summaries": [{"text": str}, {"text": str}],
     "choice": 0 or 1}
  The prompt is the post as the paper's TL;DR prompt (the format of "The N+ implementation details of RLHF with
  PPO", Huang et al. 2024), "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:", a part
  left out when its field is absent; the summaries are the responses, summaries[choice] ranked 0, the other 1.
  CNN/DM rows (info.article, no post) are errors: skip them with on_error="skip".
* "tldr_sft": TL;DR demonstrations: {"post", "title"?, "subreddit"?, "summary"} (OpenAI's tldr_3_filtered),
  {"info": {"post", ...}, "summary"}, or {"prompt", "completion"} (an already formatted prompt, as trl-lib/tldr).
* "ultrafeedback": UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized):
    {"prompt": str, "chosen": [{"role", "content"}, ...], "rejected": [...], ...}
  chosen and rejected are whole conversations that share every turn but the final assistant reply; the shared
  turns are the prompt ('prompt' is used only when the two lists hold just the replies).
* "pairs": generic preference pairs {"prompt": str or turns, "chosen": str, "rejected": str}.
* "prompts": prompts for RL, {"prompt": str or turns} or {"query": str or turns}.
* "hh_sft": HH-RLHF's chosen dialogues as demonstrations, {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}
  (the "rejected" field, if present, is ignored).
* "text": pretraining documents {"text": str} (for PPO-ptx, continued pretraining and the held-out LM loss).

Summaries, TL;DR completions and HH turns lose their outer whitespace (OpenAI's summaries start with a space,
meant for raw concatenation after "TL;DR:"; here the chat template separates turns); other texts are verbatim.

Comparison datasets have records {prompt_turns: json, responses: text_seq, ranks: int32_seq} (lower rank is
better; a pair gives [0, 1] with the chosen response first, except summarize_from_feedback, which keeps the file's
order); SFT datasets have records {turns: json}; prompt datasets {prompt_turns: json}; text datasets {text}. Turns are
[{"role": "system" | "user" | "assistant", "content": str}].

Files, by name:
* `.jsonl` (or any other name): one JSON object per line, blank lines skipped; errors name `file:line`.
* `.json`: a JSON list of objects, or an object whose "data" or "train" value is that list; errors name
  `file:record i` (the 0-based index in the list). A `.json` file holding several JSON values, one per line, is
  read as JSON Lines (OpenAI's summarize_from_feedback `batch*.json` files are). A `.json` file is parsed whole.
* `.parquet`, as the Hugging Face hub publishes datasets: read a batch of rows at a time with pyarrow; a null
  top-level value counts as a missing field; errors name `file:row i` (0-based, as the hub's viewer numbers rows).
* `.jsonl.gz` / `.json.gz`: the same, gzip-compressed (Anthropic's hh-rlhf files are).

`paths` is one file (the "train" split), a list of files (one "train" split read in order, e.g. the hub's
parquet shards), or a dict split -> file or list of files. The files' SHA-256 are the cache fingerprint; with
the default name the dataset folder is named by it (`<kind>_<16 hex digits>`), so an unchanged file reuses its
dataset and an edited file is converted again into a new folder. With an explicit `name`, an edited file is an
error (`tfds_io.prepare_dataset`) unless overwrite=True.

Bad input raises ValueError naming the file, the record (line, record or row), the field and what was expected,
before the dataset is published. `on_error="skip"` instead skips records whose fields are invalid (real dumps
have a few) and records how many, with the first messages, in the dataset metadata (`splits.<split>.skipped`,
`.errors`); a damaged file (a line that is not UTF-8 or not JSON, an unreadable Parquet or gzip file) still
raises, since it means the file itself is damaged.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rlhf_jax import tokenizers as tokenizers_lib
from rlhf_jax.checkpoint import file_sha256
from rlhf_jax.data import tfds_io

COMPARISON_FEATURES = {"prompt_turns": "json", "responses": "text_seq", "ranks": "int32_seq"}
SFT_FEATURES = {"turns": "json"}
PROMPT_FEATURES = {"prompt_turns": "json"}
TEXT_FEATURES = {"text": "text"}

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_MAX_KEPT_ERRORS = 20
_PARQUET_BATCH_ROWS = 1024  # rows converted to Python at a time: a hub shard is never held whole as objects

Paths = str | os.PathLike | Sequence[str] | Mapping[str, str | Sequence[str]]


class _LineError(ValueError):
  """A problem with one field of one record; the caller adds the file and the record's place."""


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------------------
# Readers: (where, record) for each record of a file, `where` being "12" (a line), "record 3" or "row 7".
# They raise ValueError for a damaged file, whatever on_error says.


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
  count = 0
  with _open_bytes(path) as f:
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
      yield str(lineno), obj
  if count == 0:
    raise ValueError(f"{path}: the file has no records; expected one JSON object per line")


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
  with _open_bytes(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    lineno = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the file); expected UTF-8 text") from e
  expected = "expected a JSON list of objects, an object with a 'data' or 'train' list, or JSON Lines"
  if not text.strip():
    raise ValueError(f"{path}: the file has no records; {expected}")
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    first_line = text.lstrip().split("\n", 1)[0]
    if e.msg == "Extra data" and first_line.startswith("{"):  # one object per line: JSON Lines named .json
      yield from _iter_jsonl(path)
      return
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); {expected}") from e
  if isinstance(doc, dict):
    keys = [k for k in ("data", "train") if isinstance(doc.get(k), list)]
    if len(keys) != 1:
      found = "both" if keys else "neither"
      raise ValueError(f"{path}: a JSON object with {found} of a 'data' and a 'train' list (keys "
                       f"{sorted(doc)[:8]}); {expected}")
    doc = doc[keys[0]]
  if not isinstance(doc, list):
    raise ValueError(f"{path}: the JSON document is a {type(doc).__name__}; {expected}")
  if not doc:
    raise ValueError(f"{path}: the file has no records; {expected}")
  for i, obj in enumerate(doc):
    if not isinstance(obj, dict):
      raise ValueError(f"{path}:record {i}: expected a JSON object, got {type(obj).__name__}")
    yield f"record {i}", obj


def _parquet_rows(path: str, batch: Any, start: int) -> list[dict[str, Any]]:
  try:
    return batch.to_pylist()
  except UnicodeDecodeError:  # pyarrow does not check UTF-8 on read; find the cell for the message
    for name in batch.schema.names:
      for i in range(batch.num_rows):
        try:
          batch.column(name).slice(i, 1).to_pylist()
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}:row {start + i}: column {name!r} is not valid UTF-8; expected UTF-8 text") \
              from e
    raise


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
  try:
    import pyarrow  # lazy: only parquet files need it
    import pyarrow.parquet as pq  # lazy: only parquet files need it
  except ImportError as e:
    raise ImportError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow==26.0.1)") from e
  try:
    parquet_file = pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file ({e}); expected a .parquet file as the Hugging Face hub "
                     "publishes") from e
  row = 0
  try:
    for batch in parquet_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
      for obj in _parquet_rows(path, batch, row):
        # A column is present in every row; a null is how a row lacks the field.
        yield f"row {row}", {k: v for k, v in obj.items() if v is not None}
        row += 1
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(f"{path}:row {row}: the Parquet data could not be read ({e})") from e
  if row == 0:
    raise ValueError(f"{path}: the file has no rows; expected at least one record")


def _iter_records(path: str) -> Iterator[tuple[str, Any]]:
  """(where, JSON object) for each record of `path`, the reader chosen by the file's name."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  name = path.lower()
  if name.endswith(".parquet"):
    reader = _iter_parquet
  elif name.endswith((".json", ".json.gz")):
    reader = _iter_json
  else:
    reader = _iter_jsonl
  try:
    yield from reader(path)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: not a readable gzip file ({e}); expected gzip-compressed JSON") from e


# ----------------------------------------------------------------------------------------------------------
# Fields.


def _require(obj: Mapping[str, Any], field: str, kind: type | tuple[type, ...], expected: str) -> Any:
  if field not in obj:
    raise _LineError(f"missing field {field!r}; expected {expected}")
  value = obj[field]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise _LineError(f"field {field!r}: expected {expected}, got {type(value).__name__}")
  return value


def _require_text(obj: Mapping[str, Any], field: str, expected: str) -> str:
  """A non-empty string field (`expected` says what it holds)."""
  value = _require(obj, field, str, f"{expected} (a string)")
  if not value.strip():
    raise _LineError(f"field {field!r}: the text is empty; expected non-empty text ({expected})")
  return value


def _parse_turns(value: Any, field: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    got = "an empty list" if isinstance(value, list) else type(value).__name__
    raise _LineError(f"field {field!r}: expected a non-empty list of {{\"role\", \"content\"}} turns, got {got}")
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


def _parse_prompt(obj: Mapping[str, Any], field: str = "prompt") -> list[dict[str, str]]:
  if field not in obj:
    raise _LineError(f"missing field {field!r}; expected a string or a list of turns")
  prompt = obj[field]
  if isinstance(prompt, str):
    if not prompt.strip():
      raise _LineError(f"field {field!r}: expected non-empty text")
    return [{"role": "user", "content": prompt}]
  if not isinstance(prompt, list):
    raise _LineError(f"field {field!r}: expected a string or a list of turns, got {type(prompt).__name__}")
  turns = _parse_turns(prompt, field)
  if turns[-1]["role"] != "user":
    raise _LineError(f"field {field!r}: the last turn must be a 'user' turn (the policy replies to it), got "
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


def _tldr_prompt(info: Mapping[str, Any], prefix: str) -> str:
  """The TL;DR prompt of a Reddit post; `prefix` ("info." or "") names the fields in messages."""
  post = info.get("post")
  if post is None:
    if info.get("article") is not None:
      raise _LineError(f"missing field '{prefix}post': this is a CNN/DM row ('{prefix}article'); expected a Reddit "
                       "TL;DR row (on_error='skip' drops CNN/DM rows)")
    raise _LineError(f"missing field '{prefix}post'; expected the Reddit post text (a string)")
  if not isinstance(post, str):
    raise _LineError(f"field '{prefix}post': expected the Reddit post text (a string), got {type(post).__name__}")
  if not post.strip():
    raise _LineError(f"field '{prefix}post': the text is empty; expected the Reddit post text")
  parts = []
  for key, label in (("subreddit", "SUBREDDIT: r/"), ("title", "TITLE: ")):
    value = info.get(key)
    if value is None:
      continue
    if not isinstance(value, str):
      raise _LineError(f"field '{prefix}{key}': expected a string, got {type(value).__name__}")
    value = value.strip()
    if key == "subreddit" and value.startswith("r/"):
      value = value[2:]
    if value:
      parts.append(label + value)
  parts.append("POST: " + post.strip())
  return "\n\n".join(parts) + "\n\nTL;DR:"


def _summarize_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  info = _require(obj, "info", dict, "an object with the Reddit 'post' (and 'title', 'subreddit')")
  prompt = _tldr_prompt(info, "info.")
  summaries = _require(obj, "summaries", list, "a list of 2 summaries [{\"text\": str}, {\"text\": str}]")
  if len(summaries) != 2:
    raise _LineError(f"field 'summaries': expected 2 summaries to compare, got {len(summaries)}")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict):
      raise _LineError(f"field 'summaries', item {i}: expected {{\"text\": str}}, got {type(summary).__name__}")
    text = summary.get("text")
    if text is None:
      raise _LineError(f"field 'summaries', item {i}: missing 'text'; expected the summary (a string)")
    if not isinstance(text, str):
      raise _LineError(f"field 'summaries', item {i}, 'text': expected a string, got {type(text).__name__}")
    if not text.strip():
      raise _LineError(f"field 'summaries', item {i}, 'text': the summary is empty; expected non-empty text")
    texts.append(text.strip())
  if "choice" not in obj:
    raise _LineError("missing field 'choice'; expected 0 or 1 (the index of the preferred summary)")
  choice = obj["choice"]
  if not _is_int(choice) or choice not in (0, 1):
    raise _LineError(f"field 'choice': expected 0 or 1 (the index of the preferred summary), got {choice!r}")
  return {"prompt_turns": [{"role": "user", "content": prompt}], "responses": texts,
          "ranks": [0, 1] if choice == 0 else [1, 0]}


def _tldr_sft_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  if "prompt" in obj or "completion" in obj:
    prompt = _require_text(obj, "prompt", "the formatted TL;DR prompt")
    completion = _require_text(obj, "completion", "the summary")
  elif "post" in obj or "info" in obj or "summary" in obj:
    if "info" in obj:
      prompt = _tldr_prompt(_require(obj, "info", dict, "an object with the Reddit 'post'"), "info.")
    else:
      prompt = _tldr_prompt(obj, "")
    summary = obj.get("summary")
    if isinstance(summary, dict):  # {"text": ...}, as in OpenAI's comparison files
      summary = summary.get("text")
      if not isinstance(summary, str):
        raise _LineError(f"field 'summary', 'text': expected the summary (a string), got {type(summary).__name__}")
    elif "summary" not in obj:
      raise _LineError("missing field 'summary'; expected the summary (a string)")
    elif not isinstance(summary, str):
      raise _LineError(f"field 'summary': expected the summary (a string), got {type(summary).__name__}")
    if not summary.strip():
      raise _LineError("field 'summary': the text is empty; expected non-empty text")
    completion = summary
  else:
    raise _LineError("missing field 'summary' (with 'post' or 'info') or 'prompt' and 'completion'; expected one "
                     "of the TL;DR SFT formats")
  return {"turns": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]}


def _ultrafeedback_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  dialogues = {}
  for field in ("chosen", "rejected"):
    if field not in obj:
      raise _LineError(f"missing field {field!r}; expected a list of {{\"role\", \"content\"}} turns ending with "
                       "the assistant reply")
    turns = _parse_turns(obj[field], field)
    if turns[-1]["role"] != "assistant":
      raise _LineError(f"field {field!r}: the last turn must be the 'assistant' reply being compared, got "
                       f"{turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
      raise _LineError(f"field {field!r}: the final assistant reply is empty; expected non-empty text")
    dialogues[field] = turns
  chosen, rejected = dialogues["chosen"], dialogues["rejected"]
  if chosen[:-1] != rejected[:-1]:
    n = min(len(chosen), len(rejected)) - 1
    turn = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    raise _LineError(f"fields 'chosen' and 'rejected': expected the same turns before the final assistant reply, "
                     f"but they differ at turn {turn}")
  prompt_turns = chosen[:-1]
  if not prompt_turns:  # only the replies are stored: the prompt is the 'prompt' field
    prompt_turns = _parse_prompt(obj)
  elif prompt_turns[-1]["role"] != "user":
    raise _LineError(f"fields 'chosen' and 'rejected': the turn before the final reply must be a 'user' turn (the "
                     f"prompt), got {prompt_turns[-1]['role']!r}")
  return {"prompt_turns": prompt_turns, "responses": [chosen[-1]["content"], rejected[-1]["content"]],
          "ranks": [0, 1]}


def _pairs_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  prompt_turns = _parse_prompt(obj)
  responses = []
  for field in ("chosen", "rejected"):
    if isinstance(obj.get(field), list):
      raise _LineError(f"field {field!r}: expected the response text (a string), got list (message lists are "
                       "schema 'ultrafeedback')")
    responses.append(_require_text(obj, field, f"the {field} response"))
  return {"prompt_turns": prompt_turns, "responses": responses, "ranks": [0, 1]}


def _hh_sft_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  if "chosen" not in obj:
    raise _LineError("missing field 'chosen'; expected an HH dialogue string (the demonstration)")
  turns = _parse_hh_dialogue(obj["chosen"], "chosen")
  if not turns[-1]["content"]:
    raise _LineError("field 'chosen': the final Assistant reply is empty; expected non-empty text")
  return {"turns": turns}


def _text_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  return {"text": _require_text(obj, "text", "a document of pretraining text")}


def _prompt_record(obj: Mapping[str, Any]) -> dict[str, Any]:
  if "prompt" not in obj and "query" not in obj:
    raise _LineError("missing field 'prompt' (or 'query'); expected a string or a list of turns")
  return {"prompt_turns": _parse_prompt(obj, "prompt" if "prompt" in obj else "query")}


# ----------------------------------------------------------------------------------------------------------
# Schemas and conversion.


@dataclasses.dataclass(frozen=True)
class Schema:
  kind: str  # the dataset's default name (and its fingerprint's prefix)
  parse: Callable[[Mapping[str, Any]], dict[str, Any]]
  features: Mapping[str, str]


SCHEMAS = {
    "hh": Schema("hh_pairs", _hh_record, COMPARISON_FEATURES),
    "rankings": Schema("rankings", _ranking_record, COMPARISON_FEATURES),
    "sft": Schema("sft", _sft_record, SFT_FEATURES),
    "summarize_from_feedback": Schema("summarize_from_feedback", _summarize_record, COMPARISON_FEATURES),
    "tldr_sft": Schema("tldr_sft", _tldr_sft_record, SFT_FEATURES),
    "ultrafeedback": Schema("ultrafeedback", _ultrafeedback_record, COMPARISON_FEATURES),
    "pairs": Schema("pairs", _pairs_record, COMPARISON_FEATURES),
    "prompts": Schema("prompts", _prompt_record, PROMPT_FEATURES),
    "hh_sft": Schema("hh_sft", _hh_sft_record, SFT_FEATURES),
    "text": Schema("text", _text_record, TEXT_FEATURES),
}
# The kind of record each schema gives: what a stage can read it as.
COMPARISON_SCHEMAS = tuple(k for k, v in SCHEMAS.items() if v.features is COMPARISON_FEATURES)
SFT_SCHEMAS = tuple(k for k, v in SCHEMAS.items() if v.features is SFT_FEATURES)


def _schema(name: str) -> Schema:
  if name not in SCHEMAS:
    raise ValueError(f"schema {name!r}: expected one of {list(SCHEMAS)}")
  return SCHEMAS[name]


def _split_paths(paths: Paths) -> dict[str, list[str]]:
  if isinstance(paths, (str, os.PathLike)):
    paths = {"train": paths}
  elif not isinstance(paths, Mapping):
    paths = {"train": list(paths)}
  out = {}
  for split, files in paths.items():
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
      raise ValueError(f"split {split!r}: no files given; expected a path or a list of paths")
    out[split] = [os.fspath(f) for f in files]
    for path in out[split]:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
  return out


def _parsed(schema: Schema, files: Sequence[str], on_error: str, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """The records of `files`, counting them (and the skipped ones, with their first messages) in `stats`."""
  for path in files:
    for where, obj in _iter_records(path):
      try:
        record = schema.parse(obj)
      except _LineError as e:
        message = f"{path}:{where}: {e}"
        if on_error == "raise":
          raise ValueError(message) from None
        stats["skipped"] += 1
        if len(stats["errors"]) < _MAX_KEPT_ERRORS:
          stats["errors"].append(message)
        continue
      stats["records"] += 1
      yield record


def _check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")


def prepare(
    schema: str,
    paths: Paths,
    data_dir: str,
    *,
    on_error: str = "raise",
    name: str | None = None,
    version: str = "1.0.0",
    overwrite: bool = False,
) -> str:
  """Converts `paths` (see the module docstring) of `schema` (a key of SCHEMAS) into a TFDS ArrayRecord dataset
  under `data_dir` once, and returns its folder (read it with `tfds_io.load_split_dir(folder, split)`).

  Without `name` the dataset is `<kind>_<16 hex digits of the input's fingerprint>`: a new file is a new
  dataset, an unchanged one is reused. Its records have the fields `SCHEMAS[schema].features`.
  """
  spec = _schema(schema)
  _check_on_error(on_error)
  split_files = _split_paths(paths)
  shas = {split: "+".join(file_sha256(p) for p in files) for split, files in split_files.items()}
  fingerprint = f"{spec.kind}:{on_error}:" + ",".join(f"{split}={sha}" for split, sha in sorted(shas.items()))
  if name is None:
    name = f"{spec.kind}_{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
  stats: dict[str, Any] = {"format": spec.kind, "on_error": on_error, "splits": {}}

  def records(split: str, files: list[str]) -> Iterator[dict[str, Any]]:
    sources = [os.path.abspath(p) for p in files]
    split_stats = {"source": sources[0] if len(sources) == 1 else sources, "records": 0, "skipped": 0,
                   "errors": []}
    stats["splits"][split] = split_stats
    yield from _parsed(spec, files, on_error, split_stats)

  # prepare_dataset writes the metadata after the generators ran, so the counts are filled in by then.
  splits = {split: (lambda s=split, f=files: records(s, f)) for split, files in split_files.items()}
  all_files = sorted(p for files in split_files.values() for p in files)
  return tfds_io.prepare_dataset(
      name, data_dir, spec.features, splits, version=version, metadata=stats, overwrite=overwrite,
      fingerprint=fingerprint, description=f"rlhf_jax {spec.kind} data converted from {all_files}")


def records_with_places(schema: str, paths: Paths) -> Iterator[tuple[str, dict[str, Any]]]:
  """("file:place", record) of every valid record of `paths`, as `prepare` converts them (bad ones skipped):
  for checks that need more than the record itself (its length in a tokenizer, say) to name the file's line."""
  spec = _schema(schema)
  for files in _split_paths(paths).values():
    for path in files:
      for where, obj in _iter_records(path):
        try:
          yield f"{path}:{where}", spec.parse(obj)
        except _LineError:
          continue


def check(schema: str, paths: Paths, *, on_error: str = "raise") -> int:
  """Parses every record of `paths` as `prepare(schema, paths, ...)` would, writing nothing; returns the number
  of records (with on_error="skip", of the good ones). A bad record raises ValueError naming file:place, the
  field and what was expected; a damaged file raises whatever on_error says."""
  spec = _schema(schema)
  _check_on_error(on_error)
  n = 0
  for split, files in _split_paths(paths).items():
    stats = {"records": 0, "skipped": 0, "errors": []}
    for _ in _parsed(spec, files, on_error, stats):
      pass
    if not stats["records"]:
      raise ValueError(f"{', '.join(files)}: no valid records in split {split!r} ({stats['skipped']} skipped; first: "
                       f"{stats['errors'][0] if stats['errors'] else 'none'})")
    n += stats["records"]
  return n


def prepare_hh_pairs(
    paths: Paths,
    data_dir: str,
    *,
    name: str = "hh_pairs",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """Anthropic HH-RLHF ({"chosen", "rejected"}) -> comparison records with ranks [0, 1]; `prepare("hh", ...)`."""
  return prepare("hh", paths, data_dir, name=name, version=version, on_error=on_error, overwrite=overwrite)


def prepare_rankings(
    paths: Paths,
    data_dir: str,
    *,
    name: str = "rankings",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """K-way rankings ({"prompt", "responses", "ranking"}) -> comparison records; `prepare("rankings", ...)`."""
  return prepare("rankings", paths, data_dir, name=name, version=version, on_error=on_error, overwrite=overwrite)


def check_rankings(path: str) -> int:
  """`check("rankings", path)`: parses every record of a K-way ranking file, writing nothing; returns the number
  of records. A bad line raises ValueError naming file:line, the field and what was expected."""
  return check("rankings", path)


def prepare_sft(
    paths: Paths,
    data_dir: str,
    *,
    name: str = "sft",
    version: str = "1.0.0",
    on_error: str = "raise",
    overwrite: bool = False,
) -> str:
  """SFT ({"prompt", "response"} or {"turns"}) -> records {turns}; `prepare("sft", ...)`."""
  return prepare("sft", paths, data_dir, name=name, version=version, on_error=on_error, overwrite=overwrite)
