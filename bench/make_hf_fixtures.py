"""Writes tiny random-weight Hugging Face model fixtures, saved by transformers itself, plus reference outputs.

    bench/.venv-peers/bin/python bench/make_hf_fixtures.py            # -> tests/data/hf/<family>/
    bench/.venv-peers/bin/python bench/make_hf_fixtures.py --out DIR

For each family (gpt2, llama3, qwen2, qwen3, mistral) it writes `config.json`, `generation_config.json`, the
safetensors weights (llama3 sharded, with `model.safetensors.index.json`) and `reference.npz`:

  input_ids      [3, 12] int32   left-padded batch (0, 4 and 7 pads), real tokens in [3, 96), pad = 0
  attention_mask [3, 12] int32
  logits         [3, 12, 96] f32 full forward, position_ids = clip(cumsum(mask) - 1, 0) passed explicitly
  generated      [3, 20] int32   the 20 new tokens of greedy `generate` (no EOS stop)
  gen_margin     [] f32          smallest top-1 minus top-2 logit gap over the 20 greedy steps and 3 rows

Everything is deterministic (fixed seeds, one CPU thread, eager attention, zip entries with a fixed date), so two
runs write bit-identical files. The library never imports this: it needs torch (bench/setup_peers.sh).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np
import torch
import transformers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB, LAYERS, MAX_POS = 96, 2, 64
BATCH, PROMPT_LEN, NEW_TOKENS = 3, 12, 20
PADS = (0, 4, 7)  # left pads per row
PAD, BOS, EOS = 0, 1, 2
INIT_RANGE = 0.4
MIN_MARGIN = 1e-3
REPO = Path(__file__).resolve().parent.parent

COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=INIT_RANGE,
              torch_dtype="float32")
LLAMA_LIKE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  num_hidden_layers=LAYERS, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0,
                  hidden_act="silu")


def _families():
    return {
        "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(
            n_embd=32, n_head=4, n_layer=LAYERS, n_positions=MAX_POS, activation_function="gelu_new",
            layer_norm_epsilon=1e-5, **COMMON), {}),
        "llama3": (LlamaForCausalLM, lambda: LlamaConfig(
            **LLAMA_LIKE, head_dim=8, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}, **COMMON), {"max_shard_size": "40KB"}),
        "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(
            **LLAMA_LIKE, tie_word_embeddings=True, use_sliding_window=False, **COMMON), {}),
        "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(
            **LLAMA_LIKE, head_dim=16, tie_word_embeddings=False, use_sliding_window=False, **COMMON), {}),
        "mistral": (MistralForCausalLM, lambda: MistralConfig(
            **LLAMA_LIKE, sliding_window=6, tie_word_embeddings=False, **COMMON), {}),
    }


FAMILY_SEED = {"gpt2": 1000, "llama3": 2000, "qwen2": 3000, "qwen3": 4000, "mistral": 5000}


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm weights 1 + 0.1*randn, every bias (norms' too) 0.1*randn, so their handling is actually tested."""
    with torch.no_grad():
        seen = set()
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if pname == "bias":
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif pname == "weight" and _is_norm(module):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def make_inputs(rng: np.random.RandomState):
    ids = np.full((BATCH, PROMPT_LEN), PAD, np.int32)
    mask = np.zeros((BATCH, PROMPT_LEN), np.int32)
    for row, pads in enumerate(PADS):
        ids[row, pads:] = rng.randint(3, VOCAB, size=PROMPT_LEN - pads)
        mask[row, pads:] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)


def forward_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(positions(mask)).long(), use_cache=False)
    return out.logits.float().numpy()


def greedy(model, ids: np.ndarray, mask: np.ndarray):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
            pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True, output_logits=True,
            output_scores=True, top_k=None, top_p=None, temperature=None)
    new = out.sequences[:, ids.shape[1]:].numpy().astype(np.int32)
    step_logits = torch.stack(out.logits, 1).float().numpy()  # [b, 20, v], raw (no processor applied)
    scores = torch.stack(out.scores, 1).float().numpy()
    if new.shape != (BATCH, NEW_TOKENS):
        raise SystemExit(f"generate gave {new.shape} new tokens, wanted {(BATCH, NEW_TOKENS)}")
    if not np.array_equal(step_logits, scores):
        raise SystemExit("a logits processor changed the greedy scores")
    if not np.array_equal(step_logits.argmax(-1), new):
        raise SystemExit("generated tokens are not the argmax of the step logits")
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    margin = np.float32((top2[..., 1] - top2[..., 0]).min())
    return new, step_logits, margin


def no_cache_greedy(model, ids: np.ndarray, mask: np.ndarray):
    """Greedy by full forwards with explicit positions: a check that generate's cache and masks agree."""
    seq, m = ids, mask
    toks, logits = [], []
    for _ in range(NEW_TOKENS):
        last = forward_logits(model, seq, m)[:, -1]
        tok = last.argmax(-1).astype(np.int32)
        toks.append(tok)
        logits.append(last)
        seq = np.concatenate([seq, tok[:, None]], 1)
        m = np.concatenate([m, np.ones((BATCH, 1), np.int32)], 1)
    return np.stack(toks, 1), np.stack(logits, 1)


