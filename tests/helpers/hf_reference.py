"""Recomputes transformers' outputs for a saved Hugging Face model, in the peers' environment (it needs torch).

    bench/.venv-peers/bin/python tests/helpers/hf_reference.py --model DIR --inputs IN.npz --out OUT.npz \
        [--kind causal_lm|reward]
    bench/.venv-peers/bin/python tests/helpers/hf_reference.py --jobs JOBS.json   # many, one torch start-up

JOBS.json: a list of {"model", "inputs", "out", "kind"[, "greedy_new_tokens"]} objects (with greedy_new_tokens, also
the tokens of transformers' greedy `generate`, as "generated", EOS-stopped rows padded by transformers).

IN.npz holds `input_ids` and `attention_mask` ([b, t] integers, left padding allowed). OUT.npz gets
  causal_lm: `logits` [b, t, v] float32 (AutoModelForCausalLM)
  reward:    `scores` [b] float32, the model's `.logits[:, 0]` (AutoModelForSequenceClassification, num_labels 1;
             transformers pools at the last token that is not config.pad_token_id)
Both run in float32, eval mode, eager attention, one CPU thread, with explicit
position_ids = clip(cumsum(attention_mask) - 1, 0). It runs offline and never imports rlhf_jax; on any failure it
prints one line to stderr and exits 1.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def run(model_dir: str, inputs: str, out: str, kind: str, greedy_new_tokens: int = 0) -> None:
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no model folder {model_dir}")
    with np.load(inputs) as f:
        ids = np.asarray(f["input_ids"])
        mask = np.asarray(f["attention_mask"]) if "attention_mask" in f else np.ones_like(ids)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same [b, t] shape")
    kw = dict(torch_dtype=torch.float32, local_files_only=True, attn_implementation="eager",
              output_loading_info=True)
    if kind == "causal_lm":
        model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    else:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kw)
    if info.get("missing_keys"):
        # A missing head would be freshly (randomly) initialised: its outputs would mean nothing.
        raise ValueError(f"weights missing from {model_dir}: {sorted(info['missing_keys'])}")
    model = model.float().eval()
    pos = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    with torch.no_grad():
        res = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(pos.astype(np.int64)), use_cache=False)
    logits = res.logits.float().numpy()
    arrays = {"logits": logits} if kind == "causal_lm" else {"scores": logits[:, 0].astype(np.float32)}
    if greedy_new_tokens:  # transformers' own greedy decoding, from the folder's generation_config (its EOS stops)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                 attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False,
                                 max_new_tokens=greedy_new_tokens, temperature=None, top_p=None, top_k=None)
        arrays["generated"] = gen[:, ids.shape[1]:].numpy().astype(np.int32)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a save_pretrained folder")
    ap.add_argument("--inputs", help="npz with input_ids and attention_mask")
    ap.add_argument("--out", help="npz to write")
    ap.add_argument("--kind", choices=("causal_lm", "reward"), default="causal_lm")
    ap.add_argument("--jobs", help="a JSON list of {model, inputs, out, kind} (instead of the other flags)")
    args = ap.parse_args(argv)
    try:
        if args.jobs:
            import json
            with open(args.jobs) as f:
                jobs = json.load(f)
        elif args.model and args.inputs and args.out:
            jobs = [dict(model=args.model, inputs=args.inputs, out=args.out, kind=args.kind)]
        else:
            raise ValueError("give --jobs, or --model, --inputs and --out")
        for job in jobs:
            run(job["model"], job["inputs"], job["out"], job.get("kind", "causal_lm"), job.get("greedy_new_tokens", 0))
    except BaseException as e:  # noqa: BLE001 - one line, whatever went wrong
        if isinstance(e, SystemExit) and not e.code:
            return 0
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"hf_reference: error: {type(e).__name__}: {msg[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
