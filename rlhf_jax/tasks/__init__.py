"""The simulated-human task suite: a generated world, its corpus, demonstrators, gold scorer and labelers.

    world = World.generate(seed)                       # entities, facts, words (world.py)
    gold = GoldScorer(world)                           # gold.score(prompt, response) -> float (gold.py)
    pool = LabelerPool(n_labelers=8, noise=0.65)       # pool.rank(gold_scores, labeler_id, rng) (labelers.py)
    splits, stats = generate_splits(config)            # every split, deterministic in config.seed (suite.py)
    stats = storage.ensure_suite(config, workdir)      # TFDS ArrayRecord + stats.json (storage.py)

`storage` is not imported here: it needs tensorflow_datasets, the rest is pure Python/NumPy.
"""

from rlhf_jax.tasks.curation import curate, has_pii
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.labelers import (LabelerPool, bradley_terry, elo_ratings, gold_accuracy,
                                     plackett_luce_probability, ranking_pairs, sample_plackett_luce)
from rlhf_jax.tasks.suite import DataConfig, generate, generate_splits, make_labelers, make_world
from rlhf_jax.tasks.world import FAMILIES, Task, World

__all__ = [
    "DataConfig", "FAMILIES", "GoldScorer", "LabelerPool", "Task", "World", "bradley_terry", "curate",
    "elo_ratings", "generate", "generate_splits", "gold_accuracy", "has_pii", "make_labelers", "make_world",
    "plackett_luce_probability", "ranking_pairs", "sample_plackett_luce",
]
