"""PPO at the `base` size, where the parameters dominate memory: ours full, ours with LoRA, TRL full.

    .venv/bin/python bench/ppo_memory.py [--peers-python=bench/.venv-peers/bin/python] [--rounds=1]

Each of the three runs one warm-up and one timed PPO iteration in a fresh process (bench/ours.py and
bench/peers.py, groups ppo_base and ppo_base_lora, at common.Settings.ppo_base's shapes), alternating ours and the
peer's order each round, so each peak is its own process's: device `peak_bytes_in_use` on a GPU, the process RSS
high-water mark on the CPU. Writes bench/ppo_memory.json and bench/PPO_MEMORY.md.

Targets (#25): ours full within TRL's peak on the same settings; ours with LoRA under half of ours full.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # pylint: disable=g-import-not-at-top
import compare  # pylint: disable=g-import-not-at-top  (its median over rounds)

RUNS = (("ours", "ppo_base"), ("ours", "ppo_base_lora"), ("peers", "ppo_base"))


def _key(side: str, group: str) -> str:
  return f"{side}:{group}"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--peers-python", default=os.path.join(HERE, ".venv-peers", "bin", "python"))
  p.add_argument("--rounds", type=int, default=1)
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds}: expected at least 1")
  python = {"ours": sys.executable, "peers": args.peers_python}
  results: dict[str, list] = {_key(*run): [] for run in RUNS}
  for r in range(args.rounds):
    for side, g in (RUNS if r % 2 == 0 else RUNS[::-1]):
      cmd = [python[side], os.path.join(HERE, f"{side}.py"), "--json", f"--groups={g}"]
      print(f"[ppo_memory] round {r + 1}/{args.rounds} {_key(side, g)}", flush=True)
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=os.path.dirname(HERE))
      if proc.returncode != 0:
        raise RuntimeError(f"{_key(side, g)} failed: {proc.stderr[-4000:]}")
      results[_key(side, g)].append(json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1]))

  def med(key, *path):
    return compare._median_of(results[key], g_of(key), *path)  # pylint: disable=protected-access

  def g_of(key):
    return key.split(":")[1]

  full, lora, trl = (med(k, "memory", "peak_bytes") for k in ("ours:ppo_base", "ours:ppo_base_lora",
                                                                "peers:ppo_base"))
  times = {k: med(k, "iteration_s") for k in results}
  st = common.ppo_base_settings(common.settings())
  kind = results["ours:ppo_base"][0]["ppo_base"]["memory"]["kind"]
  out = {"settings": results["ours:ppo_base"][0]["ppo_base"]["settings"], "lora_rank": st.ppo_base_lora_rank,
         "memory_kind": kind, "peak_bytes": {"ours": full, "ours_lora": lora, "trl": trl},
         "iteration_s": times,
         "param_bytes": {k: v[0][g_of(k)]["memory"]["param_bytes"] for k, v in results.items()},
         "rss_before_models_bytes": {k: med(k, "memory", "rss_before_models_bytes") for k in results},
         "targets": {"full_within_trl": {"value": trl / full, "threshold": 1.0, "met": trl / full >= 1.0},
                     "lora_under_half_of_full": {"value": lora / full, "threshold": 0.5, "met": lora / full < 0.5}},
         "machine": common.machine(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
         "git": common.git_revision(os.path.dirname(HERE))}
  with open(os.path.join(HERE, "ppo_memory.json"), "w") as f:
    json.dump(out, f, indent=1)
  s = out["settings"]
  gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  lines = [
      "# PPO at the `base` size: peak memory, full parameters and LoRA, against TRL", "",
      f"Written by `python bench/ppo_memory.py --rounds={args.rounds}` on {out['date']} (git {out['git']}). "
      f"Settings: GPT-2-small-sized models ({s['size']}: 12 x 768), batch {s['batch']}, prompt {s['prompt_len']}, "
      f"response {s['response_len']}, {s['epochs']} epoch x {s['minibatches']} minibatch; LoRA rank "
      f"{st.ppo_base_lora_rank} (alpha {2 * st.ppo_base_lora_rank}) on q, k, v, o, mlp_in and mlp_out. Peak: "
      f"{kind}, one fresh process per run (median over rounds).", "",
      "| run | peak | iteration | vs ours full |", "|---|---|---|---|",
      f"| ours, full parameters | {gib(full)} | {times['ours:ppo_base']:.1f} s | 1.00 |",
      f"| ours, LoRA | {gib(lora)} | {times['ours:ppo_base_lora']:.1f} s | {lora / full:.2f} |",
      f"| TRL 0.19 PPOTrainer, full | {gib(trl)} | {times['peers:ppo_base']:.1f} s | {trl / full:.2f} |", "",
      f"- ours full within TRL's peak: {'yes' if trl >= full else '**no**'} (TRL / ours = {trl / full:.2f}).",
      f"- ours with LoRA under half of ours full: {'yes' if lora < 0.5 * full else '**no**'} "
      f"({lora / full:.2f}).", "",
      "Parameter bytes: " + "; ".join(
          f"{k}: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in v.items())
          for k, v in out["param_bytes"].items()) + ".",
      "Process RSS before the models were built: " + ", ".join(
          f"{k} {v / 2**20:.0f} MiB" for k, v in out["rss_before_models_bytes"].items() if v) + ".", ""]
  with open(os.path.join(HERE, "PPO_MEMORY.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
