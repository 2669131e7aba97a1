"""`--experiment.init.hf_path`: the pipeline starts from an imported Hugging Face model.

With pretrain.train.steps=0 the pretrain stage only imports (its export is the imported weights, bit for bit);
with steps > 0 it continues pretraining from them; SFT and later stages inherit the imported architecture and,
with tokenizer.kind="hf", its tokenizer and chat template; the export stage writes a folder transformers loads. A
broken folder fails the preflight before anything is written into the workdir.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import experiments
from rlhf_jax import pipeline, runtime, sharding, tokenizers, training
from rlhf_jax.models import hf, transformer
from helpers import hf_helpers

# A Qwen 2.5-shaped model (SwiGLU, GQA, q/k/v biases, tied embeddings) big enough for the byte tokenizer.
QWEN = transformer.ModelConfig(family="qwen2", vocab_size=416, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=64, max_len=160, mlp="swiglu", qkv_bias=True, tie_embeddings=True,
                               norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf") / "qwen")
  params = transformer.init(jax.random.PRNGKey(3), QWEN)
  hf.save_hf(params, QWEN, path, pad_token_id=0)
  # The ChatML tokenizer fixture (405 tokens) beside the weights, as a real Qwen folder has its own.
  chatml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hf_tokenizers",
                        "chatml")
  for name in os.listdir(chatml):
    if name != "config.json":
      shutil.copy(os.path.join(chatml, name), path)
  return path


def _config(hf_path, stages, pretrain_steps):
  config = experiments.config("instructgpt", "tiny")
  config.stages = stages
  config.init.hf_path = hf_path
  config.pretrain.train.steps = pretrain_steps
  config.sft.train.steps = 2
  config.eval.n_prompts = 8
  return config


def _load(workdir, name, cfg):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, got, _ = training.load_export(os.path.join(workdir, name), mesh, sharding.DEFAULT_RULES)
  return params, got


def test_pretraining_continues_from_the_import(hf_model, tmp_path):
  workdir = str(tmp_path / "w")
  summary = pipeline.run(_config(hf_model, ("data", "pretrain"), 3), workdir)
  imported, cfg = hf.load_hf(hf_model, sharding.make_mesh(devices=jax.devices()[:1]))
  trained, _ = _load(workdir, "pretrain", cfg)
  # Three small steps from the import: close to it, but moved (a fresh init would be far from it).
  diff = np.abs(np.asarray(trained["embed"]) - np.asarray(imported["embed"])).max()
  assert 0 < diff < 0.05, diff
  assert summary["pretrain.step"] == 3


def test_a_broken_folder_fails_before_anything_is_written(hf_model, tmp_path):
  broken = str(tmp_path / "broken")
  os.makedirs(broken)
  for name in os.listdir(hf_model):
    os.link(os.path.join(hf_model, name), os.path.join(broken, name)) if name != "model.safetensors" else None
  with open(os.path.join(hf_model, "model.safetensors"), "rb") as f:
    data = f.read()
  with open(os.path.join(broken, "model.safetensors"), "wb") as f:
    f.write(data[:-64])
  workdir = str(tmp_path / "w")
  with pytest.raises(hf.HFFormatError, match="model.safetensors.*truncated"):
    pipeline.run(_config(broken, ("data", "pretrain", "sft"), 0), workdir)
  assert not os.path.exists(workdir) or not os.listdir(workdir)
  # The same through policy_config's vocabulary check: a model smaller than the tokenizer is refused.
  with pytest.raises(ValueError, match="vocab_size=416 is smaller than the tokenizer's 500"):
    runtime.policy_config(_config(hf_model, ("pretrain",), 0), 500)


def test_the_model_s_own_tokenizer_through_sft_then_export_that_transformers_loads(hf_model, tmp_path):
  workdir = str(tmp_path / "w")
  config = _config(hf_model, ("data", "pretrain", "sft", "export"), 0)
  config.tokenizer.kind = "hf"  # tokenizer.path "" = init.hf_path's tokenizer.json and chat template
  # The reward model's export through the pipeline is tests/stages/real_data_test.py's (and save_hf's,
  # tests/models/hf_test.py's); here the policy only.
  config.export.policy_from, config.export.rm_from = "sft", ""
  pipeline.run(config, workdir)
  # pretrain.train.steps=0: the stage only imported; its export is the imported weights, bit for bit.
  imported, cfg = hf.load_hf(hf_model, sharding.make_mesh(devices=jax.devices()[:1]))
  exported, exported_cfg = _load(workdir, "pretrain", cfg)
  assert exported_cfg == dataclasses.replace(cfg, dtype="float32")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), imported, exported)
  sft_params, sft_cfg = _load(workdir, "sft", cfg)
  assert sft_cfg.family == "qwen2" and sft_cfg.qkv_bias and "bq" in sft_params["layers"]
  assert not np.array_equal(np.asarray(sft_params["layers"]["w_in"]), np.asarray(imported["layers"]["w_in"]))
  with open(os.path.join(workdir, "sft", "export.json")) as f:
    manifest = json.load(f)
  assert manifest["tokenizer"]["kind"] == "hf"
  tok = tokenizers.load_from_dir(os.path.join(workdir, "sft"), manifest["tokenizer"])
  ids, mask = tokenizers.encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
  text = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
  assert text == "yo<|im_end|>", text  # ChatML: the reply and its end-of-turn token are what SFT trains on
  assert tok.decode([tok.eos_id], skip_special=False) == "<|im_end|>"  # what sampling stops on

  # The exported folder, loaded by transformers (the peers' environment): the SFT policy's logits are ours.
  policy_dir = os.path.join(workdir, "export", "policy")
  assert os.path.isfile(os.path.join(policy_dir, "tokenizer.json"))  # the imported model's tokenizer travels
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  prompts = [tokenizers.encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("Hello there", "2+2?")]
  width = max(map(len, prompts))
  ids = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts], np.int32)
  mask = (np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None]).astype(np.int32)
  np.savez(tmp_path / "inputs.npz", input_ids=ids, attention_mask=mask)
  got = hf_helpers.transformers_outputs([dict(model=policy_dir, inputs=str(tmp_path / "inputs.npz"),
                                              kind="causal_lm")], tmp_path)
  sft, sft_cfg, _ = training.load_export(os.path.join(workdir, "sft"), mesh, sharding.DEFAULT_RULES)
  ours, _ = transformer.forward(sft, ids, sft_cfg, mask_bt=mask)
  np.testing.assert_allclose(got[0]["logits"][mask.astype(bool)], np.asarray(ours)[mask.astype(bool)], atol=1e-4)
