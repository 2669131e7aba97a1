"""rlhf_jax entry point: parse flags, log the devices, run the experiment's stage or pipeline.

  python run.py                                            # the default InstructGPT pipeline, `small` preset
  python run.py --experiment=experiments/pretrain/config.py:tiny --workdir=/tmp/pt
  python run.py --experiment=experiments/pretrain/config.py:tiny --experiment.pretrain.optimizer.lr=3e-4 \
      --workdir=/tmp/pt
  python run.py --seeds=0-4 --workdir=workdirs/sweep_small      # one run per seed, then WORKDIR/sweep.md

Unknown --experiment.* keys (with the closest valid key), values of the wrong type, a missing experiment file
and every setting a stage can check from the config alone are rejected before any work starts, as one
`error: ...` line and exit status 2; --verbose adds the traceback.
"""

import glob
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import errors

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_EXPERIMENT = os.path.join(_HERE, "experiments", "instructgpt", "config.py") + ":small"

_EXPERIMENT = None  # the --experiment flag, defined by _define_experiment_flag
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go "
                               "(default: ./workdirs/<experiment>_<preset>).")
_SEEDS = flags.DEFINE_string("seeds", None, "Run the experiment once per seed ('0,1,2' or '0-4') into "
                              "WORKDIR/seed_<n>, then write WORKDIR/sweep.md and sweep.json (rlhf_jax/sweep.py).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a configuration or data error.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_HOST_TIMEOUT = flags.DEFINE_integer("host_timeout_s", 100, "Multi-host: a process that has not been heard from "
                                     "for this long is lost, and the others stop with an error instead of waiting.")


def _fail(message: str, error: BaseException | None = None):
  """One `error:` line and exit status 2 (flags are not parsed yet: --verbose is read from argv)."""
  if error is not None and "--verbose" in sys.argv:
    raise error
  errors.fail(message)


def _experiment_arg(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--experiment="):
      return arg.split("=", 1)[1]
    if arg == "--experiment" and i + 1 < len(argv):
      return argv[i + 1]
  return _DEFAULT_EXPERIMENT


def _check_experiment(argv: list[str]) -> None:
  """Loads the experiment once before absl does, so a missing file, a bad preset or an unknown key gets one line
  (with the closest valid key) instead of a traceback from inside the flag parser."""
  value = _experiment_arg(argv)
  path, _, preset = value.partition(":")
  if not os.path.isfile(path):
    found = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(_HERE, "experiments", "*", "config.py")))
    _fail(f"--experiment={value}: no experiment file {path}; expected experiments/NAME/config.py[:preset], e.g. "
          f"{', '.join(found)}")
  spec = importlib.util.spec_from_file_location("experiment_check", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(preset or None)
  except Exception as e:  # pylint: disable=broad-except  (any failure of the user's file is reported, not raised)
    _fail(f"--experiment={value}: {type(e).__name__}: {errors.one_line(e)}", e)
  for arg in argv:
    if arg.startswith("--experiment."):
      key = arg[len("--experiment."):].split("=", 1)[0]
      message = errors.unknown_key_message(config, key)
      if message:
        _fail(message)


def _define_experiment_flag():
  """--experiment, defined once the experiment and its overrides have been checked: config_flags loads the
  default experiment and applies overrides from sys.argv as soon as the flag is defined."""
  global _EXPERIMENT
  _check_experiment(sys.argv)
  try:
    _EXPERIMENT = config_flags.DEFINE_config_file(
        "experiment", _DEFAULT_EXPERIMENT, "Experiment file and preset: experiments/NAME/config.py[:preset].",
        lock_config=True)
  except (flags.Error, AttributeError, KeyError, TypeError, *errors.USER_ERRORS) as e:
    _fail(f"{type(e).__name__}: {errors.one_line(e)}", e)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e), e)
  except (AttributeError, KeyError, TypeError, *errors.USER_ERRORS) as e:  # raised by config_flags' overrides
    _fail(f"{type(e).__name__}: {errors.one_line(e)}", e)


def _default_workdir(argv_experiment: str) -> str:
  name, _, preset = argv_experiment.partition(":")
  stem = os.path.splitext(os.path.basename(name))[0]
  if stem == "config":  # experiments/<name>/config.py is named by its folder
    stem = os.path.basename(os.path.dirname(os.path.abspath(name)))
  return os.path.join(os.getcwd(), "workdirs", f"{stem}_{preset or 'default'}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}; flags take the form --name=value")
  from rlhf_jax import preemption  # lazy: it imports jax
  preemption.install()  # SIGTERM: finish the step, save, exit with preemption.EXIT_CODE
  try:
    _run()
    return
  except preemption.Preempted as e:
    message, code = f"preempted: {e}", preemption.EXIT_CODE
  except errors.USER_ERRORS as e:
    if _VERBOSE.value:
      raise
    message, code = f"error: {errors.one_line(e)}", errors.EXIT_CODE
  except Exception as e:  # pylint: disable=broad-except
    if not _several_processes():
      raise
    # A lost peer shows as a failed collective (gloo, NCCL, ICI) or the coordination service's error.
    message, code = (f"error: {type(e).__name__}: {errors.one_line(e)[:600]}; with several processes a process "
                     "that fails or is lost stops them all: rerun every process to resume from the last "
                     "checkpoint", errors.EXIT_CODE)
  if _several_processes() and code != preemption.EXIT_CODE and "rerun every process" not in message:
    message += " (with several processes: rerun every process to resume from the last checkpoint)"
  print(message, file=sys.stderr, flush=True)
  if _several_processes():
    sys.stdout.flush()
    os._exit(code)  # JAX's exit barrier would wait for a lost process and then abort with pages of logs
  sys.exit(code)


def _several_processes() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.process_count() > 1


def _run():
  # After flag parsing, so that XLA flags in the environment apply and --help stays fast.
  import jax  # lazy: see above
  from rlhf_jax import pipeline, sweep  # lazy: they import jax

  seeds = sweep.parse_seeds(_SEEDS.value) if _SEEDS.value is not None else None
  if _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, heartbeat_timeout_seconds=_HOST_TIMEOUT.value)
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
  _define_experiment_flag()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(_QuietLibraries())
  sys.exit(app.run(main, flags_parser=_parse_flags))