def save_npz(path: Path, **arrays) -> None:
    """Like np.savez, but with a fixed zip date so that reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def build(name: str, out_root: Path, verbose: bool = True) -> dict:
    cls, make_config, save_kw = _families()[name]
    seed = FAMILY_SEED[name]
    for attempt in range(50):
        torch.manual_seed(seed)
        rng = np.random.RandomState(seed)
        config = make_config()
        config._attn_implementation = "eager"
        model = cls(config).float().eval()
        _perturb(model, torch.Generator().manual_seed(seed + 1))
        ids, mask = make_inputs(rng)
        new, step_logits, margin = greedy(model, ids, mask)
        if margin >= MIN_MARGIN:
            break
        if verbose:
            print(f"  {name}: seed {seed} has gen_margin {margin:.2e} < {MIN_MARGIN}, next seed")
        seed += 1
    else:
        raise SystemExit(f"{name}: no seed gave gen_margin >= {MIN_MARGIN}")
    logits = forward_logits(model, ids, mask)
    nc_toks, nc_logits = no_cache_greedy(model, ids, mask)
    if not np.array_equal(nc_toks, new):
        raise SystemExit(f"{name}: generate and the no-cache greedy loop disagree")
    cache_diff = float(np.abs(nc_logits - step_logits).max())

    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True, **save_kw)
    save_npz(d / "reference.npz", input_ids=ids, attention_mask=mask, logits=logits.astype(np.float32),
             generated=new, gen_margin=margin)
    if verbose:
        print(f"{name}: seed {seed}, gen_margin {margin:.4f}, generate-vs-no-cache step logits max diff "
              f"{cache_diff:.2e}, files {sorted(p.name for p in d.iterdir())}")
    return {"seed": seed, "gen_margin": float(margin)}


CHAT_TOKENIZER = REPO / "tests" / "data" / "hf_tokenizers" / "chatml"
CHAT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_chat(out_root: Path, name: str = "qwen2_chat", seed: int = 6000) -> None:
    """A tiny random Qwen2 model that comes with a tokenizer (the ChatML fixture's, 405 tokens; the vocabulary is
    padded to 408 as Qwen's is) and a context of 1024: the model of the real-data smoke experiments
    (experiments/tldr, experiments/hh). transformers' own greedy tokens for it are checked against our sampler by
    the test of the exported policy, so it needs no reference.npz."""
    gen = json.loads((CHAT_TOKENIZER / "generation_config.json").read_text())
    torch.manual_seed(seed)
    config = Qwen2Config(**{**LLAMA_LIKE, "max_position_embeddings": 1024}, vocab_size=408, tie_word_embeddings=True,
                         use_sliding_window=False, pad_token_id=gen["pad_token_id"], bos_token_id=gen["bos_token_id"],
                         eos_token_id=gen["eos_token_id"], initializer_range=INIT_RANGE, torch_dtype="float32")
    model = Qwen2ForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed + 1))
    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d, safe_serialization=True)
    for f in CHAT_TOKENIZER_FILES:
        shutil.copy(CHAT_TOKENIZER / f, d / f)
    print(f"{name}: seed {seed}, files {sorted(p.name for p in d.iterdir())}")


def write_readme(out_root: Path, info: dict) -> None:
    rows = "\n".join(f"| `{n}` | {i['seed']} | {i['gen_margin']:.4f} |" for n, i in info.items())
    text = f"""# Tiny Hugging Face model fixtures

Random-weight (float32, 2 layers, vocab 96) GPT-2, Llama 3, Qwen2, Qwen3 and Mistral models, saved by
`transformers` itself (`save_pretrained(..., safe_serialization=True)`; `llama3` is sharded, with
`model.safetensors.index.json`), so that the JAX side can be checked against transformers without torch.
Norm weights and biases are perturbed away from 1 and 0. Each `reference.npz` holds a left-padded batch
(`input_ids`, `attention_mask`), transformers' `logits` for it (eager attention, explicit
`position_ids = clip(cumsum(mask) - 1, 0)`), the 20 greedily `generated` tokens (no EOS stop) and `gen_margin`,
the smallest top-1 minus top-2 logit gap over those greedy steps. Logits at pad positions depend on how an
implementation treats fully masked query rows: compare only where `attention_mask` is 1.
`qwen2_chat` (no reference.npz) is a Qwen2 of vocab 408 and context 1024 with the ChatML tokenizer fixture's files, for
the real-data smoke experiments. Tied models (`gpt2`, `qwen2`) have no `lm_head.weight` in their file; `mistral`'s sliding window (6) counts the
token itself (key j is seen from query i when i - 6 < j <= i); `qwen3`'s head_dim (16) is not hidden/heads.

Regenerate (deterministic: reruns are byte-identical) with

    bash bench/setup_peers.sh
    bench/.venv-peers/bin/python bench/make_hf_fixtures.py

Written with transformers {transformers.__version__}, torch {torch.__version__}.
`tests/helpers/hf_reference.py` (same environment) recomputes logits or reward scores for any saved model.

| family | seed | gen_margin |
| --- | --- | --- |
{rows}
"""
    (out_root / "README.md").write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "hf")
    ap.add_argument("--only", nargs="*", help="families to (re)write; default all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    names = args.only or list(_families())
    args.out.mkdir(parents=True, exist_ok=True)
    info = {n: build(n, args.out) for n in names if n != "qwen2_chat"}
    if not args.only or "qwen2_chat" in args.only:
        build_chat(args.out)
    if not args.only:
        write_readme(args.out, info)
    print(json.dumps({n: round(i["gen_margin"], 4) for n, i in info.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
