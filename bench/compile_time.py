"""Compile time of a train step (forward + backward) of a 24-layer model: scanned layers against unrolled.

    .venv/bin/python bench/compile_time.py [--layers 24] [--d_model 256]

Lowers and compiles `jax.grad` of the next-token loss for `model.scan_layers` False and True (alternating, two
rounds, the fastest of each kept) and prints the times; issue target: scanned at most a quarter of unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rlhf_jax.models import transformer  # noqa: E402


def compile_seconds(cfg: transformer.ModelConfig, batch: int, seq: int) -> float:
  params = jax.eval_shape(lambda: transformer.init(jax.random.PRNGKey(0), cfg))
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(p, t):
    logits, _ = transformer.forward(p, t, cfg)
    return -jnp.mean(transformer.token_logprobs(logits[:, :-1], t[:, 1:]))

  t0 = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args()
  base = transformer.ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=8,
                                 n_kv_heads=8, d_ff=4 * args.d_model, max_len=256)
  times = {"unrolled": [], "scanned": []}
  for _ in range(args.rounds):
    for name, cfg in (("unrolled", base), ("scanned", dataclasses.replace(base, scan_layers=True))):
      times[name].append(compile_seconds(cfg, 4, 128))
  best = {k: min(v) for k, v in times.items()}
  print(json.dumps({"layers": args.layers, "d_model": args.d_model, "compile_s": times}))
  print(f"| train-step compile, {args.layers} layers (d={args.d_model}) | unrolled {best['unrolled']:.1f} s | "
        f"scanned {best['scanned']:.1f} s | {best['scanned'] / best['unrolled']:.2f} of unrolled |")


if __name__ == "__main__":
  main()
