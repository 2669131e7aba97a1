"""Optimizers and sharded train states shared by every stage.

A train state is a plain dict pytree: `{"params", "opt_state", "step", "rng"}`. It is created already sharded
(`jax.jit(init, out_shardings=...)` over `jax.eval_shape`), and its optimizer state is sharded like the
parameters it tracks (`optax.tree_map_params`), so no device ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding

State = dict[str, Any]


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * final_lr_fraction` at `total_steps`."""
  warmup = int(opt_cfg.warmup_steps)
  schedule = str(opt_cfg.get("schedule", "cosine"))
  if schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt_cfg.lr, max(warmup, 1)), optax.constant_schedule(opt_cfg.lr)], [warmup])
  if schedule != "cosine":
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {schedule!r}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.get("final_lr_fraction", 0.1))


def make_optimizer(opt_cfg, total_steps: int, decay_mask: Any = None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm gradient clipping.

  `optimizer.eps_convention` makes Adam's epsilon placement an explicit choice (RLHF_NOTES, PPO detail 10):
  "pytorch" (optax's default): update = m_hat / (sqrt(v_hat) + eps);
  "tensorflow": TF1's Adam adds eps to sqrt of the *uncorrected* v, i.e. eps_t = eps / sqrt(1 - b2^t) in the
  bias-corrected form, which lm-human-preferences used.
  """
  lr = learning_rate_schedule(opt_cfg, total_steps)
  convention = str(opt_cfg.get("eps_convention", "pytorch"))
  if convention == "pytorch":
    adam = optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif convention == "tensorflow":
    adam = _scale_by_adam_tf(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  else:
    raise ValueError(f"optimizer.eps_convention must be 'pytorch' or 'tensorflow', got {convention!r}")
  parts = []
  if opt_cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(adam)
  if opt_cfg.get("weight_decay", 0.0):
    parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  rounding = str(opt_cfg.get("param_rounding", "stochastic"))
  if rounding not in ("stochastic", "nearest"):
    raise ValueError(f"optimizer.param_rounding must be 'stochastic' or 'nearest', got {rounding!r}")
  return float32_state(optax.chain(*parts), stochastic_rounding=rounding == "stochastic")


def settled_gradient(grads):
  """(grads, their global norm), with the optimizer's work ordered after both (an optimization barrier).

  Without it XLA:CPU interleaves the norm's reduction, the gradient and the optimizer chain and keeps every
  intermediate tree alive at once: at the bench's `base` size a PPO gradient + AdamW step held 7.2 GB of
  temporaries, 1.6 GB with the barrier, and the iteration's peak RSS fell from 10.8 to 5.1 GiB
  (bench/PPO_MEMORY.md). The values are unchanged.
  """
  return jax.lax.optimization_barrier((grads, optax.tree.norm(grads)))


def float32_state(inner: optax.GradientTransformation,
                  stochastic_rounding: bool = False) -> optax.GradientTransformation:
  """`inner` run in float32 whatever the parameters' dtype: its state (Adam's mu and nu) is float32, and so are
  the updates, which optax.apply_updates adds to the parameters before rounding to their dtype once.

  optax's scale_by_adam keeps nu in the parameters' dtype (its mu_dtype covers mu only); bfloat16 moments would
  round away most of nu's 1 - b2 = 5% steps. For float32 parameters every cast here is the identity.

  stochastic_rounding: bfloat16 parameters get w + u rounded up or down at random with the probabilities that
  make its expectation w + u (stochastic_round), instead of to the nearest bfloat16. Rounding to nearest drops
  every update under half a bfloat16 spacing of its weight (2^-9 to 2^-8 of it): measured on the tiny and small
  presets, an Adam step at lr 1e-5 (InstructGPT's PPO rate) leaves 74-80% of the matrix weights unchanged, at
  1e-4 7-8%, and norm scales near 1 never move below lr ~4e-3. The updates returned are then the float32
  differences (rounded - w), which optax.apply_updates adds back exactly. The draws come from Adam's step count
  in the state (so a resumed run rounds as the uninterrupted one did) and the leaf's position; the state's
  structure is unchanged. Other dtypes are untouched. Written here: optax has no stochastic rounding of
  parameters (JAX's only one is a Pallas TPU kernel primitive).
  """
  to32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init_fn(params):
    return inner.init(to32(params))

  def update_fn(updates, state, params=None):
    updates, new_state = inner.update(to32(updates), state, None if params is None else to32(params))
    if not stochastic_rounding or not any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params)):
      return updates, new_state
    key = jax.random.fold_in(jax.random.PRNGKey(0), _step_count(new_state))
    leaves, treedef = jax.tree.flatten(params)
    rounded = [u if p.dtype != jnp.bfloat16 else
               stochastic_round(p.astype(jnp.float32) + u, jax.random.fold_in(key, i)) - p.astype(jnp.float32)
               for i, (p, u) in enumerate(zip(leaves, treedef.flatten_up_to(updates)))]
    return treedef.unflatten(rounded), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _step_count(state) -> jax.Array:
  """The optimizer's step count (Adam's, the schedule's: they agree), the stochastic rounding's counter."""
  counts = [v for _, v in optax.tree_utils.tree_get_all_with_path(state, "count")]
  if not counts:
    raise ValueError("stochastic rounding needs an optimizer state with a step count (optax's 'count')")
  return counts[0]


def stochastic_round(x_f32: jax.Array, key: jax.Array) -> jax.Array:
  """float32 x rounded to a neighbouring bfloat16 value (returned as float32) at random: up with probability
  (x - down) / (up - down), so E[result] = x. The 16 bits that bfloat16 drops get a uniform 16-bit integer
  added before they are cut off (a carry rounds the magnitude up). Non-finite values pass through."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  noise = jax.random.bits(key, x_f32.shape, jnp.uint32) >> 16
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x_f32), rounded, x_f32)


def _scale_by_adam_tf(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam with TensorFlow's epsilon placement: m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))."""
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    eps_t = eps / jnp.sqrt(1.0 - b2 ** count.astype(jnp.float32))
    new = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps_t), mu_hat, nu_hat)
    return new, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_mask_from_axes(axes_tree) -> Any:
  """Weight decay on matrices only: not on norms, biases or scalar heads' offsets."""
  return jax.tree.map(lambda axes: "norm" not in axes and len([a for a in axes if a != "layers"]) >= 2,
                      axes_tree, is_leaf=sharding._is_axes)


