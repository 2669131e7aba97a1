"""Tests for rlhf_jax/data/real.py: parsing user JSONL into TFDS datasets, and the error for each bad input."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.data import real
from rlhf_jax.data import tfds_io


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else
               (line if isinstance(line, str) else json.dumps(line)).encode("utf-8")) + b"\n")
  return str(path)


HH_GOOD = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five, probably."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken...",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."},
]


def test_hh_pairs_records(tmp_path):
  path = _write_lines(tmp_path / "hh.jsonl", HH_GOOD + [""])  # a trailing blank line is allowed
  out = real.prepare_hh_pairs(path, str(tmp_path / "data"))
  src = tfds_io.load_split("hh_pairs", str(tmp_path / "data"), "train")
  assert len(src) == 2
  assert tfds_io.load_split_dir(out, "train")[1]["responses"] == src[1]["responses"]
  r0, r1 = src[0], src[1]
  assert r0["prompt_turns"] == [{"role": "user", "content": "What is 2+2?"}]
  assert r0["responses"] == ["4.", "Five, probably."]
  assert r0["ranks"].tolist() == [0, 1]
  assert r1["prompt_turns"] == [
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Tell me a joke"}]
  assert r1["responses"] == ["Why did the chicken...", "No."]
  meta = tfds_io.read_metadata(out)
  assert meta["splits"]["train"]["records"] == 2 and meta["splits"]["train"]["skipped"] == 0


def test_rankings_records_with_ties_and_turn_prompts(tmp_path):
  lines = [
      {"prompt": "Name a colour.", "responses": ["red", "blue", "uh"], "ranking": [0, 0, 1]},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
       "responses": ["a", "b", "c", "d"], "ranking": [3, 1, 0, 2]},
  ]
  real.prepare_rankings({"train": _write_lines(tmp_path / "r.jsonl", lines),
                         "test": _write_lines(tmp_path / "t.jsonl", lines[:1])}, str(tmp_path / "d"))
  src = tfds_io.load_split("rankings", str(tmp_path / "d"), "train")
  assert src[0]["prompt_turns"] == [{"role": "user", "content": "Name a colour."}]
  assert src[0]["responses"] == ["red", "blue", "uh"]
  np.testing.assert_array_equal(src[0]["ranks"], [0, 0, 1])
  assert src[1]["prompt_turns"][0] == {"role": "system", "content": "Be brief."}
  np.testing.assert_array_equal(src[1]["ranks"], [3, 1, 0, 2])
  assert len(tfds_io.load_split("rankings", str(tmp_path / "d"), "test")) == 1


def test_sft_both_formats(tmp_path):
  turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
  path = _write_lines(tmp_path / "s.jsonl", [{"prompt": "Say hi", "response": "hi"}, {"turns": turns}])
  real.prepare_sft(path, str(tmp_path / "d"))
  src = tfds_io.load_split("sft", str(tmp_path / "d"), "train")
  assert src[0]["turns"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
  assert src[1]["turns"] == turns


def test_changed_file_is_noticed_and_skip_mode_counts(tmp_path):
  path = _write_lines(tmp_path / "hh.jsonl", HH_GOOD)
  real.prepare_hh_pairs(path, str(tmp_path / "d"))
  _write_lines(path, HH_GOOD + [{"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: x\n\nAssistant: y"}])
  with pytest.raises(ValueError, match="the input changed"):
    real.prepare_hh_pairs(path, str(tmp_path / "d"))
  out = real.prepare_hh_pairs(path, str(tmp_path / "d2"), on_error="skip")
  assert len(tfds_io.load_split("hh_pairs", str(tmp_path / "d2"), "train")) == 2
  meta = tfds_io.read_metadata(out)["splits"]["train"]
  assert meta["skipped"] == 1 and "hh.jsonl:3" in meta["errors"][0]


# (preparer, lines, message). The message must name the line (1-based) and the field.
BAD_INPUTS = {
    "invalid_json": (real.prepare_rankings, ['{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}',
                                             '{"prompt": "p", "responses": '],
                     r"r\.jsonl:2: invalid JSON"),
    "not_utf8": (real.prepare_sft, [b'{"prompt": "caf\xe9", "response": "ok"}'],
                 r"r\.jsonl:1: not valid UTF-8"),
    "not_object": (real.prepare_sft, ['["prompt", "response"]'], r"r\.jsonl:1: expected a JSON object, got list"),
    "missing_field": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"]}],
                      r"r\.jsonl:1: missing field 'ranking'"),
    "wrong_type": (real.prepare_rankings, [{"prompt": "p", "responses": "a b", "ranking": [0, 1]}],
                   r"r\.jsonl:1: field 'responses': expected a list of at least 2 response strings, got str"),
    "one_response": (real.prepare_rankings, [{"prompt": "p", "responses": ["a"], "ranking": [0]}],
                     r"r\.jsonl:1: field 'responses': expected at least 2 responses to compare, got 1"),
    "ranking_length": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}],
                       r"r\.jsonl:1: field 'ranking': has 2 ranks but 'responses' has 3"),
    "rank_not_int": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1.5]}],
                     r"r\.jsonl:1: field 'ranking', item 1: expected a non-negative integer rank, got 1\.5"),
    "rank_bool": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, True]}],
                  r"r\.jsonl:1: field 'ranking', item 1: expected a non-negative integer rank, got True"),
    "all_tied": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}],
                 r"r\.jsonl:1: field 'ranking': all responses are tied"),
    "empty_response": (real.prepare_rankings, [{"prompt": "p", "responses": ["a", "  "], "ranking": [0, 1]}],
                       r"r\.jsonl:1: field 'responses', item 1: the response is empty"),
    "hh_no_final_assistant": (real.prepare_hh_pairs,
                              [HH_GOOD[0], {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
                                            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"}],
                              r"r\.jsonl:2: field 'chosen': the dialogue must end with an Assistant turn"),
    "hh_empty_reply": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: ",
                                                "rejected": "\n\nHuman: a\n\nAssistant: b"}],
                       r"r\.jsonl:1: field 'chosen': the final Assistant reply is empty"),
    "hh_prefix_mismatch": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                    "rejected": "\n\nHuman: OTHER\n\nAssistant: b"}],
                           r"r\.jsonl:1: fields 'chosen' and 'rejected': expected the same dialogue"),
    "hh_missing_rejected": (real.prepare_hh_pairs, [{"chosen": "\n\nHuman: a\n\nAssistant: b"}],
                            r"r\.jsonl:1: missing field 'rejected'"),
    "sft_unknown_role": (real.prepare_sft, [{"turns": [{"role": "bot", "content": "x"}]}],
                         r"r\.jsonl:1: field 'turns', turn 0: unknown role 'bot'"),
    "sft_no_assistant": (real.prepare_sft, [{"turns": [{"role": "user", "content": "x"}]}],
                         r"r\.jsonl:1: expected at least one non-empty assistant turn"),
    "sft_response_type": (real.prepare_sft, [{"prompt": "p", "response": 3}],
                          r"r\.jsonl:1: field 'response': expected a string, got int"),
    "empty_file": (real.prepare_sft, ["", "  "], r"r\.jsonl: the file has no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_line_and_field(tmp_path, case):
  prepare, lines, message = BAD_INPUTS[case]
  path = _write_lines(tmp_path / "r.jsonl", lines)
  with pytest.raises(ValueError, match=message):
    prepare(path, str(tmp_path / "d"))
  # Nothing is published for a failed conversion.
  assert not any(os.path.isdir(os.path.join(tmp_path, "d", n, "1.0.0")) for n in ("sft", "rankings", "hh_pairs"))


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    real.prepare_sft(str(tmp_path / "nope.jsonl"), str(tmp_path / "d"))
