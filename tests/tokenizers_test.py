"""Tests for rlhf_jax/tokenizers.py: round trips, reserved specials, the chat layout and its loss mask."""

import hashlib
import pickle
import random

import pytest

from rlhf_jax import tokenizers as tk

UNICODE_SAMPLES = [
    "",
    "hello world",
    "  two  spaces\tand a tab\nnewline\r\n",
    "héllo wörld, ça va? Ünïcödé",
    "日本語のテキスト，中文，한국어",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "\u0000 nul and \uffff and \U0010ffff",
    "<|user|> <s> </s> <pad> look like specials",
]


def _corpus(n: int = 2000, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = ("the a cat dog sat on mat big small red blue runs jumps quickly over lazy fox hello world "
           "reward model policy value token language human assistant answer question").split()
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", "!"])
          for _ in range(n)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tok.model"
  return tk.SentencePieceTokenizer.train(_corpus(), str(path), vocab_size=320)


def test_byte_tokenizer_ids_are_utf8_bytes_plus_six():
  tok = tk.ByteTokenizer()
  text = "aé😀"
  assert tok.encode(text) == [b + 6 for b in text.encode("utf-8")]
  assert tok.encode("a") == [ord("a") + 6]
  assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.system_id) == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_round_trip(text):
  tok = tk.ByteTokenizer()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert all(6 <= i < 262 for i in ids)


def test_byte_decode_skips_or_names_specials_and_replaces_broken_utf8():
  tok = tk.ByteTokenizer()
  ids = [tok.bos_id, tok.user_id] + tok.encode("hi") + [tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "hi"
  assert tok.decode(ids, skip_special=False) == "<s><|user|>hi</s><pad>"
  # The first byte of a 2-byte character alone: decoded as U+FFFD instead of raising.
  assert tok.decode([0xC3 + 6]) == "\ufffd"


def test_sentencepiece_specials_reserved_and_distinct(sp_tok):
  ids = [sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id, sp_tok.user_id, sp_tok.assistant_id, sp_tok.system_id]
  assert ids == [0, 1, 2, 3, 4, 5]
  assert sp_tok.vocab_size == 320
  assert sp_tok.pad_id != sp_tok.eos_id


@pytest.mark.parametrize("text", UNICODE_SAMPLES + _corpus(20, seed=7))
def test_sentencepiece_round_trip_and_no_special_ids(sp_tok, text):
  ids = sp_tok.encode(text)
  assert sp_tok.decode(ids) == text
  assert not set(ids) & set(range(6)), f"special id produced for {text!r}: {ids}"
  assert all(0 <= i < sp_tok.vocab_size for i in ids)


def test_sentencepiece_compresses_in_domain_text(sp_tok):
  # A trained model must beat bytes on its own domain, or training silently did nothing.
  text = " ".join(_corpus(50, seed=3))
  assert len(sp_tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_sentencepiece_training_is_deterministic_and_load_matches(sp_tok, tmp_path):
  other = tk.SentencePieceTokenizer.train(_corpus(), str(tmp_path / "again.model"), vocab_size=320)
  assert hashlib.sha256(other.model_proto).digest() == hashlib.sha256(sp_tok.model_proto).digest()
  loaded = tk.SentencePieceTokenizer.load(sp_tok.path)
  text = "the lazy fox answers a question 😀"
  assert loaded.encode(text) == sp_tok.encode(text)
  clone = pickle.loads(pickle.dumps(sp_tok))
  assert clone.encode(text) == sp_tok.encode(text)


def test_make_tokenizer_trains_once_then_loads(tmp_path):
  path = str(tmp_path / "m.model")
  with pytest.raises(FileNotFoundError, match="m.model"):
    tk.make_tokenizer("sentencepiece", path=path, vocab_size=300)
  tok = tk.make_tokenizer("sentencepiece", path=path, vocab_size=300, corpus=_corpus(500))
  again = tk.make_tokenizer("sentencepiece", path=path, vocab_size=300, corpus=["ignored"])
  assert again.model_proto == tok.model_proto
  with pytest.raises(ValueError, match="vocab_size 300"):
    tk.make_tokenizer("sentencepiece", path=path, vocab_size=512)
  assert isinstance(tk.tokenizer_from_config({"kind": "byte"}), tk.ByteTokenizer)
  with pytest.raises(ValueError, match="'wordpiece'"):
    tk.make_tokenizer("wordpiece")


def test_encode_chat_layout_and_loss_mask():
  tok = tk.ByteTokenizer()
  turns = [
      {"role": "system", "content": "S"},
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"},
      {"role": "user", "content": "?"},
      {"role": "assistant", "content": "k"},
  ]
  b = lambda s: [c + 6 for c in s.encode()]  # noqa: E731
  expected_ids = ([1] + [5] + b("S") + [2] + [3] + b("hi") + [2] + [4] + b("yo") + [2]
                  + [3] + b("?") + [2] + [4] + b("k") + [2])
  expected_mask = ([0] + [0, 0, 0] + [0, 0, 0, 0] + [0, 1, 1, 1] + [0, 0, 0] + [0, 1, 1])
  ids, mask = tk.encode_chat(tok, turns)
  assert ids == expected_ids
  assert mask == expected_mask
  prompt = tk.encode_prompt(tok, turns[:2])
  assert prompt == [1, 5] + b("S") + [2, 3] + b("hi") + [2, 4]
  # The prompt is a prefix of the full dialogue: SFT, RM and PPO see the same tokens.
  assert expected_ids[:len(prompt)] == prompt


def test_encode_chat_rejects_unknown_role_and_bad_turns():
  tok = tk.ByteTokenizer()
  with pytest.raises(ValueError, match="'robot'"):
    tk.encode_chat(tok, [{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match="turn 1.*content must be a string"):
    tk.encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])
  with pytest.raises(ValueError, match="turn 0.*'role' and 'content'"):
    tk.encode_chat(tok, [{"content": "x"}])
