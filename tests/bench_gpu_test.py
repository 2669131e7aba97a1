"""bench/gpu.py (the prepared GPU run): its FLOP and byte counts against independent counts, and its parts run
end to end at --smoke shapes on the CPU with the reported numbers what their own definitions give."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu  # noqa: E402  pylint: disable=g-import-not-at-top


def test_the_1b_shapes_are_llama_3_2_1b_and_the_matmul_count_is_a_hand_count():
  cfg = gpu.model_config(gpu.FULL)
  assert cfg.num_params() == 1_235_814_400  # Llama-3.2-1B's published parameter count (tied embeddings)
  d, f, kv, v, layers = 2048, 8192, 8 * 64, 128256, 16
  per_layer = d * d + 2 * d * kv + d * d + 3 * d * f  # q, k, v, o; gate, up, down
  assert gpu.matmul_params(cfg) == layers * per_layer + v * d  # the unembedding (tied) is a matmul too
  assert gpu.matmul_params(cfg) == cfg.num_params() - (2 * layers + 1) * d  # everything but the norms
  seq = 2048
  assert gpu.train_flops_per_token(cfg, seq) == 6 * gpu.matmul_params(cfg) + 12 * layers * d * seq


def test_decode_rooflines():
  cfg = gpu.model_config(gpu.FULL)
  peak, bw, pbytes = 900e12, 4.0e12, 2.47e9
  r = gpu.decode_rooflines(cfg, batch=256, prompt=128, new=128, peak=peak, bandwidth=bw, param_bytes=pbytes)
  kv = 2 * 16 * 256 * (128 + 64) * 8 * 64 * 2  # K and V, layers, batch, mean filled positions, heads x width, bf16
  assert r["step_bytes"] == pytest.approx(pbytes + kv)
  assert r["bandwidth_tokens_per_s"] == pytest.approx(256 * bw / (pbytes + kv))
  assert r["compute_tokens_per_s"] == pytest.approx(peak / (2 * gpu.matmul_params(cfg)))


def test_smoke_parts_run_and_report_what_their_definitions_give(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--smoke", "--parts=peak,train,decode",
                         f"--out-dir={tmp_path}"], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  peak = json.load(open(tmp_path / "peak.json"))
  train = json.load(open(tmp_path / "train.json"))
  decode = json.load(open(tmp_path / "decode.json"))
  cfg = gpu.model_config(gpu.SMOKE_SHAPES, scan_layers=True)
  tokens = train["batch"] * train["seq_len"]
  assert train["tokens_per_s"] == pytest.approx(tokens / train["step_s"])
  assert train["model_flops_per_s"] == pytest.approx(gpu.train_flops_per_token(cfg, train["seq_len"]) * tokens
                                                     / train["step_s"])
  assert train["mfu"] == pytest.approx(train["model_flops_per_s"] / peak["bf16_flops_per_s"])
  for b in gpu.SMOKE_SHAPES.decode_batches:
    r = decode[f"b{b}"]
    assert 1 < r["steps"] <= gpu.SMOKE_SHAPES.decode_new
    assert r["fraction_of_bandwidth_roofline"] == pytest.approx(r["decode_tokens_per_s"] / r["bandwidth_tokens_per_s"])
  text = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--report", f"--out-dir={tmp_path}"],
                        capture_output=True, text=True, timeout=300, check=True).stdout
  assert "SMOKE shapes" in text and "MFU" in text and "batch 4" in text


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path, monkeypatch):
  """Device time is scarce: when one part raises (here the peak), its JSON holds the error, the next part runs
  (train, without a peak to divide by), the run exits non-zero naming the part, and the report says so."""
  def broken(sh):
    raise RuntimeError("out of memory in the peak part")

  monkeypatch.setattr(gpu, "part_peak", broken)
  with pytest.raises(SystemExit, match="failed parts: peak"):
    gpu.main(["--smoke", "--parts=peak,train", f"--out-dir={tmp_path}"])
  peak = json.load(open(tmp_path / "peak.json"))
  assert peak["error"] == "RuntimeError: out of memory in the peak part" and "broken" in peak["traceback"]
  train = json.load(open(tmp_path / "train.json"))
  assert train["mfu"] is None and train["tokens_per_s"] > 0
  text = gpu.report(str(tmp_path))
  assert "**Part `peak` failed** (RuntimeError: out of memory in the peak part)" in text and "MFU" in text


def test_smoke_ppo_part_runs_a_lora_iteration(tmp_path):
  """The PPO part (run first on the GPU, in its own process) at --smoke shapes: one LoRA PPO iteration after a
  warm-up, its phases adding up to the total and its adapter count the LoRA module's."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--smoke", "--parts=ppo",
                         f"--out-dir={tmp_path}"], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ppo = json.load(open(tmp_path / "ppo.json"))
  sh = gpu.SMOKE_SHAPES
  cfg = gpu.model_config(sh, max_len=max(sh.model["max_len"], sh.ppo_prompt + sh.ppo_response))
  lcfg = gpu.lora.LoraConfig(rank=sh.lora_rank, alpha=2.0 * sh.lora_rank,
                             targets=("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"))
  assert ppo["lora_params"] == gpu.lora.num_params(cfg, lcfg) > 0
  phases = ppo["phases_s"]
  assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
  assert (ppo["batch"], ppo["prompt_len"], ppo["response_len"]) == (sh.ppo_batch, sh.ppo_prompt, sh.ppo_response)


def test_attention_check_passes_here_and_catches_a_path_that_drops_the_padding(monkeypatch):
  """The `check` part on the CPU (xla, the library path here, against the blocked one) passes; the same check
  with a library path that ignores the padding mask (every query sees the left pads) fails."""
  good = gpu.part_check(gpu.SMOKE_SHAPES, windows=(5,))
  assert good["implementation"] == "xla" and good["passed"] and good["window5"]["passed"]
  assert 0 < good["window5"]["xla_bf16"]["logits"] <= 3 * good["window5"]["blocked_bf16"]["logits"]
  library = gpu.transformer._library_attention

  def no_padding(q, k, v, allowed_bts, implementation, causal_self=False):
    t, s = allowed_bts.shape[1:]
    return library(q, k, v, jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool), s - t), allowed_bts.shape),
                   implementation, causal_self)

  monkeypatch.setattr(gpu.transformer, "_library_attention", no_padding)
  bad = gpu.part_check(gpu.SMOKE_SHAPES, windows=(5,))
  assert not bad["passed"]
  assert bad["window5"]["xla_bf16"]["logits"] > 10 * bad["window5"]["blocked_bf16"]["logits"]
