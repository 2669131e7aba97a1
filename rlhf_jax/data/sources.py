"""Where each stage's data comes from: the task suite's TFDS datasets, turned into batches.

This is the one place that knows the suite's split names. Stages ask for iterators (`pretrain_iters`,
`sft_iters`), records (`offline_comparisons`, `file_comparisons`, `rl_prompts`, `benchmark`) or the simulated
humans (`gold_scorer`, `labelers`); the suite is generated on first use into WORKDIR/data (or `data.data_dir`)
and cached after.
Every iterator has get_state()/set_state() so its position is part of a checkpoint. The sequence of global
batches depends on the seed and the step only: with several processes every one walks the same global stream and
keeps its rows of each global batch (`ProcessRows`), so one process, several devices and several processes train
on the same batches, and a checkpoint written by N processes resumes on M with the data where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from rlhf_jax import tokenizers
from rlhf_jax.data import pipeline, real, tfds_io
from rlhf_jax.data.batching import fit_prompt, left_pad
from rlhf_jax.tasks import gold, storage, suite


def data_dir(config, workdir: str) -> str:
  """config.data.data_dir, or WORKDIR/data."""
  return storage.data_dir_for(config, workdir)


_ENSURED: dict[tuple[str, str], dict[str, Any]] = {}


def ensure_suite(config, workdir: str) -> dict[str, Any]:
  """Generates the suite's datasets if missing (cached by a fingerprint of config.data and the seed)."""
  key = (workdir, config.data.to_json() + str(config.seed))
  if key not in _ENSURED:
    _ENSURED[key] = storage.ensure_suite(config, workdir)
  return _ENSURED[key]


def split(config, workdir: str, name: str):
  """A random-access source of one suite split (see rlhf_jax/tasks/suite.py for the record formats), or with
  config.files, of the user's file that stands in for it (`user_split`)."""
  if on_user_data(config):
    return user_split(config, workdir, name)
  ensure_suite(config, workdir)
  return storage.load_suite(data_dir(config, workdir))[name]


# ----------------------------------------------------------------------------------------------------------
# A user's data files (config.files) in place of the suite.

# suite split -> (config.files field, validation?); the others (comparisons, benchmark) have no user stand-in.
USER_SPLITS = {"sft": ("sft", False), "sft_val": ("sft", True), "prompts": ("prompts", False),
               "prompts_val": ("prompts", True), "pretrain": ("pretrain", False), "pretrain_val": ("pretrain", True)}


def on_user_data(config) -> bool:
  """Whether the run reads a user's files (config.files.sft set) instead of generating the task suite."""
  return bool(config.get("files") and config.files.sft)


def check_files(config) -> None:
  """The preflight of config.files, from the config and the files' existence (parsing is the data stage's)."""
  if "files" not in config:  # a config of the data stage alone (experiments/data)
    return
  fc = config.files
  expected = {"sft": real.SFT_SCHEMAS, "prompts": ("prompts", *real.SFT_SCHEMAS), "pretrain": ("text",)}
  for field, schemas in expected.items():
    schema = fc[f"{field}_schema"]
    if schema not in schemas:
      raise ValueError(f"files.{field}_schema={schema!r}: expected one of {list(schemas)}")
    for path in file_paths(fc[field]):
      if not os.path.isfile(path):
        raise ValueError(f"files.{field}={path}: file not found")
  if fc.on_error not in ("raise", "skip"):
    raise ValueError(f"files.on_error={fc.on_error!r}: expected 'raise' or 'skip'")
  if not 0.0 < fc.val_fraction < 1.0:
    raise ValueError(f"files.val_fraction={fc.val_fraction}: expected a fraction in (0, 1)")
  if not fc.sft and (fc.prompts or fc.pretrain):
    raise ValueError("files.prompts / files.pretrain are set but files.sft is empty: a run on user data starts "
                     "from the demonstrations in files.sft")
  if fc.sft and config.tokenizer.kind not in ("hf", "byte"):
    raise ValueError(f"files.sft is set with tokenizer.kind={config.tokenizer.kind!r}: that tokenizer is trained "
                     "on the task suite's corpus; expected 'hf' (the model's own) or 'byte'")


def file_paths(value) -> list[str]:
  """A files.* value: one path, or several separated by commas (one split read in order)."""
  return [p.strip() for p in str(value).split(",") if p.strip()] if value else []


