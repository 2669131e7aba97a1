"""The mlm stage end to end on the shared tiny reference run (its data, tokenizer and pretrained decoder): a few
BERT steps and the cloze evaluation beside the decoder; what rm.backbone="encoder" picks; the preflight's errors."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from helpers import experiments, stage_runner
from rlhf_jax import pipeline, sharding, tokenizers, training
from rlhf_jax.evals import cloze as cloze_evals
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.tasks import cloze, suite

pytestmark = pytest.mark.xdist_group("mlm")  # its module fixture is built once, on one worker


def _config():
  """experiments/mlm's tiny preset with the reference run's overrides (stage_runner.TINY_FLAGS), shrunk."""
  c = experiments.config("mlm", "tiny")
  c.pretrain.train.steps = 8
  c.mlm.train.steps, c.mlm.train.log_every, c.mlm.train.eval_batches = 3, 1, 1
  c.mlm.cloze_items_per_kind = 4
  c.checkpoint.save_every = 100
  c.stages = ("mlm",)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  ref, _ = stage_runner.shared_reference(tmp_path_factory)
  workdir = stage_runner.copy_workdir(ref, str(tmp_path_factory.mktemp("mlm") / "w"))
  config = _config()
  summary = pipeline.run(config, workdir)
  return config, workdir, summary


def test_the_encoder_trains_and_its_cloze_numbers_are_what_its_choices_give(run):
  config, workdir, summary = run
  with open(os.path.join(workdir, "mlm", "summary.json")) as f:
    mlm = json.load(f)
  assert mlm["step"] == 3 and np.isfinite(mlm["val_mlm_loss"]) and mlm["val_masked_tokens"] > 0
  assert mlm["mask_id"] == 262
  with open(os.path.join(workdir, "pretrain", "summary.json")) as f:
    assert mlm["num_params"] == json.load(f)["num_params"]  # the same parameter count as the decoder
  manifest = training.read_manifest(os.path.join(workdir, "mlm"))
  assert manifest["model"].causal is False
  rows = [json.loads(line) for line in open(os.path.join(workdir, "mlm", "cloze.jsonl"))]
  assert len(rows) == mlm["n_cloze_items"] == 12
  for name in ("encoder", "decoder", "unigram"):
    for kind in ("value", "entity", "prompt", "all"):
      of_kind = [r for r in rows if kind in ("all", r["kind"])]
      want = np.mean([r[name] in r["answers"] for r in of_kind])
      np.testing.assert_allclose(mlm[f"cloze_{name}_{kind}"], want)
  # The encoder's written choices are the argmax of its scores, recomputed here from the exported parameters.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params, cfg, _ = training.load_export(os.path.join(workdir, "mlm"), mesh, sharding.DEFAULT_RULES)
  world = suite.make_world(config.seed, suite.DataConfig.from_config(config.data))
  items = cloze.subsample(cloze.items(world), 4)[:3]
  scores = cloze_evals.score_items(jax.jit(lambda p, b: cloze_evals.encoder_scores(p, b, cfg)), params,
                                   tokenizers.ByteTokenizer(), items, mask_id=262, batch_size=32, mesh=mesh,
                                   rules=sharding.DEFAULT_RULES)
  for item, s, row in zip(items, scores, rows):
    assert item.text == row["text"] and item.candidates[int(np.argmax(s))].strip() == row["encoder"]
  section = open(os.path.join(workdir, "mlm", "report_section.md")).read()
  assert section.startswith("## Masked-LM encoder") and f"{mlm['cloze_encoder_all']:.3f}" in section
  assert summary["mlm.val_mlm_loss"] == mlm["val_mlm_loss"]


def test_rm_backbone_encoder_is_the_policy_s_architecture_without_the_causal_mask():
  """The encoder RM trains end to end in experiments/mlm (README.md there); here, cheaply, what the switch picks."""
  config = _config()
  decoder = rm_stage.rm_model_config(config, 264)
  config.rm.backbone = "encoder"
  encoder = rm_stage.rm_model_config(config, 264)
  assert decoder.causal and encoder == dataclasses.replace(decoder, causal=False)
  assert encoder.num_params() == decoder.num_params()


@pytest.mark.parametrize("field,value,message", [
    ("mlm.select_rate", 1.5, r"mlm.select_rate=1.5: expected a probability"),
    ("mlm.mask_fraction", 0.95, r"mlm.mask_fraction=0.95 \+ mlm.random_fraction=0.1 exceeds 1"),
    ("mlm.train.steps", 0, r"mlm.train.steps=0"),
    ("model.sliding_window", 4, r"mlm: the encoder is config.model with causal=False: model.sliding_window"),
    ("rm.backbone", "bert", r"rm.backbone='bert': expected 'decoder' or 'encoder'"),
    ("mlm.select_rate", 0.0, r"mlm.select_rate=0: no token would be predicted"),
])
def test_preflight_names_the_field(field, value, message):
  config = _config()
  block, _, name = field.rpartition(".")
  node = config
  for part in block.split("."):
    node = node[part]
  node[name] = value
  stages = ("mlm",) if field.startswith(("mlm", "model")) else ("rm",)
  config.stages = stages
  with pytest.raises(ValueError, match=message):
    pipeline.preflight(config)


def test_an_encoder_rm_of_another_size_is_refused():
  config = _config()
  config.rm.backbone, config.rm.model_size = "encoder", "tiny"
  config.stages = ("rm",)
  with pytest.raises(ValueError, match="rm.backbone='encoder' starts from the mlm stage's encoder"):
    pipeline.preflight(config)
