"""Hugging Face checkpoints in and out: GPT-2, Llama 3, Qwen 2.5, Qwen 3 and Mistral.

    params, cfg = hf.load_hf("path/to/Qwen2.5-0.5B", mesh, rules, dtype="float32")
    hf.save_hf(params, cfg, "out/policy", source="path/to/Qwen2.5-0.5B")          # a *ForCausalLM folder
    hf.save_hf(rm_params, cfg, "out/rm", kind="reward", pad_token_id=0)            # *ForSequenceClassification

One table per family (`_FAMILIES`) says how config.json's fields map to `ModelConfig` and how every tensor is
named and laid out; the loader, the exporter and the checks are shared. Import reads the safetensors files as
memory maps: each device's shard is sliced out of the mapped file and copied, so no process holds a whole
tensor unless one of its devices holds it whole. Everything (config fields, tensor names, shapes, dtypes, file
sizes) is checked before the first tensor is placed, and every failure is one line naming the file and the
field or tensor.

Positions: transformers' forward() numbers positions 0..t-1 whatever the padding (its generate() derives them
from the mask); this model counts them over real tokens, so compare with explicit
`position_ids = cumsum(mask) - 1`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from rlhf_jax import sharding
from rlhf_jax.models import transformer
from rlhf_jax.models.transformer import ModelConfig

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files of the source model that travel with an export (tokenizer, generation defaults).
# The chat template may live in its own file (transformers >= 4.43 writes chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64)}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class HFFormatError(ValueError):
  """A Hugging Face folder that cannot be read as the model it claims to be; the message is one line."""


# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.

# Fields that describe the file, training-time options or token ids, not the function the model computes.
_METADATA = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
    "id2label", "label2id", "num_labels", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "tie_encoder_decoder", "is_decoder", "pretraining_tp", "max_window_layers",
    "sep_token_id", "decoder_start_token_id",
    "rlhf_jax_score_bias",  # a reward model's constant (see save_hf); the import reads backbones only
}


def _llama_like_config(c: dict[str, Any], family: str, path: str) -> dict[str, Any]:
  heads = c["num_attention_heads"]
  fields = dict(
      family=family, vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
      n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads, d_ff=c["intermediate_size"],
      max_len=c["max_position_embeddings"], norm_eps=c.get("rms_norm_eps", 1e-6),
      rope_theta=float(c.get("rope_theta", 10_000.0)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      norm="rms", mlp="swiglu", pos_embedding="rope", qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
  head_dim = c.get("head_dim")
  if family == "qwen3" and head_dim is None:
    head_dim = 128  # Qwen3Config's default
  if head_dim is not None and head_dim != fields["d_model"] // heads:
    fields["head_dim"] = int(head_dim)
  if c.get("hidden_act", "silu") != "silu":
    raise HFFormatError(f"{path}: hidden_act={c['hidden_act']!r} is not supported; expected 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    if c.get(flag, False):
      raise HFFormatError(f"{path}: {flag}=true is not supported by the {family} import")
  if c.get("use_sliding_window", False):
    raise HFFormatError(f"{path}: use_sliding_window=true is not supported by the {family} import")
  if family == "mistral" and c.get("sliding_window"):
    fields["sliding_window"] = int(c["sliding_window"])
  layer_types = c.get("layer_types")
  if layer_types is not None and (family != "mistral" and set(layer_types) - {"full_attention"}):
    raise HFFormatError(f"{path}: layer_types={sorted(set(layer_types))} is not supported; expected only "
                        "'full_attention'")
  scaling = c.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
      pass
    elif kind == "llama3":
      fields.update(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                    rope_low_freq_factor=float(scaling["low_freq_factor"]),
                    rope_high_freq_factor=float(scaling["high_freq_factor"]),
                    rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    else:
      raise HFFormatError(f"{path}: rope_scaling type {kind!r} is not supported; expected 'llama3' or none")
  return fields


_LLAMA_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
               "tie_word_embeddings", "head_dim", "hidden_act", "attention_bias", "mlp_bias"}
_QWEN_KEYS = _LLAMA_KEYS | {"use_sliding_window", "sliding_window", "layer_types"}
_MISTRAL_KEYS = _LLAMA_KEYS | {"sliding_window", "layer_types"}


def _gpt2_config(c: dict[str, Any], family: str, path: str) -> dict[str, Any]:
  d = c.get("n_embd", 768)
  act = c.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise HFFormatError(f"{path}: activation_function={act!r} is not supported; expected 'gelu_new'")
  for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                   ("add_cross_attention", False)):
    if c.get(flag, ok) != ok:
      raise HFFormatError(f"{path}: {flag}={c[flag]!r} is not supported; expected {ok!r}")
  return dict(family=family, vocab_size=c.get("vocab_size", 50257), d_model=d, n_layers=c.get("n_layer", 12),
              n_heads=c.get("n_head", 12), n_kv_heads=c.get("n_head", 12), d_ff=c.get("n_inner") or 4 * d,
              max_len=c.get("n_positions", 1024), norm_eps=c.get("layer_norm_epsilon", 1e-5),
              tie_embeddings=bool(c.get("tie_word_embeddings", True)), norm="layer", mlp="gelu",
              pos_embedding="learned", qkv_bias=True, proj_bias=True)


_GPT2_KEYS = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx", "layer_norm_epsilon",
              "activation_function", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
              "reorder_and_upcast_attn", "add_cross_attention", "attn_pdrop", "embd_pdrop", "resid_pdrop",
              "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
              "summary_use_proj", "task_specific_params"}


# ----------------------------------------------------------------------------------------------------------
# Tensor tables. Each entry: our parameter path -> (HF name, with {i} for the layer; a function from the HF
# array to ours, per layer). Export inverts them with `_TO_HF`.


def _t(a):
  return a.T


def _llama_tensors(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
  d, h, k, e = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
  p = "model.layers.{i}."
  table = {
      "embed": ("model.embed_tokens.weight", lambda a: a),
      "final_norm": ("model.norm.weight", lambda a: a),
      "layers/attn_norm": (p + "input_layernorm.weight", lambda a: a),
      "layers/mlp_norm": (p + "post_attention_layernorm.weight", lambda a: a),
      "layers/wq": (p + "self_attn.q_proj.weight", lambda a: a.T.reshape(d, h, e)),
      "layers/wk": (p + "self_attn.k_proj.weight", lambda a: a.T.reshape(d, k, e)),
      "layers/wv": (p + "self_attn.v_proj.weight", lambda a: a.T.reshape(d, k, e)),
      "layers/wo": (p + "self_attn.o_proj.weight", lambda a: a.T.reshape(h, e, d)),
      "layers/w_gate": (p + "mlp.gate_proj.weight", _t),
      "layers/w_in": (p + "mlp.up_proj.weight", _t),
      "layers/w_out": (p + "mlp.down_proj.weight", _t),
  }
  if not cfg.tie_embeddings:
    table["unembed"] = ("lm_head.weight", _t)
  if cfg.qkv_bias:
    table["layers/bq"] = (p + "self_attn.q_proj.bias", lambda a: a.reshape(h, e))
    table["layers/bk"] = (p + "self_attn.k_proj.bias", lambda a: a.reshape(k, e))
    table["layers/bv"] = (p + "self_attn.v_proj.bias", lambda a: a.reshape(k, e))
  if cfg.qk_norm:
    table["layers/q_norm"] = (p + "self_attn.q_norm.weight", lambda a: a)
    table["layers/k_norm"] = (p + "self_attn.k_norm.weight", lambda a: a)
  return table


def _gpt2_tensors(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
  d, h, e = cfg.d_model, cfg.n_heads, cfg.d_head
  p = "transformer.h.{i}."
  # c_attn is one Conv1D ([in, out] layout) whose output columns are q, then k, then v.
  qkv = lambda j: lambda a: a[:, j * d:(j + 1) * d].reshape(d, h, e)
  qkv_b = lambda j: lambda a: a[j * d:(j + 1) * d].reshape(h, e)
  return {
      "embed": ("transformer.wte.weight", lambda a: a),
      "pos_embed": ("transformer.wpe.weight", lambda a: a),
      "final_norm": ("transformer.ln_f.weight", lambda a: a),
      "final_norm_bias": ("transformer.ln_f.bias", lambda a: a),
      "layers/attn_norm": (p + "ln_1.weight", lambda a: a),
      "layers/attn_norm_bias": (p + "ln_1.bias", lambda a: a),
      "layers/mlp_norm": (p + "ln_2.weight", lambda a: a),
      "layers/mlp_norm_bias": (p + "ln_2.bias", lambda a: a),
      "layers/wq": (p + "attn.c_attn.weight", qkv(0)),
      "layers/wk": (p + "attn.c_attn.weight", qkv(1)),
      "layers/wv": (p + "attn.c_attn.weight", qkv(2)),
      "layers/bq": (p + "attn.c_attn.bias", qkv_b(0)),
      "layers/bk": (p + "attn.c_attn.bias", qkv_b(1)),
      "layers/bv": (p + "attn.c_attn.bias", qkv_b(2)),
      "layers/wo": (p + "attn.c_proj.weight", lambda a: a.reshape(h, e, d)),
      "layers/bo": (p + "attn.c_proj.bias", lambda a: a),
      "layers/w_in": (p + "mlp.c_fc.weight", lambda a: a),
      "layers/b_in": (p + "mlp.c_fc.bias", lambda a: a),
      "layers/w_out": (p + "mlp.c_proj.weight", lambda a: a),
      "layers/b_out": (p + "mlp.c_proj.bias", lambda a: a),
  }


def _llama_to_hf(cfg: ModelConfig, ours: Callable[[str], np.ndarray], i: int | None) -> dict[str, np.ndarray]:
  """The HF tensors of layer i (or the global ones for i None) from `ours(path)` (per-layer arrays)."""
  d = cfg.d_model
  if i is None:
    out = {"model.embed_tokens.weight": ours("embed"), "model.norm.weight": ours("final_norm")}
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = ours("unembed").T
    return out
  p = f"model.layers.{i}."
  out = {p + "input_layernorm.weight": ours("layers/attn_norm"),
         p + "post_attention_layernorm.weight": ours("layers/mlp_norm"),
         p + "self_attn.q_proj.weight": ours("layers/wq").reshape(d, -1).T,
         p + "self_attn.k_proj.weight": ours("layers/wk").reshape(d, -1).T,
         p + "self_attn.v_proj.weight": ours("layers/wv").reshape(d, -1).T,
         p + "self_attn.o_proj.weight": ours("layers/wo").reshape(-1, d).T,
         p + "mlp.gate_proj.weight": ours("layers/w_gate").T,
         p + "mlp.up_proj.weight": ours("layers/w_in").T,
         p + "mlp.down_proj.weight": ours("layers/w_out").T}
  if cfg.qkv_bias:
    for n in "qkv":
      out[p + f"self_attn.{n}_proj.bias"] = ours(f"layers/b{n}").reshape(-1)
  if cfg.qk_norm:
    out[p + "self_attn.q_norm.weight"] = ours("layers/q_norm")
    out[p + "self_attn.k_norm.weight"] = ours("layers/k_norm")
  return out


def _gpt2_to_hf(cfg: ModelConfig, ours: Callable[[str], np.ndarray], i: int | None) -> dict[str, np.ndarray]:
  d = cfg.d_model
  if i is None:
    return {"transformer.wte.weight": ours("embed"), "transformer.wpe.weight": ours("pos_embed"),
            "transformer.ln_f.weight": ours("final_norm"), "transformer.ln_f.bias": ours("final_norm_bias")}
  p = f"transformer.h.{i}."
  return {p + "ln_1.weight": ours("layers/attn_norm"), p + "ln_1.bias": ours("layers/attn_norm_bias"),
          p + "ln_2.weight": ours("layers/mlp_norm"), p + "ln_2.bias": ours("layers/mlp_norm_bias"),
          p + "attn.c_attn.weight": np.concatenate([ours(f"layers/w{n}").reshape(d, d) for n in "qkv"], axis=1),
          p + "attn.c_attn.bias": np.concatenate([ours(f"layers/b{n}").reshape(d) for n in "qkv"]),
          p + "attn.c_proj.weight": ours("layers/wo").reshape(d, d), p + "attn.c_proj.bias": ours("layers/bo"),
          p + "mlp.c_fc.weight": ours("layers/w_in"), p + "mlp.c_fc.bias": ours("layers/b_in"),
          p + "mlp.c_proj.weight": ours("layers/w_out"), p + "mlp.c_proj.bias": ours("layers/b_out")}


def _llama_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  c = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
       "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff,
       "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
       "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "head_dim": cfg.d_head}
  if cfg.rope_scaling == "llama3":
    c["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                         "low_freq_factor": cfg.rope_low_freq_factor,
                         "high_freq_factor": cfg.rope_high_freq_factor,
                         "original_max_position_embeddings": cfg.rope_original_max_len}
  if cfg.family == "llama":
    c.update(attention_bias=False, mlp_bias=False)
  if cfg.family in ("qwen2", "qwen3"):
    c.update(use_sliding_window=False)
  if cfg.family == "mistral":
    c["sliding_window"] = cfg.sliding_window or None
  return c


def _gpt2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  return {"vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
          "n_inner": cfg.d_ff, "n_positions": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps,
          "activation_function": "gelu_new", "tie_word_embeddings": True}


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face family is named and laid out."""
  name: str  # ModelConfig.family
  model_type: str  # config.json's model_type
  causal_lm: str  # the *ForCausalLM class
  classifier: str  # the *ForSequenceClassification class
  keys: frozenset  # config.json fields the import understands, beside _METADATA
  config: Callable  # (config.json dict, family, path) -> ModelConfig fields
  hf_config: Callable  # ModelConfig -> config.json fields
  tensors: Callable  # ModelConfig -> {our path: (HF name, HF array -> ours)}
  to_hf: Callable  # (ModelConfig, ours, layer or None) -> {HF name: array}
  backbone_prefix: str  # the backbone's prefix in *ForCausalLM files ("model." / "transformer.")


