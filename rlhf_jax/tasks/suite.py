"""Every split of the simulated-human task suite, generated deterministically from a seed.

`generate_splits(config)` returns plain JSON-able records:

    pretrain, pretrain_val      {"text"}                                       pretraining corpus (corpus.py)
    benchmark                   {"prompt", "answer", "kind"}                   the skill behind the alignment tax
    sft, sft_val                {"turns", "user_id", "family"}                 chat demonstrations
    prompts, prompts_val        {"turns", "prompt", "family", "user_id", "reference"}   prompts for RL / eval
    comparisons, comparisons_val {"prompt_turns", "prompt", "family", "user_id", "responses", "ranks",
                                  "labeler_id", "gold_scores"}                 K ranked responses per prompt

Turns are [{"role": "user" | "assistant", "content": str}, ...]; "prompt" is the last user message, which
is what the gold scorer parses. Prompt turns end with a user turn; a multi-turn prompt holds an earlier
question and its reference answer.

How the prompts are made (InstructGPT sec. 3.2 in miniature): a pool of distinct prompts of five families
(fact, arithmetic, string, unanswerable, harmful) is drawn without replacement from everything the world can
ask, spread over user ids, and mixed with planted problems: near-duplicates (an earlier prompt with
"Thanks!" appended), prompts with an e-mail address or phone number, and a few heavy users with more prompts
than the per-user cap. `curation.curate` then removes them; the pool is built so that exactly the planted
prompts are removed, and the stats report both counts. Validation prompts come from held-out users, so no
validation prompt (or user) is seen in training; the SFT, comparison and RL prompts are disjoint.

Random streams: each part of the suite draws from its own `SeedSequence(seed, spawn_key=(n,))`, so changing
one size (say the number of pretraining documents) leaves every other split unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax.tasks import corpus
from rlhf_jax.tasks import curation
from rlhf_jax.tasks import demonstrator as demo
from rlhf_jax.tasks import language as lang
from rlhf_jax.tasks import labelers as labelers_lib
from rlhf_jax.tasks import multistep
from rlhf_jax.tasks.gold import GoldScorer
from rlhf_jax.tasks.world import FAMILIES, Task, World

SUITE_VERSION = "1.0.0"  # bump when the generator changes what a config produces
STAGE_FIELDS = ("data_dir", "overwrite")
SPLITS = ("pretrain", "pretrain_val", "benchmark", "sft", "sft_val", "prompts", "prompts_val", "comparisons",
          "comparisons_val")
_EMAIL_NAMES = ("mira", "tom", "ana", "li", "sam", "noor", "kai", "eva")
_EMAIL_HOSTS = ("zmail.com", "mailbox.org", "example.net")
_PII_TEMPLATES = ("My email is {email}. {q}", "{q} My phone is {phone}.", "{q} Call me at {phone}.",
                  "{q} You can write to {email}.", "I am {email} and I ask: {q}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Every size and knob of the suite. Defaults are the `small` preset of experiments/data/config.py."""

  # The world.
  n_entities: int = 64
  n_unknown_entities: int = 32
  n_words: int = 48
  max_number: int = 20  # sums and differences of numbers 0..max_number
  max_factor: int = 10  # products of numbers 0..max_factor
  # Pretraining corpus and benchmark.
  n_pretrain_docs: int = 5000
  n_pretrain_val_docs: int = 250
  max_sections: int = 3
  qa_error_rate: float = 0.2  # wrong answers in the forum Q&A sections
  n_benchmark_arithmetic: int = 100
  # Prompts and curation.
  family_weights: tuple[tuple[str, float], ...] = (
      ("fact", 0.34), ("arithmetic", 0.22), ("string", 0.16), ("unanswerable", 0.14), ("harmful", 0.14))
  multi_turn_rate: float = 0.2
  max_prompts_per_user: int = 20
  prefix_dedup_chars: int = 40
  near_dup_rate: float = 0.05
  pii_rate: float = 0.03
  n_heavy_users: int = 3
  heavy_user_prompts: int = 50
  # SFT demonstrations.
  n_sft: int = 1000
  n_sft_val: int = 100
  demo_accuracy: float = 0.85
  demo_verbose_rate: float = 0.15
  # RL prompts.
  n_prompts: int = 800
  n_prompts_val: int = 100
  # Comparisons.
  n_comparisons: int = 600
  n_comparisons_val: int = 100
  k_min: int = 4
  k_max: int = 9
  skill_min: float = 0.2  # accuracy of the worst comparison demonstrator
  skill_max: float = 0.95
  comparison_verbose_rate: float = 0.25
  # Labelers.
  n_labelers: int = 8
  labeler_noise: float = labelers_lib.DEFAULT_NOISE
  labeler_noise_spread: float = 0.2
  labeler_length_bias: float = 0.1
  # Multi-step questions (rlhf_jax/tasks/multistep.py), opt-in: pretraining documents of their training items
  # (appended to the pretrain split) and step-by-step SFT demonstrations (appended to sft, a tenth as many to
  # sft_val). At 0 they are left out of the fingerprint, so every suite generated before them is unchanged.
  n_multistep_docs: int = 0
  n_multistep_sft: int = 0

  def __post_init__(self):
    def check(cond, field, expected):
      if not cond:
        raise ValueError(f"data.{field}={getattr(self, field)!r}: expected {expected}")
    check(2 <= self.k_min <= self.k_max, "k_min", f"2 <= k_min <= k_max (k_max={self.k_max})")
    for f in ("demo_accuracy", "demo_verbose_rate", "qa_error_rate", "multi_turn_rate", "near_dup_rate",
              "pii_rate", "skill_min", "skill_max", "comparison_verbose_rate"):
      check(0.0 <= getattr(self, f) <= 1.0, f, "a probability in [0, 1]")
    check(self.skill_min <= self.skill_max, "skill_min", f"<= data.skill_max={self.skill_max}")
    for f in ("n_pretrain_docs", "n_pretrain_val_docs", "n_sft", "n_sft_val", "n_prompts", "n_prompts_val",
              "n_comparisons", "n_comparisons_val", "max_sections"):
      check(getattr(self, f) >= 1, f, "at least 1")
    check(self.n_heavy_users >= 0, "n_heavy_users", ">= 0")
    for f in OPT_IN_FIELDS:
      check(getattr(self, f) >= 0, f, ">= 0 (0: off)")
    check(self.n_heavy_users == 0 or self.heavy_user_prompts > self.max_prompts_per_user, "heavy_user_prompts",
          f"more than data.max_prompts_per_user={self.max_prompts_per_user} (heavy users exceed the cap)")
    # Canonical order, so that the same weights given in another order generate the same suite (the
    # fingerprint, a sorted JSON dump, cannot tell the orders apart).
    order = {f: i for i, f in enumerate(FAMILIES)}
    object.__setattr__(self, "family_weights", tuple(
        (str(n), float(w)) for n, w in sorted(self.family_weights, key=lambda nw: order.get(nw[0], len(order)))))
    names = [n for n, _ in self.family_weights]
    check(sorted(names) == sorted(FAMILIES) and all(w >= 0 for _, w in self.family_weights)
          and sum(w for _, w in self.family_weights) > 0, "family_weights",
          f"a non-negative weight for each of {FAMILIES}")

  @classmethod
  def from_config(cls, data: Mapping[str, Any] | Any) -> DataConfig:
    """From `config.data` (a ConfigDict or dict); unknown fields are an error naming them."""
    items = dict(data.to_dict() if hasattr(data, "to_dict") else data)
    known = {f.name for f in dataclasses.fields(cls)}
    # data_dir and overwrite say where and whether to write, not what: they are not part of the suite.
    extra = sorted(set(items) - known - set(STAGE_FIELDS))
    if extra:
      raise ValueError(f"config.data has unknown fields {extra}; expected fields of DataConfig: {sorted(known)}")
    for f in STAGE_FIELDS:
      items.pop(f, None)
    if isinstance(items.get("family_weights"), Mapping):
      items["family_weights"] = tuple((k, float(v)) for k, v in items["family_weights"].items())
    return cls(**items)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["family_weights"] = {k: v for k, v in self.family_weights}
    for f, default in OPT_IN_FIELDS.items():  # off: not part of what the suite is (the fingerprint stays)
      if out[f] == default:
        del out[f]
    return out


