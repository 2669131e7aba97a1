"""Tiny SFT, reward-model and PPO runs on any mesh: the shared body of the scale-out tests.

tests/scale_test.py runs these in one process on 1 and on 8 simulated devices, tests/checkpoint_test.py moves
their states between meshes, and tests/multihost_test.py runs them in two processes (worker.py) and compares.
Everything is a deterministic function of the mesh shape: the same parameters, batches and rngs whatever the
layout, so a difference in the results can only come from the sharding.

Multi-process: every process builds the same global batch and keeps only its own rows (`local_rows`), as the
library's loaders do (each reads its shard by `jax.process_index()`); `sharding.put_batch` then assembles the
global array with `jax.make_array_from_process_local_data`. Results come back to the host with `to_host`, which
gathers the other processes' rows.

The trainers mirror the stages: `LMTrainer` is `training.train_lm`'s step (SFT starts from given "pretrained"
parameters with `optim.state_from_params`), `RMTrainer` is `rm.run`'s, and `ppo_run` is `rl.run`'s
iteration (four parameter sets, rollout, update), without data files, checkpoints or logging.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import configs, optim, sampling, sharding, tokenizers, training
from rlhf_jax.data import comparisons
from rlhf_jax.models import heads, presets, transformer
from rlhf_jax.rl import learner
from rlhf_jax.rl import rollout as rl_rollout
from rlhf_jax.stages import rm

TOK = tokenizers.ByteTokenizer()
# One layer, width 32: compiles in seconds on a laptop CPU. 4 heads / 2 kv heads split over tensor=2; the
# byte tokenizer's 264 ids split over tensor=2 and 8.
CFG = presets.preset("tiny", vocab_size=TOK.vocab_size, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1,
                   max_len=48)
RULES = sharding.DEFAULT_RULES

SFT_STEPS, SFT_BATCH, SFT_LEN = 6, 8, 40
RM_STEPS, RM_BATCH, RM_K, RM_LEN = 3, 8, 4, 24
PPO_ITERATIONS, PPO_BATCH, PROMPT_LEN = 2, 16, 12
PPO = rl_rollout.PPOSettings(
    sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=1.0), eos_id=TOK.eos_id, pad_id=TOK.pad_id,
    no_eos_penalty=-1.0, whiten_rewards=True, gamma=1.0, lam=0.95, clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1,
    entropy_coef=0.01, ptx_coef=0.0, epochs=2, n_minibatches=2, algorithm="ppo", min_whiten=8)


def make_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over the first prod(shape) devices (all of them in a multi-process run)."""
  return sharding.make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])


def local_rows(x: np.ndarray) -> np.ndarray:
  """This process's contiguous slice of a global batch's leading axis."""
  n, i = jax.process_count(), jax.process_index()
  rows = x.shape[0] // n
  return x[i * rows:(i + 1) * rows]


def put(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return sharding.put_batch({k: local_rows(np.asarray(v)) for k, v in batch.items()}, mesh, RULES)


def to_host(x) -> np.ndarray:
  """The global value of an array, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def host_params(init_fn, seed: int, scale: float = 1.0):
  """Parameters shaped like `init_fn`'s output, drawn with NumPy on the host: norms 1, head biases 0, every
  other leaf normal(0, 0.02 * scale). A stand-in for a previous stage's export that costs no compilation
  (jit-compiled random init is the slowest part of these tests on a CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("norm']") or name.endswith("['gain']"):
      return np.ones(x.shape, np.float32)
    if x.ndim == 0:  # head and normalisation biases
      return np.zeros(x.shape, np.float32)
    return (0.02 * scale * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def place(host_tree, axes, mesh):
  """Host arrays laid out on the mesh by their logical axes (each process fills only its own devices), as
  `training.load_params` restores an exported stage."""
  shardings = sharding.tree_shardings(axes, host_tree, mesh, RULES)
  return jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]), host_tree,
                      shardings)


