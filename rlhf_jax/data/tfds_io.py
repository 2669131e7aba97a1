"""Write datasets as TFDS ArrayRecord folders and read them back with `tfds.data_source`, without TensorFlow.

Every dataset in rlhf_jax (generated tasks, user-supplied JSONL, PPO rollouts kept for analysis) goes through
`prepare_dataset`, which writes a standard TFDS folder

    <data_dir>/<name>/<version>/
        <name>-<split>.array_record-00000-of-0000N   # one tf.train.Example per record, random access
        dataset_info.json, features.json              # TFDS metadata: tfds.data_source / builder_from_directory read it
        metadata.json                                  # our schema (field -> type string) and the caller's metadata

and `load_split`, which opens one split through `tfds.data_source` and decodes records into plain Python
values.

Why not `tfds.core.GeneratorBasedBuilder.download_and_prepare(file_format="array_record")`? It does work
without TensorFlow (checked with tfds 4.9.10), but (1) its serializer calls `SerializeToString()` without
`deterministic=True`, and a tf.train.Example's feature map is then written in a per-process hash order, so
two writes of the same records give different bytes; and (2) the ad-hoc builder
(`tfds.dataset_builders.store_as_tfds_dataset`) fails without TensorFlow. We therefore use TFDS's own pieces
directly: `FeaturesDict.encode_example`, the tf.train.Example serializer (with deterministic map order), the
`ArrayRecordWriter` with the same options TFDS uses (`group_size:1`, one record per chunk for fast random
access), and the public `tfds.folder_dataset.write_metadata` for the metadata files. Records keep the order
they were given (no TFDS key-hash shuffle): record i of a split is the i-th record its generator yielded.
Shuffling is the loader's job.

A dataset is written once: if `<data_dir>/<name>/<version>` already holds a complete dataset with the same
schema (and the same input `fingerprint`, when one is given) it is reused. Writing goes to a temporary folder
renamed into place at the end, so an interrupted write never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FEATURE_TYPES = ("text", "int32", "float32", "int32_seq", "float32_seq", "text_seq", "json")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_METADATA_FILE = "metadata.json"
_SCHEMA_KEY = "rlhf_jax_features"
_USER_KEY = "rlhf_jax_metadata"
_FINGERPRINT_KEY = "rlhf_jax_fingerprint"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _tfds():
  import tensorflow_datasets as tfds  # lazy: ~0.5 s to import, and most of the library never needs it

  return tfds


def _tfds_features(schema: Mapping[str, str]):
  tfds = _tfds()
  f = tfds.features
  table = {
      "text": f.Text,
      "json": f.Text,
      "int32": lambda: f.Scalar(np.int32),
      "float32": lambda: f.Scalar(np.float32),
      "int32_seq": lambda: f.Sequence(np.int32),
      "float32_seq": lambda: f.Sequence(np.float32),
      "text_seq": lambda: f.Sequence(f.Text()),
  }
  return f.FeaturesDict({k: table[t]() for k, t in schema.items()})


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return _is_int(x) or isinstance(x, (float, np.floating))


def _check_value(kind: str, value: Any) -> tuple[Any, str | None]:
  """(value ready for the TFDS feature, None) or (None, what was expected)."""
  if kind == "text":
    if isinstance(value, str):
      return value, None
    return None, "a string"
  if kind == "json":
    try:
      # sort_keys and fixed separators: the same value always gives the same bytes.
      return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False), None
    except (TypeError, ValueError) as e:
      return None, f"a JSON-serialisable value ({e})"
  if kind == "int32":
    if _is_int(value) and _INT32_MIN <= int(value) <= _INT32_MAX:
      return np.int32(value), None
    return None, "an integer in int32 range"
  if kind == "float32":
    if _is_number(value):
      return np.float32(value), None
    return None, "a number"
  if kind in ("int32_seq", "float32_seq", "text_seq"):
    if isinstance(value, np.ndarray):
      if value.ndim != 1:
        return None, f"a 1-D sequence, got an array of shape {value.shape}"
      items = value.tolist()
    elif isinstance(value, (list, tuple)):
      items = list(value)
    else:
      return None, "a list"
    if kind == "int32_seq":
      if all(_is_int(x) and _INT32_MIN <= int(x) <= _INT32_MAX for x in items):
        return np.asarray(items, dtype=np.int32), None
      return None, "a list of integers in int32 range"
    if kind == "float32_seq":
      if all(_is_number(x) for x in items):
        return np.asarray(items, dtype=np.float32), None
      return None, "a list of numbers"
    if all(isinstance(x, str) for x in items):
      return items, None
    return None, "a list of strings"
  raise AssertionError(kind)


def _describe(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _encode_record(
    record: Any, schema: Mapping[str, str], where: str,
) -> dict[str, Any]:
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a dict with fields {sorted(schema)}, got {_describe(record)}")
  missing = sorted(set(schema) - set(record))
  extra = sorted(set(record) - set(schema))
  if missing:
    raise ValueError(f"{where}: missing field {missing[0]!r} (expected fields {sorted(schema)})")
  if extra:
    raise ValueError(f"{where}: unexpected field {extra[0]!r} (expected fields {sorted(schema)})")
  out = {}
  for field, kind in schema.items():
    value, expected = _check_value(kind, record[field])
    if expected is not None:
      raise ValueError(f"{where}: field {field!r} ({kind}): expected {expected}, got {_describe(record[field])}")
    out[field] = value
  return out


def _check_names(name: str, features: Mapping[str, str], splits: Mapping[str, Any]) -> None:
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r}: expected lowercase letters, digits and '_', starting with a letter")
  if not features:
    raise ValueError(f"dataset {name!r}: features is empty; expected a dict field -> type")
  for field, kind in features.items():
    if kind not in FEATURE_TYPES:
      raise ValueError(f"dataset {name!r}: field {field!r} has type {kind!r}; expected one of {FEATURE_TYPES}")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", field):
      raise ValueError(f"dataset {name!r}: field name {field!r} must be an identifier")
  if not splits:
    raise ValueError(f"dataset {name!r}: no splits given")
  for split in splits:
    if not _NAME_RE.match(split):
      raise ValueError(f"dataset {name!r}: split name {split!r}: expected lowercase letters, digits and '_'")


def _read_metadata_file(dataset_dir: str) -> dict[str, Any]:
  path = os.path.join(dataset_dir, _METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: {dataset_dir} is not a dataset written by prepare_dataset")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_metadata(dataset_dir: str) -> dict[str, Any]:
  """The `metadata` dict given to `prepare_dataset` for the dataset in `dataset_dir` ({} if none)."""
  return _read_metadata_file(dataset_dir).get(_USER_KEY) or {}


def read_fingerprint(dataset_dir: str) -> str | None:
  """The `fingerprint` the dataset in `dataset_dir` was written from (None if none was given)."""
  return _read_metadata_file(dataset_dir).get(_FINGERPRINT_KEY)


def read_schema(dataset_dir: str) -> dict[str, str]:
  """The field -> type-string dict the dataset in `dataset_dir` was written with."""
  return dict(_read_metadata_file(dataset_dir)[_SCHEMA_KEY])


def _is_complete(dataset_dir: str) -> bool:
  return all(os.path.isfile(os.path.join(dataset_dir, f))
             for f in ("dataset_info.json", "features.json", _METADATA_FILE))


def _write_split(
    out_dir: str,
    name: str,
    split: str,
    records: Iterable[Any],
    schema: Mapping[str, str],
    records_per_shard: int,
) -> tuple[list[int], int]:
  """Writes one split's shards; returns (records per shard, total serialized bytes)."""
  from array_record.python import array_record_module  # lazy: with tensorflow_datasets, see _tfds
  from tensorflow_datasets.core import example_serializer  # lazy: see _tfds

  features = _tfds_features(schema)
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  shard_lengths: list[int] = []
  num_bytes = 0
  writer = None
  tmp_paths: list[str] = []
  for index, record in enumerate(records):
    where = f"dataset {name!r}, split {split!r}, record {index}"
    values = _encode_record(record, schema, where)
    try:
      encoded = features.encode_example(values)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{where}: TFDS could not encode the record: {e}") from e
    data = serializer.get_tf_example(encoded).SerializeToString(deterministic=True)
    if writer is None:
      tmp_paths.append(os.path.join(out_dir, f"shard-{split}-{len(tmp_paths)}.tmp"))
      writer = array_record_module.ArrayRecordWriter(tmp_paths[-1], "group_size:1")
      shard_lengths.append(0)
    writer.write(data)
    shard_lengths[-1] += 1
    num_bytes += len(data)
    if shard_lengths[-1] == records_per_shard:
      writer.close()
      writer = None
  if writer is not None:
    writer.close()
  if not shard_lengths:
    raise ValueError(f"dataset {name!r}, split {split!r}: the generator yielded no records; expected at least one")
  n = len(tmp_paths)
  for i, tmp in enumerate(tmp_paths):
    os.replace(tmp, os.path.join(out_dir, f"{name}-{split}.array_record-{i:05d}-of-{n:05d}"))
  return shard_lengths, num_bytes


