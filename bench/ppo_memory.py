"""PPO at the `base` size, where the parameters dominate memory: ours full, ours with LoRA, TRL full.

    .venv/bin/python bench/ppo_memory.py [--peers-python=bench/.venv-peers/bin/python] [--rounds=1]

Each run is one warm-up and one timed PPO iteration in a fresh process (bench/ours.py and
bench/peers.py, groups ppo_base*, at common.Settings.ppo_base's shapes), alternating ours and the
peer's order each round, so each peak is its own process's: device `peak_bytes_in_use` on a GPU, the process RSS
high-water mark on the CPU. Writes bench/ppo_memory.json and bench/PPO_MEMORY.md.

Each side runs twice: as it runs by default, and with activation recomputation (ours: scanned, rematerialised
layers; TRL: gradient checkpointing), so six processes a round.
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

RUNS = (("ours", "ppo_base"), ("ours", "ppo_base_lora"), ("peers", "ppo_base"),
        ("ours", "ppo_base_lean"), ("ours", "ppo_base_lora_lean"), ("peers", "ppo_base_lean"))
# The two settings compared: as each library runs by default, and with activation recomputation on both sides
# (ours: scanned, rematerialised layers; TRL: gradient checkpointing on its trained models).
SETTINGS = (("default", "ppo_base", "ppo_base_lora"), ("recompute", "ppo_base_lean", "ppo_base_lora_lean"))


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

  times = {k: med(k, "iteration_s") for k in results}
  st = common.ppo_base_settings(common.settings())
  kind = results["ours:ppo_base"][0]["ppo_base"]["memory"]["kind"]
  peaks, targets = {}, {}
  for name, g_full, g_lora in SETTINGS:
    full, lora, trl = (med(k, "memory", "peak_bytes") for k in (_key("ours", g_full), _key("ours", g_lora),
                                                                  _key("peers", g_full)))
    peaks[name] = {"ours": full, "ours_lora": lora, "trl": trl}
    targets[name] = {"full_within_trl": {"value": trl / full, "threshold": 1.0, "met": trl / full >= 1.0},
                     "lora_under_half_of_full": {"value": lora / full, "threshold": 0.5, "met": lora / full < 0.5}}
  out = {"settings": results["ours:ppo_base"][0]["ppo_base"]["settings"], "lora_rank": st.ppo_base_lora_rank,
         "memory_kind": kind, "peak_bytes": peaks, "iteration_s": times,
         "param_bytes": {k: v[0][g_of(k)]["memory"]["param_bytes"] for k, v in results.items()},
         "rss_before_models_bytes": {k: med(k, "memory", "rss_before_models_bytes") for k in results},
         "targets": targets,
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
      f"{kind}, one fresh process per run (median over rounds). Two settings: `default` (each library as it "
      "runs out of the box: our layers unrolled, no recomputation) and `recompute` (activation recomputation on "
      "both sides: ours `model.scan_layers` and `model.remat`, TRL `gradient_checkpointing_enable()` on its "
      "policy and value models).", "",
      "| setting | run | peak | iteration | vs ours full |", "|---|---|---|---|---|"]
  for name, g_full, g_lora in SETTINGS:
    p = peaks[name]
    lines += [
        f"| {name} | ours, full parameters | {gib(p['ours'])} | {times[_key('ours', g_full)]:.1f} s | 1.00 |",
        f"| {name} | ours, LoRA | {gib(p['ours_lora'])} | {times[_key('ours', g_lora)]:.1f} s | "
        f"{p['ours_lora'] / p['ours']:.2f} |",
        f"| {name} | TRL 0.19 PPOTrainer, full | {gib(p['trl'])} | {times[_key('peers', g_full)]:.1f} s | "
        f"{p['trl'] / p['ours']:.2f} |"]
  lines.append("")
  for name, _, _ in SETTINGS:
    t = targets[name]
    lines += [
        f"- {name}: ours full within TRL's peak: {'yes' if t['full_within_trl']['met'] else '**no**'} "
        f"(TRL / ours = {t['full_within_trl']['value']:.2f}); ours with LoRA under half of ours full: "
        f"{'yes' if t['lora_under_half_of_full']['met'] else '**no**'} ({t['lora_under_half_of_full']['value']:.2f})."]
  lines += [
      "",
      "Parameter bytes: " + "; ".join(
          f"{k}: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in v.items())
          for k, v in out["param_bytes"].items() if "lean" not in k) + " (the same with recomputation).",
      "Process RSS before the models were built: " + ", ".join(
          f"{k} {v / 2**20:.0f} MiB" for k, v in out["rss_before_models_bytes"].items() if v) + ".", ""]
  with open(os.path.join(HERE, "PPO_MEMORY.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