_FAMILIES = {f.name: f for f in (
    Family("gpt2", "gpt2", "GPT2LMHeadModel", "GPT2ForSequenceClassification", frozenset(_GPT2_KEYS),
           _gpt2_config, _gpt2_hf_config, _gpt2_tensors, _gpt2_to_hf, "transformer."),
    Family("llama", "llama", "LlamaForCausalLM", "LlamaForSequenceClassification", frozenset(_LLAMA_KEYS),
           _llama_like_config, _llama_hf_config, _llama_tensors, _llama_to_hf, "model."),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", frozenset(_QWEN_KEYS),
           _llama_like_config, _llama_hf_config, _llama_tensors, _llama_to_hf, "model."),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", frozenset(_QWEN_KEYS),
           _llama_like_config, _llama_hf_config, _llama_tensors, _llama_to_hf, "model."),
    Family("mistral", "mistral", "MistralForCausalLM", "MistralForSequenceClassification",
           frozenset(_MISTRAL_KEYS), _llama_like_config, _llama_hf_config, _llama_tensors, _llama_to_hf, "model."),
)}
_BY_ARCHITECTURE = {a: f for f in _FAMILIES.values() for a in (f.causal_lm, f.classifier)}


def families() -> list[str]:
  return sorted(_FAMILIES)


