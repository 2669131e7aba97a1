"""One prepared accelerator run (#25): what a researcher with one GPU gets, against rooflines measured in the run.

    bash bench/gpu.sh                        # on one H100/H200: about 8 minutes, writes bench/gpu/
    python bench/gpu.py --smoke --out-dir=/tmp/g --parts=ppo   # tiny shapes, any backend (tests/bench_gpu_test.py)
    python bench/gpu.py --report --out-dir=/tmp/g              # RESULTS.md from the parts' JSON files

Parts (each writes OUT_DIR/<part>.json; gpu.sh runs `ppo` in its own process first, so its device peak is its own):
  ppo     one PPO iteration of a 1B Llama-shaped policy with LoRA (rank 16 on q, k, v, o, mlp_in, mlp_gate,
          mlp_out; bfloat16 weights), bench/ppo_iteration.py's phases, after a warm-up iteration; the device's
          peak_bytes_in_use.
  peak    the bfloat16 matmul peak (a jitted chain of square products, 2 n^3 FLOPs each) and the HBM bandwidth
          (a jitted elementwise pass over a large array: bytes read + written / time), both measured here.
  train   a pretraining step (forward, backward, AdamW; bfloat16 parameters and compute, float32 moments, scanned
          layers, cuDNN attention) at sequence 2048: model FLOPs per token 6 N + 12 L d T (PaLM appendix B; N the
          matmul parameters with the unembedding, d the attention width) over the step time, as a fraction of
          the measured peak (MFU).
  check   model.attention's library path on this device (cuDNN on a GPU, XLA's elsewhere) against the blocked
          attention, both in bfloat16, each against a float32 blocked reference: logits and gradients with left
          padding, GQA, an odd length and a sliding window or none, and cached decoding. It passes when the
          library's error is at most 3x the bfloat16 blocked path's (the same rounding, another kernel; a
          mask error is far larger). cuDNN's path has not run anywhere else: this is its first check.
  decode  cached greedy-free sampling (temperature 1) at batch 1 and 256: decode tokens/s from the time of
          max_new tokens less the time of 1 (prefill), against the rooflines of one decode step: the bandwidth
          bound reads every weight and the batch's filled KV cache once (bytes / measured bandwidth), the
          compute bound does 2 N FLOPs a token at the measured peak.

Targets: train MFU >= 45% of the measured bf16 peak; decode at batch 1 >= 50% of the bandwidth roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from rlhf_jax import configs, optim, sampling, sharding, training  # pylint: disable=g-import-not-at-top
from rlhf_jax.models import lora, transformer  # pylint: disable=g-import-not-at-top

PARTS = ("ppo", "check", "peak", "train", "decode")
# Llama 3.2 1B's shapes (tied embeddings, GQA 32/8, SwiGLU), and a tiny model of the same form for --smoke.
LLAMA_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, max_len=2048,
                mlp="swiglu", tie_embeddings=True, rope_theta=500_000.0)
SMOKE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=64, mlp="swiglu",
             tie_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Shapes:
  model: dict
  matmul_n: int = 8192
  matmul_chain: int = 16
  bandwidth_elems: int = 2**30  # bfloat16: 2 GiB read and 2 GiB written per pass
  train_batch: int = 4
  train_seq: int = 2048
  train_steps: int = 3  # timed, after one compiling step
  decode_batches: tuple[int, ...] = (1, 256)
  decode_prompt: int = 128
  decode_new: int = 128
  ppo_batch: int = 64
  ppo_prompt: int = 128
  ppo_response: int = 128
  ppo_minibatches: int = 4
  lora_rank: int = 16
  # part `check`: head width 64, GQA 8 over 2
  check_model: tuple = (("vocab_size", 256), ("d_model", 512), ("n_layers", 2), ("n_heads", 8), ("n_kv_heads", 2),
                        ("d_ff", 1024), ("max_len", 64), ("mlp", "swiglu"))


FULL = Shapes(model=LLAMA_1B)
SMOKE_SHAPES = Shapes(model=SMOKE, matmul_n=128, matmul_chain=2, bandwidth_elems=2**16, train_batch=2,
                      train_seq=32, train_steps=1, decode_batches=(1, 4), decode_prompt=8, decode_new=6,
                      ppo_batch=8, ppo_prompt=8, ppo_response=8, ppo_minibatches=2, lora_rank=2,
                      check_model=(("vocab_size", 256), ("d_model", 64), ("n_layers", 1), ("n_heads", 8),
                                   ("n_kv_heads", 2), ("d_ff", 128), ("max_len", 64), ("mlp", "swiglu")))


def model_config(sh: Shapes, **kw) -> transformer.ModelConfig:
  attention = "auto" if jax.default_backend() == "gpu" else "blocked"
  return transformer.ModelConfig(**{**sh.model, "dtype": "bfloat16", "param_dtype": "bfloat16",
                                    "attention": attention, **kw})


def matmul_params(cfg: transformer.ModelConfig) -> int:
  """N of 6 N: every weight a token is multiplied by, once: the layers' projections and the unembedding."""
  shapes = jax.eval_shape(lambda: transformer.init(jax.random.PRNGKey(0), cfg))
  layer = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["layers"]) if x.ndim >= 3)
  return layer + cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: transformer.ModelConfig, seq: int) -> float:
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq


