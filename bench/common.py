"""Settings shared by our side (bench/ours.py) and the peers' side (bench/peers.py).

Pure Python, no JAX and no torch: the peers' virtual environment imports it too, so both sides read the SAME
model sizes, batch shapes, lengths, epochs and minibatches from one place.

Model sizes are GPT-2-style decoders: pre-norm blocks, GELU MLP of width d_ff, learned absolute positions,
untied unembedding, no dropout. Ours uses RMSNorm and no biases; Hugging Face's GPT2LMHeadModel uses
LayerNorm and biases, so its parameter count is slightly larger (both counts are reported).

FLOPs (PaLM, arXiv 2204.02311, appendix B): a training step costs per token
    6 * N + 12 * L * d * T
where N counts the matmul parameters (every weight matrix, the unembedding included, the embedding lookup
and norms excluded), L layers, d model width and T the sequence length (the attention score and value
products, forward and backward, counted over the full T x T square as PaLM does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
from typing import Any

# The vocabulary of the project's SentencePiece default (configs.tokenizer_config); small on purpose, like
# the rest of the laptop-sized defaults.
VOCAB_SIZE = 512
PAD_ID = 0
EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class Size:
  """One model size; the field names follow rlhf_jax.models.transformer.ModelConfig."""

  name: str
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_len: int
  vocab_size: int = VOCAB_SIZE

  def matmul_params(self) -> int:
    """N of the FLOPs formula: attention (4 d^2) and MLP (2 d d_ff) matrices per layer, plus the unembedding."""
    d = self.d_model
    return self.n_layers * (4 * d * d + 2 * d * self.d_ff) + d * self.vocab_size

  def train_flops_per_token(self, seq_len: int) -> float:
    return 6.0 * self.matmul_params() + 12.0 * self.n_layers * self.d_model * seq_len

  def min_forward_flops(self, tokens: float, attended_keys: float, logits: float) -> float:
    """The matmul FLOPs a forward pass cannot avoid (a lower bound, unlike the PaLM count above).

    2 per layer weight per token; the unembedding only at the `logits` positions that need one; the score and
    value products only over the keys each query attends (`attended_keys`, summed over queries: T(T+1)/2 for
    one causal sequence, no padding). Norms, softmax and other elementwise work are left out.
    """
    layer_params = self.matmul_params() - self.d_model * self.vocab_size
    return (2.0 * layer_params * tokens + 2.0 * self.d_model * self.vocab_size * logits
            + 4.0 * self.n_layers * self.d_model * attended_keys)


def causal_keys(start: int, stop: int) -> int:
  """Keys attended, summed over the queries at positions start..stop-1 of a causal sequence: sum of (i + 1)."""
  return (stop * (stop + 1) - start * (start + 1)) // 2


def generate_min_flops(size: "Size", batch: int, prompt_len: int, new_tokens: int) -> float:
  """Lower bound on the FLOPs of sampling `new_tokens` after a `prompt_len` prompt with a KV cache.

  Prefill: the prompt through every layer, logits at its last position (the first new token). Then
  new_tokens - 1 decode steps of one token each, attending the prompt and the tokens before it.
  """
  prefill = size.min_forward_flops(prompt_len, causal_keys(0, prompt_len), 1)
  total = prompt_len + new_tokens - 1
  decode = size.min_forward_flops(new_tokens - 1, causal_keys(prompt_len, total), new_tokens - 1)
  return batch * (prefill + decode)


def ppo_iteration_min_flops(st: "Settings") -> float:
  """Lower bound on the FLOPs of one PPO iteration at these settings, whoever runs it.

  The rollout (generate_min_flops); one forward pass each of the reference (logits on the response only), the
  value and the reward model (no unembedding) over prompt + response; then `epochs` passes over every episode
  of a policy and a value gradient step, each at least 3 forward passes (the backward pass is two matmuls per
  forward one). The old log-probs are not recomputed (TRL takes the sampler's).
  """
  size = SIZES[st.ppo_size]
  p, n, b = st.ppo_prompt_len, st.ppo_response_len, st.ppo_batch
  keys = causal_keys(0, p + n)
  policy_fwd = size.min_forward_flops(p + n, keys, n)
  scalar_fwd = size.min_forward_flops(p + n, keys, 0)
  rollout = generate_min_flops(size, b, p, n)
  passes = b * (policy_fwd + 2 * scalar_fwd)  # reference, value, reward
  update = st.ppo_epochs * b * 3 * (policy_fwd + scalar_fwd)
  return rollout + passes + update


# `small` and `base` are the presets of rlhf_jax.models.presets (base = GPT-2 small's 12 x 768 body).
SIZES = {
    "small": Size("small", d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=256),
    "base": Size("base", d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything both sides must agree on. `quick` shrinks the timed repetitions, never the shapes."""

  # Training step: batch x sequence tokens per step, per model size.
  train: tuple[tuple[str, int, int], ...] = (("small", 32, 256), ("base", 2, 256))
  train_warmup: int = 1
  train_steps: int = 2
  # Generation: small model, prompt of prompt_len tokens, new_tokens sampled at temperature 1.
  gen_size: str = "small"
  gen_batches: tuple[int, ...] = (1, 64)
  gen_prompt_len: int = 64
  gen_new_tokens: int = 64
  gen_repeats: int = 2  # with the KV cache; the no-cache runs are timed once (they are 10-100x slower)
  # PPO iteration: small policy, reference, value and reward models.
  ppo_size: str = "small"
  ppo_batch: int = 64  # rollouts per iteration
  ppo_prompt_len: int = 64
  ppo_response_len: int = 64
  ppo_epochs: int = 4
  ppo_minibatches: int = 4
  ppo_iterations: int = 1  # timed iterations after one warm-up iteration
  # The `base`-size PPO iteration (groups ppo_base, ppo_base_lora; bench/ppo_memory.py): where the parameters,
  # not the runtime, dominate memory. (size, batch, prompt, response, epochs, minibatches), and the LoRA run's
  # rank on every attention and MLP projection.
  ppo_base: tuple[str, int, int, int, int, int] = ("base", 8, 32, 32, 1, 1)
  ppo_base_lora_rank: int = 16
  # Peak: a chain of square float32 matrix products.
  matmul_n: int = 2048
  matmul_chain: int = 8

  def quick(self) -> "Settings":
    return dataclasses.replace(self, train_warmup=1, train_steps=1, gen_repeats=1, ppo_iterations=1,
                               matmul_chain=2)


def ppo_base_settings(st: Settings) -> Settings:
  """`st` with its PPO fields at the ppo_base shapes."""
  size, b, p, n, e, m = st.ppo_base
  return dataclasses.replace(st, ppo_size=size, ppo_batch=b, ppo_prompt_len=p, ppo_response_len=n, ppo_epochs=e,
                             ppo_minibatches=m)


def settings(quick: bool = False) -> Settings:
  s = Settings()
  return s.quick() if quick else s


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU model, cores, memory, OS."""
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gib = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          mem_gib = round(int(line.split()[1]) / 2**20, 1)
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem_gib, "os": platform.platform(),
          "python": platform.python_version()}


def peak_rss_bytes() -> int:
  """High-water mark of this process's resident memory (Linux reports KiB)."""
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs: list[float]) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def emit(results: dict[str, Any], as_json: bool) -> None:
  """The one output format of both sides: a JSON object on the last line of stdout (the driver reads it)."""
  if as_json:
    print(json.dumps(results))
  else:
    print(json.dumps(results, indent=2))


def git_revision(repo: str) -> str:
  try:
    return subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


# *_lean: the same PPO iteration with activation recomputation, as a researcher short of memory runs it: ours
# with scanned, rematerialised layers (model.scan_layers, model.remat), TRL with gradient checkpointing.
GROUPS = ("peak", "train", "generate", "ppo", "ppo_base", "ppo_base_lora", "ppo_base_lean",
          "ppo_base_lora_lean")  # ppo_base_lora*: ours only


def main(run, doc: str | None, argv=None) -> None:
  """The command line both sides share: `--groups`, `--quick`, `--json`; run(groups, settings) -> results."""
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {GROUPS}")
  p.add_argument("--quick", action="store_true", help="fewer timed repetitions (same shapes)")
  p.add_argument("--json", action="store_true", help="one JSON line on stdout")
  args = p.parse_args(argv)
  groups = [g for g in args.groups.split(",") if g]
  bad = [g for g in groups if g not in GROUPS]
  if bad:
    p.error(f"unknown group(s) {bad}; expected a subset of {GROUPS}")
  emit(run(groups, settings(args.quick)), args.json)