def read_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, config.json as a dict) of a Hugging Face folder; every field checked."""
  file = os.path.join(path, CONFIG)
  if not os.path.isdir(path):
    raise HFFormatError(f"{path}: not a folder; expected a Hugging Face model folder with {CONFIG}")
  if not os.path.isfile(file):
    raise HFFormatError(f"{path}: no {CONFIG}; expected a Hugging Face model folder")
  try:
    with open(file) as f:
      c = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise HFFormatError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(c, dict):
    raise HFFormatError(f"{file}: expected a JSON object")
  archs = c.get("architectures") or []
  if len(archs) != 1 or archs[0] not in _BY_ARCHITECTURE:
    raise HFFormatError(f"{file}: architectures={archs!r} is not supported; expected one of "
                        f"{sorted(_BY_ARCHITECTURE)}")
  family = _BY_ARCHITECTURE[archs[0]]
  unknown = sorted(set(c) - _METADATA - family.keys)
  if unknown:
    raise HFFormatError(f"{file}: field {unknown[0]!r} (={c[unknown[0]]!r}) is not supported by the "
                        f"{family.name} import" + (f" (nor {unknown[1:]})" if unknown[1:] else ""))
  try:
    fields = family.config(c, family.name, file)
    return ModelConfig(**fields), c
  except KeyError as e:
    raise HFFormatError(f"{file}: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, HFFormatError):
      raise
    raise HFFormatError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Reading safetensors: headers checked up front, tensors as memory-mapped views.
# Our own reader (the format is an 8-byte header length, a JSON header and raw bytes): memory-mapped views can
# be transposed and sliced before anything is copied, and a truncated file is caught from its header.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset in the file


def _read_header(file: str) -> dict[str, _Tensor]:
  try:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise HFFormatError(f"{file}: truncated ({size} bytes); expected a safetensors file")
      n = int.from_bytes(raw, "little")
      if n > size - 8:
        raise HFFormatError(f"{file}: header of {n} bytes exceeds the file's {size}; truncated or not safetensors")
      header = json.loads(f.read(n))
  except OSError as e:
    raise HFFormatError(f"{file}: cannot read ({e.strerror})") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise HFFormatError(f"{file}: the header is not JSON; not a safetensors file") from None
  tensors, end = {}, 0
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _ST_DTYPES:
      raise HFFormatError(f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}; expected one of "
                          f"{sorted(_ST_DTYPES)}")
    dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
    start, stop = info["data_offsets"]
    if stop - start != math.prod(shape) * dtype.itemsize:
      raise HFFormatError(f"{file}: tensor {name!r}: {stop - start} bytes for shape {list(shape)} "
                          f"{info['dtype']}")
    tensors[name] = _Tensor(file, dtype, shape, 8 + n + start)
    end = max(end, stop)
  if 8 + n + end > size:
    raise HFFormatError(f"{file}: truncated: {size} bytes, the header describes {8 + n + end}")
  return tensors


def _index(path: str) -> dict[str, _Tensor]:
  """Every tensor of the folder's safetensors file(s), by name."""
  index_file = os.path.join(path, INDEX)
  if os.path.isfile(index_file):
    try:
      with open(index_file) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise HFFormatError(f"{index_file}: not a safetensors index ({e}); expected a 'weight_map'") from None
    tensors = {}
    for file in sorted(set(weight_map.values())):
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise HFFormatError(f"{index_file}: names {file}, which is missing")
      header = _read_header(full)
      for name, f in weight_map.items():
        if f == file:
          if name not in header:
            raise HFFormatError(f"{full}: tensor {name!r} is missing (named by {INDEX})")
          tensors[name] = header[name]
    return tensors
  single = os.path.join(path, SINGLE)
  if not os.path.isfile(single):
    raise HFFormatError(f"{path}: neither {SINGLE} nor {INDEX}")
  return _read_header(single)


