"""Hugging Face interop (rlhf_jax.models.hf) against transformers' own models.

The fixtures under tests/data/hf/ are tiny random-weight models that transformers wrote
(bench/make_hf_fixtures.py), each with reference.npz: transformers' logits on a left-padded batch (explicit
positions over real tokens) and its 20 greedy tokens. Export is checked by transformers itself: the exported
folder is loaded by `from_pretrained` in the peers' environment (bench/.venv-peers, which `.ci/run` installs)
and its logits / scores compared with ours.
"""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import hf_helpers
from rlhf_jax import sampling, sharding
from rlhf_jax.models import heads, hf, transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "data", "hf")
NAMES = ("gpt2", "llama3", "qwen2", "qwen3", "mistral")


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _reference(name):
  return dict(np.load(os.path.join(_fixture(name), "reference.npz")))


@pytest.fixture(scope="module")
def one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


_forward = jax.jit(transformer.forward, static_argnames=("cfg",))


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_on_a_left_padded_batch(name, one_device):
  ref = _reference(name)
  params, cfg = hf.load_hf(_fixture(name), one_device)
  logits, _ = _forward(params, ref["input_ids"], cfg=cfg, mask_bt=ref["attention_mask"])
  real = ref["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], ref["logits"][real], atol=1e-4, rtol=0)
  assert np.abs(ref["logits"][real]).max() > 0.5  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decoding_gives_the_full_pass_logits(name, one_device):
  ref = _reference(name)
  params, cfg = hf.load_hf(_fixture(name), one_device)
  tokens = np.concatenate([ref["input_ids"], ref["generated"]], axis=1)
  mask = np.concatenate([ref["attention_mask"], np.ones_like(ref["generated"])], axis=1)
  full, _ = _forward(params, tokens, cfg=cfg, mask_bt=mask)
  p = ref["input_ids"].shape[1]
  _, cache = transformer.prefill(params, tokens[:, :p], cfg, length=tokens.shape[1], mask_bt=mask[:, :p])
  for i in range(p, tokens.shape[1]):
    step, cache = _forward(params, tokens[:, i:i + 1], cfg=cfg, mask_bt=mask[:, i:i + 1], cache=cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, i]), atol=1e-4, rtol=0,
                               err_msg=f"position {i}")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_gives_transformers_tokens(name, one_device):
  ref = _reference(name)
  params, cfg = hf.load_hf(_fixture(name), one_device)
  n = ref["generated"].shape[1]
  eos = next(i for i in range(3, cfg.vocab_size) if i not in ref["generated"])  # so no row stops early
  out = sampling.generate(params, ref["input_ids"], ref["attention_mask"].astype(bool), jax.random.PRNGKey(0),
                          cfg, sampling.SamplingConfig(max_new_tokens=n, temperature=0.0), eos_id=eos, pad_id=0)
  np.testing.assert_array_equal(np.asarray(out.tokens_bn), ref["generated"])


@pytest.mark.parametrize("name", NAMES)
def test_import_of_export_is_bit_exact(name, one_device, tmp_path):
  params, cfg = hf.load_hf(_fixture(name), one_device)
  hf.save_hf(params, cfg, str(tmp_path / "out"), source=_fixture(name), max_shard_bytes=30_000)
  again, cfg_again = hf.load_hf(str(tmp_path / "out"), one_device)
  assert cfg_again == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)
  assert os.path.isfile(tmp_path / "out" / hf.INDEX)  # 30 kB shards: the sharded layout was written and read


def test_the_llama_fixture_is_sharded_and_other_names_are_what_transformers_wrote():
  assert os.path.isfile(os.path.join(_fixture("llama3"), hf.INDEX))
  cfg, _ = hf.read_config(_fixture("llama3"))
  assert cfg.rope_scaling == "llama3" and cfg.n_kv_heads < cfg.n_heads
  assert hf.read_config(_fixture("qwen3"))[0].d_head != 32 // 4
  assert hf.read_config(_fixture("mistral"))[0].sliding_window > 0
  assert hf.read_config(_fixture("qwen2"))[0].tie_embeddings


@pytest.mark.parametrize("mesh_shape", [dict(fsdp=4, tensor=2), dict(data=8)])
def test_import_on_eight_devices_places_the_same_values(mesh_shape, one_device):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
  for name in ("llama3", "gpt2"):
    single, _ = hf.load_hf(_fixture(name), one_device)
    placed, cfg = hf.load_hf(_fixture(name), mesh)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), single, placed)
    if "fsdp" in mesh_shape:
      # The big matrices are split 8 ways (embed over fsdp, the other axis over tensor), not replicated.
      assert sharding.largest_shard_fraction(placed["embed"]) <= 1 / 8 + 1e-9
      assert sharding.largest_shard_fraction(placed["layers"]["w_in"]) <= 1 / 8 + 1e-9
      assert sharding.largest_shard_fraction(placed["layers"]["wq"]) <= 1 / 8 + 1e-9
    axes = transformer.param_axes(cfg)
    want = sharding.tree_shardings(axes, placed, mesh, sharding.DEFAULT_RULES)
    jax.tree.map(lambda x, s: assert_same_sharding(x, s), placed, want)


