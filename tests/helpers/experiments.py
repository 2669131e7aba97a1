"""Experiment files loaded by path, as run.py's --experiment flag loads them (experiments/ is not a package)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def path(name: str) -> str:
  """experiments/<name>/config.py."""
  return os.path.join(ROOT, "experiments", name, "config.py")


def module(name: str):
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path(name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def config(name: str, preset: str | None = None):
  """get_config(preset) of experiments/<name>/config.py."""
  return module(name).get_config(preset)
