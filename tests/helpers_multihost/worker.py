"""One process of tests/multihost_test.py: tiny SFT and PPO on a mesh spanning two processes.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      python tests/helpers_multihost/worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Every process joins the coordinator on 127.0.0.1:PORT (process 0 hosts it), builds the data=2 x fsdp=2 x
tensor=2 mesh over all 8 global devices, feeds only its own rows of every global batch, runs the tiny SFT steps,
saves and restores the SFT state through orbax (every process takes part), logs through `metrics.MetricsWriter`
(only process 0 may write), runs the tiny PPO iterations, and writes what it saw to OUT_DIR/result_<id>.json.
"""

import json
import os
import sys

import jax
import numpy as np


def main(argv):
  process_id, num_processes, port, out_dir = int(argv[1]), int(argv[2]), argv[3], argv[4]
  # Collectives between CPU processes go through gloo: the default in jax 0.10, set explicitly because with
  # "none" each process would silently run alone.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120)

  import tiny_stages as ts  # pylint: disable=g-import-not-at-top  (after initialize: it reads jax.devices())
  from rlhf_jax import checkpoint, metrics, optim  # pylint: disable=g-import-not-at-top

  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
  shape = (2, 2, 2)
  mesh = ts.make_mesh(shape)

  # Each process holds half the rows; the global array is the whole batch, in order.
  batch = ts.sft_batches(1)[0]
  out["local_rows"] = int(ts.local_rows(batch["tokens"]).shape[0])
  placed = ts.put(batch, mesh)
  out["global_batch_shape"] = list(placed["tokens"].shape)
  out["global_batch_equal"] = bool(np.array_equal(ts.to_host(placed["tokens"]), batch["tokens"]))

  losses, state = ts.sft_run(shape)
  out["sft_losses"] = losses.tolist()

  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "ckpt"), save_every=1)
  ckpt.save(ts.SFT_STEPS, state, data_state={"pos": ts.SFT_STEPS}, meta={"stage": "sft"}, force=True)
  ckpt.wait()
  restored, data_state, _ = ckpt.restore(
      ts.SFT_STEPS, optim.abstract_with_shardings(state, ts.lm_trainer(shape).state_sh))
  ckpt.close()
  out["ckpt_data_state"] = data_state
  out["ckpt_restored_equal"] = all(
      np.array_equal(ts.to_host(a), ts.to_host(b)) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  params = {jax.tree_util.keystr(p): ts.to_host(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
  if process_id == 0:
    np.savez(os.path.join(out_dir, "sft_params.npz"), **params)

  writer = metrics.MetricsWriter(os.path.join(out_dir, "sft"), stage="sft", total_steps=ts.SFT_STEPS)
  for step, loss in enumerate(losses, 1):
    writer.log(step, {"loss": float(loss)})
  writer.close()

  iterations, _ = ts.ppo_run(shape)
  out["ppo"] = [{"rollout": {k: v.tolist() for k, v in it["rollout"].items()}, "update": it["update"]}
                for it in iterations]
  with open(os.path.join(out_dir, f"result_{process_id}.json"), "w") as f:
    json.dump(out, f)
  print(f"process {process_id}: done", flush=True)


if __name__ == "__main__":
  main(sys.argv)