def prepare_dataset(
    name: str,
    data_dir: str,
    features: Mapping[str, str],
    splits: Mapping[str, Callable[[], Iterable[Mapping[str, Any]]]],
    *,
    version: str = "1.0.0",
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    fingerprint: str | None = None,
    records_per_shard: int = 100_000,
) -> str:
  """Writes a TFDS ArrayRecord dataset once and returns its folder `<data_dir>/<name>/<version>`.

  Args:
    name: dataset name (lowercase, digits, '_').
    data_dir: root folder holding datasets.
    features: field -> one of FEATURE_TYPES: "text" (str), "int32", "float32", "int32_seq" (list of int),
      "float32_seq", "text_seq" (list of str), "json" (any JSON value, stored as canonical JSON text).
    splits: split name -> a zero-argument function returning the split's records (dicts with exactly the
      fields of `features`), called only if the dataset must be written.
    version: TFDS version "X.Y.Z"; bump it when the content changes on purpose.
    description: stored in dataset_info.json.
    metadata: JSON dict (for example statistics) stored with the dataset; see `read_metadata`.
    overwrite: rewrite even if a complete dataset exists.
    fingerprint: an identifier of the input (for example a file hash). A cached dataset written from a
      different fingerprint is an error rather than silently reused.
    records_per_shard: maximum records per ArrayRecord file.

  Returns:
    The dataset folder, to pass to `read_metadata` or `tfds.builder_from_directory`.
  """
  tfds = _tfds()
  features = dict(features)
  _check_names(name, features, splits)
  if not re.match(r"^\d+\.\d+\.\d+$", version):
    raise ValueError(f"dataset {name!r}: version {version!r}: expected 'X.Y.Z'")
  out_dir = os.path.join(os.fspath(data_dir), name, version)
  if not overwrite and _is_complete(out_dir):
    stored = _read_metadata_file(out_dir)
    if stored.get(_SCHEMA_KEY) != features:
      raise ValueError(
          f"{out_dir} holds dataset {name!r} v{version} with fields {stored.get(_SCHEMA_KEY)}, not {features}; "
          "bump the version or pass overwrite=True")
    if fingerprint is not None and stored.get(_FINGERPRINT_KEY) != fingerprint:
      raise ValueError(
          f"{out_dir} holds dataset {name!r} v{version} written from input {stored.get(_FINGERPRINT_KEY)!r}, "
          f"not {fingerprint!r} (the input changed); bump the version or pass overwrite=True")
    return out_dir

  tmp_dir = os.path.join(os.fspath(data_dir), name, f"incomplete.{version}.{uuid.uuid4().hex}")
  os.makedirs(tmp_dir)
  try:
    split_infos = []
    for split, make_records in splits.items():
      shard_lengths, num_bytes = _write_split(
          tmp_dir, name, split, make_records(), features, records_per_shard)
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=num_bytes))
    stored = {_SCHEMA_KEY: features, _USER_KEY: dict(metadata or {}), _FINGERPRINT_KEY: fingerprint}
    try:
      json.dumps(stored, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"dataset {name!r}: metadata must be a JSON-serialisable dict: {e}") from e
    tfds.folder_dataset.write_metadata(
        data_dir=tmp_dir,
        features=_tfds_features(features),
        split_infos=split_infos,
        version=version,
        check_data=False,  # the check reads with tf.data, i.e. TensorFlow
        description=description or f"{name}: written by rlhf_jax.data.tfds_io.prepare_dataset",
        metadata=tfds.core.MetadataDict(stored),
        disable_shuffling=True,  # record i is the i-th record written; the loader shuffles
    )
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return out_dir


