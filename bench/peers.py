"""The peers' side of the benchmarks: PyTorch eager, Hugging Face transformers and TRL 0.19, same settings.

Runs only in the peers' virtual environment (bench/setup_peers.sh); it never imports rlhf_jax or JAX.

    bench/.venv-peers/bin/python bench/peers.py --json --groups=train

Groups mirror bench/ours.py:
  peak      torch float32 matmul chain (reported for reference; MFU uses the XLA peak measured by ours.py).
  train     GPT2LMHeadModel of the same sizes: forward, cross-entropy over all T targets, backward,
            clip_grad_norm_(1.0), torch.optim.AdamW. Eager mode, the way most research code runs.
  generate  `model.generate(do_sample=True, top_k=0, min_new_tokens=max_new_tokens)` with use_cache on and off.
  ppo       trl.PPOTrainer (0.19): GPT-2 policy, reference, value and reward models (the last two
            GPT2ForSequenceClassification, num_labels=1), one iteration = one PPOTrainer batch; timed from
            a callback at the end of each iteration, the first iteration counted as warm-up.
  ppo_base, ppo_base_lean  the same at the `base` size (bench/ppo_memory.py); lean: gradient checkpointing on
            the policy and value models (`gradient_checkpointing_enable()`).

Threads: torch.set_num_threads(os.cpu_count()) (both cores here), like XLA's CPU backend, which uses every
core by default. Device: CUDA when torch sees one (every timing then synchronises), else the CPU; on a GPU,
float32 matmuls may use TF32 (`torch.set_float32_matmul_precision("high")`), as XLA's GPU backend does by
default.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top
import numpy as np
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
  if DEVICE.type == "cuda":
    torch.cuda.synchronize()


def gpt2_config(size: str):
  from transformers import GPT2Config  # pylint: disable=g-import-not-at-top
  sz = common.SIZES[size]
  return GPT2Config(vocab_size=sz.vocab_size, n_positions=sz.max_len, n_embd=sz.d_model, n_layer=sz.n_layers,
                    n_head=sz.n_heads, n_inner=sz.d_ff, activation_function="gelu_new", resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=common.EOS_ID, pad_token_id=common.PAD_ID)


def lm(size: str, seed: int = 0):
  from transformers import GPT2LMHeadModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  return GPT2LMHeadModel(gpt2_config(size)).to(DEVICE)


def n_params(m) -> int:
  return sum(p.numel() for p in m.parameters())


def bench_peak(st: common.Settings) -> dict[str, Any]:
  n, chain = st.matmul_n, st.matmul_chain
  a = torch.randn(n, n, device=DEVICE) / n**0.5
  b = torch.randn(n, n, device=DEVICE) / n**0.5

  def run():
    y = a
    for _ in range(chain):
      y = y @ b
    _sync()
    return y

  run()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t0)
  return {"matmul_n": n, "chain": chain, "dtype": "float32", "flops_per_s": 2.0 * n**3 * chain / best}


def bench_train(st: common.Settings) -> dict[str, Any]:
  out = {}
  for size, batch, seq in st.train:
    m = lm(size)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(6, 512, (batch, seq + 1)).astype(np.int64))
    tokens = tokens.to(DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]
    attn = torch.ones_like(x)

    def step():
      logits = m(input_ids=x, attention_mask=attn).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return float(loss)

    times = []
    for i in range(st.train_warmup + st.train_steps):
      t0 = time.perf_counter()
      loss = step()
      if i >= st.train_warmup:
        times.append(time.perf_counter() - t0)
    sec = common.median(times)
    out[size] = {"batch": batch, "seq_len": seq, "params": n_params(m), "step_s": sec,
                 "tokens_per_s": batch * seq / sec, "loss": loss,
                 "model_flops_per_s": common.SIZES[size].train_flops_per_token(seq) * batch * seq / sec,
                 "attn_implementation": getattr(m.config, "_attn_implementation", None)}
  return out


def bench_generate(st: common.Settings) -> dict[str, Any]:
  m = lm(st.gen_size)
  m.eval()
  out = {}
  for batch in st.gen_batches:
    prompts = np.random.default_rng(batch).integers(6, 512, (batch, st.gen_prompt_len)).astype(np.int64)
    ids = torch.from_numpy(prompts).to(DEVICE)
    attn = torch.ones_like(ids)
    for use_cache in (True, False):
      def run(seed, n=st.gen_new_tokens, use_cache=use_cache, ids=ids, attn=attn):
        torch.manual_seed(seed)
        with torch.no_grad():
          seqs = m.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                            use_cache=use_cache, pad_token_id=common.PAD_ID, eos_token_id=common.EOS_ID)
        _sync()
        return seqs
      run(0, n=2)  # warm-up of the code paths (eager: nothing to compile)
      times, steps = [], []
      for i in range(st.gen_repeats if use_cache else 1):
        t0 = time.perf_counter()
        seqs = run(i + 1)
        times.append(time.perf_counter() - t0)
        steps.append(seqs.shape[1] - st.gen_prompt_len)
      sec = common.median(times)
      key = f"b{batch}_{'cache' if use_cache else 'nocache'}"
      out[key] = {"batch": batch, "prompt_len": st.gen_prompt_len, "new_tokens": st.gen_new_tokens,
                  "steps": common.median(steps), "seconds": sec,
                  "new_tokens_per_s": batch * common.median(steps) / sec}
  return out


def _tokenizer():
  """A word-level tokenizer over the bench vocabulary: TRL needs one for padding and the pad/EOS ids."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers.models import WordLevel  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {f"t{i}": i for i in range(common.VOCAB_SIZE)}
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t5")),
                                pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t5")
  tok.padding_side = "left"
  return tok