def assert_same_sharding(x, s):
  assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the tensor or field; nothing placed before the checks pass.


def _copy(name, tmp_path):
  dst = str(tmp_path / name)
  shutil.copytree(_fixture(name), dst)
  return dst


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  c.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)


def _rewrite_tensors(path, edit):
  """Rewrite model.safetensors with edit(dict of numpy arrays) applied."""
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file)


def _one_line_error(path, one_device, *needles):
  with pytest.raises(hf.HFFormatError) as e:
    hf.load_hf(path, one_device)
  message = str(e.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message
  return message


def test_a_missing_tensor(tmp_path, one_device):
  path = _copy("qwen2", tmp_path)
  _rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  _one_line_error(path, one_device, "model.layers.1.self_attn.k_proj.bias", "missing")


def test_a_tensor_of_the_wrong_shape(tmp_path, one_device):
  path = _copy("qwen3", tmp_path)
  _rewrite_tensors(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((65, 32), np.float32)}))
  _one_line_error(path, one_device, "model.safetensors", "model.layers.0.mlp.up_proj.weight", "[65, 32]")


def test_an_unknown_architecture_and_an_unsupported_field(tmp_path, one_device):
  path = _copy("mistral", tmp_path)
  _edit_config(path, architectures=["FalconForCausalLM"])
  _one_line_error(path, one_device, "config.json", "FalconForCausalLM")
  path = _copy("llama3", tmp_path / "b")
  _edit_config(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  _one_line_error(path, one_device, "config.json", "rope_scaling", "yarn")
  path = _copy("gpt2", tmp_path / "c")
  _edit_config(path, some_new_switch=True)
  _one_line_error(path, one_device, "config.json", "some_new_switch")
  path = _copy("qwen2", tmp_path / "d")
  _edit_config(path, use_sliding_window=True)
  _one_line_error(path, one_device, "use_sliding_window")


def test_a_folder_without_config_json(tmp_path, one_device):
  os.makedirs(tmp_path / "empty")
  _one_line_error(str(tmp_path / "empty"), one_device, "config.json")


def test_a_truncated_safetensors_file(tmp_path, one_device):
  path = _copy("gpt2", tmp_path)
  file = os.path.join(path, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  _one_line_error(path, one_device, "model.safetensors", "truncated")
  with open(file, "r+b") as f:  # a header length beyond the file
    f.write(struct.pack("<Q", 10**9))
  _one_line_error(path, one_device, "model.safetensors", "truncated")


# ----------------------------------------------------------------------------------------------------------
# Export, checked by transformers itself in the peers' environment.


def _perturbed(params, seed):
  """The fixture's weights moved by a little noise, so the export is not a copy of what transformers wrote."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
                                   for x in leaves])


def test_export_loads_in_transformers_with_our_logits_and_normalised_rm_scores(one_device, tmp_path):
  jobs, expected = [], []
  for j, name in enumerate(NAMES):
    ref = _reference(name)
    params, cfg = hf.load_hf(_fixture(name), one_device)
    params = _perturbed(params, j)
    inputs = str(tmp_path / f"{name}_inputs.npz")
    np.savez(inputs, input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    real = ref["attention_mask"].astype(bool)

    policy_dir = str(tmp_path / f"{name}_policy")
    hf.save_hf(params, cfg, policy_dir, source=_fixture(name), max_shard_bytes=40_000)
    assert os.path.isfile(os.path.join(policy_dir, "generation_config.json"))  # copied from the source
    ours, _ = _forward(params, ref["input_ids"], cfg=cfg, mask_bt=ref["attention_mask"])
    jobs.append(dict(model=policy_dir, inputs=inputs, kind="causal_lm"))
    expected.append(("logits", np.asarray(ours)[real], real, None))

    rm = heads.init_rm_params(jax.random.PRNGKey(j), cfg, backbone=params)
    rm["norm"] = {"gain": jnp.asarray(1.7, jnp.float32), "bias": jnp.asarray(-0.4, jnp.float32)}
    rm["head"]["b"] = jnp.asarray(0.3, jnp.float32)
    rm_dir = str(tmp_path / f"{name}_rm")
    config = hf.save_hf(rm, cfg, rm_dir, kind="reward", source=_fixture(name))
    # GPT-2's final LayerNorm bias absorbs the constant; the RMSNorm families keep it beside the weights.
    assert ("rlhf_jax_score_bias" in config) == (name != "gpt2")
    scores = heads.scores(rm, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]), cfg)
    jobs.append(dict(model=rm_dir, inputs=inputs, kind="reward"))
    expected.append(("scores", np.asarray(scores), None, config.get("rlhf_jax_score_bias", 0.0)))

  for (key, want, real, bias), got, job in zip(expected, hf_helpers.transformers_outputs(jobs, tmp_path), jobs):
    values = got[key][real] if real is not None else got[key] + bias
    np.testing.assert_allclose(values, want, atol=1e-4, rtol=0, err_msg=job["model"])