_USER: dict[tuple, tuple[Any, Any]] = {}


def user_datasets(config, workdir: str, field: str):
  """(train, validation) random-access sources of config.files.<field>, converted once into DATA_DIR/user (cached
  by the files' hash); without a validation split the last files.val_fraction of the records (at least one)."""
  fc = config.files
  paths, schema = file_paths(fc[field]), fc[f"{field}_schema"]
  key = (data_dir(config, workdir), field, tuple(paths), schema, fc.on_error, fc.val_fraction)
  if key not in _USER:
    folder = real.prepare(schema, paths, os.path.join(data_dir(config, workdir), "user"), on_error=fc.on_error)
    train = tfds_io.load_split_dir(folder, "train")
    n_val = max(1, int(round(len(train) * fc.val_fraction)))
    if len(train) < 2:
      raise ValueError(f"files.{field}={fc[field]}: {len(train)} record(s); expected at least 2 (train and "
                       "validation)")
    _USER[key] = (_Slice(train, 0, len(train) - n_val), _Slice(train, len(train) - n_val, len(train)))
  return _USER[key]


class _Slice:
  """Records [start, stop) of a random-access source, itself random access."""

  def __init__(self, src, start: int, stop: int):
    self.src, self.start, self.stop = src, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.src[self.start + i]


def prompt_text(turns) -> str:
  """The text that names a prompt in tables and for the judge: the user's message of a one-turn prompt, else
  every turn as "role: content"."""
  if len(turns) == 1:
    return turns[0]["content"]
  return "\n\n".join(f"{t['role']}: {t['content']}" for t in turns)


class _PromptsOf:
  """The prompts of SFT records (every turn before the last assistant reply) as prompt records
  {prompt_turns, reference}: RL and evaluation prompts when config.files.prompts is empty."""

  def __init__(self, src):
    self.src = src

  def __len__(self) -> int:
    return len(self.src)

  def __getitem__(self, i: int):
    turns = list(self.src[i]["turns"])
    last = max(j for j, t in enumerate(turns) if t["role"] == "assistant")
    return {"prompt_turns": turns[:last], "reference": turns[last]["content"]}


def user_split(config, workdir: str, name: str):
  if name not in USER_SPLITS:
    raise ValueError(f"the {name!r} data of the task suite has no stand-in among a user's files (config.files): "
                     + ("set rm.source='file' and rm.file" if name.startswith("comparisons") else
                        "it is the suite's own"))
  field, val = USER_SPLITS[name]
  if field == "prompts" and not config.files.prompts:
    return _PromptsOf(user_datasets(config, workdir, "sft")[val])
  if not config.files[field]:
    raise ValueError(f"this run needs {name!r} data but files.{field} is empty; expected a "
                     f"{config.files[field + '_schema']} file")
  src = user_datasets(config, workdir, field)[val]
  if field == "prompts" and config.files.prompts_schema != "prompts":  # an SFT file given as prompts
    return _PromptsOf(src)
  return src


def user_references(config, workdir: str) -> dict[str, str]:
  """{prompt text: reference reply} of the validation demonstrations (the human-written summaries of TL;DR)."""
  out = {}
  src = _PromptsOf(user_datasets(config, workdir, "sft")[1])
  for i in range(len(src)):
    r = src[i]
    out.setdefault(prompt_text(r["prompt_turns"]), r["reference"])
  return out


def tokenizer(config, workdir: str) -> tokenizers.Tokenizer:
  """Byte-level, SentencePiece trained once on the pretraining corpus (tokenizer.path or
  DATA_DIR/tokenizer-<vocab>.model), or a Hugging Face model's own (kind "hf")."""
  tc = config.tokenizer
  if tc.kind == "byte":
    return tokenizers.ByteTokenizer()
  if tc.kind == "hf":  # the tokenizer a Hugging Face model came with: tokenizer.path, or init.hf_path's
    path = tc.path or config.init.hf_path
    if not path:
      raise ValueError("tokenizer.kind='hf' needs tokenizer.path or init.hf_path: a folder with tokenizer.json")
    return tokenizers.make_tokenizer("hf", path=path)
  path = tc.path or os.path.join(data_dir(config, workdir), f"tokenizer-{tc.vocab_size}.model")
  corpus = None
  if not os.path.exists(path):
    src = split(config, workdir, "pretrain")
    corpus = (src[i]["text"] for i in range(len(src)))
  return tokenizers.make_tokenizer(tc.kind, path=path, vocab_size=tc.vocab_size, corpus=corpus)