def bench_ppo(st: common.Settings, lean: bool = False) -> dict[str, Any]:
  import datasets  # pylint: disable=g-import-not-at-top
  from transformers import GPT2ForSequenceClassification, TrainerCallback  # pylint: disable=g-import-not-at-top
  from trl import PPOConfig, PPOTrainer  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  rss_before = common.peak_rss_bytes()
  size, b = st.ppo_size, st.ppo_batch
  policy, ref = lm(size, 0), lm(size, 0)

  def scalar_model(seed):
    cfg = gpt2_config(size)
    cfg.num_labels = 1  # a scalar head: TRL's value and reward models
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(cfg)

  value, reward = scalar_model(1), scalar_model(2)
  prompts = np.random.default_rng(0).integers(6, common.VOCAB_SIZE, (b, st.ppo_prompt_len))
  ds = datasets.Dataset.from_dict({"input_ids": prompts.tolist()})
  iterations = 1 + st.ppo_iterations  # the first is warm-up

  class Timer(TrainerCallback):
    def __init__(self):
      self.marks = []

    def on_train_begin(self, args, state, control, **kwargs):
      self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
      self.marks.append(time.perf_counter())

  timer = Timer()
  with tempfile.TemporaryDirectory() as tmp:
    args = PPOConfig(
        output_dir=tmp, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
        per_device_train_batch_size=b, gradient_accumulation_steps=1, num_mini_batches=st.ppo_minibatches,
        num_ppo_epochs=st.ppo_epochs, response_length=st.ppo_response_len, local_rollout_forward_batch_size=b,
        total_episodes=b * iterations, num_sample_generations=0, temperature=1.0, stop_token="eos",
        missing_eos_penalty=1.0, kl_coef=0.05, learning_rate=3e-6, cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95)
    if lean:  # PPOTrainer's own loop does not apply args.gradient_checkpointing: enable it on the trained models
      for model in (policy, value):
        model.gradient_checkpointing_enable()
    trainer = PPOTrainer(args=args, processing_class=_tokenizer(), model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=ds, eval_dataset=ds,
                         callbacks=[timer])
    trainer.train()
  laps = np.diff(timer.marks).tolist()
  if len(laps) != iterations:
    raise RuntimeError(f"expected {iterations} PPOTrainer iterations, timed {len(laps)}")
  param_bytes = {name: sum(p.numel() * p.element_size() for p in mod.parameters())
                 for name, mod in (("policy", policy), ("reference", ref), ("value", value), ("reward", reward))}
  return {"settings": {"batch": b, "prompt_len": st.ppo_prompt_len, "response_len": st.ppo_response_len,
                       "epochs": st.ppo_epochs, "minibatches": st.ppo_minibatches, "size": size,
                       "gradient_checkpointing": lean},
          "iteration_s": common.median(laps[1:]), "first_iteration_s": laps[0], "trl": trl.__version__,
          "memory": {"kind": "process RSS high-water mark", "peak_bytes": common.peak_rss_bytes(),
                     "rss_before_models_bytes": rss_before, "param_bytes": param_bytes}}


def versions() -> dict[str, Any]:
  import transformers  # pylint: disable=g-import-not-at-top
  out = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
         "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
         "tf32": DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
  try:
    import trl  # pylint: disable=g-import-not-at-top
    out["trl"] = trl.__version__
  except ImportError:
    pass
  return out


def run(groups: list[str], st: common.Settings) -> dict[str, Any]:
  torch.set_num_threads(os.cpu_count() or 1)
  if DEVICE.type == "cuda":  # TF32 matmuls, like XLA's GPU default
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  res: dict[str, Any] = {"side": "peers", "versions": versions()}
  if "peak" in groups or "train" in groups:
    res["peak"] = bench_peak(st)
  if "train" in groups:
    res["train"] = bench_train(st)
  if "generate" in groups:
    res["generate"] = bench_generate(st)
  if "ppo" in groups:
    res["ppo"] = bench_ppo(st)
  if "ppo_base" in groups:
    res["ppo_base"] = bench_ppo(common.ppo_base_settings(st))
  if "ppo_base_lean" in groups:
    res["ppo_base_lean"] = bench_ppo(common.ppo_base_settings(st), lean=True)
  if "ppo_base_lora" in groups or "ppo_base_lora_lean" in groups:
    raise SystemExit("ppo_base_lora*: ours only (TRL's PPOTrainer with peft is not benchmarked here)")
  return res


def main(argv=None):
  common.main(run, __doc__, argv)


if __name__ == "__main__":
  main()
