"""LoRA (Hu et al. 2021): low-rank adapters on chosen projections of the pure-function Transformer.

W' = W + (alpha / r) * A @ B for each target projection W [d_in..., d_out...], with A [d_in..., r] drawn from
N(0, 1 / fan_in) and B [r, d_out...] zero, so a fresh adapter leaves the model exactly as it was (LoRA sec 4.1).
Only the adapters are trained; the base weights are a frozen argument of the jitted step, so their gradient is
never formed beyond one layer's transient dL/dW', and the optimizer holds the adapters' moments only.

Written here rather than with qwix or peft: qwix rewrites Flax module calls and peft wraps torch modules, while
this model is a pure function of a params dict, where LoRA is a merge of two small arrays into one entry.
Two ways to apply them. `merge` forms W + s A @ B (exports, and any model path). `attach`, what the rollout
and the training steps use, puts the adapters beside the weights (params["layers"]["lora"]) and the model adds
s (x @ A) @ B to each adapted projection's output (transformer._lora): the merged weights and their gradient,
a full model's worth each, are never formed; the sampler merges attached adapters layer by layer as it unstacks
the weights for decoding (transformer.unstack_layers). The two agree to float rounding. With scanned,
rematerialised layers (model.scan_layers, model.remat) the update's temporaries then fall from a model's worth
per trained role to a layer's (bench/PPO_MEMORY.md).

Adapters: {"layers": {target: {"a": [l, d_in..., r], "b": [l, r, d_out...]}}}, stacked along the layers axis
like the weights they adapt. They are float32 whatever model.param_dtype is; the merged weight is cast back to
the base weight's dtype, so the model a run trains is the model it exports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models import transformer
from rlhf_jax.models.transformer import ModelConfig

Params = dict[str, Any]

# target name (config) -> (parameter under params["layers"], how many of its dims after "layers" are inputs).
TARGETS = {
    "q": ("wq", 1),  # [l, d, h, e]
    "k": ("wk", 1),  # [l, d, k, e]
    "v": ("wv", 1),  # [l, d, k, e]
    "o": ("wo", 2),  # [l, h, e, d]: the inputs are the heads' outputs
    "mlp_in": ("w_in", 1),  # [l, d, f]
    "mlp_gate": ("w_gate", 1),  # [l, d, f], model.mlp="swiglu" only
    "mlp_out": ("w_out", 1),  # [l, f, d]
}

# The rank axis has no rule in the sharding table, so adapters are replicated along it (r is small).
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r (0 = LoRA off), alpha (the update is scaled by alpha / r) and the target projections."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank}: expected 0 (off) or a positive rank")
    if self.rank and not self.alpha > 0:
      raise ValueError(f"lora.alpha={self.alpha}: expected a positive scale numerator")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or (self.rank and not self.targets) or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"lora.targets={tuple(self.targets)!r}: expected distinct names from {tuple(TARGETS)}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def check(lcfg: LoraConfig, cfg: ModelConfig, field: str = "lora") -> None:
  """Every target exists in this model (mlp_gate needs a SwiGLU MLP) and the rank is below its widths."""
  specs = transformer.param_axes(cfg)["layers"]
  for target in lcfg.targets:
    if TARGETS[target][0] not in specs:
      raise ValueError(f"{field}.targets has {target!r}, but the model has no {TARGETS[target][0]} "
                       "(mlp_gate needs model.mlp='swiglu')")


def _shapes(cfg: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]:
  """(input dims, output dims, their logical axes) of a target's weight, after the layers axis."""
  name, n_in = TARGETS[target]
  abstract = jax.eval_shape(lambda: transformer.init(jax.random.PRNGKey(0), cfg))["layers"][name]
  axes = transformer.param_axes(cfg)["layers"][name]
  shape = abstract.shape[1:]
  return shape[:n_in], shape[n_in:], axes[1:1 + n_in], axes[1 + n_in:]


def init_adapters(rng: jax.Array, cfg: ModelConfig, lcfg: LoraConfig) -> Params:
  """Fresh adapters: A ~ N(0, 1 / fan_in) (so x @ A keeps x's scale), B = 0 (the model is unchanged)."""
  out = {}
  keys = jax.random.split(rng, len(lcfg.targets))
  for key, target in zip(keys, lcfg.targets):
    d_in, d_out, _, _ = _shapes(cfg, target)
    fan_in = math.prod(d_in)
    out[target] = {
        "a": jax.random.normal(key, (cfg.n_layers, *d_in, lcfg.rank), jnp.float32) / math.sqrt(fan_in),
        "b": jnp.zeros((cfg.n_layers, lcfg.rank, *d_out), jnp.float32),
    }
  return {"layers": out}


def adapter_axes(cfg: ModelConfig, lcfg: LoraConfig) -> Params:
  """Logical axes of `init_adapters`' output: the adapted weight's own axes, with the rank axis between."""
  out = {}
  for target in lcfg.targets:
    _, _, in_axes, out_axes = _shapes(cfg, target)
    out[target] = {"a": ("layers", *in_axes, RANK_AXIS), "b": ("layers", RANK_AXIS, *out_axes)}
  return {"layers": out}


def merge(params: Params, adapters: Params, lcfg: LoraConfig) -> Params:
  """`params` with W + scale * A @ B for every adapted weight (float32 sum, cast to W's dtype); the rest shared."""
  layers = jax.vmap(transformer.merge_attached_lora)(attach(params, adapters, lcfg)["layers"])
  return {**params, "layers": layers}


def attach(params: Params, adapters: Params, lcfg: LoraConfig) -> Params:
  """`params` with the adapters beside the weights they adapt: layers["lora"][weight name] = {"a", "b"} and
  layers["lora_scale"] = alpha / r per layer, so slicing or scanning the layers carries them along. The model
  then computes x @ W + scale * (x @ A) @ B (transformer._lora), the same function as `merge`'s weights."""
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = {**params["layers"], "lora": {TARGETS[t][0]: ab for t, ab in adapters["layers"].items()},
            "lora_scale": jnp.full((n_layers,), lcfg.scale, jnp.float32)}
  return {**params, "layers": layers}


def num_params(cfg: ModelConfig, lcfg: LoraConfig) -> int:
  """How many numbers the adapters hold: r * (fan_in + fan_out) per target and layer."""
  total = 0
  for target in lcfg.targets:
    d_in, d_out, _, _ = _shapes(cfg, target)
    total += cfg.n_layers * lcfg.rank * (math.prod(d_in) + math.prod(d_out))
  return total
