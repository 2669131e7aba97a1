"""Tokenizers and the chat format shared by every stage.

Three tokenizers implement one small interface (`Tokenizer`):

* `ByteTokenizer`: six special ids, then the 256 UTF-8 bytes. Needs no training, encodes any text; the
  laptop default.
* `SentencePieceTokenizer`: a SentencePiece model trained from an in-memory corpus with byte fallback, so any
  text still encodes.
* `HFTokenizer`: the tokenizer an imported Hugging Face model came with (tokenizer.json, tokenizer_config.json,
  its chat template), so a stage trains on exactly the ids `apply_chat_template` gives. It has no role tokens
  and no fixed ids; its chat format is its template (see the class docstring).

The first two reserve the same six specials: PAD=0, BOS=1, EOS=2, USER=3, ASSISTANT=4, SYSTEM=5. They are never produced
by `encode` of ordinary text (for SentencePiece they are control symbols, so the literal string "<|user|>" in a
prompt is encoded as ordinary pieces and cannot forge a role token). PAD is distinct from EOS, as PPO needs
(RLHF_NOTES, PPO detail 7).

The chat format lives here because SFT, the reward model and PPO must agree on it token for token:

    [BOS] ([ROLE] content [EOS])* [ASSISTANT]?

`encode_chat` returns a loss mask that is 1 exactly on assistant content tokens and the assistant's closing
EOS: the tokens the model must learn to produce, including when to stop. `encode_prompt` ends with the
ASSISTANT role token; the policy continues from there and stops by emitting EOS. For an `HFTokenizer` both
render its chat template instead, with the same contract: EOS is the token that closes an assistant turn
(<|im_end|> for ChatML, <|eot_id|> for Llama 3) and the mask covers each reply and that token.
"""

from __future__ import annotations

import abc
import datetime
import functools
import io
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
import sentencepiece
import tokenizers as hf_tokenizers

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


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers and chat templates.