def _view(t: _Tensor) -> np.ndarray:
  return np.memmap(t.file, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape)


def _strip_prefix(tensors: dict[str, _Tensor], family: Family) -> dict[str, _Tensor]:
  """Accept a bare backbone's names (GPT2Model, LlamaModel) and a classifier's, beside the CausalLM's."""
  prefix = family.backbone_prefix
  if any(name.startswith(prefix) for name in tensors):
    return tensors
  return {(name if name in ("lm_head.weight", "score.weight") else prefix + name): t for name, t in tensors.items()}


def _plan(path: str, cfg: ModelConfig, family: Family):
  """{our path: (shape, [(HF tensor, fn) per layer or one])}, every name and shape checked."""
  tensors = _strip_prefix(_index(path), family)
  specs = transformer._param_specs(cfg)  # pylint: disable=protected-access
  plan = {}
  for ours, (hf_name, fn) in family.tensors(cfg).items():
    shape = specs[ours][0]
    layered = ours.startswith("layers/")
    names = [hf_name.format(i=i) for i in range(cfg.n_layers)] if layered else [hf_name]
    want = shape[1:] if layered else shape
    for name in names:
      if name not in tensors:
        raise HFFormatError(f"{path}: tensor {name!r} is missing (needed for {ours})")
      t = tensors[name]
      try:
        got = jax.eval_shape(fn, jax.ShapeDtypeStruct(t.shape, np.float32)).shape
      except (TypeError, ValueError, IndexError):
        got = None
      if got != want:
        raise HFFormatError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, which does not give "
                            f"{ours}'s {list(want)} for this config.json")
    plan[ours] = (shape, [(tensors[n], fn) for n in names])
  return plan