def kv_cache_bytes(cfg: transformer.ModelConfig, batch: int, filled: float) -> float:
  """bfloat16 keys and values of `filled` positions for every layer and KV head."""
  return 2.0 * cfg.n_layers * batch * filled * cfg.n_kv_heads * cfg.d_head * 2


def decode_rooflines(cfg: transformer.ModelConfig, batch: int, prompt: int, new: int, peak: float,
                     bandwidth: float, param_bytes: float) -> dict[str, float]:
  """Tokens/s bounds of the decode steps: each reads every weight and the filled cache once (mean fill
  prompt + new / 2), and does 2 N FLOPs per token (N without the embedding lookup)."""
  step_bytes = param_bytes + kv_cache_bytes(cfg, batch, prompt + new / 2)
  return {"bandwidth_tokens_per_s": batch * bandwidth / step_bytes,
          "compute_tokens_per_s": peak / (2.0 * matmul_params(cfg)), "step_bytes": step_bytes}


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return min(out)


def part_peak(sh: Shapes) -> dict[str, Any]:
  n, chain = sh.matmul_n, sh.matmul_chain
  a = (jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
  matmuls = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))  # data-dependent chain
  t = _best(lambda: matmuls(a, w), 5)
  x = jnp.ones((sh.bandwidth_elems,), jnp.bfloat16)
  scale = jax.jit(lambda x: x * 1.5 + 0.5)
  tb = _best(lambda: scale(x), 10)
  return {"matmul_n": n, "chain": chain, "bf16_flops_per_s": 2.0 * n**3 * chain / t,
          "bandwidth_bytes_per_s": 2.0 * x.size * x.dtype.itemsize / tb, "bandwidth_array_bytes": x.size * 2}


