"""Import time and peak host memory of `rlhf_jax.models.hf.load_hf` on a Qwen2.5-0.5B-shaped checkpoint.

    .venv/bin/python bench/hf_import.py [--dir /tmp/qwen25_05b] [--dtype bfloat16] [--devices 1]

Writes (once) a randomly initialised checkpoint with Qwen2.5-0.5B's config.json shapes (494M parameters, bf16
as published, 2 shards with an index), then imports it in a fresh subprocess and reports the wall time, the
process's peak resident memory (ru_maxrss) and that peak less the resident memory after `import jax` and
before the import, against the model's bytes in the target dtype. No download: the weights are random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def write_checkpoint(path: str) -> None:
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
    return
  os.makedirs(path, exist_ok=True)
  c = QWEN25_05B
  d, f, v, h, k = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_attention_heads"], \
      c["num_key_value_heads"]
  e = d // h
  rng = np.random.default_rng(0)
  bf = lambda *shape: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
  shards = [{"model.embed_tokens.weight": bf(v, d), "model.norm.weight": bf(d)}, {}]
  for i in range(c["num_hidden_layers"]):
    p, shard = f"model.layers.{i}.", shards[0 if i < 8 else 1]
    shard.update({p + "input_layernorm.weight": bf(d), p + "post_attention_layernorm.weight": bf(d),
                  p + "self_attn.q_proj.weight": bf(h * e, d), p + "self_attn.q_proj.bias": bf(h * e),
                  p + "self_attn.k_proj.weight": bf(k * e, d), p + "self_attn.k_proj.bias": bf(k * e),
                  p + "self_attn.v_proj.weight": bf(k * e, d), p + "self_attn.v_proj.bias": bf(k * e),
                  p + "self_attn.o_proj.weight": bf(d, h * e), p + "mlp.gate_proj.weight": bf(f, d),
                  p + "mlp.up_proj.weight": bf(f, d), p + "mlp.down_proj.weight": bf(d, f)})
  weight_map = {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({t: name for t in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {}, "weight_map": weight_map}, fh)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(c, fh, indent=2)


_CHILD = r"""
import json, os, resource, sys, time
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[3])}"
import jax, numpy as np
sys.path.insert(0, sys.argv[4])
from rlhf_jax import sharding
from rlhf_jax.models import hf
def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
base = rss()
mesh = sharding.make_mesh(fsdp=-1)
t0 = time.perf_counter()
params, cfg = hf.load_hf(sys.argv[1], mesh, dtype=sys.argv[2])
jax.block_until_ready(params)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps(dict(params=cfg.num_params(), model_bytes=nbytes, wall_s=wall, rss_before=base, peak_rss=peak,
                      devices=jax.device_count(), dtype=sys.argv[2])))
"""


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dir", default="/tmp/qwen25_05b_random")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--devices", type=int, default=1)
  args = ap.parse_args()
  write_checkpoint(args.dir)
  out = subprocess.run([sys.executable, "-c", _CHILD, args.dir, args.dtype, str(args.devices), ROOT],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(out.stderr[-3000:])
  r = json.loads(out.stdout.strip().splitlines()[-1])
  over = (r["peak_rss"] - r["rss_before"]) / r["model_bytes"] - 1
  print(json.dumps(r))
  print(f"| Qwen2.5-0.5B-shaped ({r['params'] / 1e6:.0f}M, {r['dtype']}, {r['devices']} device(s)) | "
        f"{r['wall_s']:.1f} s | peak RSS {r['peak_rss'] / 2**30:.2f} GiB; {(r['peak_rss'] - r['rss_before']) / 2**30:.2f} "
        f"GiB over the {r['rss_before'] / 2**30:.2f} GiB before the import, model {r['model_bytes'] / 2**30:.2f} GiB "
        f"({over:+.0%}) |")


if __name__ == "__main__":
  main()