class DecodedSource(Sequence):
  """Random access to one split, records decoded to Python values.

  text -> str, json -> the parsed value, int32 -> int, float32 -> float, int32_seq/float32_seq -> 1-D numpy
  arrays, text_seq -> list[str]. Picklable (grain worker processes reopen it).
  """

  def __init__(self, tfds_source: Any, schema: Mapping[str, str], where: str):
    self._source = tfds_source
    self.schema = dict(schema)
    self.where = where

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for field, kind in self.schema.items():
      v = raw[field]
      if kind == "text":
        out[field] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
      elif kind == "json":
        out[field] = json.loads(v.decode("utf-8") if isinstance(v, bytes) else v)
      elif kind == "int32":
        out[field] = int(v)
      elif kind == "float32":
        out[field] = float(v)
      elif kind == "int32_seq":
        out[field] = np.asarray(v, dtype=np.int32).reshape(-1)
      elif kind == "float32_seq":
        out[field] = np.asarray(v, dtype=np.float32).reshape(-1)
      else:  # text_seq
        out[field] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in v]
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
    if not _is_int(index):
      raise TypeError(f"{self.where}: index must be an int, got {type(index).__name__}")
    n = len(self)
    i = int(index) + n if index < 0 else int(index)
    if not 0 <= i < n:
      raise IndexError(f"{self.where}: index {index} out of range for {n} records")
    return self._decode(self._source[i])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"DecodedSource({self.where}, {len(self)} records, fields={self.schema})"