def part_train(sh: Shapes, peak: float | None) -> dict[str, Any]:
  cfg = model_config(sh, scan_layers=True, max_len=max(sh.model["max_len"], sh.train_seq))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  opt_cfg = configs.optimizer_config(lr=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=1.0)
  axes = transformer.param_axes(cfg)
  optimizer = optim.make_optimizer(opt_cfg, 1000, optim.decay_mask_from_axes(axes))
  state, state_sh = optim.create_state(lambda k: transformer.init(k, cfg), axes, optimizer, jax.random.PRNGKey(0),
                                       mesh, rules)
  tokens = np.random.default_rng(0).integers(6, cfg.vocab_size, (sh.train_batch, sh.train_seq + 1)).astype(np.int32)
  host = {"tokens": tokens, "mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in host}
  times = []
  with sharding.activate(mesh, rules):
    step = jax.jit(training.make_train_step(training.lm_loss_fn(cfg), optimizer), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=0)
    batch = sharding.put_batch(host, mesh, rules)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(sh.train_steps):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  flops = train_flops_per_token(cfg, sh.train_seq) * sh.train_batch * sh.train_seq / sec
  return {"params": cfg.num_params(), "matmul_params": matmul_params(cfg), "batch": sh.train_batch,
          "seq_len": sh.train_seq, "step_s": sec, "first_step_s": compile_s,
          "tokens_per_s": sh.train_batch * sh.train_seq / sec, "model_flops_per_s": flops,
          "mfu": flops / peak if peak else None, "loss": float(m["loss"]), "attention": cfg.attention}


def part_decode(sh: Shapes, peak: float | None, bandwidth: float | None) -> dict[str, Any]:
  cfg = model_config(sh, max_len=max(sh.model["max_len"], sh.decode_prompt + sh.decode_new))
  params = jax.jit(lambda k: transformer.init(k, cfg))(jax.random.PRNGKey(0))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  out: dict[str, Any] = {"param_bytes": param_bytes}
  for b in sh.decode_batches:
    prompt = jnp.asarray(np.random.default_rng(b).integers(6, cfg.vocab_size, (b, sh.decode_prompt)), jnp.int32)
    mask = jnp.ones_like(prompt, jnp.bool_)

    def gen(n, i, prompt=prompt, mask=mask):
      # eos_id 0 is never sampled from these prompts' random logits often enough to end rows early; the steps
      # the loop ran are counted below either way.
      return sampling.generate(params, prompt, mask, jax.random.PRNGKey(i), cfg,
                               sampling.SamplingConfig(max_new_tokens=n, temperature=1.0), eos_id=0, pad_id=1)

    t_full = _best(lambda: gen(sh.decode_new, 0), 2)
    t_one = _best(lambda: gen(1, 0), 2)
    steps = int(np.max(np.asarray(gen(sh.decode_new, 0).lengths_b)))
    tps = b * (steps - 1) / max(t_full - t_one, 1e-9)
    row = {"batch": b, "prompt": sh.decode_prompt, "new_tokens": sh.decode_new, "steps": steps,
           "seconds": t_full, "prefill_and_one_s": t_one, "decode_tokens_per_s": tps}
    if peak and bandwidth:
      roof = decode_rooflines(cfg, b, sh.decode_prompt, sh.decode_new, peak, bandwidth, param_bytes)
      row.update(roof)
      row["fraction_of_bandwidth_roofline"] = tps / roof["bandwidth_tokens_per_s"]
      row["fraction_of_roofline"] = tps / min(roof["bandwidth_tokens_per_s"], roof["compute_tokens_per_s"])
    out[f"b{b}"] = row
  return out


def part_check(sh: Shapes, windows: tuple[int, ...] = (0, 5)) -> dict[str, Any]:
  """The library attention (cudnn on a GPU; xla elsewhere) and the blocked one, both bfloat16, against a float32
  blocked reference on a batch with left padding, GQA (8 query heads over 2), an odd length (cuDNN's even-length
  padding) and a sliding window of 5 or none: relative errors of the logits at real positions, of the
  parameter gradient of a loss over them, and of cached decoding's logits."""
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  b, t = 3, 33
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(6, 256, (b, t)), jnp.int32)
  lengths = np.array([t, t - 6, 2])
  mask = jnp.asarray(np.arange(t)[None, :] >= t - lengths[:, None])  # left padding
  real = np.asarray(mask)
  out: dict[str, Any] = {"implementation": impl, "passed": True}
  for window in windows:
    ref_cfg = transformer.ModelConfig(**dict(sh.check_model), sliding_window=window)
    params = transformer.init(jax.random.PRNGKey(1), ref_cfg)

    def logits_of(cfg, p):
      return transformer.forward(p, tokens, cfg, mask_bt=mask)[0].astype(jnp.float32)

    def grads_of(cfg):
      loss = lambda p: jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits_of(cfg, p)), 0.0) ** 2) * 1e-4
      return jax.jit(jax.grad(loss))(params)

    @functools.partial(jax.jit, static_argnums=0)
    def decoded(cfg):
      p0 = t - 4
      _, cache = transformer.prefill(params, tokens[:, :p0], cfg, length=t, mask_bt=mask[:, :p0])
      steps = []
      for i in range(p0, t):
        step, cache = transformer.forward(params, tokens[:, i:i + 1], cfg, mask_bt=mask[:, i:i + 1], cache=cache)
        steps.append(step[:, 0].astype(jnp.float32))
      return jnp.stack(steps, axis=1)

    ref_logits = np.asarray(jax.jit(lambda p: logits_of(ref_cfg, p))(params))
    ref_grads = grads_of(ref_cfg)
    ref_decoded = np.asarray(decoded(ref_cfg))
    rel = lambda a, r: float(np.max(np.abs(a - r)) / np.max(np.abs(r)))  # noqa: E731
    errors = {}
    for name, attention in (("blocked_bf16", "blocked"), (f"{impl}_bf16", impl)):
      cfg = dataclasses.replace(ref_cfg, dtype="bfloat16", attention=attention)
      g = grads_of(cfg)
      grad_err = max(float(jnp.linalg.norm((a - r).ravel()) / jnp.linalg.norm(r.ravel()))
                     for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads)))
      errors[name] = {"logits": rel(np.asarray(jax.jit(lambda p, c=cfg: logits_of(c, p))(params))[real], ref_logits[real]),
                      "grads": grad_err,
                      "decode": rel(np.asarray(decoded(cfg)), ref_decoded)}
    base_err, lib_err = errors["blocked_bf16"], errors[f"{impl}_bf16"]
    ok = all(lib_err[k] <= 3 * base_err[k] + 1e-6 for k in lib_err)
    out[f"window{window}"] = {**errors, "passed": ok}
    out["passed"] = out["passed"] and ok
  return out