def check_folder(path: str) -> ModelConfig:
  """The ModelConfig of a Hugging Face folder whose config.json, files, tensor names and shapes all check out
  (headers only: nothing is read or placed). The pipeline's preflight calls it before any stage writes."""
  cfg, _ = read_config(path)
  _plan(path, cfg, _FAMILIES[cfg.family])
  return cfg


_COLLECT_BYTES = 64 << 20


def load_hf(path: str, mesh, rules=sharding.DEFAULT_RULES, dtype: str = "float32"):
  """(params, ModelConfig) of a Hugging Face folder, placed on `mesh` by the logical-axis `rules`.

  Each device's shard is copied out of the memory-mapped files (one layer's tensor at a time for stacked
  layers) and cast to `dtype`; a process never holds a whole tensor unless one of its devices holds it whole.
  """
  cfg, _ = read_config(path)
  family = _FAMILIES[cfg.family]
  plan = _plan(path, cfg, family)
  np_dtype = _DTYPES[dtype]
  axes = dict(_flatten(transformer.param_axes(cfg)))
  flat = {}
  uncollected = 0  # bytes copied since the last gc.collect()
  # Largest first: a tensor's transient host copies then coexist with few placed tensors, which keeps the
  # peak near the model's own bytes (bench/hf_import.py).
  for ours in sorted(plan, key=lambda name: -math.prod(plan[name][0])):
    shape, sources = plan[ours]
    spec = sharding.logical_to_spec(axes[ours], shape, mesh, rules)
    named = jax.sharding.NamedSharding(mesh, spec)
    layered = ours.startswith("layers/")

    def shard(index, sources=sources, layered=layered, shape=shape):
      if not layered:
        t, fn = sources[0]
        return np.ascontiguousarray(fn(_view(t))[index], dtype=np_dtype)
      rows = range(*index[0].indices(len(sources)))
      per_layer = np.empty(shape[1:], np.bool_)[index[1:]].shape
      out = np.empty((len(rows), *per_layer), np_dtype)
      for j, i in enumerate(rows):  # one layer's mapped tensor at a time, written into the shard in place
        t, fn = sources[i]
        out[j] = fn(_view(t))[index[1:]]
      return out

    flat[ours] = jax.make_array_from_callback(shape, named, shard)
    # The callback's host copies and file maps sit in reference cycles until collected. A full collection costs
    # up to a second in a process with a large heap (a test worker), so small tensors are collected in batches.
    uncollected += math.prod(shape) * np.dtype(np_dtype).itemsize
    if uncollected >= _COLLECT_BYTES:
      gc.collect()
      uncollected = 0
  return transformer._unflatten(flat), cfg  # pylint: disable=protected-access


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten(value, path + "/")
    else:
      yield path, value


