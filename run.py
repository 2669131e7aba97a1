"""rlhf_jax entry point: parse flags, log the devices, run the experiment's stage or pipeline.

  python run.py                                            # the default InstructGPT pipeline, `small` preset
  python run.py --experiment=experiments/pretrain.py:tiny --workdir=/tmp/pt
  python run.py --experiment=experiments/pretrain.py:tiny --experiment.pretrain.optimizer.lr=3e-4 --workdir=/tmp/pt
  python run.py --seeds=0-4 --workdir=workdirs/sweep_small      # one run per seed, then WORKDIR/sweep.md

Unknown --experiment.* keys and values of the wrong type are rejected before any work starts.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_EXPERIMENT = os.path.join(_HERE, "experiments", "instructgpt.py") + ":small"

_EXPERIMENT = config_flags.DEFINE_config_file(
    "experiment", _DEFAULT_EXPERIMENT, "Experiment file and preset: experiments/NAME.py[:preset].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go "
                               "(default: ./workdirs/<experiment>_<preset>).")
_SEEDS = flags.DEFINE_string("seeds", None, "Run the experiment once per seed ('0,1,2' or '0-4') into "
                              "WORKDIR/seed_<n>, then write WORKDIR/sweep.md and sweep.json (rlhf_jax/sweep.py).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def _default_workdir(argv_experiment: str) -> str:
  name, _, preset = argv_experiment.partition(":")
  stem = os.path.splitext(os.path.basename(name))[0]
  return os.path.join(os.getcwd(), "workdirs", f"{stem}_{preset or 'default'}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rlhf_jax import sweep  # pylint: disable=g-import-not-at-top
  try:
    seeds = sweep.parse_seeds(_SEEDS.value) if _SEEDS.value is not None else None
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  import jax  # pylint: disable=g-import-not-at-top  (after flags, so XLA flags in the environment apply)

  if _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from rlhf_jax import pipeline  # pylint: disable=g-import-not-at-top

  config = _EXPERIMENT.value
  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["experiment"].serialize().split("=", 1)[1])
  workdir = os.path.abspath(workdir)
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices())
  if jax.process_index() == 0:
    print(f"workdir: {workdir}", flush=True)
  if seeds is not None:
    agg = sweep.run(config, workdir, seeds)
    if agg is not None:
      print(sweep.markdown(agg), flush=True)
    return
  summary = pipeline.run(config, workdir)
  if jax.process_index() == 0:
    print(pipeline.format_summary(summary), flush=True)


class _QuietLibraries:
  """Keeps library chatter (orbax, grain, jax, tfds) out of the console below WARNING; our progress lines stay."""

  _NOISY = ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/tensorflow_datasets/", "/etils/", "/absl/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self._NOISY)  # 30: std WARNING


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(_QuietLibraries())
  sys.exit(app.run(main))