# The files of a Hugging Face tokenizer folder that HFTokenizer reads (and save_to_dir copies).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "chat_template.json", "generation_config.json")
HF_DIR = "hf_tokenizer"  # save_to_dir writes an HFTokenizer's files into this subfolder of a stage directory
# transformers' SPECIAL_TOKENS_ATTRIBUTES (less additional_special_tokens): the names a template may use.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:400] or type(e).__name__


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text, renders its body unchanged.

  transformers needs it for return_assistant_tokens_mask; here the mask comes from rendering prefixes
  (HFTokenizer.encode_chat), so the tag only has to parse.
  """

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str) -> jinja2.Template:
  """The template compiled as transformers 4.55 compiles it (utils/chat_template_utils.py,
  _compile_jinja_template): sandboxed, trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`,
  `strftime_now` and a `tojson` that does not escape HTML."""

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(format):  # noqa: A002 - transformers' name for it
    return datetime.datetime.now().strftime(format)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def _token_content(value: Any, where: str) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, {"content": ...} (an AddedToken) or null."""
  if value is None or isinstance(value, str):
    return value or None
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r:.100}")


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer folder: tokenizer.json run by the `tokenizers` library, its chat template by jinja2.

  Built from the files `save_pretrained` writes (`HFTokenizer.load(folder)`): tokenizer.json (required),
  tokenizer_config.json (special tokens, added_tokens_decoder, chat_template), special_tokens_map.json (read
  only for folders without added_tokens_decoder, as transformers does), chat_template.jinja or chat_template.json
  and generation_config.json. The chat template is, in order: chat_template.jinja, tokenizer_config.json's
  "chat_template" (a named list or dict: its "default"), chat_template.json's "chat_template".

  * `encode(text)`: the ids of plain text, no specials added; the spelling of a special token in the text
    ("<|im_end|>") is encoded as ordinary text, as the other tokenizers do, so text cannot forge a stop token.
    `decode` is the tokenizers library's (special tokens skipped unless skip_special=False; ids outside the
    vocabulary dropped; no clean_up_tokenization_spaces), so decode(encode(t)) == t up to the tokenizer's own
    normaliser (NFC for Qwen).
  * `vocab_size`: the full vocabulary including added tokens (len(tokenizer) in transformers). A checkpoint's
    embedding may have more rows (Qwen2.5: 151936 for 151665 tokens).
  * `eos_id`, the stop token: the first special token after an assistant reply in the chat template's own
    rendering of a probe conversation (a user turn, then an assistant turn; a system turn first if the template
    needs one), i.e. the token that ends a chat reply (<|im_end|>, <|eot_id|>). That is what the SFT mask
    teaches and what a chat model stops on, even where tokenizer_config.json names another eos_token (the first
    Llama-3-Instruct release said <|end_of_text|>; generation_config.json lists both). Without a template (or
    when the template ends replies with no special token): tokenizer_config.json's eos_token, then
    generation_config.json's first eos_token_id. `stop_ids` holds the eos_id with every other eos id the folder
    names, for callers that want to stop on any of them.
  * `pad_id`: tokenizer_config.json's pad_token unless it is the eos token; else the first of its eos_token and
    generation_config.json's eos ids that is not the eos_id (Llama 3 pads with <|end_of_text|>); else the
    lowest-id special token that is neither eos nor bos. Never equal to eos_id (PAD is not a stop token).
  * `bos_id`: the bos_token; a tokenizer without one (Qwen) gets its pad_id (Qwen: <|endoftext|>, its document
    separator), used only where a stage writes [BOS] + text (plain documents, benchmark prompts). The chat
    template adds its own BOS when it wants one, and `encode_chat` never adds another.
  * There are no role tokens: user_id, assistant_id, system_id and role_id raise; the template formats turns.

  The chat (`encode_chat`) renders the template with messages, add_generation_prompt, tools=None,
  documents=None and the special token strings (bos_token, eos_token, ..., additional_special_tokens, the
  extra_special_tokens), then tokenises the text once with add_special_tokens=False: the same ids as
  transformers' apply_chat_template(tokenize=True). The loss mask is found by rendering prefixes: the
  characters of assistant turn i are [len(render(turns[:i], add_generation_prompt=True)),
  len(render(turns[:i+1]))), so it is 1 on the tokens that overlap them up to and including the last eos_id
  among them, and 0 on headers, other turns and what follows the eos (ChatML's newline). This works for any
  template that renders earlier turns the same when turns are appended and whose generation prompt is the
  header of the next assistant turn; a template that does not (one that rewrites earlier replies, as Qwen3
  drops their reasoning) raises a one-line error instead of giving a wrong mask.
  """

  def __init__(self, files: Mapping[str, str], path: str | None = None):
    self._files = {name: str(files[name]) for name in HF_FILES if name in files}
    self.path = path
    self._where = where = path or "<in-memory Hugging Face tokenizer>"
    if "tokenizer.json" not in self._files:
      raise FileNotFoundError(f"{where}: no tokenizer.json; expected a Hugging Face tokenizer folder as "
                              "save_pretrained writes it (tokenizer.json, tokenizer_config.json)")
    config = self._json("tokenizer_config.json")
    names = {k: _token_content(config.get(k), f"{where}/tokenizer_config.json {k}") for k in _NAMED_SPECIALS}
    additional = config.get("additional_special_tokens") or []
    if "added_tokens_decoder" not in config:  # the legacy layout: special_tokens_map.json has the last word
      legacy = self._json("special_tokens_map.json")
      for k in _NAMED_SPECIALS:
        if k in legacy:
          names[k] = _token_content(legacy[k], f"{where}/special_tokens_map.json {k}")
      additional = list(additional) + [t for t in legacy.get("additional_special_tokens") or [] if t not in additional]
    # What transformers passes the template besides the messages (tokenization_utils_base.special_tokens_map).
    self._template_tokens: dict[str, Any] = {k: v for k, v in names.items() if v}
    additional = [_token_content(t, f"{where}/tokenizer_config.json additional_special_tokens") for t in additional]
    if any(additional):
      self._template_tokens["additional_special_tokens"] = [t for t in additional if t]
    for k, v in (config.get("extra_special_tokens") or {}).items():
      if content := _token_content(v, f"{where}/tokenizer_config.json extra_special_tokens {k}"):
        self._template_tokens[k] = content

    self._chat = self._backend(config, split_special_tokens=bool(config.get("split_special_tokens", False)))
    self._plain = self._backend(config, split_special_tokens=True)
    self.vocab_size = int(self._chat.get_vocab_size(with_added_tokens=True))
    self._special = frozenset(i for i, t in self._chat.get_added_tokens_decoder().items() if t.special)
    self._template = self._chat_template(config)

    config_eos = self._id(names["eos_token"], "eos_token")
    generation = self._json("generation_config.json")
    gen_eos = generation.get("eos_token_id")
    gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in gen_eos):
      raise ValueError(f"{where}/generation_config.json: eos_token_id={gen_eos!r}; expected token ids below "
                       f"{self.vocab_size}")
    eos = self._end_of_turn() if self._template else None
    self.eos_rule = "the token that ends an assistant turn in the chat template"
    if eos is None:
      eos, self.eos_rule = config_eos, "tokenizer_config.json eos_token"
    if eos is None and gen_eos:
      eos, self.eos_rule = gen_eos[0], "generation_config.json eos_token_id"
    if eos is None:
      raise ValueError(f"{where}: no end-of-sequence token: expected an eos_token in tokenizer_config.json, an "
                       "eos_token_id in generation_config.json or a chat template that ends replies with one")
    self.eos_id = int(eos)
    self.stop_ids = tuple(sorted({self.eos_id, *gen_eos, *([config_eos] if config_eos is not None else [])}))

    bos = self._id(names["bos_token"], "bos_token")
    pad_token = self._id(names["pad_token"], "pad_token")
    candidates = [pad_token, config_eos, *gen_eos, *sorted(self._special - {bos})]
    pad = next((int(i) for i in candidates if i is not None and i != self.eos_id), None)
    if pad is None:
      raise ValueError(f"{where}: no pad token: tokenizer_config.json names no pad_token other than the EOS "
                       f"{self._token(self.eos_id)!r} and there is no other special token to pad with; set pad_token")
    self.pad_id = pad
    self.bos_id = int(bos) if bos is not None else self.pad_id

  @classmethod
  def load(cls, directory: str | os.PathLike[str]) -> HFTokenizer:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"Hugging Face tokenizer folder {directory} does not exist (or is not a folder)")
    files = {}
    for name in HF_FILES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          files[name] = f.read()
    return cls(files, path=directory)

  def save(self, directory: str) -> None:
    """Writes the folder's files (as read) into `directory`, removing other HF_FILES left there."""
    os.makedirs(directory, exist_ok=True)
    for name in HF_FILES:
      path = os.path.join(directory, name)
      if name not in self._files:
        if os.path.exists(path):
          os.remove(path)  # a stale chat_template.jinja would win over the template saved here
        continue
      tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(self._files[name])
      os.replace(tmp, path)

  # ------------------------------------------------------------------------------------------------------------
  # Construction helpers.

  def _json(self, name: str) -> dict[str, Any]:
    if name not in self._files:
      return {}
    try:
      value = json.loads(self._files[name])
    except json.JSONDecodeError as e:
      raise ValueError(f"{self._where}/{name}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
      raise ValueError(f"{self._where}/{name}: expected a JSON object, got {type(value).__name__}")
    return value

  def _backend(self, config: Mapping[str, Any], *, split_special_tokens: bool) -> hf_tokenizers.Tokenizer:
    where = f"{self._where}/tokenizer.json"
    try:
      tok = hf_tokenizers.Tokenizer.from_str(self._files["tokenizer.json"])
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a malformed file
      raise ValueError(f"{where}: the tokenizers library cannot read it ({_one_line(e)})") from e
    tok.no_padding()
    tok.no_truncation()
    # With add_special_tokens=False a post-processor adds no token; it may only trim offsets (GPT-2's
    # trim_offsets leaves whitespace tokens zero-width), which the loss mask must not see.
    tok.post_processor = None
    tok.encode_special_tokens = split_special_tokens
    # Tokens tokenizer_config.json declares but tokenizer.json lacks are appended, as PreTrainedTokenizerFast does.
    for key, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
      idx, content = int(key), _token_content(entry, f"{self._where}/tokenizer_config.json added_tokens_decoder")
      if tok.id_to_token(idx) == content:
        continue
      if tok.id_to_token(idx) is None and tok.token_to_id(content) is None:
        extra = {k: bool(entry.get(k, False)) for k in ("single_word", "lstrip", "rstrip", "normalized")}
        added = hf_tokenizers.AddedToken(content, special=bool(entry.get("special", False)), **extra)
        (tok.add_special_tokens if added.special else tok.add_tokens)([added])
      if tok.token_to_id(content) != idx:
        raise ValueError(f"{self._where}/tokenizer_config.json: added_tokens_decoder puts {content!r} at id {idx} "
                         f"but tokenizer.json has {tok.id_to_token(idx)!r} there; expected the files of one "
                         "tokenizer")
    return tok

  def _id(self, content: str | None, what: str) -> int | None:
    if content is None:
      return None
    i = self._chat.token_to_id(content)
    if i is None:
      raise ValueError(f"{self._where}/tokenizer_config.json: {what} {content!r} is not in tokenizer.json's "
                       "vocabulary")
    return int(i)

  def _token(self, i: int) -> str:
    return self._chat.id_to_token(i) or f"<id {i}>"

  def _chat_template(self, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(template source, the file it came from), or None."""
    if "chat_template.jinja" in self._files:
      return self._files["chat_template.jinja"], "chat_template.jinja"
    for name, value in (("tokenizer_config.json", config.get("chat_template")),
                        ("chat_template.json", self._json("chat_template.json").get("chat_template"))):
      if isinstance(value, list):  # [{"name": ..., "template": ...}], the older way to store several
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
      if isinstance(value, Mapping):
        if not isinstance(value.get("default"), str):
          raise ValueError(f"{self._where}/{name}: chat_template holds templates {sorted(map(str, value))} but no "
                           "'default'; expected one to use")
        value = value["default"]
      if isinstance(value, str) and value:
        return value, name
      if value:
        raise ValueError(f"{self._where}/{name}: chat_template is a {type(value).__name__}; expected a string")
    return None

  def _end_of_turn(self) -> int | None:
    """The first special token after the reply in the template's rendering of a short conversation."""
    reply = {"role": "assistant", "content": "Fine, thanks."}
    for turns in ([{"role": "user", "content": "How are you?"}, reply],
                  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}, reply]):
      try:
        text = self._render(turns, add_generation_prompt=False)
        (start, end), = self._assistant_spans(turns, text)
      except ValueError:
        continue  # the template wants another shape of conversation: try the next one
      enc = self._chat.encode(text, add_special_tokens=False)
      for i, (a, b) in zip(enc.ids, enc.offsets):
        if i in self._special and start <= a and b <= end:
          return int(i)
      return None
    return None

  # ------------------------------------------------------------------------------------------------------------
  # The Tokenizer interface.

  def _no_role_tokens(self, name: str):
    raise AttributeError(f"{self!r} has no {name}: a Hugging Face tokenizer formats turns with its chat "
                         "template; use tokenizers.encode_chat / encode_prompt")

  user_id = property(lambda self: self._no_role_tokens("user_id"))
  assistant_id = property(lambda self: self._no_role_tokens("assistant_id"))
  system_id = property(lambda self: self._no_role_tokens("system_id"))

  def role_id(self, role: str) -> int:
    self._no_role_tokens(f"role token for {role!r}")

  @property
  def special_ids(self) -> frozenset[int]:
    """Every added token marked special (the ones decode skips), which includes eos, pad and bos."""
    return self._special | {self.eos_id, self.pad_id, self.bos_id}

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
    return list(self._plain.encode(text, add_special_tokens=False).ids)

  def _decode_plain(self, ids: Sequence[int]) -> str:
    return self._chat.decode(list(ids), skip_special_tokens=False)

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    flat = np.asarray(list(ids), dtype=np.int64).reshape(-1).tolist()
    return self._chat.decode([i for i in flat if 0 <= i < self.vocab_size], skip_special_tokens=skip_special)

  # ------------------------------------------------------------------------------------------------------------
  # The chat.

  @property
  def chat_template(self) -> str | None:
    return self._template[0] if self._template else None

  def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    if self._template is None:
      raise ValueError(f"{self._where}: no chat template; expected one in chat_template.jinja, tokenizer_config.json "
                       "(\"chat_template\") or chat_template.json")
    source, name = self._template
    try:
      return _compile_chat_template(source).render(
          messages=[dict(m) for m in messages], tools=None, documents=None,
          add_generation_prompt=add_generation_prompt, **self._template_tokens)
    except Exception as e:  # noqa: BLE001 - a template can fail any way Python can: one line, whatever it was
      raise ValueError(f"{self._where}/{name}: the chat template failed on a conversation of {len(messages)} "
                       f"turns ({type(e).__name__}: {_one_line(e)})") from e

  def render_chat(self, turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The template's text of a dialogue (apply_chat_template(tokenize=False))."""
    return self._render(_messages(turns), add_generation_prompt)

  def _assistant_spans(self, messages: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns in `text` (the rendering of all of `messages`)."""
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self._render(messages[:i], add_generation_prompt=True)
      through = self._render(messages[:i + 1], add_generation_prompt=False)
      if not (through.startswith(before) and text.startswith(through)):
        raise ValueError(
            f"{self._where}/{self._template[1]}: the chat template renders turns 0..{i} differently when later "
            "turns follow (or its generation prompt is not how it starts an assistant turn), so the assistant "
            "loss mask cannot be found by rendering prefixes; expected a template that only appends")
      spans.append((len(before), len(through)))
    return spans

  def encode_chat(self, turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
                  ) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a dialogue: apply_chat_template's ids; the mask as the class docstring says."""
    messages = _messages(turns)
    text = self._render(messages, add_generation_prompt)
    enc = self._chat.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), enc.offsets
    mask = [0] * len(ids)
    for n, (start, end) in enumerate(self._assistant_spans(messages, text)):
      inside = [t for t, (a, b) in enumerate(offsets) if (a < end and b > start) or (a == b and start <= a < end)]
      closing = [t for t in inside if ids[t] == self.eos_id]
      if not closing:
        raise ValueError(
            f"{self._where}/{self._template[1]}: assistant turn {n} of the conversation is not closed by the EOS "
            f"token {self._token(self.eos_id)!r} (id {self.eos_id}, {self.eos_rule}); expected the template to end "
            "every reply with it, so the model learns to stop")
      for t in inside:
        if t <= closing[-1]:
          mask[t] = 1
    return ids, mask

  # The tokenizers objects pickle, the compiled template does not: pickle the files (grain pickles transforms).
  def __getstate__(self) -> dict[str, Any]:
    return {"files": self._files, "path": self.path}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["files"], path=state["path"])

  def __repr__(self) -> str:
    return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


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
  trains it and later runs reuse it). kind="hf" loads the Hugging Face tokenizer folder `path` (an imported
  model's folder); its vocabulary is its own, so `vocab_size` and `corpus` are ignored.
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind == "hf":
    if not path:
      raise ValueError("tokenizer.kind='hf' needs tokenizer.path (a folder with tokenizer.json, such as the folder "
                       "of the imported model)")
    return HFTokenizer.load(path)
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer.kind={kind!r}: expected 'byte', 'sentencepiece' or 'hf'")
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


def _messages(turns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Checked copies of the turns, every field kept (apply_chat_template passes the template whole messages)."""
  out = []
  for i, turn in enumerate(turns):
    _check_turn(turn, i)
    out.append(dict(turn))
  return out


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

  An `HFTokenizer` renders its chat template instead (`HFTokenizer.encode_chat`): the ids of transformers'
  apply_chat_template, and a mask that is 1 on each reply and the token that closes it.

  Returns:
    (ids, loss_mask), two lists of the same length.
  """
  if isinstance(tok, HFTokenizer):
    return tok.encode_chat(turns, add_generation_prompt=add_generation_prompt)
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
  """The ids a policy continues: the dialogue so far, then [ASSISTANT] (for an HFTokenizer: the template's
  generation prompt, e.g. "<|im_start|>assistant\n")."""
  return encode_chat(tok, turns, add_generation_prompt=True)[0]


def save_to_dir(tok: Tokenizer, directory: str) -> dict[str, Any]:
  """Writes what it takes to rebuild `tok` into `directory` (a SentencePiece model as tokenizer.model, a Hugging
  Face tokenizer's files into HF_DIR/) and returns its description for a manifest (`load_from_dir` reads it
  back)."""
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
  if isinstance(tok, HFTokenizer):
    tok.save(os.path.join(directory, HF_DIR))
    # The ids are recorded so that a later load under changed rules (or files) fails instead of training on others.
    return {"kind": "hf", "dir": HF_DIR, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "bos_id": tok.bos_id}
  raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")


def load_from_dir(directory: str, info: Mapping[str, Any]) -> Tokenizer:
  """The tokenizer `save_to_dir` described with `info`, from `directory`."""
  kind = info.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer.load(os.path.join(directory, str(info.get("file", "tokenizer.model"))))
  if kind == "hf":
    tok = HFTokenizer.load(os.path.join(directory, str(info.get("dir", HF_DIR))))
    for field in ("vocab_size", "eos_id", "pad_id", "bos_id"):
      if field in info and int(info[field]) != getattr(tok, field):
        raise ValueError(f"{tok.path}: the tokenizer gives {field}={getattr(tok, field)} but the manifest of "
                         f"{directory} recorded {info[field]}; expected the tokenizer the stage was trained with")
    return tok
  raise ValueError(f"{directory}: unknown tokenizer kind {kind!r} in its manifest; expected 'byte', "
                   "'sentencepiece' or 'hf'")
