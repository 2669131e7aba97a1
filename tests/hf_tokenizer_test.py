"""Hugging Face tokenizers and chat templates (rlhf_jax.tokenizers.HFTokenizer) against transformers.

The folders under tests/data/hf_tokenizers/ are tiny byte-level BPE tokenizers saved by transformers
(bench/make_hf_tokenizer_fixtures.py): `chatml` (Qwen2.5's template), `llama3` (Meta-Llama-3-Instruct's) and
`system` (a system turn rendered specially, {% generation %} around replies). transformers' own ids and
assistant masks come from tests/helpers/hf_chat_reference.py, run once in the peers' environment
(bench/.venv-peers); the other tests need no transformers.
"""

import datetime
import json
import os
import pickle
import shutil
import subprocess

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from helpers import hf_helpers
from rlhf_jax import tokenizers as tk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "hf_tokenizers")
NAMES = ("chatml", "llama3", "system")
REFERENCE_SCRIPT = os.path.join(ROOT, "tests", "helpers", "hf_chat_reference.py")

U = lambda content: {"role": "user", "content": content}  # noqa: E731
A = lambda content: {"role": "assistant", "content": content}  # noqa: E731
S = lambda content: {"role": "system", "content": content}  # noqa: E731

CONVERSATIONS = [
    [U("Hello there!"), A("Hi! How can I help you today?")],
    [S("You are terse."), U("What is 2+2?"), A("4."), U("And 3+3?"), A("It is six.")],
    [U("Ça va? 日本語 🙂 naïve"), A("Très bien — merci! 😀"), U("Encore une fois"), A("Voilà: ß, Ω, 你好."),
     U("Last one."), A("Done, thank you.")],
    [S("Réponds en français."), U("L'e\u0301te\u0301 est-il chaud?"), A("Oui, l'été est chaud.")],
    [U("Tell me a story about a cat.")],
    [U("Tabs\tand  spaces\n\nand new lines "), A("  a padded reply  "), U("ok")],
    [U("Can you spell the stop token?"), A("It is <|im_end|> or <|eot_id|> or <|end|>, spelled out.")],
]