# ----------------------------------------------------------------------------------------------------------
# Export.


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def hf_tensors(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The policy's tensors under their Hugging Face names (the *ForCausalLM layout), float32 on the host."""
  if cfg.family not in _FAMILIES:
    raise ValueError(f"model.family={cfg.family!r}: this architecture has no Hugging Face class; export needs "
                     f"a model imported from one of {families()} (--experiment.init.hf_path)")
  family = _FAMILIES[cfg.family]
  flat = {k: _host(v) for k, v in _flatten(params)}
  out = family.to_hf(cfg, lambda name: flat[name], None)
  for i in range(cfg.n_layers):
    out.update(family.to_hf(cfg, lambda name, i=i: flat[name][i], i))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _write_shards(tensors: dict[str, np.ndarray], path: str, max_shard_bytes: int) -> None:
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SINGLE), metadata={"format": "pt"})
    return
  weight_map = {}
  for j, shard in enumerate(shards):
    file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
              f, indent=2, sort_keys=True)


def save_hf(params, cfg: ModelConfig, path: str, *, kind: str = "causal_lm", source: str | None = None,
            max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None,
            bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
  """Write `params` as a Hugging Face folder that transformers' from_pretrained loads; returns config.json.

  kind "causal_lm": the policy (transformer params) as a *ForCausalLM. kind "reward": reward-model params
  ({"backbone", "head", "norm"}) as a *ForSequenceClassification with num_labels 1, the stored normalisation
  folded in: score weight = gain * w. The constant gain * b + bias has no place in transformers' bias-free
  score layer except where the final norm has a bias (GPT-2's LayerNorm: it moves along w); for the RMSNorm
  families it is written as config.json's "rlhf_jax_score_bias", to be added to transformers' score.
  `source`: the folder the model was imported from; its tokenizer files are copied and its token ids kept.
  Writes into a fresh folder `path`, which must not exist yet.
  """
  if kind not in ("causal_lm", "reward"):
    raise ValueError(f"save_hf kind={kind!r}: expected 'causal_lm' or 'reward'")
  if kind == "reward" and "read" in params and float(params["read"].get("loglik", 0.0)) != 0.0:
    raise ValueError("save_hf kind='reward': this reward model adds its log-likelihood to the score "
                     "(rm.loglik_coef); transformers' classifier has no such term, so its export would score "
                     "differently. Export an RM trained with rm.loglik_coef=0")
  if kind == "reward" and "read" in params and float(params["read"]["eos"]) != 1.0:
    raise ValueError("save_hf kind='reward': this reward model is read at rm.score_at='last' or 'mean' (its 'read' "
                     "weights); transformers' classifier reads the last real token only, so its export would score "
                     "differently. Export an RM trained with rm.score_at='eos'")
  if not cfg.causal:  # transformers would load the weights into a causal model and silently change what it computes
    raise ValueError("save_hf: a bidirectional encoder (model.causal=False, the mlm stage's) has no Hugging Face "
                     "*ForCausalLM / *ForSequenceClassification equivalent among the families; expected a decoder")
  if os.path.exists(path):
    raise ValueError(f"{path}: already exists; save_hf writes a new folder")
  source_config = read_config(source)[1] if source else {}
  ids = {k: source_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  ids.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                ("pad_token_id", pad_token_id)) if v is not None})
  backbone = params["backbone"] if kind == "reward" else params
  tensors = hf_tensors(backbone, cfg)
  family = _FAMILIES[cfg.family]
  config = {"architectures": [family.causal_lm if kind == "causal_lm" else family.classifier],
            "model_type": family.model_type, "torch_dtype": "float32", **family.hf_config(cfg),
            **{k: v for k, v in ids.items() if v is not None}}
  if kind == "reward":
    if config.get("pad_token_id") is None:
      raise ValueError("save_hf kind='reward' needs pad_token_id: transformers' classifier finds each row's last "
                       "token by it")
    gain, bias = float(_host(params["norm"]["gain"])), float(_host(params["norm"]["bias"]))
    w = _host(params["head"]["w"]).astype(np.float64)
    constant = gain * float(_host(params["head"]["b"])) + bias
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = (gain * w)[None, :].astype(np.float32)
    if cfg.norm == "layer" and np.any(w):
      name = family.backbone_prefix + "ln_f.bias"
      shift = constant / (gain * float(w @ w))
      tensors[name] = (tensors[name].astype(np.float64) + shift * w).astype(np.float32)
    else:
      config["rlhf_jax_score_bias"] = constant
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  os.makedirs(path)
  _write_shards(tensors, path, max_shard_bytes)
  if source:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy2(os.path.join(source, name), os.path.join(path, name))
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return config