# Opt-in fields and their "off" value: to_json leaves them out when off.
OPT_IN_FIELDS = {"n_multistep_docs": 0, "n_multistep_sft": 0}


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def make_world(seed: int, cfg: DataConfig) -> World:
  return World.generate(seed, n_entities=cfg.n_entities, n_unknown_entities=cfg.n_unknown_entities,
                        n_words=cfg.n_words, max_number=cfg.max_number, max_factor=cfg.max_factor)


def make_labelers(seed: int, cfg: DataConfig) -> labelers_lib.LabelerPool:
  return labelers_lib.LabelerPool(cfg.n_labelers, noise=cfg.labeler_noise, noise_spread=cfg.labeler_noise_spread,
                                  length_bias=cfg.labeler_length_bias, seed=seed)


def fingerprint(seed: int, cfg: DataConfig) -> str:
  """Identifies what a (seed, config) generates: a hash of both and the suite version."""
  blob = json.dumps({"seed": seed, "data": cfg.to_json(), "version": SUITE_VERSION}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(splits: Mapping[str, list[dict[str, Any]]]) -> str:
  return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# The prompt pool.


def _quotas(total: int, weights: tuple[tuple[str, float], ...]) -> dict[str, int]:
  """Largest-remainder split of `total` by weight (deterministic)."""
  w = np.array([x for _, x in weights], dtype=np.float64)
  raw = total * w / w.sum()
  base = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - base), kind="stable")[: total - base.sum()]:
    base[i] += 1
  return {name: int(n) for (name, _), n in zip(weights, base)}