def state_shardings(abstract_state: State, params_axes, mesh: Mesh, rules: sharding.Rules,
                    optimizer: optax.GradientTransformation) -> State:
  """Shardings for a whole train state: params by their logical axes, optimizer state like its params."""
  params_sh = sharding.tree_shardings(params_axes, abstract_state["params"], mesh, rules)
  rep = sharding.replicated(mesh)
  # Parameter-shaped leaves of the optimizer state (Adam's mu and nu) take their parameter's sharding;
  # everything else (step counts) is replicated.
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"], params_sh,
                                 transform_non_params=lambda _: rep)
  out = {k: rep for k in abstract_state if k not in ("params", "opt_state")}
  out["params"] = params_sh
  out["opt_state"] = opt_sh
  return out


def create_state(
    init_params: Callable[[jax.Array], Any],
    params_axes,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: sharding.Rules,
) -> tuple[State, State]:
  """A fresh train state created directly in its sharded layout; returns (state, state_shardings)."""

  def init_state(key):
    init_key, state_key = jax.random.split(key)
    params = init_params(init_key)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": state_key}

  return _place(init_state, (rng,), params_axes, optimizer, mesh, rules)


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings: the restore target for a checkpoint onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_from_params(
    params,
    params_axes,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: sharding.Rules,
) -> tuple[State, State]:
  """A train state starting from given parameters (e.g. the previous stage's), laid out on this mesh."""

  def init_state(p, key):
    return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32), "rng": key}

  return _place(init_state, (params, rng), params_axes, optimizer, mesh, rules)


def _place(init_state, args, params_axes, optimizer, mesh: Mesh, rules: sharding.Rules) -> tuple[State, State]:
  """Runs init_state(*args) under jit with the state's shardings as outputs: created already laid out."""
  abstract = jax.eval_shape(init_state, *args)
  shardings = state_shardings(abstract, params_axes, mesh, rules, optimizer)
  with sharding.activate(mesh, rules):
    state = jax.jit(init_state, out_shardings=shardings)(*args)
  return state, shardings