# ----------------------------------------------------------------------------------------------------------
# Data: the same global batches for every mesh and process.


def _right_padded(ids, loss_mask, length):
  tokens = np.full((length,), TOK.pad_id, np.int32)
  mask = np.zeros((length,), np.int32)
  target = np.zeros((length,), np.int32)
  tokens[:len(ids)], mask[:len(ids)], target[:len(ids)] = ids, 1, loss_mask
  return tokens, mask, target


def sft_batches(n: int = SFT_STEPS, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Chat batches [b, t+1] whose loss mask covers assistant tokens only (tokenizers.encode_chat), one or two
  exchanges per dialogue so rows have different lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    rows = []
    for _ in range(SFT_BATCH):
      a, b = (int(x) for x in rng.integers(0, 20, 2))
      turns = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
      if rng.random() < 0.5:
        turns += [{"role": "user", "content": "twice?"}, {"role": "assistant", "content": str(2 * (a + b))}]
      ids, loss_mask = tokenizers.encode_chat(TOK, turns)
      rows.append(_right_padded(ids, loss_mask, SFT_LEN + 1))
    tokens, mask, loss_mask = (np.stack(x) for x in zip(*rows))
    out.append({"tokens": tokens, "mask": mask, "loss_mask": loss_mask})
  return out


def rm_batches(n: int = RM_STEPS, seed: int = 1) -> list[dict[str, np.ndarray]]:
  """Group batches (tokens [b, k, t]) of K-way rankings with ties and some 3-response groups (padded slots)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    records = []
    for _ in range(RM_BATCH):
      a, b = (int(x) for x in rng.integers(0, 20, 2))
      responses = [str(a + b), str(a + b + 1), "no idea", str(a * b)]
      ranks = [0, 1, 2, 2]
      if rng.random() < 0.4:
        responses, ranks = responses[:3], ranks[:3]
      records.append({"prompt_turns": [{"role": "user", "content": f"{a}+{b}?"}], "responses": responses,
                      "ranks": ranks})
    comps, _ = comparisons.tokenize_comparisons(records, TOK, seq_len=RM_LEN, too_long="error", source="scale test")
    groups = comparisons.make_groups(comps, grouping="prompt", pair_weighting="uniform")
    out.append(comparisons.group_batch(comps, groups, k=RM_K, seq_len=RM_LEN, pad_id=TOK.pad_id))
  return out


def ppo_prompts(iteration: int) -> dict[str, np.ndarray]:
  """Left-padded chat prompts [b, p] ending with the ASSISTANT token."""
  rng = np.random.default_rng([3, iteration])
  tokens = np.full((PPO_BATCH, PROMPT_LEN), TOK.pad_id, np.int32)
  mask = np.zeros((PPO_BATCH, PROMPT_LEN), bool)
  for i in range(PPO_BATCH):
    a, b = (int(x) for x in rng.integers(0, 20, 2))
    ids = tokenizers.encode_prompt(TOK, [{"role": "user", "content": f"{a}+{b}?"}])
    tokens[i, PROMPT_LEN - len(ids):], mask[i, PROMPT_LEN - len(ids):] = ids, True
  return {"prompt_bp": tokens, "prompt_mask_bp": mask}


# ----------------------------------------------------------------------------------------------------------
# SFT and RM: one jitted step per stage, laid out as the stages do it.


class LMTrainer:
  """SFT: `training.make_train_step` jitted with the state's shardings, from sharded "pretrained" params."""

  def __init__(self, shape):
    self.mesh = make_mesh(shape)
    axes = transformer.param_axes(CFG)
    self.axes = axes
    self.optimizer = optim.make_optimizer(configs.optimizer_config(lr=3e-3, warmup_steps=1), SFT_STEPS,
                                          optim.decay_mask_from_axes(axes))
    self.pretrained = place(host_params(lambda k: transformer.init(k, CFG), seed=1), axes, self.mesh)
    batch_sh = {k: sharding.batch_sharding(self.mesh, RULES, 2) for k in ("tokens", "mask", "loss_mask")}
    self._spare, self.state_sh = self._new_state()  # the first fresh_state() hands this one out
    with sharding.activate(self.mesh, RULES):
      self.step = jax.jit(training.make_train_step(training.lm_loss_fn(CFG), self.optimizer),
                          in_shardings=(self.state_sh, batch_sh), out_shardings=(self.state_sh, None), donate_argnums=0)

  def _new_state(self):
    return optim.state_from_params(self.pretrained, self.axes, self.optimizer, jax.random.PRNGKey(0), self.mesh,
                                   RULES)

  def fresh_state(self):
    """A new train state at step 0 (the step donates its input, so every run needs its own)."""
    state, self._spare = self._spare, None
    return state if state is not None else self._new_state()[0]

  def train(self, state, batches):
    """Steps over `batches` (global numpy batches); returns the new state and the losses."""
    out = []
    with sharding.activate(self.mesh, RULES):
      for batch in batches:
        state, m = self.step(state, put(batch, self.mesh))
        out.append(float(m["loss"]))
    return state, np.array(out)


class RMTrainer:
  """The reward model: `training.make_train_step` of `rm.ranking_loss_fn` on group batches, as `rm.run` jits it."""

  def __init__(self, shape):
    self.mesh = make_mesh(shape)
    axes = heads.rm_param_axes(CFG)
    self.optimizer = optim.make_optimizer(configs.optimizer_config(lr=3e-3, warmup_steps=1), RM_STEPS,
                                          optim.decay_mask_from_axes(axes))
    # Like `rm.run` with rm.init_from="sft": given backbone parameters, then `optim.state_from_params`.
    params = place(_rm_host(), axes, self.mesh)
    self.state, self.state_sh = optim.state_from_params(params, axes, self.optimizer, jax.random.PRNGKey(4),
                                                        self.mesh, RULES)
    bsh = comparisons.batch_shardings(self.mesh, RULES)
    with sharding.activate(self.mesh, RULES):
      self.step = jax.jit(training.make_train_step(rm.ranking_loss_fn(CFG), self.optimizer),
                          in_shardings=(self.state_sh, bsh), out_shardings=(self.state_sh, None), donate_argnums=0)

  def train(self, batches):
    out = []
    with sharding.activate(self.mesh, RULES):
      for batch in batches:
        self.state, m = self.step(self.state, put(batch, self.mesh))
        out.append((float(m["loss"]), float(m["accuracy"])))
    return np.array(out)


@functools.lru_cache(maxsize=None)
def lm_trainer(shape) -> LMTrainer:
  return LMTrainer(shape)


@functools.lru_cache(maxsize=None)
def sft_run(shape):
  """(losses [SFT_STEPS], final state) of an uninterrupted SFT run on this mesh; cached per process."""
  trainer = lm_trainer(shape)
  state, losses = trainer.train(trainer.fresh_state(), sft_batches())
  return losses, state


@functools.lru_cache(maxsize=None)
def rm_run(shape):
  """[RM_STEPS, 2] (loss, accuracy) per step and the trainer holding the final state."""
  trainer = RMTrainer(shape)
  return trainer.train(rm_batches()), trainer


# ----------------------------------------------------------------------------------------------------------
# PPO: four parameter sets on one mesh, rollout and update as in `rl.run`.


def _policy_host():
  # Larger weights make the samples diverse, and a bias towards EOS makes about half the responses stop
  # early, so both reward paths run: the RM score at EOS and the fixed penalty for never stopping.
  params = host_params(lambda k: transformer.init(k, CFG), seed=10, scale=8.0)
  params["unembed"][:, TOK.eos_id] += 0.4
  return params


def _rm_host():
  params = host_params(lambda k: heads.init_rm_params(k, CFG), seed=13)
  params["head"]["w"] *= 5.0  # about the std 1/sqrt(d+1) of heads.init_rm_params
  params["norm"] = {"gain": np.float32(2.0), "bias": np.float32(-0.5)}
  params["read"] = {m: np.float32(w) for m, w in heads.read_weights("eos").items()}  # host_params zeroed them
  return params


def ppo_sets(mesh):
  """(train state holding policy and value, its shardings, frozen reference, frozen RM, optimizer): the four
  parameter sets of `rl.run`, all laid out by the same rules on one mesh."""
  axes = {"policy": transformer.param_axes(CFG), "value": heads.value_axes(CFG)}
  value = host_params(lambda k: {"backbone": transformer.init(k, CFG), "head": heads.init_scalar_head(k, CFG)}, seed=11)
  value["head"]["w"] *= 5.0  # a non-zero head (as when the value model starts from the RM): values vary
  trainable = {"policy": place(_policy_host(), axes["policy"], mesh), "value": place(value, axes["value"], mesh)}
  ref = place(host_params(lambda k: transformer.init(k, CFG), seed=12), transformer.param_axes(CFG), mesh)
  rm = place(_rm_host(), heads.rm_param_axes(CFG), mesh)
  optimizer = optim.make_optimizer(configs.optimizer_config(lr=1e-3, warmup_steps=0, weight_decay=0.0),
                                   PPO_ITERATIONS * PPO.epochs * PPO.n_minibatches, optim.decay_mask_from_axes(axes))
  state, state_sh = optim.state_from_params(trainable, axes, optimizer, jax.random.PRNGKey(2), mesh, RULES)
  state["kl_beta"] = jnp.asarray(0.05, jnp.float32)
  state_sh["kl_beta"] = sharding.replicated(mesh)
  return state, state_sh, ref, rm, optimizer


def _layout(tree) -> dict[str, tuple[float, str]]:
  """Per leaf: its shape, the fraction of it that one device holds, and its PartitionSpec."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): (x.shape, sharding.largest_shard_fraction(x), str(x.sharding.spec))
          for p, x in leaves}


@functools.lru_cache(maxsize=None)
def ppo_run(shape):
  """PPO_ITERATIONS iterations as `rl.run` does them. Returns per iteration the gathered rollout (and RM
  scores), the rollout stats and the update metrics; and the layout of the four parameter sets and of Adam's
  first moment as created (`_layout`), before the update donates their buffers."""
  mesh = make_mesh(shape)
  state, _, ref, rm, optimizer = ppo_sets(mesh)
  layouts = {"policy": _layout(state["params"]["policy"]), "value": _layout(state["params"]["value"]),
             "ref": _layout(ref), "rm": _layout(rm),
             "adam_mu": _layout(state["opt_state"][1].mu)}  # chain: (clip, adam, lr)
  iterations = []
  with sharding.activate(mesh, RULES):
    rollout_fn = jax.jit(rl_rollout.make_rollout(CFG, CFG, PPO))
    update_fn = jax.jit(learner.make_update(optimizer, CFG, PPO), donate_argnums=0)
    for it in range(PPO_ITERATIONS):
      prompts = put(ppo_prompts(it), mesh)
      rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), 1)
      ro, rm_b, stats = rollout_fn(state["params"]["policy"], state["params"]["value"], ref, rm,
                                   prompts["prompt_bp"], prompts["prompt_mask_bp"], rng, state["kl_beta"])
      rollout = {k: to_host(v) for k, v in ro._asdict().items()}
      rollout["rm_score_b"] = to_host(rm_b)
      state, metrics = update_fn(state, ro, None)
      iterations.append({"rollout": rollout, "stats": {k: float(v) for k, v in stats.items()},
                         "update": {k: float(v) for k, v in jax.device_get(metrics).items()}})
  return iterations, layouts
