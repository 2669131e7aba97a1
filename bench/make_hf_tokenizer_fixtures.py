"""Writes tiny Hugging Face tokenizer folders (trained here, saved by transformers itself) for the chat tests.

    bench/.venv-peers/bin/python bench/make_hf_tokenizer_fixtures.py          # -> tests/data/hf_tokenizers/<name>/
    bench/.venv-peers/bin/python bench/make_hf_tokenizer_fixtures.py --out DIR

Each folder holds a byte-level BPE trained with the `tokenizers` library on the short English text below (so any
UTF-8 text encodes), its special tokens appended after the learned vocabulary as real checkpoints have them, and
what `PreTrainedTokenizerFast(...).save_pretrained` writes (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja) plus a generation_config.json from `GenerationConfig`:

  chatml   Qwen2.5's pre-tokenizer (NFC, its split regex), specials <|endoftext|> (pad) <|im_start|> <|im_end|>
           (eos), the non-special added tokens <tool_call> </tool_call>, and Qwen2.5-Instruct's chat template
           verbatim (default system prompt "You are Qwen, created by Alibaba Cloud. ..."); generation_config stops
           on [<|im_end|>, <|endoftext|>] as Qwen2.5-Instruct's does.
  llama3   Llama 3's split regex, <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|>
           <|eot_id|> and reserved specials in Llama 3's order, a post-processor that prepends <|begin_of_text|>
           (so a tokenizer that adds specials would show it), the Meta-Llama-3-Instruct chat template, no pad
           token, and eos_token <|end_of_text|> as the first Llama-3-Instruct release had it; generation_config
           stops on [<|end_of_text|>, <|eot_id|>].
  system   GPT-2's byte-level pre-tokenizer, <|bos|> <|pad|> <|system|> <|user|> <|assistant|> <|end|>, and a
           template that renders the system turn specially (a default system prompt when there is none; a
           system turn after the first raises), with {% generation %} around each assistant content so that
           transformers' return_assistant_tokens_mask works on it. Saved with save_jinja_files=False: its
           template lives in tokenizer_config.json, the older layout.

Deterministic: the BPE trainer breaks ties by token id and the text is fixed, so two runs write identical files
(checked by --check). The library never imports this: it needs transformers (bench/setup_peers.sh).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "hf_tokenizers"

TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
Hello there! How can I help you today? I would like to know the time, please.
It is three o'clock in the afternoon. Thank you very much; you're welcome.
What is two plus two? Two plus two is four. What is three plus three? It is six.
The assistant writes a reply, and the user reads it. Then the user asks again.
We're sure they'll say it's fine, and I've heard you'd agree; I'm not so certain.
Numbers such as 1, 22, 333, 4444 and 2024 appear in text; so do symbols like #, $, %, & and @.
Rivers flow to the sea. Mountains rise above the clouds. The weather is cold in winter and warm in summer.
Please summarise the following paragraph in one sentence. Sure, here is a summary of the paragraph.
Tell me a story about a cat who lived on a boat. Once upon a time, a cat lived on a small boat.
def add(a, b):
    return a + b
Lists: apples, oranges, pears; colours: red, green, blue.
"""

# Qwen2's and Llama 3's pre-tokenizer regexes (tokenizer.json of Qwen2.5 and Meta-Llama-3).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-Instruct's chat template, as in its tokenizer_config.json.
QWEN25_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SYSTEM_TEMPLATE = """\
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'You are a tiny test assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|system|>\\n' + system_message + '<|end|>\\n' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '<|user|>\\n' + message['content'] + '<|end|>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\\n' }}
        {%- generation %}
            {{- message['content'] }}
        {%- endgeneration %}
        {{- '<|end|>\\n' }}
    {%- else %}
        {{- raise_exception('a system turn may only come first; found a later one') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- endif %}
"""


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _bpe(vocab_size: int, split: str | None, *, nfc: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split is None:  # GPT-2: the byte-level pre-tokenizer's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(keepends=True), trainer)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def chatml(out: Path) -> None:
    tok = _bpe(400, QWEN2_SPLIT, nfc=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([_special(s) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ("<tool_call>", "</tool_call>")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=QWEN25_TEMPLATE,
        model_max_length=32768, clean_up_tokenization_spaces=False, split_special_tokens=False, errors="replace")
    fast.save_pretrained(out)
    ids = fast.convert_tokens_to_ids
    GenerationConfig(bos_token_id=ids("<|endoftext|>"), eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
                     pad_token_id=ids("<|endoftext|>"), do_sample=True, temperature=0.7, top_p=0.8).save_pretrained(out)


def llama3(out: Path) -> None:
    tok = _bpe(450, LLAMA3_SPLIT)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    tok.add_special_tokens([_special(s) for s in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE, model_max_length=8192, clean_up_tokenization_spaces=True)
    fast.save_pretrained(out)
    ids = fast.convert_tokens_to_ids
    GenerationConfig(bos_token_id=bos, eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")], do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(out)


def system(out: Path) -> None:
    tok = _bpe(320, None)
    specials = ["<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.add_special_tokens([_special(s) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"], chat_template=SYSTEM_TEMPLATE,
        model_max_length=2048, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out, save_jinja_files=False)  # the template goes into tokenizer_config.json
    ids = fast.convert_tokens_to_ids
    GenerationConfig(bos_token_id=ids("<|bos|>"), eos_token_id=ids("<|end|>"),
                     pad_token_id=ids("<|pad|>")).save_pretrained(out)


FIXTURES = {"chatml": chatml, "llama3": llama3, "system": system}


def write(root: Path) -> None:
    for name, make in FIXTURES.items():
        out = root / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        make(out)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="folder to write <name>/ into")
    ap.add_argument("--check", action="store_true", help="write twice into temporary folders; fail if they differ")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            write(Path(a))
            write(Path(b))
            if _digest(Path(a)) != _digest(Path(b)):
                print("make_hf_tokenizer_fixtures: two runs wrote different files", file=sys.stderr)
                return 1
        print("make_hf_tokenizer_fixtures: deterministic")
    write(Path(args.out))
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(f"wrote {', '.join(FIXTURES)} under {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
