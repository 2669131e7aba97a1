"""`--experiment.init.hf_path`: the pipeline starts from an imported Hugging Face model.

With pretrain.train.steps=0 the pretrain stage only imports (its export is the imported weights, bit for bit);
with steps > 0 it continues pretraining from them (here); SFT and later stages inherit the imported architecture
and, with tokenizer.kind="hf", its tokenizer and chat template, and the export stage writes a folder transformers
loads (tests/stages/real_data_test.py, on experiments/tldr's smoke preset). A broken folder fails the preflight
before anything is written into the workdir.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import experiments, stage_runner
from rlhf_jax import pipeline, runtime, sharding, training
from rlhf_jax.models import hf, transformer

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
  # In a subprocess on one device (as a user runs it), which compiles faster than the 8 simulated devices.
  workdir = str(tmp_path / "w")
  proc = stage_runner.run(workdir, *(f"--experiment.stages={s}" for s in ("data", "pretrain")),
                          f"--experiment.init.hf_path={hf_model}", "--experiment.pretrain.train.steps=3",
                          cache_dir=str(tmp_path / "xla_cache"), base_flags=stage_runner.TINY_FLAGS[:1])
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["pretrain.step"] == 3
  imported, cfg = hf.load_hf(hf_model, sharding.make_mesh(devices=jax.devices()[:1]))
  trained, _ = _load(workdir, "pretrain", cfg)
  # Three small steps from the import: close to it, but moved (a fresh init would be far from it).
  diff = np.abs(np.asarray(trained["embed"]) - np.asarray(imported["embed"])).max()
  assert 0 < diff < 0.05, diff


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


# The imported model's own tokenizer through SFT and export, and the export loaded by transformers: the
# experiments/tldr smoke run of tests/stages/real_data_test.py.