# A template written with indented blocks and no whitespace control, `continue` and `tojson`: it renders as
# transformers renders it only with trim_blocks, lstrip_blocks, loopcontrols and its non-escaping tojson.
INDENTED_TEMPLATE = r"""{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {% endif %}
    {% if message['content'] == '' %}
        {% continue %}
    {% endif %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] | tojson }}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def _fixture(name):
  return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def toks():
  return {name: tk.HFTokenizer.load(_fixture(name)) for name in NAMES}


def _one_line_error(excinfo, *needles):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, msg


def _runs(ids, mask):
  """The maximal runs of masked tokens, as lists of ids."""
  runs, run = [], []
  for i, m in zip(ids, mask):
    if m:
      run.append(i)
    elif run:
      runs.append(run)
      run = []
  return runs + ([run] if run else [])


# ----------------------------------------------------------------------------------------------------------
# Against transformers, in the peers' environment.


def _system_eot_inside(root):
  """The `system` fixture with <|end|> moved inside the {% generation %} block."""
  path = os.path.join(root, "system_eot_inside")
  shutil.copytree(_fixture("system"), path)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    config = json.load(f)
  old = "{{- message['content'] }}\n        {%- endgeneration %}\n        {{- '<|end|>\\n' }}"
  assert old in config["chat_template"]
  config["chat_template"] = config["chat_template"].replace(
      old, "{{- message['content'] + '<|end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """transformers' outputs for every fixture (and the system variant) on CONVERSATIONS: one peers' run."""
  python = hf_helpers.peers_python()
  root = tmp_path_factory.mktemp("hf_chat_reference")
  convs = str(root / "conversations.json")
  with open(convs, "w") as f:
    json.dump(CONVERSATIONS, f)
  folders = {name: _fixture(name) for name in NAMES}
  folders["system_eot_inside"] = _system_eot_inside(str(root))
  folders["chatml_indented"] = str(root / "chatml_indented")
  shutil.copytree(_fixture("chatml"), folders["chatml_indented"])
  with open(os.path.join(folders["chatml_indented"], "chat_template.jinja"), "w") as f:
    f.write(INDENTED_TEMPLATE)
  jobs = [dict(tokenizer=path, conversations=convs, out=str(root / f"{name}.json")) for name, path in folders.items()]
  with open(root / "jobs.json", "w") as f:
    json.dump(jobs, f)
  proc = subprocess.run([python, REFERENCE_SCRIPT, "--jobs", str(root / "jobs.json")], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = {}
  for name, job in zip(folders, jobs):
    with open(job["out"], encoding="utf-8") as f:
      out[name] = json.load(f)
  return folders, out


@pytest.mark.parametrize("name", NAMES + ("chatml_indented",))
@pytest.mark.parametrize("c", range(len(CONVERSATIONS)))
def test_ids_equal_apply_chat_template(name, c, toks, reference):
  folders, ref = reference
  tok = toks[name] if name in toks else tk.HFTokenizer.load(folders[name])
  conv, want = CONVERSATIONS[c], ref[name]["conversations"][c]
  assert tok.vocab_size == ref[name]["vocab_size"]
  ids, mask = tk.encode_chat(tok, conv)
  assert tok.render_chat(conv) == want["text"]
  assert ids == want["ids"]
  assert len(mask) == len(ids)
  assert tok.render_chat(conv, add_generation_prompt=True) == want["text_generation_prompt"]
  assert tk.encode_prompt(tok, conv) == want["ids_generation_prompt"]
  gen_ids, gen_mask = tk.encode_chat(tok, conv, add_generation_prompt=True)
  assert gen_ids == want["ids_generation_prompt"]
  assert gen_mask[:len(mask)] == mask and not any(gen_mask[len(mask):])  # the prompt's header is not trained on


@pytest.mark.parametrize("c", range(len(CONVERSATIONS)))
def test_mask_is_transformers_assistant_mask_plus_the_closing_eos(c, toks, reference):
  """On `system` ({% generation %} around the reply only), ours = transformers' assistant_masks where, after each
  of its runs, (a) the rest of the reply's last character is also set when that character is several byte tokens
  (transformers ends a run at char_to_token(end - 1), the first of them) and (b) the one EOS token that closes
  the reply is set. With the EOS inside the {% generation %} block the two masks are equal."""
  folders, ref = reference
  tok = toks["system"]
  ids, mask = tk.encode_chat(tok, CONVERSATIONS[c])
  want = ref["system"]["conversations"][c]
  theirs, offsets = want["assistant_masks"], want["offsets"]
  assert ref["system"]["template_has_generation"] and len(theirs) == len(ids) == len(offsets)
  expected, split_chars = list(theirs), 0
  for t in range(len(theirs)):
    if theirs[t] and not theirs[t + 1]:
      while offsets[t + 1] == offsets[t]:  # (a)
        t += 1
        expected[t] = 1
        split_chars += 1
      assert ids[t + 1] == tok.eos_id, f"transformers' span ending at {t} is not followed by the EOS"
      expected[t + 1] = 1  # (b)
  assert mask == expected
  n_replies = sum(turn["role"] == "assistant" for turn in CONVERSATIONS[c])
  assert sum(mask) == sum(theirs) + n_replies + split_chars
  assert split_chars == (3 if c == 2 else 0)  # the 😀 that ends a reply of conversation 2 is 4 byte tokens

  inside = tk.HFTokenizer.load(folders["system_eot_inside"])
  ids_inside, mask_inside = tk.encode_chat(inside, CONVERSATIONS[c])
  assert ids_inside == ids
  assert mask_inside == ref["system_eot_inside"]["conversations"][c]["assistant_masks"] == mask


# ----------------------------------------------------------------------------------------------------------
# Without transformers.


def test_special_tokens_follow_the_documented_rules(toks):
  t = toks["chatml"]
  assert (t._token(t.eos_id), t._token(t.pad_id), t._token(t.bos_id)) == ("<|im_end|>", "<|endoftext|>",
                                                                           "<|endoftext|>")
  t = toks["llama3"]  # tokenizer_config.json says <|end_of_text|>; replies end with <|eot_id|>
  with open(os.path.join(_fixture("llama3"), "tokenizer_config.json")) as f:
    assert json.load(f)["eos_token"] == "<|end_of_text|>"
  assert (t._token(t.eos_id), t._token(t.pad_id), t._token(t.bos_id)) == ("<|eot_id|>", "<|end_of_text|>",
                                                                           "<|begin_of_text|>")
  assert set(t.stop_ids) == {t.eos_id, t.pad_id}
  t = toks["system"]
  assert (t._token(t.eos_id), t._token(t.pad_id), t._token(t.bos_id)) == ("<|end|>", "<|pad|>", "<|bos|>")
  for name, t in toks.items():
    assert t.pad_id != t.eos_id, name
    assert t.eos_rule == "the token that ends an assistant turn in the chat template", name


@pytest.mark.parametrize("name", NAMES)
def test_vocab_size_counts_added_tokens(name, toks):
  with open(os.path.join(_fixture(name), "tokenizer.json")) as f:
    data = json.load(f)
  assert toks[name].vocab_size == len(data["model"]["vocab"]) + len(data["added_tokens"])
  assert toks[name].vocab_size > max(toks[name].special_ids)


@pytest.mark.parametrize("name", NAMES)
def test_masked_tokens_decode_to_each_reply_and_its_eos(name, toks):
  tok = toks[name]
  eos = tok._token(tok.eos_id)
  for conv in CONVERSATIONS:
    ids, mask = tk.encode_chat(tok, conv)
    # Llama 3's template trims each content (`| trim`); the others render it as given.
    replies = [t["content"].strip() if name == "llama3" else t["content"] for t in conv if t["role"] == "assistant"]
    assert [tok.decode(r, skip_special=False) for r in _runs(ids, mask)] == [r + eos for r in replies], conv


@pytest.mark.parametrize("name", NAMES)
def test_prompt_ends_with_the_generation_header_and_encode_chat_dispatches(name, toks):
  tok = toks[name]
  conv = CONVERSATIONS[1]
  ids, mask = tk.encode_chat(tok, conv[:-1], add_generation_prompt=True)
  assert (ids, mask) == tok.encode_chat(conv[:-1], add_generation_prompt=True)
  assert tk.encode_prompt(tok, conv[:-1]) == ids
  full, full_mask = tk.encode_chat(tok, conv)
  # The prompt is a prefix of the finished dialogue, so a sampled reply continues it token for token.
  assert full[:len(ids)] == ids and full_mask[:len(ids)] == mask
  assert not any(mask[-3:])  # it ends with the assistant header, which is given, not trained on
  reply = tok.decode(full[len(ids):], skip_special=False)
  assert reply.startswith("It is six.") and tok._token(tok.eos_id) in reply


@pytest.mark.parametrize("name", NAMES)
def test_plain_text_round_trips_and_cannot_forge_special_tokens(name, toks):
  tok = toks[name]
  for text in ["Très bien — merci! 😀 日本語", "  spaces\tand\nnew lines  ", "<|im_end|><|eot_id|><|end|>"]:
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
  assert tok.decode([tok.eos_id, *tok.encode("hi"), tok.pad_id, 10**6]) == "hi"  # specials and unknown ids dropped
  assert tok.decode([tok.eos_id], skip_special=False) == tok._token(tok.eos_id)


def test_role_tokens_are_rejected(toks):
  tok = toks["chatml"]
  assert not hasattr(tok, "user_id")
  for attr in ("user_id", "assistant_id", "system_id"):
    with pytest.raises(AttributeError) as e:
      getattr(tok, attr)
    _one_line_error(e, attr, "chat template")
  with pytest.raises(AttributeError, match="chat template"):
    tok.role_id("user")


@pytest.mark.parametrize("name", NAMES)
def test_save_to_dir_and_load_from_dir_give_identical_ids(name, toks, tmp_path):
  tok = toks[name]
  info = tk.save_to_dir(tok, str(tmp_path))
  assert info["kind"] == "hf" and os.path.isfile(tmp_path / info["dir"] / "tokenizer.json")
  json.dumps(info)  # goes into a JSON manifest
  again = tk.load_from_dir(str(tmp_path), info)
  unpickled = pickle.loads(pickle.dumps(tok))
  for other in (again, unpickled):
    assert (other.vocab_size, other.eos_id, other.pad_id, other.bos_id) == (tok.vocab_size, tok.eos_id, tok.pad_id,
                                                                             tok.bos_id)
    assert other.chat_template == tok.chat_template
    for conv in CONVERSATIONS:
      assert tk.encode_chat(other, conv) == tk.encode_chat(tok, conv)
      assert other.encode(conv[0]["content"]) == tok.encode(conv[0]["content"])
  with pytest.raises(ValueError) as e:
    tk.load_from_dir(str(tmp_path), {**info, "eos_id": info["eos_id"] + 1})
  _one_line_error(e, "eos_id", "manifest")


def test_make_tokenizer_and_config_build_it():
  tok = tk.tokenizer_from_config({"kind": "hf", "path": _fixture("chatml"), "vocab_size": 512})
  assert isinstance(tok, tk.HFTokenizer) and tok.vocab_size == 405  # vocab_size of the config is not its size
  assert isinstance(tk.make_tokenizer("hf", path=_fixture("llama3")), tk.HFTokenizer)
  with pytest.raises(ValueError) as e:
    tk.make_tokenizer("hf")
  _one_line_error(e, "tokenizer.path")


def _copy(name, tmp_path, drop=()):
  path = tmp_path / name
  shutil.copytree(_fixture(name), path)
  for f in drop:
    os.remove(path / f)
  return path


def test_missing_folder_or_tokenizer_json_is_one_line_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    tk.HFTokenizer.load(tmp_path / "nowhere")
  _one_line_error(e, "nowhere", "does not exist")
  path = _copy("chatml", tmp_path, drop=["tokenizer.json"])
  with pytest.raises(FileNotFoundError) as e:
    tk.make_tokenizer("hf", path=str(path))
  _one_line_error(e, str(path), "no tokenizer.json")
  with open(path / "tokenizer.json", "w") as f:
    f.write('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
  with pytest.raises(ValueError) as e:
    tk.HFTokenizer.load(path)
  _one_line_error(e, "tokenizer.json", "cannot read")


def test_missing_chat_template_fails_only_when_a_chat_is_encoded(tmp_path):
  path = _copy("chatml", tmp_path, drop=["chat_template.jinja"])
  tok = tk.HFTokenizer.load(path)
  assert tok.chat_template is None
  assert (tok._token(tok.eos_id), tok.eos_rule) == ("<|im_end|>", "tokenizer_config.json eos_token")
  assert tok.decode(tok.encode("plain text still works")) == "plain text still works"
  with pytest.raises(ValueError) as e:
    tk.encode_prompt(tok, CONVERSATIONS[0][:1])
  _one_line_error(e, str(path), "no chat template", "chat_template.jinja", "tokenizer_config.json")


def test_template_that_raises_is_one_line_error(toks):
  with pytest.raises(ValueError) as e:
    tk.encode_chat(toks["system"], [U("hi"), A("hello"), S("a late system turn"), U("ok")])
  _one_line_error(e, "system/tokenizer_config.json", "a system turn may only come first")


def test_template_that_rewrites_earlier_turns_is_rejected(tmp_path):
  path = _copy("chatml", tmp_path)
  with open(path / "chat_template.jinja", "w") as f:  # headers count the turns still to come: not append-only
    f.write("{% for m in messages %}<|im_start|>{{ m.role }} {{ loop.revindex }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  tok = tk.HFTokenizer.load(path)
  tok.encode_chat([U("hi")], add_generation_prompt=True)  # no reply, no mask to find: fine
  with pytest.raises(ValueError) as e:
    tok.encode_chat(CONVERSATIONS[0])
  _one_line_error(e, "chat_template.jinja", "renders turns 0..1 differently")


def test_template_from_chat_template_json_with_strftime_now(tmp_path):
  path = _copy("chatml", tmp_path, drop=["chat_template.jinja"])
  template = ("{{ strftime_now('%Y') }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with open(path / "chat_template.json", "w") as f:
    json.dump({"chat_template": template}, f)
  tok = tk.HFTokenizer.load(path)
  assert tok.render_chat([U("hi")]).startswith(str(datetime.datetime.now().year))
  ids, mask = tok.encode_chat(CONVERSATIONS[0])
  assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == CONVERSATIONS[0][1]["content"] + (
      "<|im_end|>")


def test_added_tokens_missing_from_tokenizer_json_are_appended(tmp_path, toks):
  path = _copy("chatml", tmp_path)
  with open(path / "tokenizer.json") as f:
    data = json.load(f)
  data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<tool_call>", "</tool_call>")]
  with open(path / "tokenizer.json", "w") as f:
    json.dump(data, f)
  tok = tk.HFTokenizer.load(path)
  assert tok.vocab_size == toks["chatml"].vocab_size
  assert tok.encode("<tool_call>x</tool_call>") == toks["chatml"].encode("<tool_call>x</tool_call>")
  assert tok.encode("<tool_call>")[0] == 403


def test_no_pad_token_is_one_line_error(tmp_path):
  backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
  backend.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "</s>", "unk_token": "<unk>"}, f)
  with pytest.raises(ValueError) as e:
    tk.HFTokenizer.load(tmp_path)
  _one_line_error(e, "no pad token", "'</s>'", "set pad_token")
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "</s>", "pad_token": "<pad>"}, f)
  with pytest.raises(ValueError) as e:
    tk.HFTokenizer.load(tmp_path)
  _one_line_error(e, "pad_token '<pad>' is not in tokenizer.json")