def follow_up(prompt: str) -> str:
  return lang.FOLLOW_UP_PREFIX + prompt[:1].lower() + prompt[1:]


def _first_turn(world: World, task: Task, rng: np.random.Generator) -> tuple[str, Task]:
  """An earlier question for a multi-turn prompt, on the same subject as the follow-up when there is one."""
  choice = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
  if task.family in ("fact", "unanswerable", "harmful"):
    attr = choice([a for a in lang.ATTRIBUTES if a != task.kind])
    return choice(lang.FACT_PROMPTS[attr]).format(e=task.entity), world.fact_task(task.entity, attr)
  if task.family == "arithmetic":
    op = choice(tuple(lang.ARITHMETIC_PROMPTS))
    a, b = choice(world.operand_pairs(op))
    return choice(lang.ARITHMETIC_PROMPTS[op]).format(a=a, b=b), world.arithmetic_task(op, a, b)
  op = choice([o for o in lang.STRING_PROMPTS if o != task.kind])
  return choice(lang.STRING_PROMPTS[op]).format(w=task.word), world.string_task(op, task.word)


def _clean_pool(world: World, cfg: DataConfig, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
  """n distinct prompts, no two colliding under the prefix rule, families by weight, in random order."""
  index = curation.PrefixIndex(cfg.prefix_dedup_chars)
  pool = []
  for family, quota in _quotas(n, cfg.family_weights).items():
    space = list(world.prompt_space(family))
    taken = 0
    for i in rng.permutation(len(space)):
      if taken == quota:
        break
      text, task = space[i]
      first = None
      if rng.random() < cfg.multi_turn_rate:
        first, text = _first_turn(world, task, rng), follow_up(text)
      if index.collides(text):
        continue
      index.add(text)
      taken += 1
      turns = [{"role": "user", "content": text}]
      if first is not None:
        turns = [{"role": "user", "content": first[0]}, {"role": "assistant", "content": first[1].reference}] + turns
      pool.append({"turns": turns, "prompt": text, "family": task.family, "reference": task.reference})
    if taken < quota:
      raise ValueError(
          f"the world has only {taken} distinct {family!r} prompts but the splits need {quota}: lower data.n_sft, "
          "data.n_comparisons, data.n_prompts (or their _val) or grow the world (data.n_entities, "
          "data.n_unknown_entities, data.n_words, data.max_number)")
  return [pool[i] for i in rng.permutation(len(pool))]


def _with_last_user(record: dict[str, Any], text: str) -> dict[str, Any]:
  turns = [dict(t) for t in record["turns"]]
  turns[-1]["content"] = text
  return {**record, "turns": turns, "prompt": text}


def build_prompt_pool(world: World, cfg: DataConfig, n_needed: int,
                      rng: np.random.Generator) -> tuple[list[dict[str, Any]], dict[str, int], set[str]]:
  """(raw submitted prompts: clean ones plus planted problems, in order; planted counts; heavy user ids)."""
  cap = cfg.max_prompts_per_user
  n_over = cfg.n_heavy_users * (cfg.heavy_user_prompts - cap)
  clean = _clean_pool(world, cfg, n_needed + n_over, rng)
  n = len(clean)
  # Users: heavy users own random prompts; the rest are cut into runs of 1..cap//2 per user.
  heavy_slots = rng.permutation(n)[: cfg.n_heavy_users * cfg.heavy_user_prompts]
  owner = np.full(n, -1)
  for h in range(cfg.n_heavy_users):
    owner[heavy_slots[h * cfg.heavy_user_prompts:(h + 1) * cfg.heavy_user_prompts]] = h
  n_users = cfg.n_heavy_users
  left = [i for i in range(n) if owner[i] < 0]
  pos = 0
  while pos < len(left):
    size = 1 + int(rng.integers(max(1, cap // 2)))
    owner[left[pos:pos + size]] = n_users
    n_users, pos = n_users + 1, pos + size
  n_normal = n_users - cfg.n_heavy_users
  ids = rng.permutation(n_users + 1000)[:n_users]  # user ids do not reveal who is heavy
  user_id = lambda u: f"user{int(ids[u]):05d}"  # noqa: E731
  keyed = [((float(i), 0), {**p, "user_id": user_id(int(owner[i]))}) for i, p in enumerate(clean)]
  normal_user = lambda: user_id(cfg.n_heavy_users + int(rng.integers(max(n_normal, 1))))  # noqa: E731

  n_dup = int(round(cfg.near_dup_rate * n))
  for i in sorted(rng.permutation(n)[:n_dup].tolist()):
    suffix = lang.NEAR_DUP_SUFFIXES[int(rng.integers(len(lang.NEAR_DUP_SUFFIXES)))]
    dup = _with_last_user(clean[i], clean[i]["prompt"] + suffix)
    keyed.append(((i + float(rng.uniform(0.01, n - i)), 1), {**dup, "user_id": normal_user()}))
  n_pii = int(round(cfg.pii_rate * n))
  for i in sorted(rng.permutation(n)[:n_pii].tolist()):
    email = f"{lang.WORDS[int(rng.integers(len(lang.WORDS)))]}.{_EMAIL_NAMES[int(rng.integers(8))]}" \
            f"{int(rng.integers(100))}@{_EMAIL_HOSTS[int(rng.integers(3))]}"
    phone = f"{int(rng.integers(200, 999))}-{int(rng.integers(100, 999))}-{int(rng.integers(1000, 9999))}"
    template = _PII_TEMPLATES[int(rng.integers(len(_PII_TEMPLATES)))]
    pii = _with_last_user(clean[i], template.format(q=clean[i]["prompt"], email=email, phone=phone))
    keyed.append(((float(rng.uniform(0, n)), 2), {**pii, "user_id": normal_user()}))
  keyed.sort(key=lambda kv: kv[0])
  planted = {"planted_near_duplicates": n_dup, "planted_pii": n_pii, "planted_over_quota": n_over,
             "n_users": n_users, "n_heavy_users": cfg.n_heavy_users}
  return [p for _, p in keyed], planted, {user_id(h) for h in range(cfg.n_heavy_users)}


def _split_by_user(kept: list[dict[str, Any]], n_val: int, heavy_users: set[str],
                   rng: np.random.Generator) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Held-out users for validation (InstructGPT splits by user id); heavy users stay in training."""
  users = sorted({p["user_id"] for p in kept} - heavy_users)
  counts: dict[str, int] = {}
  for p in kept:
    counts[p["user_id"]] = counts.get(p["user_id"], 0) + 1
  val_users, n = set(), 0
  for u in (users[i] for i in rng.permutation(len(users))):
    if n >= n_val:
      break
    val_users.add(u)
    n += counts[u]
  return [p for p in kept if p["user_id"] not in val_users], [p for p in kept if p["user_id"] in val_users]


# ------------------------------------------------------------------------------------------------------------
# Records.


def sft_record(world: World, prompt: dict[str, Any], cfg: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
  """A demonstration: the careful demonstrator answers every user turn of the prompt."""
  turns = []
  for t in prompt["turns"]:
    if t["role"] == "user":
      turns.append(dict(t))
      response, _ = demo.demonstrate(world, world.parse(t["content"]), rng, accuracy=cfg.demo_accuracy,
                                     verbose_rate=cfg.demo_verbose_rate)
      turns.append({"role": "assistant", "content": response})
  return {"turns": turns, "user_id": prompt["user_id"], "family": prompt["family"]}


def comparison_record(world: World, gold: GoldScorer, pool: labelers_lib.LabelerPool, prompt: dict[str, Any],
                      cfg: DataConfig, rng: np.random.Generator) -> dict[str, Any]:
  """K responses by demonstrators of random skill, ranked by one random labeler."""
  task = world.parse(prompt["prompt"])
  k = int(rng.integers(cfg.k_min, cfg.k_max + 1))
  responses: list[str] = []
  for _ in range(k):
    for _ in range(8):  # distinct responses where possible: a duplicate pair carries no preference
      skill = float(rng.uniform(cfg.skill_min, cfg.skill_max))
      text, _ = demo.demonstrate(world, task, rng, accuracy=skill, verbose_rate=cfg.comparison_verbose_rate,
                                 careless=True)
      if text not in responses:
        break
    responses.append(text)
  scores = np.array([gold.score(prompt["prompt"], r) for r in responses])
  labeler_id = int(rng.integers(pool.n_labelers))
  ranks = pool.rank_responses(scores, responses, labeler_id, rng)
  return {"prompt_turns": prompt["turns"], "prompt": prompt["prompt"], "family": prompt["family"],
          "user_id": prompt["user_id"], "responses": responses, "ranks": [int(r) for r in ranks],
          "labeler_id": labeler_id, "gold_scores": [float(s) for s in scores]}


def _prompt_record(p: dict[str, Any]) -> dict[str, Any]:
  return {"turns": p["turns"], "prompt": p["prompt"], "family": p["family"], "user_id": p["user_id"],
          "reference": p["reference"]}


def generate_splits(config: Any) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
  """(splits, stats) for an experiment config with `.seed` and `.data` (see experiments/data/config.py)."""
  return generate(int(config.seed), DataConfig.from_config(config.data))


def generate(seed: int, cfg: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
  """(splits, stats). Deterministic: the same seed and config give identical splits (stats["content_sha256"])."""
  start = time.perf_counter()
  world = make_world(seed, cfg)
  gold = GoldScorer(world)
  pool = make_labelers(seed, cfg)

  # Prompts: pool -> curation -> held-out users -> stages.
  n_train = cfg.n_sft + cfg.n_comparisons + cfg.n_prompts
  n_val = cfg.n_sft_val + cfg.n_comparisons_val + cfg.n_prompts_val
  # Slack: the held-out users' last user can push the validation share past n_val by < cap prompts.
  raw, planted, heavy = build_prompt_pool(world, cfg, n_train + n_val + cfg.max_prompts_per_user, _rng(seed, 2))
  kept, cur = curation.curate(raw, prefix_chars=cfg.prefix_dedup_chars, max_per_user=cfg.max_prompts_per_user)
  train, val = _split_by_user(kept, n_val, heavy, _rng(seed, 10))
  if len(train) < n_train or len(val) < n_val:
    raise ValueError(f"prompt pool too small after curation: {len(train)} train / {len(val)} validation prompts "
                     f"for {n_train} / {n_val} needed; raise data.max_prompts_per_user or lower the counts")
  a, b = cfg.n_sft, cfg.n_sft + cfg.n_comparisons
  av, bv = cfg.n_sft_val, cfg.n_sft_val + cfg.n_comparisons_val

  splits: dict[str, list[dict[str, Any]]] = {}
  splits["pretrain"] = corpus.pretrain_documents(world, cfg.n_pretrain_docs, _rng(seed, 3),
                                                 qa_error_rate=cfg.qa_error_rate, max_sections=cfg.max_sections)
  splits["pretrain_val"] = corpus.pretrain_documents(world, cfg.n_pretrain_val_docs, _rng(seed, 4),
                                                     qa_error_rate=cfg.qa_error_rate, max_sections=cfg.max_sections)
  splits["benchmark"] = corpus.benchmark(world, cfg.n_benchmark_arithmetic, _rng(seed, 5))
  rng_sft = _rng(seed, 6)
  splits["sft"] = [sft_record(world, p, cfg, rng_sft) for p in train[:a]]
  splits["sft_val"] = [sft_record(world, p, cfg, rng_sft) for p in val[:av]]
  rng_cmp = _rng(seed, 8)
  splits["comparisons"] = [comparison_record(world, gold, pool, p, cfg, rng_cmp) for p in train[a:b]]
  splits["comparisons_val"] = [comparison_record(world, gold, pool, p, cfg, rng_cmp) for p in val[av:bv]]
  splits["prompts"] = [_prompt_record(p) for p in train[b:n_train]]
  splits["prompts_val"] = [_prompt_record(p) for p in val[bv:n_val]]
  if cfg.n_multistep_docs:  # opt-in streams of their own: every split above is as without them
    splits["pretrain"] += multistep.multistep_documents(world, cfg.n_multistep_docs, _rng(seed, 11))
  if cfg.n_multistep_sft:
    rng_ms = _rng(seed, 12)
    splits["sft"] += multistep.sft_records(world, cfg.n_multistep_sft, rng_ms, user_id="multistep")
    splits["sft_val"] += multistep.sft_records(world, max(1, cfg.n_multistep_sft // 10), rng_ms,
                                               user_id="multistep")

  stats = suite_stats(splits, world, gold, pool, cfg, seed)
  stats.update({f"curation_{k}": v for k, v in cur.items()})
  stats.update({f"curation_{k}": v for k, v in planted.items()})
  stats["n_unused_prompts"] = len(train) - n_train + len(val) - n_val
  stats["content_sha256"] = content_hash(splits)
  stats["generation_s"] = round(time.perf_counter() - start, 3)
  return splits, dict(sorted(stats.items()))


def suite_stats(splits: Mapping[str, list[dict[str, Any]]], world: World, gold: GoldScorer,
                pool: labelers_lib.LabelerPool, cfg: DataConfig, seed: int) -> dict[str, Any]:
  """Counts, demonstrator accuracy, labeler agreement and the gold ceiling, measured on the splits."""
  stats: dict[str, Any] = {"seed": seed, "suite_version": SUITE_VERSION, "fingerprint": fingerprint(seed, cfg)}
  for name in SPLITS:
    stats[f"n_{name}"] = len(splits[name])
  stats["pretrain_chars"] = sum(len(r["text"]) for r in splits["pretrain"])
  stats["pretrain_val_chars"] = sum(len(r["text"]) for r in splits["pretrain_val"])
  stats["n_entities"], stats["n_facts"] = len(world.entities), len(world.entities) * len(lang.ATTRIBUTES)

  demos = [(r["turns"][-2]["content"], r["turns"][-1]["content"]) for r in splits["sft"] + splits["sft_val"]
           if r["family"] in FAMILIES]  # the gold scorer judges the world's families (not "multistep")
  stats["demo_accuracy_measured"] = float(np.mean([gold.is_correct(p, r) for p, r in demos]))
  stats["demo_gold_mean"] = float(np.mean([gold.score(p, r) for p, r in demos]))
  stats["sft_multi_turn_fraction"] = float(np.mean([len(r["turns"]) > 2 for r in splits["sft"]
                                                    if r["family"] in FAMILIES]))
  if cfg.n_multistep_docs or cfg.n_multistep_sft:
    stats["n_multistep_docs"], stats["n_multistep_sft"] = cfg.n_multistep_docs, cfg.n_multistep_sft
  prompts = splits["prompts"] + splits["prompts_val"]
  stats["reference_gold_mean"] = float(np.mean([gold.score(p["prompt"], p["reference"]) for p in prompts]))
  stats["prompt_families"] = {f: sum(p["family"] == f for p in splits["prompts"]) for f in FAMILIES}

  comparisons = splits["comparisons"] + splits["comparisons_val"]
  gold_sets = [np.array(c["gold_scores"]) for c in comparisons]
  lengths = [np.array([len(r) for r in c["responses"]]) for c in comparisons]
  stats["comparison_pairs"] = int(sum(len(g) * (len(g) - 1) // 2 for g in gold_sets))
  stats["comparison_k_mean"] = float(np.mean([len(g) for g in gold_sets]))
  stats["labeler_noise"] = cfg.labeler_noise
  stats["labeler_agreement"] = pool.pair_agreement(gold_sets, _rng(seed, 9), lengths)
  stats["gold_ceiling_accuracy"] = labelers_lib.gold_accuracy(gold_sets, [np.array(c["ranks"]) for c in comparisons])
  return stats