def part_ppo(sh: Shapes) -> dict[str, Any]:
  import ppo_iteration  # pylint: disable=g-import-not-at-top
  cfg = model_config(sh, max_len=max(sh.model["max_len"], sh.ppo_prompt + sh.ppo_response))
  s = ppo_iteration.PPOSettings(batch=sh.ppo_batch, prompt_len=sh.ppo_prompt, response_len=sh.ppo_response,
                                epochs=1, minibatches=sh.ppo_minibatches, eos_id=0, pad_id=1)
  lcfg = lora.LoraConfig(rank=sh.lora_rank, alpha=2.0 * sh.lora_rank,
                         targets=("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"))
  it = ppo_iteration.Iteration(cfg, s, lora_cfg=lcfg)
  warm, _ = it.run(jax.random.PRNGKey(100))
  phases, info = it.run(jax.random.PRNGKey(0))
  stats = jax.devices()[0].memory_stats() or {}
  return {"params": cfg.num_params(), "lora_params": lora.num_params(cfg, lcfg), "lora_rank": sh.lora_rank,
          "batch": s.batch, "prompt_len": s.prompt_len, "response_len": s.response_len, "epochs": s.epochs,
          "minibatches": s.minibatches, "phases_s": phases, "first_iteration_s": warm["total"], "info": info,
          "param_bytes": it.param_bytes(), "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def report(out_dir: str) -> str:
  res = {}
  for p in PARTS:
    path = os.path.join(out_dir, f"{p}.json")
    if os.path.exists(path):
      with open(path) as f:
        res[p] = json.load(f)
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  lines = ["# One GPU: MFU, decode against its rooflines, a 1B LoRA PPO iteration (`bash bench/gpu.sh`)", ""]
  meta = res.get("peak", res.get("ppo", {})).get("_meta", {})
  if meta:
    lines += [f"Device: {meta.get('device')}; JAX {meta.get('jax')}; git {meta.get('git')}; {meta.get('date')}"
              f"{'; SMOKE shapes (not a result)' if meta.get('smoke') else ''}.", ""]
  for p in [p for p in PARTS if "error" in res.get(p, {})]:
    lines += [f"**Part `{p}` failed** ({res.pop(p)['error'].splitlines()[0][:300]}); the traceback is in {p}.json.", ""]
  if "peak" in res:
    pk = res["peak"]
    lines += [f"Measured here: bfloat16 matmul peak {pk['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s "
              f"({pk['matmul_n']}^3 products), HBM bandwidth {pk['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s.", ""]
  if "check" in res:
    c = res["check"]
    lines += [f"Attention check: `{c['implementation']}` (bfloat16) against a float32 blocked reference, beside the "
              f"bfloat16 blocked path; largest relative errors (passes at most 3x the blocked path's): "
              f"**{'passed' if c['passed'] else 'FAILED'}**", "",
              "| window | path | logits | gradients | cached decoding | passed |", "|---|---|---|---|---|---|"]
    for w in [k for k in c if k.startswith("window")]:
      for name, e in c[w].items():
        if name != "passed":
          lines.append(f"| {w[6:]} | {name} | {e['logits']:.2e} | {e['grads']:.2e} | {e['decode']:.2e} | "
                       f"{'yes' if c[w]['passed'] else 'no'} |")
    lines.append("")
  if "train" in res:
    t = res["train"]
    lines += ["| pretraining step | params | batch x seq | step | tokens/s | MFU (target >= 45%) |", "|---|---|---|---|---|---|",
              f"| 1B Llama-shaped, bf16, {t['attention']} attention | {t['params'] / 1e9:.2f}B | {t['batch']} x "
              f"{t['seq_len']} | {t['step_s'] * 1e3:.0f} ms | {t['tokens_per_s']:,.0f} | {pct(t['mfu'])} |", ""]
  if "decode" in res:
    lines += ["| decode | tokens/s | bandwidth roofline | of it | compute roofline | of the binding one |",
              "|---|---|---|---|---|---|"]
    for k, r in res["decode"].items():
      if not k.startswith("b"):
        continue
      lines.append(f"| batch {r['batch']} (prompt {r['prompt']}, {r['steps']} steps) | {r['decode_tokens_per_s']:,.0f} | "
                   f"{r.get('bandwidth_tokens_per_s', float('nan')):,.0f} | {pct(r.get('fraction_of_bandwidth_roofline'))} | "
                   f"{r.get('compute_tokens_per_s', float('nan')):,.0f} | {pct(r.get('fraction_of_roofline'))} |")
    lines += ["", "Target: batch 1 at >= 50% of the bandwidth roofline.", ""]
  if "ppo" in res:
    p = res["ppo"]
    ph = p["phases_s"]
    lines += [f"PPO iteration, 1B policy with LoRA rank {p['lora_rank']} ({p['lora_params'] / 1e6:.1f}M adapter "
              f"parameters per role), batch {p['batch']}, prompt {p['prompt_len']}, response {p['response_len']}, "
              f"{p['epochs']} epoch x {p['minibatches']} minibatches; device peak "
              f"{(p['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB:", "",
              "| " + " | ".join(ph) + " |", "|" + "---|" * len(ph), "| " + " | ".join(f"{v:.2f} s" for v in ph.values()) + " |", ""]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  ap.add_argument("--out-dir", default=os.path.join(HERE, "gpu"))
  ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code on any backend")
  ap.add_argument("--report", action="store_true", help="only write OUT_DIR/RESULTS.md from the parts' JSON")
  args = ap.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  if args.report:
    print(report(args.out_dir))
    return
  parts = [p for p in args.parts.split(",") if p]
  if set(parts) - set(PARTS):
    ap.error(f"--parts={args.parts}: expected a subset of {PARTS}")
  sh = SMOKE_SHAPES if args.smoke else FULL
  import common  # pylint: disable=g-import-not-at-top
  meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "smoke": args.smoke,
          "git": common.git_revision(os.path.dirname(HERE)), "date": time.strftime("%Y-%m-%d %H:%M")}
  peak_path = os.path.join(args.out_dir, "peak.json")
  failed = []
  for p in parts:
    t0 = time.perf_counter()
    # A part that fails is recorded and the next one runs: device time is scarce, one run must give what it can.
    try:
      if p == "peak":
        res = part_peak(sh)
      else:
        pk = json.load(open(peak_path)) if os.path.exists(peak_path) else {}
        pk = {} if "error" in pk else pk
        res = {"ppo": lambda: part_ppo(sh), "check": lambda: part_check(sh),
             "train": lambda: part_train(sh, pk.get("bf16_flops_per_s")),
               "decode": lambda: part_decode(sh, pk.get("bf16_flops_per_s"), pk.get("bandwidth_bytes_per_s"))}[p]()
    except Exception as e:  # pylint: disable=broad-except
      failed.append(p)
      res = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}
      print(f"[gpu] {p} FAILED: {res['error']}\n{res['traceback']}", file=sys.stderr, flush=True)
    res["_meta"] = {**meta, "wall_s": time.perf_counter() - t0}
    with open(os.path.join(args.out_dir, f"{p}.json"), "w") as f:
      json.dump(res, f, indent=1)
    print(f"[gpu] {p}: {time.perf_counter() - t0:.0f} s", flush=True)
  if failed:
    sys.exit(f"[gpu] failed parts: {','.join(failed)} (their errors are in {args.out_dir}/<part>.json)")


if __name__ == "__main__":
  main()