def load_split(name: str, data_dir: str, split: str, *, version: str | None = None) -> DecodedSource:
  """One split of a dataset written by `prepare_dataset`, via `tfds.data_source` (random access, no TF).

  Without `version`, the newest version in `<data_dir>/<name>` is read (TFDS's rule).
  """
  tfds = _tfds()
  root = os.path.join(os.fspath(data_dir), name)
  if version is None:
    versions = [v for v in os.listdir(root) if re.match(r"^\d+\.\d+\.\d+$", v)] if os.path.isdir(root) else []
    if not versions:
      raise FileNotFoundError(f"no dataset {name!r} in {data_dir} (expected a folder {root}/<version>)")
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
  dataset_dir = os.path.join(root, version)
  if not _is_complete(dataset_dir):
    raise FileNotFoundError(f"{dataset_dir} holds no complete dataset written by prepare_dataset")
  schema = read_schema(dataset_dir)
  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{dataset_dir}: no split {split!r}; available splits: {sorted(builder.info.splits)}")
  source = tfds.data_source(f"{name}:{version}", split=split, data_dir=os.fspath(data_dir), download=False)
  return DecodedSource(source, schema, where=f"{name}:{version}[{split}]")


def num_shards(dataset_dir: str, split: str) -> int:
  """How many ArrayRecord files hold `split` (for tests and diagnostics)."""
  pattern = re.compile(rf"-{re.escape(split)}\.array_record-\d{{5}}-of-(\d{{5}})$")
  counts = {int(m.group(1)) for f in os.listdir(dataset_dir) if (m := pattern.search(f))}
  return max(counts) if counts else 0



def load_split_dir(dataset_dir: str, split: str) -> DecodedSource:
  """`load_split` for a folder `<data_dir>/<name>/<version>` as returned by `prepare_dataset`."""
  dataset_dir = os.path.abspath(os.fspath(dataset_dir))
  version = os.path.basename(dataset_dir)
  name_dir = os.path.dirname(dataset_dir)
  if not re.match(r"^\d+\.\d+\.\d+$", version):
    raise ValueError(f"{dataset_dir}: expected a dataset folder <data_dir>/<name>/<X.Y.Z> from prepare_dataset")
  return load_split(os.path.basename(name_dir), os.path.dirname(name_dir), split, version=version)
