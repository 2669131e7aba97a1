"""Tokenizers and the chat format shared by every stage.

Two tokenizers implement one small interface (`Tokenizer`):

* `ByteTokenizer`: six special ids, then the 256 UTF-8 bytes. Needs no training, encodes any text; the
  laptop default.
* `SentencePieceTokenizer`: a SentencePiece model trained from an in-memory corpus with byte fallback, so any
  text still encodes.

Both reserve the same six specials: PAD=0, BOS=1, EOS=2, USER=3, ASSISTANT=4, SYSTEM=5. They are never produced
by `encode` of ordinary text (for SentencePiece they are control symbols, so the literal string "<|user|>" in a
prompt is encoded as ordinary pieces and cannot forge a role token). PAD is distinct from EOS, as PPO needs
(RLHF_NOTES, PPO detail 7).

The chat format lives here because SFT, the reward model and PPO must agree on it token for token:

    [BOS] ([ROLE] content [EOS])* [ASSISTANT]?

`encode_chat` returns a loss mask that is 1 exactly on assistant content tokens and the assistant's closing
EOS: the tokens the model must learn to produce, including when to stop. `encode_prompt` ends with the
ASSISTANT role token; the policy continues from there and stops by emitting EOS.
"""

from __future__ import annotations

import abc
import io
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
USER_ID = 3
ASSISTANT_ID = 4
SYSTEM_ID = 5
NUM_SPECIALS = 6

# Printed by decode(skip_special=False); also the SentencePiece piece names of the specials.
SPECIAL_NAMES = {
    PAD_ID: "<pad>",
    BOS_ID: "<s>",
    EOS_ID: "</s>",
    USER_ID: "<|user|>",
    ASSISTANT_ID: "<|assistant|>",
    SYSTEM_ID: "<|system|>",
}

ROLES = ("system", "user", "assistant")