def _shard():
  return jax.process_index(), jax.process_count()


def _check_divides(batch_size: int, count: int) -> None:
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} does not divide over {count} processes")


class ProcessRows:
  """Process `index` of `count`'s rows of every global batch of `it`: rows [index * B / count, (index + 1) *
  B / count). The state is the global iterator's, the same on every process and for any count."""

  def __init__(self, it, index: int, count: int):
    self.it, self.index, self.count = it, index, count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    rows = len(next(iter(batch.values())))
    _check_divides(rows, self.count)
    per = rows // self.count
    return {k: np.asarray(v)[self.index * per:(self.index + 1) * per] for k, v in batch.items()}

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def pretrain_iters(config, workdir: str, tok, *, stage_cfg=None):
  """(train_iter_fn(shard_index, shard_count), eval_iter_fn()) of packed next-token batches: process
  shard_index of shard_count's rows of the global batches."""
  tc = (stage_cfg or config.pretrain).train
  train_src = split(config, workdir, "pretrain")
  val_src = split(config, workdir, "pretrain_val")
  _check_divides(tc.batch_size, jax.process_count())

  def train_iter_fn(shard_index: int, shard_count: int):
    return ProcessRows(pipeline.lm_loader(train_src, tok, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                          seed=config.seed), shard_index, shard_count)

  def eval_iter_fn():
    return ProcessRows(pipeline.lm_loader(val_src, tok, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=0,
                                          shuffle=False, num_epochs=1), *_shard())

  return train_iter_fn, eval_iter_fn


class NamedIterators:
  """Several checkpointable iterators whose positions are saved and restored together, as {name: state}."""

  def __init__(self, iterators: dict[str, Any]):
    self.iterators = iterators

  def get_state(self) -> dict[str, Any]:
    return {name: it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: dict[str, Any]) -> None:
    for name, it in self.iterators.items():
      it.set_state(state[name])


class MixIterator:
  """Rows from two iterators in one batch (SFT with a fraction of pretraining text); checkpointable."""

  def __init__(self, a, b, n_a: int):
    self.a, self.b, self.n_a = a, b, n_a

  def __iter__(self):
    return self

  def __next__(self):
    x, y = next(self.a), next(self.b)
    keys = ("tokens", "mask", "loss_mask")
    return {k: np.concatenate([np.asarray(x[k])[:self.n_a], np.asarray(y[k])]) for k in keys}

  def get_state(self):
    return {"a": self.a.get_state(), "b": self.b.get_state()}

  def set_state(self, state):
    self.a.set_state(state["a"])
    self.b.set_state(state["b"])


class _Subset:
  """Records `indices` of a random-access source, itself random access."""

  def __init__(self, src, indices: Sequence[int]):
    self.src, self.indices = src, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.src[self.indices[i]]


def record_families(record, world) -> set[str]:
  """The task families of an SFT record: its "family" and, for the world's families, that of every user turn
  (a multi-turn harmful prompt starts with a fact question, whose demonstration SFT would learn from too)."""
  out = {record["family"]}
  if record["family"] in suite.FAMILIES:
    out |= {world.parse(t["content"]).family for t in record["turns"] if t["role"] == "user"}
  return out


def without_families(src, families, world) -> _Subset:
  """The records of `src` with none of `families` among their record_families (sft.exclude_families)."""
  drop = set(families)
  kept = [i for i in range(len(src)) if not record_families(src[i], world) & drop]
  if not kept:
    raise ValueError(f"sft.exclude_families={tuple(families)} leaves no demonstration")
  return _Subset(src, kept)


