"""Our side of the benchmarks: rlhf_jax on whatever JAX backend is present (CPU here, unchanged on GPU/TPU).

    /work/venv/bin/python bench/ours.py                     # everything, pretty-printed JSON
    /work/venv/bin/python bench/ours.py --json --groups=ppo  # one group, one JSON line (what compare.py reads)

Groups:
  peak      the measured matmul peak: a jitted chain of square float32 matrix products (the dtype of the
            models), FLOP/s = 2 n^3 per product. MFU divides by this, not by a datasheet number.
  train     pretraining train step (`training.make_train_step`: forward, backward, global-norm clip, AdamW)
            per model size: tokens/s, model FLOP/s (bench/common.py states the formula) and MFU.
  generate  `sampling.generate` new tokens/s with and without the KV cache, batch 1 and 64.
  ppo       one PPO iteration (bench/ppo_iteration.py) split by phase, and its peak memory with the four
            parameter sets: device `peak_bytes_in_use` on GPU/TPU, process RSS high-water mark on CPU (run
            this group in its own process for a clean number; compare.py does).
  ppo_base  the same at the `base` size and common.Settings.ppo_base's shapes (bench/ppo_memory.py);
  ppo_base_lora  and with LoRA adapters (rank ppo_base_lora_rank) on every projection.
  ppo_base_lean, ppo_base_lora_lean  both with scanned, rematerialised layers (model.scan_layers, model.remat).

Every timing blocks on the result (`block_until_ready`); compilation happens in untimed warm-up calls.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import configs, optim, sampling, sharding, training
from rlhf_jax.models import presets, transformer


def model_config(size: str) -> transformer.ModelConfig:
  """Our ModelConfig for a bench size: learned positions and no dropout, like GPT-2 (bench/common.py)."""
  sz = common.SIZES[size]
  return presets.preset(size, vocab_size=sz.vocab_size, pos_embedding="learned", dropout_rate=0.0)


def _time(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def bench_peak(st: common.Settings) -> dict[str, Any]:
  n, chain = st.matmul_n, st.matmul_chain
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / np.sqrt(n)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32) / np.sqrt(n)

  @jax.jit
  def matmuls(x, w):
    # A data-dependent chain, so XLA can neither skip nor merge the products.
    return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

  jax.block_until_ready(matmuls(a, b))
  best = min(_time(lambda: matmuls(a, b), 3))
  return {"matmul_n": n, "chain": chain, "dtype": "float32", "flops_per_s": 2.0 * n**3 * chain / best}


def bench_train(st: common.Settings, peak: float | None) -> dict[str, Any]:
  out = {}
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  for size, batch, seq in st.train:
    cfg = model_config(size)
    steps = st.train_warmup + st.train_steps
    opt_cfg = configs.optimizer_config(lr=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=1.0)
    axes = transformer.param_axes(cfg)
    optimizer = optim.make_optimizer(opt_cfg, 1000, optim.decay_mask_from_axes(axes))
    state, state_sh = optim.create_state(lambda k, c=cfg: transformer.init(k, c), axes, optimizer,
                                         jax.random.PRNGKey(0), mesh, rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(6, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    host_batch = {"tokens": tokens, "mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
    batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in host_batch}
    with sharding.activate(mesh, rules):
      step = jax.jit(training.make_train_step(training.lm_loss_fn(cfg), optimizer), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)
      dev_batch = sharding.put_batch(host_batch, mesh, rules)
      times = []
      for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, dev_batch)
        jax.block_until_ready(metrics["loss"])
        if i >= st.train_warmup:
          times.append(time.perf_counter() - t0)
    sec = common.median(times)
    tokens_per_step = batch * seq
    flops = common.SIZES[size].train_flops_per_token(seq) * tokens_per_step / sec
    out[size] = {"batch": batch, "seq_len": seq, "params": cfg.num_params(), "step_s": sec,
                 "tokens_per_s": tokens_per_step / sec, "model_flops_per_s": flops,
                 "mfu": flops / peak if peak else None, "loss": float(metrics["loss"])}
  return out


def bench_generate(st: common.Settings) -> dict[str, Any]:
  cfg = model_config(st.gen_size)
  params = transformer.init(jax.random.PRNGKey(0), cfg)
  out = {}
  for batch in st.gen_batches:
    prompts = np.random.default_rng(batch).integers(6, cfg.vocab_size, (batch, st.gen_prompt_len))
    prompt_bp = jnp.asarray(prompts, jnp.int32)
    mask_bp = jnp.ones_like(prompt_bp, jnp.bool_)
    for use_cache in (True, False):
      scfg = sampling.SamplingConfig(max_new_tokens=st.gen_new_tokens, temperature=1.0, use_cache=use_cache)
      lengths = []

      def run(i=0, scfg=scfg, prompt_bp=prompt_bp, mask_bp=mask_bp, lengths=lengths):
        sample = sampling.generate(params, prompt_bp, mask_bp, jax.random.PRNGKey(i), cfg, scfg,
                                   eos_id=common.EOS_ID, pad_id=common.PAD_ID)
        lengths.append(sample.lengths_b)
        return sample

      jax.block_until_ready(run())  # compile
      times = []
      for i in range(st.gen_repeats if use_cache else 1):  # the no-cache path is timed once: it is slow
        t0 = time.perf_counter()
        jax.block_until_ready(run(i + 1))
        times.append(time.perf_counter() - t0)
      # The loop runs until the longest row stops (rows that stopped still occupy the batch), so the work
      # done is batch x the longest response; a random model rarely stops before the limit anyway.
      steps = common.median([float(np.max(np.asarray(l))) for l in lengths[1:]])
      sec = common.median(times)
      key = f"b{batch}_{'cache' if use_cache else 'nocache'}"
      out[key] = {"batch": batch, "prompt_len": st.gen_prompt_len, "new_tokens": st.gen_new_tokens,
                  "steps": steps, "seconds": sec, "new_tokens_per_s": batch * steps / sec}
  return out


def bench_ppo(st: common.Settings, lora_rank: int = 0, lean: bool = False) -> dict[str, Any]:
  import ppo_iteration  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import lora  # pylint: disable=g-import-not-at-top

  rss_before = common.peak_rss_bytes()
  cfg = model_config(st.ppo_size)
  if lean:  # one compiled block, recomputed in the backward: a layer's temporaries, not a model's
    cfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
  s = ppo_iteration.PPOSettings(batch=st.ppo_batch, prompt_len=st.ppo_prompt_len,
                                response_len=st.ppo_response_len, epochs=st.ppo_epochs,
                                minibatches=st.ppo_minibatches, eos_id=common.EOS_ID, pad_id=common.PAD_ID)
  lora_cfg = None
  if lora_rank:  # every attention and MLP projection, alpha = 2 r
    lora_cfg = lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank,
                               targets=("q", "k", "v", "o", "mlp_in", "mlp_out"))
  it = ppo_iteration.Iteration(cfg, s, lora_cfg=lora_cfg)
  warm_times, _ = it.run(jax.random.PRNGKey(100))  # compiles every phase
  runs = [it.run(jax.random.PRNGKey(i)) for i in range(st.ppo_iterations)]
  phases = {k: common.median([t[k] for t, _ in runs]) for k in runs[0][0]}
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  mem = {"param_bytes": it.param_bytes()}
  if stats and "peak_bytes_in_use" in stats:
    mem.update(kind="device peak_bytes_in_use", peak_bytes=int(stats["peak_bytes_in_use"]))
  else:
    mem.update(kind="process RSS high-water mark", peak_bytes=common.peak_rss_bytes(),
               rss_before_models_bytes=rss_before)
  return {"settings": {"batch": s.batch, "prompt_len": s.prompt_len, "response_len": s.response_len,
                       "epochs": s.epochs, "minibatches": s.minibatches, "size": st.ppo_size,
                       "lora_rank": lora_rank, "scan_layers": cfg.scan_layers, "remat": cfg.remat},
          "iteration_s": phases["total"], "phases_s": phases, "first_iteration_s": warm_times["total"],
          "info": runs[-1][1], "memory": mem}


def versions() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "flax": flax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
          "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count()}


def run(groups: list[str], st: common.Settings) -> dict[str, Any]:
  res: dict[str, Any] = {"side": "ours", "versions": versions()}
  peak = None
  if "peak" in groups or "train" in groups:
    res["peak"] = bench_peak(st)
    peak = res["peak"]["flops_per_s"]
  if "train" in groups:
    res["train"] = bench_train(st, peak)
  if "generate" in groups:
    res["generate"] = bench_generate(st)
  if "ppo" in groups:
    res["ppo"] = bench_ppo(st)
  if "ppo_base" in groups:
    res["ppo_base"] = bench_ppo(common.ppo_base_settings(st))
  if "ppo_base_lora" in groups:
    res["ppo_base_lora"] = bench_ppo(common.ppo_base_settings(st), lora_rank=st.ppo_base_lora_rank)
  if "ppo_base_lean" in groups:
    res["ppo_base_lean"] = bench_ppo(common.ppo_base_settings(st), lean=True)
  if "ppo_base_lora_lean" in groups:
    res["ppo_base_lora_lean"] = bench_ppo(common.ppo_base_settings(st), lora_rank=st.ppo_base_lora_rank, lean=True)
  return res


def main(argv=None):
  common.main(run, __doc__, argv)


if __name__ == "__main__":
  main()
