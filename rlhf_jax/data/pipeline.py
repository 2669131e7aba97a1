"""grain loaders that turn a random-access source of records into fixed-shape numpy batches.

Two loaders cover pretraining, evaluation and SFT:

* `lm_loader`: each text record becomes `[BOS] + encode(text) + [EOS]`. With `packing=True` the documents of
  the (shuffled) stream are concatenated and cut into windows of `seq_len + 1` tokens, GPT-2/nanoGPT style:
  attention may cross document boundaries. Consecutive windows overlap by one token (stride `seq_len`), so
  every token after the first is a prediction target exactly once. With `packing=False` each document is one
  row, truncated to `seq_len + 1` and right-padded with PAD.
* `chat_loader`: each record's `turns` go through `tokenizers.encode_chat`; rows are right-padded and the loss
  mask covers assistant tokens only.

Every batch is a dict of numpy arrays, all [B, seq_len + 1] unless noted:
  tokens    int32  token ids (PAD where mask is 0).
  mask      int32  1 on real tokens.
  loss_mask int32  1 where token t is a prediction target (predicted from the logits at t - 1); never at t=0.
  truncated int32  [B], padded and chat modes only: 1 if the row's record was cut to fit.
The last batch of a finite run (num_epochs set) is padded to `batch_size` with empty rows (mask 0) so shapes
stay fixed under jit, unless `drop_remainder=True` drops it.

Order of operations: source -> shard (`source[shard_index::shard_count]`, so processes read disjoint records)
-> shuffle (a new permutation every epoch, from `seed`) -> repeat -> tokenize -> [pack] -> batch. The returned
iterator is a grain `DatasetIterator`: `get_state()` is a small JSON-serialisable dict (indices, not data)
and `set_state(state)` makes the next batches identical to an uninterrupted run. The packer stores the
parent state *before* the document the next window starts in, plus the offset into it, and replays from
there on restore.

`worker_count > 0` tokenizes in grain worker processes (`mp_prefetch`); packing and batching run after it in
the main process, so the batches do not depend on the worker count. Worker processes need absl flags parsed,
as `run.py` does (`app.run`), and picklable sources and tokenizers (both of ours are). The default 0 reads in
the main process with a small thread pool.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from rlhf_jax import tokenizers as tokenizers_lib

Batch = dict[str, np.ndarray]


def _check_args(seq_len: int, batch_size: int, shard_index: int, shard_count: int, n: int, where: str) -> None:
  if seq_len < 1:
    raise ValueError(f"{where}: seq_len={seq_len}: expected >= 1")
  if batch_size < 1:
    raise ValueError(f"{where}: batch_size={batch_size}: expected >= 1")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"{where}: shard_index={shard_index}, shard_count={shard_count}: expected 0 <= index < count")
  if n < shard_count:
    raise ValueError(f"{where}: the source has {n} records, fewer than shard_count={shard_count}")


def _with_index(index: int, record: Any) -> tuple[int, Any]:
  return index, record


def _records(
    source: Sequence[Any],
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> grain.MapDataset:
  """(source index, record) pairs of this shard, shuffled per epoch and repeated."""
  ds = grain.MapDataset.source(source).map_with_index(_with_index)
  ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)  # grain draws a fresh permutation for each repetition
  if num_epochs is None or num_epochs > 1:
    ds = ds.repeat(num_epochs)
  elif num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs}: expected None (forever) or >= 1")
  return ds


def _field(record: Any, field: str, index: int) -> Any:
  if not isinstance(record, Mapping) or field not in record:
    fields = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"record {index}: no field {field!r} (record has {fields})")
  return record[field]


def _tokenize_document(item: tuple[int, Any], *, tokenizer: tokenizers_lib.Tokenizer, field: str) -> np.ndarray:
  index, record = item
  text = _field(record, field, index)
  if not isinstance(text, str):
    raise ValueError(f"record {index}: field {field!r} must be text, got {type(text).__name__}")
  return np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], dtype=np.int32)


def _padded_row(ids: Sequence[int], loss_mask: Sequence[int] | None, length: int, pad_id: int) -> Batch:
  n = min(len(ids), length)
  tokens = np.full((length,), pad_id, np.int32)
  tokens[:n] = np.asarray(ids[:n], np.int32)
  mask = np.zeros((length,), np.int32)
  mask[:n] = 1
  if loss_mask is None:
    target = mask.copy()
    target[0] = 0  # the first token has no context to be predicted from
  else:
    target = np.zeros((length,), np.int32)
    target[:n] = np.asarray(loss_mask[:n], np.int32)
  return {"tokens": tokens, "mask": mask, "loss_mask": target, "truncated": np.int32(len(ids) > length)}


def _document_row(ids: np.ndarray, *, length: int, pad_id: int) -> Batch:
  return _padded_row(ids, None, length, pad_id)


def _chat_row(
    item: tuple[int, Any], *, tokenizer: tokenizers_lib.Tokenizer, field: str, length: int, too_long: str,
) -> Batch:
  index, record = item
  turns = _field(record, field, index)
  if not isinstance(turns, (list, tuple)):
    raise ValueError(f"record {index}: field {field!r} must be a list of {{role, content}} turns, "
                     f"got {type(turns).__name__}")
  try:
    ids, loss_mask = tokenizers_lib.encode_chat(tokenizer, turns)
  except ValueError as e:
    raise ValueError(f"record {index}: field {field!r}: {e}") from e
  if len(ids) > length and too_long == "error":
    raise ValueError(f"record {index}: chat is {len(ids)} tokens, longer than seq_len + 1 = {length}; "
                     "raise seq_len or use too_long='truncate'")
  return _padded_row(ids, loss_mask, length, tokenizer.pad_id)


def _stack(rows: Sequence[Batch], *, batch_size: int, pad_id: int) -> Batch:
  """Stacks rows; a short final batch is completed with empty rows so every batch has the same shape."""
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    for k, v in out.items():
      fill = np.full((missing, *v.shape[1:]), pad_id if k == "tokens" else 0, v.dtype)
      out[k] = np.concatenate([v, fill])
  return out


class _PackIterator(grain.DatasetIterator):
  """Concatenates token arrays and yields windows of `window` tokens every `stride` tokens.

  State: the parent's state before the document holding the next window's first token, and how many tokens
  of that document are already consumed. Restoring replays from there, so the state never holds tokens.
  """

  def __init__(self, parent: grain.DatasetIterator, window: int, stride: int, pad_id: int):
    super().__init__(parent)
    self._window = window
    self._stride = stride
    self._pad_id = pad_id
    # Each entry: [parent state before this document, tokens, first unconsumed position].
    self._entries: collections.deque[list[Any]] = collections.deque()
    self._buffered = 0
    self._exhausted = False
    self._skip = 0  # tokens to drop from the next document fetched (set by set_state)

  def _fill(self) -> None:
    while self._buffered < self._window and not self._exhausted:
      state = copy.deepcopy(self._parent.get_state())
      try:
        doc = np.asarray(next(self._parent), dtype=np.int32)
      except StopIteration:
        self._exhausted = True
        break
      start, self._skip = self._skip, 0
      if start < len(doc):
        self._entries.append([state, doc, start])
        self._buffered += len(doc) - start

  def _consume(self, k: int) -> None:
    while k > 0:
      entry = self._entries[0]
      available = len(entry[1]) - entry[2]
      if available <= k:
        self._entries.popleft()
        self._buffered -= available
        k -= available
      else:
        entry[2] += k
        self._buffered -= k
        k = 0

  def __next__(self) -> Batch:
    self._fill()
    if self._buffered < 2:  # a window needs one target, and the last token was already a target
      raise StopIteration
    n = min(self._window, self._buffered)
    parts, need = [], n
    for _, doc, start in self._entries:
      part = doc[start:start + need]
      parts.append(part)
      need -= len(part)
      if not need:
        break
    row = _padded_row(np.concatenate(parts), None, self._window, self._pad_id)
    del row["truncated"]  # meaningless when documents are cut on purpose
    # A full window keeps its last token as the next window's first (context for it); the final partial
    # window consumes everything.
    self._consume(self._stride if n == self._window else n)
    return row

  def get_state(self) -> dict[str, Any]:
    if self._entries:
      state, _, start = self._entries[0]
      return {"parent": copy.deepcopy(state), "skip": int(start)}
    return {"parent": copy.deepcopy(self._parent.get_state()), "skip": int(self._skip)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._entries.clear()
    self._buffered = 0
    self._exhausted = False
    self._skip = int(state["skip"])


class _PackIterDataset(grain.IterDataset):
  """See `_PackIterator`."""

  def __init__(self, parent: grain.IterDataset, *, window: int, stride: int, pad_id: int):
    super().__init__(parent)
    self._window, self._stride, self._pad_id = window, stride, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._window, self._stride, self._pad_id)


def _to_iter(ds: grain.MapDataset, worker_count: int, read_threads: int) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(8, read_threads)))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def lm_loader(
    source: Sequence[Mapping[str, Any]],
    tokenizer: tokenizers_lib.Tokenizer,
    *,
    text_field: str = "text",
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    drop_remainder: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 2,
) -> grain.DatasetIterator:
  """Language-model batches of `seq_len + 1` tokens from text records; see the module docstring.

  Args:
    source: random access records (len, __getitem__), e.g. `tfds_io.load_split(...)`.
    tokenizer: any `rlhf_jax.tokenizers.Tokenizer`.
    text_field: the record field holding the document.
    seq_len: model context; rows hold seq_len + 1 tokens (inputs [:-1], targets [1:]).
    batch_size: rows per batch (per process when sharded).
    seed: shuffle seed; the same seed gives the same batches.
    shuffle: shuffle records (a new permutation each epoch).
    num_epochs: passes over this shard; None repeats forever.
    packing: GPT-2 style concatenation (True) or one padded document per row (False, for eval).
    drop_remainder: drop a short final batch instead of padding it with empty rows.
    shard_index, shard_count: this process reads records shard_index, shard_index + shard_count, ...
    worker_count: grain worker processes for tokenization (0: in-process).
    read_threads: threads reading and tokenizing records in-process.

  Returns:
    A grain iterator of batches with get_state()/set_state().
  """
  _check_args(seq_len, batch_size, shard_index, shard_count, len(source), "lm_loader")
  length = seq_len + 1
  ds = _records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                shard_index=shard_index, shard_count=shard_count)
  ds = ds.map(functools.partial(_tokenize_document, tokenizer=tokenizer, field=text_field))
  if packing:
    it = _to_iter(ds, worker_count, read_threads)
    it = _PackIterDataset(it, window=length, stride=seq_len, pad_id=tokenizer.pad_id)
  else:
    ds = ds.map(functools.partial(_document_row, length=length, pad_id=tokenizer.pad_id))
    it = _to_iter(ds, worker_count, read_threads)
  it = it.batch(batch_size, drop_remainder=drop_remainder,
                batch_fn=functools.partial(_stack, batch_size=batch_size, pad_id=tokenizer.pad_id))
  return iter(it)


def chat_loader(
    source: Sequence[Mapping[str, Any]],
    tokenizer: tokenizers_lib.Tokenizer,
    *,
    turns_field: str = "turns",
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    too_long: str = "truncate",
    drop_remainder: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 2,
) -> grain.DatasetIterator:
  """SFT batches: one dialogue per row, loss on assistant tokens only (`tokenizers.encode_chat`).

  `too_long="truncate"` cuts rows to seq_len + 1 tokens (counted in batch["truncated"]); "error" raises a
  ValueError naming the record index and its length. Other arguments as in `lm_loader`.
  """
  if too_long not in ("truncate", "error"):
    raise ValueError(f"chat_loader: too_long={too_long!r}: expected 'truncate' or 'error'")
  _check_args(seq_len, batch_size, shard_index, shard_count, len(source), "chat_loader")
  ds = _records(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                shard_index=shard_index, shard_count=shard_count)
  ds = ds.map(functools.partial(_chat_row, tokenizer=tokenizer, field=turns_field, length=seq_len + 1,
                                too_long=too_long))
  it = _to_iter(ds, worker_count, read_threads)
  it = it.batch(batch_size, drop_remainder=drop_remainder,
                batch_fn=functools.partial(_stack, batch_size=batch_size, pad_id=tokenizer.pad_id))
  return iter(it)