def sft_iters(config, workdir: str, tok):
  """Chat batches (loss on assistant tokens), optionally mixed with pretraining rows (sft.pretrain_mix)."""
  tc = config.sft.train
  train_src = split(config, workdir, "sft")
  val_src = split(config, workdir, "sft_val")
  if config.sft.exclude_families:  # the held-out-family test (experiments/icl): SFT never sees these families
    world = gold_scorer(config, workdir).world
    train_src, val_src = (without_families(src, config.sft.exclude_families, world) for src in (train_src, val_src))
  mix = float(config.sft.pretrain_mix)
  if not 0.0 <= mix < 1.0:
    raise ValueError(f"sft.pretrain_mix={mix}: expected a fraction in [0, 1)")
  _check_divides(tc.batch_size, jax.process_count())
  n_pt = int(round(tc.batch_size * mix))  # of every global batch

  def train_iter_fn(shard_index: int, shard_count: int):
    chat = pipeline.chat_loader(train_src, tok, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=config.seed,
                                too_long=config.sft.too_long)
    if n_pt:
      pt = pipeline.lm_loader(split(config, workdir, "pretrain"), tok, seq_len=tc.seq_len, batch_size=n_pt,
                              seed=config.seed + 1)
      chat = MixIterator(chat, pt, tc.batch_size - n_pt)
    return ProcessRows(chat, shard_index, shard_count)

  def eval_iter_fn():
    return ProcessRows(pipeline.chat_loader(val_src, tok, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=0,
                                            shuffle=False, num_epochs=1, too_long="truncate"), *_shard())

  return train_iter_fn, eval_iter_fn


# ----------------------------------------------------------------------------------------------------------
# Prompts, the simulated humans, the benchmark.


def gold_scorer(config, workdir: str):
  """The simulated humans' hidden preference over the suite's world (the same seed and config.data)."""
  del workdir
  if on_user_data(config):
    raise ValueError("a run on a user's files (config.files) has no simulated humans to score or rank responses: "
                     "set eval.judge='rm' (a held-out reward model) and rm.source='file'")
  return gold.GoldScorer(suite.make_world(config.seed, suite.DataConfig.from_config(config.data)))


def labelers(config):
  """The simulated labeler pool of the suite (its noise and number of labelers from config.data)."""
  if on_user_data(config):
    raise ValueError("a run on a user's files (config.files) has no simulated labelers: its comparisons come from "
                     "rm.source='file' (rm.file, rm.file_schema)")
  return suite.make_labelers(config.seed, suite.DataConfig.from_config(config.data))


def validation_prompts(config, workdir: str, tok) -> list[dict]:
  """Every validation prompt of the task suite as rl_prompts' records: the RL validation prompts, then the
  comparison and the SFT validation prompts (their user turns up to the last; the answers left out). None of them
  is trained on by any stage; with the RL ones alone an evaluation has data.n_prompts_val prompts."""
  out = rl_prompts(config, workdir, tok, which="validation")
  cmp_val, sft_val = split(config, workdir, "comparisons_val"), split(config, workdir, "sft_val")
  for turns in ([*(cmp_val[i]["prompt_turns"] for i in range(len(cmp_val))),
                 *(sft_val[i]["turns"][:-1] for i in range(len(sft_val)))]):
    turns = list(turns)
    out.append({"ids": tokenizers.encode_prompt(tok, turns), "turns": turns, "prompt": turns[-1]["content"]})
  return out


def rl_prompts(config, workdir: str, tok, *, which: str = "train") -> list[dict]:
  """Prompt records with their token ids: {"ids", "turns", "prompt"}; which = "train" or "validation"."""
  if which not in ("train", "validation"):
    raise ValueError(f"rl_prompts: which={which!r}, expected 'train' or 'validation'")
  name = "prompts" if which == "train" else "prompts_val"
  src = split(config, workdir, name)
  out = []
  for i in range(len(src)):
    r = src[i]
    if "prompt_turns" in r:  # a user's prompts (config.files)
      turns = list(r["prompt_turns"])
      r = {"turns": turns, "prompt": prompt_text(turns)}
    out.append({"ids": tokenizers.encode_prompt(tok, r["turns"]), "turns": r["turns"], "prompt": r["prompt"]})
  return out


def benchmark(config, workdir: str) -> list[dict]:
  if on_user_data(config):
    return []  # the world-knowledge benchmark is the suite's
  src = split(config, workdir, "benchmark")
  return [src[i] for i in range(len(src))]