class Tokenizer(abc.ABC):
  """What every stage needs from a tokenizer: ids of the specials, encode and decode."""

  vocab_size: int
  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  user_id: int = USER_ID
  assistant_id: int = ASSISTANT_ID
  system_id: int = SYSTEM_ID

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset(
        (self.pad_id, self.bos_id, self.eos_id, self.user_id, self.assistant_id, self.system_id))

  def role_id(self, role: str) -> int:
    """The id of the token that opens a turn of `role` ("system", "user" or "assistant")."""
    ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
    if role not in ids:
      raise ValueError(f"unknown chat role {role!r}: expected one of {list(ROLES)}")
    return ids[role]

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without any special token."""

  @abc.abstractmethod
  def _decode_plain(self, ids: Sequence[int]) -> str:
    """Text of ids that contain no special id."""

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`. Specials are dropped, or written as their names ("<|user|>") if skip_special=False."""
    specials = self.special_ids
    pieces: list[str] = []
    run: list[int] = []
    for i in np.asarray(list(ids), dtype=np.int64).reshape(-1).tolist():
      if i in specials:
        if run:
          pieces.append(self._decode_plain(run))
          run = []
        if not skip_special:
          pieces.append(SPECIAL_NAMES[i])
      else:
        run.append(i)
    if run:
      pieces.append(self._decode_plain(run))
    return "".join(pieces)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past the six specials: byte b has id b + 6; vocab_size 264 (262 rounded up to 8)."""

  vocab_size = 264

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
    return [b + NUM_SPECIALS for b in text.encode("utf-8")]

  def _decode_plain(self, ids: Sequence[int]) -> str:
    # Ids 262 and 263 pad the vocabulary to a multiple of 8 and are no byte: skipped, like specials.
    data = bytes(i - NUM_SPECIALS for i in ids if NUM_SPECIALS <= i < NUM_SPECIALS + 256)
    # An untrained or sampled sequence may cut a multi-byte character: show U+FFFD instead of raising.
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Lines of `texts` for the SentencePiece trainer, which wants one sentence per input and skips long ones."""
  for text in texts:
    for line in text.split("\n"):
      if line.strip() and len(line.encode("utf-8")) <= max_bytes:
        yield line


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model whose ids 0..5 are the specials, with byte fallback for unseen characters.

  Normalisation is switched off (identity rule, whitespace kept, no dummy prefix) so that
  decode(encode(text)) == text for every string, as with the byte tokenizer.
  """

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._model_proto = bytes(model_proto)
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)
    self.path = path
    self.vocab_size = int(self._sp.get_piece_size())
    where = path or "<in-memory model>"
    for i, name in SPECIAL_NAMES.items():
      piece = self._sp.id_to_piece(i)
      if piece != name or not self._sp.is_control(i):
        raise ValueError(
            f"{where}: SentencePiece id {i} is {piece!r} but rlhf_jax expects the special {name!r} there; "
            "train the model with SentencePieceTokenizer.train")

  @classmethod
  def train(
      cls,
      texts: Iterable[str],
      path: str | os.PathLike[str] | None,
      vocab_size: int = 512,
      *,
      model_type: str = "unigram",
      character_coverage: float = 1.0,
      max_sentence_bytes: int = 16384,
  ) -> SentencePieceTokenizer:
    """Trains on an in-memory corpus; writes the model to `path` (a file) unless path is None.

    Deterministic: one thread and no sampling of the input, so the same corpus gives the same model bytes.
    Texts are split into lines, since the trainer treats each input as one sentence.
    """
    if vocab_size < 256 + NUM_SPECIALS + 2:
      raise ValueError(
          f"SentencePiece vocab_size={vocab_size} is too small: byte fallback alone needs 256 + "
          f"{NUM_SPECIALS} specials + 1 unk; expected at least {256 + NUM_SPECIALS + 2}")
    writer = io.BytesIO()
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=_training_sentences(texts, max_sentence_bytes),
          model_writer=writer,
          vocab_size=vocab_size,
          model_type=model_type,
          character_coverage=character_coverage,
          pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
          # unk comes after the role tokens so ids 0..5 match ByteTokenizer.
          unk_id=NUM_SPECIALS,
          pad_piece=SPECIAL_NAMES[PAD_ID], bos_piece=SPECIAL_NAMES[BOS_ID],
          eos_piece=SPECIAL_NAMES[EOS_ID], unk_piece="<unk>",
          # Control symbols (not user-defined symbols): never matched in input text.
          control_symbols=[SPECIAL_NAMES[USER_ID], SPECIAL_NAMES[ASSISTANT_ID], SPECIAL_NAMES[SYSTEM_ID]],
          byte_fallback=True,
          normalization_rule_name="identity",
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          allow_whitespace_only_pieces=True,
          split_digits=True,
          max_sentence_length=max_sentence_bytes,
          num_threads=1,
          input_sentence_size=0,
          shuffle_input_sentence=False,
          minloglevel=2,
      )
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training for {path or '<in-memory model>'} failed: {e}") from e
    proto = writer.getvalue()
    if path is not None:
      path = os.fspath(path)
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      # Every process of a multi-host run may train the same model (training is deterministic) and write it
      # to a shared filesystem: a temporary name unique per host and process, then an atomic rename.
      tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
      with open(tmp, "wb") as f:
        f.write(proto)
      os.replace(tmp, path)  # atomic: a concurrent reader never sees half a model
    return cls(proto, path=None if path is None else str(path))

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model file {path} does not exist")
    with open(path, "rb") as f:
      return cls(f.read(), path=path)

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"SentencePieceTokenizer.encode expects str, got {type(text).__name__}")
    return list(self._sp.encode(text))

  def _decode_plain(self, ids: Sequence[int]) -> str:
    return self._sp.decode(list(ids))

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  # The processor is a C++ object: pickle the model bytes instead (grain worker processes pickle transforms).
  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._model_proto, "path": self.path}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"], path=state["path"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def make_tokenizer(
    kind: str,
    *,
    path: str | None = None,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
) -> Tokenizer:
  """The tokenizer a config names.

  kind="byte" ignores the other arguments. kind="sentencepiece" loads `path`; if the file does not exist and
  a `corpus` is given, trains on it and saves the model to `path` first (so the first run of an experiment
  trains it and later runs reuse it).
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer.kind={kind!r}: expected 'byte' or 'sentencepiece'")
  if not path:
    raise ValueError("tokenizer.kind='sentencepiece' needs tokenizer.path (the .model file to load or write)")
  if os.path.exists(path):
    tok = SentencePieceTokenizer.load(path)
    if tok.vocab_size != vocab_size:
      raise ValueError(
          f"{path}: SentencePiece model has vocab_size {tok.vocab_size} but tokenizer.vocab_size={vocab_size}; "
          "fix the config or delete the file to retrain")
    return tok
  if corpus is None:
    raise FileNotFoundError(
        f"tokenizer.path={path} does not exist and no training corpus was given to train it")
  return SentencePieceTokenizer.train(corpus, path, vocab_size)


