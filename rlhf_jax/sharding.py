"""Meshes and logical-axis sharding: declared once, by name.

Every parameter and main activation carries logical axis names (`("embed", "mlp")`, `("batch", "length",
"embed")`). One rules table maps logical names to mesh axes (`data`, `fsdp`, `tensor`); an experiment may
override it (`config.sharding_rules`). On one device everything still goes through a 1x1x1 mesh, so the code
path that runs on a laptop is the one that runs on a pod.

Two rules keep any rules table valid for any model size:
- a mesh axis is used at most once per array (first dimension wins), so `batch -> (data, fsdp)` and
  `embed -> fsdp` can share one table: activations are split over the batch, weights over `embed`;
- a dimension the mesh axes do not divide is replicated instead (e.g. 2 kv heads on tensor=4).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take what the others leave."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ValueError(f"mesh.{k} must be a positive integer or -1, got {v}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices do not divide by the fixed axes' product {known}")
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(
        f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
        f"{math.prod(sizes.values())} devices, but {len(devices)} are available; set one of "
        "--experiment.mesh.{data,fsdp,tensor}=-1 to fill")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(mesh_cfg) -> Mesh:
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def rules_from_config(config) -> Rules:
  rules = config.get("sharding_rules", None) if hasattr(config, "get") else None
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
  """The PartitionSpec for one array, replicating dims that the mesh axes do not divide."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match an array of rank {len(shape)}")
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given its logical axes."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      axes_tree, shapes_tree, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, rank: int = 2) -> NamedSharding:
  """Batches are split along their leading axis over the data-parallel axes (data x fsdp)."""
  axes = ("batch",) + (None,) * (rank - 1)
  return NamedSharding(mesh, logical_to_spec(axes, (data_parallel_size(mesh, rules),) + (1,) * (rank - 1), mesh,
                                             rules))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  target = dict(rules).get("batch")
  mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return math.prod(mesh.shape[a] for a in mesh_axes)


def check_batch(global_batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, field: str = "batch_size") -> None:
  n = data_parallel_size(mesh, rules)
  if global_batch % n:
    raise ValueError(f"{field}={global_batch} does not divide over the data-parallel size {n} "
                     f"(mesh data x fsdp); choose a multiple of {n}")


# Activation constraints: model code calls `constrain(x, axes)`; it does something only inside `activate`.
_ACTIVE = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Trace model code under this mesh and rules (activation sharding constraints become real)."""
  prev = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, rules)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.value = prev


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def per_device(fn, args: Sequence[jax.Array], axes: Sequence[Sequence[str | None]]) -> jax.Array:
  """fn(*args) for a kernel XLA cannot partition (a Pallas / Mosaic call): under an active mesh of more than one
  device, each device runs fn on its shards (jax.shard_map), args split by their logical `axes`; fn's output has
  the first argument's shape and axes. Without an active mesh, or on one device, fn(*args). Only for fn that
  treats every sharded dimension as independent rows (batch, heads), never a reduction over one."""
  active = getattr(_ACTIVE, "value", None)
  if active is None or active[0].size == 1:
    return fn(*args)
  mesh, rules = active
  specs = tuple(logical_to_spec(a, x.shape, mesh, rules) for a, x in zip(axes, args))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """Place a host batch on the mesh, split over data x fsdp.

  Single-process: the host holds the global batch. Multi-process: each host holds its own slice of the global
  batch (process-indexed data loading), assembled with `jax.make_array_from_process_local_data`.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, rules, v.ndim)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """Like `put_batch` for a batch that every process holds whole (evaluation sets): each keeps its own rows."""
  n, i = jax.process_count(), jax.process_index()
  local = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if len(v) % n:
      raise ValueError(f"a global batch of {len(v)} rows does not divide over {n} processes")
    rows = len(v) // n
    local[k] = v[i * rows:(i + 1) * rows]
  return put_batch(local, mesh, rules)


def put_minibatches(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """[n_minibatches, rows, ...] process-local arrays (PPO-ptx) placed with the rows split over data x fsdp."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    spec = PartitionSpec(None, *batch_sharding(mesh, rules, v.ndim - 1).spec)
    sh = NamedSharding(mesh, spec)
    out[k] = jax.device_put(v, sh) if jax.process_count() == 1 else jax.make_array_from_process_local_data(sh, v)
  return out


def fetch(x: jax.Array) -> np.ndarray:
  """The global value of an array on this host; `np.asarray` fails on arrays that span other processes."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_batch(x: jax.Array, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> np.ndarray:
  """This process's rows of a batch-sharded array: the inverse of `put_batch`."""
  if jax.process_count() == 1:
    return np.asarray(x)
  spec = batch_sharding(mesh, rules, x.ndim).spec
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def largest_shard_fraction(x: jax.Array) -> float:
  """Fraction of the array's elements held by one device (1.0 means a full copy somewhere)."""
  shard = x.addressable_shards[0].data
  return shard.size / max(x.size, 1)