class PromptIterator:
  """Shuffled epochs of left-padded prompt batches for RL; checkpointable as {"epoch", "pos"}.

  Prompts longer than `max_len` tokens keep their last `max_len` tokens behind BOS (the question is at the end).
  """

  def __init__(self, prompts: Sequence[dict], *, batch_size: int, pad_id: int, seed: int, max_len: int):
    if len(prompts) < batch_size:
      raise ValueError(f"ppo.batch_size={batch_size} is larger than the {len(prompts)} RL prompts")
    self.prompts, self.batch_size, self.pad_id, self.seed, self.max_len = prompts, batch_size, pad_id, seed, max_len
    self.epoch, self.pos = 0, 0
    self.n_truncated = sum(len(p["ids"]) > max_len for p in prompts)
    if self.n_truncated:
      logging.warning("%d of %d RL prompts are longer than ppo.max_prompt_len=%d and are cut from the left",
                      self.n_truncated, len(prompts), max_len)

  def __iter__(self):
    return self

  def __next__(self):
    if self.pos + self.batch_size > len(self.prompts):
      self.epoch, self.pos = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
    idx = order[self.pos:self.pos + self.batch_size]
    self.pos += self.batch_size
    i, n = _shard()
    idx = idx[i * (len(idx) // n):(i + 1) * (len(idx) // n)]
    ids = [fit_prompt(self.prompts[j]["ids"], self.max_len) for j in idx]
    tokens, mask = left_pad(ids, self.pad_id, self.max_len)
    return tokens, mask, [self.prompts[j]["prompt"] for j in idx]

  def get_state(self):
    return {"epoch": self.epoch, "pos": self.pos}

  def set_state(self, state):
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def ptx_iter(config, workdir: str, tok):
  """Pretraining batches for PPO-ptx: ppo.ptx.ratio rows per RL episode, split into the update's minibatches."""
  pc = config.ppo
  rows = pc.batch_size * pc.ptx.ratio
  return pipeline.lm_loader(split(config, workdir, "pretrain"), tok, seq_len=pc.ptx.seq_len, batch_size=rows,
                            seed=config.seed + 3)


def ptx_minibatches(it, n_minibatches: int) -> dict[str, np.ndarray]:
  """This process's [n_minibatches, rows, t+1] arrays of the next global batch: minibatch i of every epoch sees
  the same pretraining rows, whatever the number of processes (each keeps its rows of every minibatch)."""
  batch = next(it)
  i, n = _shard()
  out = {}
  for k in ("tokens", "mask", "loss_mask"):
    x = np.asarray(batch[k])
    x = x.reshape(n_minibatches, x.shape[0] // n_minibatches, *x.shape[1:])
    _check_divides(x.shape[1], n)
    per = x.shape[1] // n
    out[k] = x[:, i * per:(i + 1) * per]
  return out


# ----------------------------------------------------------------------------------------------------------
# Comparisons for the reward model.


def offline_comparisons(config, workdir: str) -> tuple[list[dict], list[dict]]:
  """The suite's own comparisons (train, validation), records {prompt_turns, prompt, responses, ranks,
  gold_scores, labeler_id}, cut to rm.n_prompts / rm.n_val_prompts (0 = all)."""
  rc = config.rm
  tr, va = split(config, workdir, "comparisons"), split(config, workdir, "comparisons_val")
  return ([tr[i] for i in range(len(tr))][:rc.n_prompts or None],
          [va[i] for i in range(len(va))][:rc.n_val_prompts or None])


def file_comparisons(path: str) -> tuple[list[dict], list[dict]]:
  """A user's rankings dataset directory (rlhf_jax.data.real.prepare_rankings / prepare_hh_pairs): its train
  and validation splits, or the last 10% of train held out when it has no validation split."""
  if not path or not os.path.isdir(path):
    raise ValueError(f"rm.file={path!r}: expected a rankings dataset directory written by "
                     "rlhf_jax.data.real.prepare_rankings / prepare_hh_pairs")
  tr = tfds_io.load_split_dir(path, "train")
  try:
    va = tfds_io.load_split_dir(path, "validation")
  except Exception:  # pylint: disable=broad-except
    n_val = max(1, len(tr) // 10)  # no validation split: hold out the last 10%
    records = [tr[i] for i in range(len(tr))]
    return records[:-n_val], records[-n_val:]
  return [tr[i] for i in range(len(tr))], [va[i] for i in range(len(va))]