def tokenizer_from_config(cfg: Mapping[str, Any] | Any, corpus: Iterable[str] | None = None) -> Tokenizer:
  """`make_tokenizer` from a config with fields kind, path (optional) and vocab_size (optional)."""
  get = cfg.get if isinstance(cfg, Mapping) or hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
  return make_tokenizer(
      get("kind", "byte"), path=get("path", None) or None, vocab_size=int(get("vocab_size", 512)),
      corpus=corpus)


def _check_turn(turn: Any, index: int) -> tuple[str, str]:
  if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
    raise ValueError(f"chat turn {index}: expected a dict with 'role' and 'content', got {turn!r:.200}")
  role, content = turn["role"], turn["content"]
  if role not in ROLES:
    raise ValueError(f"chat turn {index}: unknown role {role!r}; expected one of {list(ROLES)}")
  if not isinstance(content, str):
    raise ValueError(f"chat turn {index} ({role}): content must be a string, got {type(content).__name__}")
  return role, content


def encode_chat(
    tok: Tokenizer,
    turns: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
  """Token ids of a dialogue and the mask of tokens the model is trained to produce.

  Layout: [BOS] then, per turn, [ROLE] + encode(content) + [EOS]; with add_generation_prompt, a final
  [ASSISTANT]. loss_mask[t] is 1 iff token t is assistant content or the EOS closing an assistant turn (the
  role token itself is given, not predicted: it is part of the format, not of the reply).

  Returns:
    (ids, loss_mask), two lists of the same length.
  """
  ids = [tok.bos_id]
  mask = [0]
  for i, turn in enumerate(turns):
    role, content = _check_turn(turn, i)
    body = tok.encode(content) + [tok.eos_id]
    ids.append(tok.role_id(role))
    mask.append(0)
    ids.extend(body)
    mask.extend([1 if role == "assistant" else 0] * len(body))
  if add_generation_prompt:
    ids.append(tok.assistant_id)
    mask.append(0)
  return ids, mask


def encode_prompt(tok: Tokenizer, turns: Sequence[Mapping[str, str]]) -> list[int]:
  """The ids a policy continues: the dialogue so far, then [ASSISTANT]."""
  return encode_chat(tok, turns, add_generation_prompt=True)[0]


def save_to_dir(tok: Tokenizer, directory: str) -> dict[str, Any]:
  """Writes what it takes to rebuild `tok` into `directory` (a SentencePiece model as tokenizer.model) and
  returns its description for a manifest (`load_from_dir` reads it back)."""
  if isinstance(tok, ByteTokenizer):
    return {"kind": "byte"}
  if isinstance(tok, SentencePieceTokenizer):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.model")
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(tok.model_proto)
    os.replace(tmp, path)
    return {"kind": "sentencepiece", "file": "tokenizer.model", "vocab_size": tok.vocab_size}
  raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")


def load_from_dir(directory: str, info: Mapping[str, Any]) -> Tokenizer:
  """The tokenizer `save_to_dir` described with `info`, from `directory`."""
  kind = info.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer.load(os.path.join(directory, str(info.get("file", "tokenizer.model"))))
  raise ValueError(f"{directory}: unknown tokenizer kind {kind!r} in its manifest; expected 'byte' or "
                   "'sentencepiece'")
