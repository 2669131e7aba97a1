"""transformers' chat template ids and assistant masks for a tokenizer folder, in the peers' environment.

    bench/.venv-peers/bin/python tests/helpers/hf_chat_reference.py --tokenizer DIR --conversations IN.json \
        --out OUT.json
    bench/.venv-peers/bin/python tests/helpers/hf_chat_reference.py --jobs JOBS.json   # many, one import

JOBS.json: a list of {"tokenizer", "conversations", "out"} objects. IN.json: a list of conversations, each a list
of {"role", "content"} turns. OUT.json gets
  {"vocab_size": len(tokenizer), "template_has_generation": bool,
   "conversations": [{"text", "ids", "text_generation_prompt", "ids_generation_prompt", "assistant_masks"}]}
where ids / ids_generation_prompt are apply_chat_template(conversation, tokenize=True) without / with
add_generation_prompt, text* the same with tokenize=False, and assistant_masks is
apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"] (without the
generation prompt) when the template has a {% generation %} block, else null; then "offsets" holds the
character span of each of those tokens (return_offsets_mapping), else null. The tokenizer is loaded with
AutoTokenizer.from_pretrained(DIR, local_files_only=True). It runs offline and never imports rlhf_jax; on any
failure it prints one line to stderr and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")  # transformers' own test for the block


def run(tokenizer_dir: str, conversations: str, out: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"no tokenizer folder {tokenizer_dir}")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    with open(conversations, encoding="utf-8") as f:
        convs = json.load(f)
    if not isinstance(convs, list) or not all(isinstance(c, list) for c in convs):
        raise ValueError(f"{conversations}: expected a JSON list of conversations (lists of turns)")
    template = tok.get_chat_template()
    has_generation = bool(GENERATION_TAG.search(template))
    results = []
    for conv in convs:
        row = {
            "text": tok.apply_chat_template(conv, tokenize=False),
            "ids": list(tok.apply_chat_template(conv, tokenize=True)),
            "text_generation_prompt": tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
            "ids_generation_prompt": list(tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)),
            "assistant_masks": None,
            "offsets": None,
        }
        # What apply_chat_template(tokenize=True) is in 4.55: the rendered text, tokenised without added specials.
        for text, ids in ((row["text"], row["ids"]), (row["text_generation_prompt"], row["ids_generation_prompt"])):
            if tok(text, add_special_tokens=False)["input_ids"] != ids:
                raise ValueError(f"{tokenizer_dir}: apply_chat_template(tokenize=True) is not the tokenised text")
        if has_generation:
            enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            if list(enc["input_ids"]) != row["ids"]:
                raise ValueError(f"{tokenizer_dir}: return_dict=True gave other ids than tokenize=True")
            row["assistant_masks"] = [int(m) for m in enc["assistant_masks"]]
            offsets = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            row["offsets"] = [list(o) for o in offsets]
        results.append(row)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"vocab_size": len(tok), "template_has_generation": has_generation, "conversations": results}, f,
                  ensure_ascii=False)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a save_pretrained tokenizer folder")
    ap.add_argument("--conversations", help="JSON list of conversations")
    ap.add_argument("--out", help="JSON to write")
    ap.add_argument("--jobs", help="a JSON list of {tokenizer, conversations, out} (instead of the other flags)")
    args = ap.parse_args(argv)
    try:
        if args.jobs:
            with open(args.jobs, encoding="utf-8") as f:
                jobs = json.load(f)
        elif args.tokenizer and args.conversations and args.out:
            jobs = [dict(tokenizer=args.tokenizer, conversations=args.conversations, out=args.out)]
        else:
            raise ValueError("give --jobs, or --tokenizer, --conversations and --out")
        for job in jobs:
            run(job["tokenizer"], job["conversations"], job["out"])
    except BaseException as e:  # noqa: BLE001 - one line, whatever went wrong
        if isinstance(e, SystemExit) and not e.code:
            return 0
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"hf_chat_reference: error: {type(e).__name__}: {msg[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
