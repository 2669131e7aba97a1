r"""The data stage: the simulated-human task suite (world, corpus, demonstrations, comparisons, prompts).

    python run.py --experiment=experiments/data/config.py:small --workdir=/tmp/data
    python run.py --experiment=experiments/data/config.py:tiny --workdir=/tmp/data_tiny
    python run.py --experiment=experiments/data/config.py:small --experiment.data.labeler_noise=0.3 --workdir=/tmp/d2

Writes TFDS ArrayRecord datasets suite_{pretrain,benchmark,sft,prompts,comparisons} and stats.json into
WORKDIR/data (or --experiment.data.data_dir). Pure Python/NumPy; a second run with the same config reuses
the data. Every knob is documented in rlhf_jax/tasks/suite.py (DataConfig); the preset sizes live in
rlhf_jax/configs.py (DATA_PRESETS), shared with the pipeline experiments.

Time on a 2-core laptop CPU: `small` about 5 s (generation about 1.5 s, the rest writing ArrayRecord files),
`tiny` about 1 s. Two runs with the same seed write byte-identical records (stats.json differs only in its
timings).

Expected stats.json (`small`, seed 0): 5000 pretraining documents (1.6 MB of text), 256 facts about 64
entities, 1000/100 SFT demonstrations (demonstrator accuracy 0.84, 18% multi-turn), 1000/100 comparisons
(K 4..9, about 21,400 ranked pairs), 800/100 RL prompts, 20 prompts of the world left unused; curation
removes exactly the planted 96 PII prompts, 160 near-duplicates and 90 over-quota prompts; labeler_agreement
0.74 (0.73 +- 0.02 over seeds; InstructGPT: about 0.73) and gold_ceiling_accuracy 0.80 (the best any reward
model can do on these labels).
Labeler noise -> agreement: 0.25 -> 0.85, 0.5 -> 0.77, 0.65 -> 0.73 (default), 1.0 -> 0.66, 1.5 -> 0.60.
"""

import ml_collections

from rlhf_jax import configs


def get_config(arg=None):
  """`arg` picks the preset: "small" (default) or "tiny"."""
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.seed = 0
  config.data = configs.data_config(arg or "small")
  return config
