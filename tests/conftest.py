"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported), so sharding tests run in-process.

The repository root (for `rlhf_jax`) and tests/ (for `helpers`) are put on sys.path: test files live in folders
mirroring rlhf_jax/ and import `from helpers import ...` from any of them.
"""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TESTS))
sys.path.insert(0, _TESTS)

# Compile-speed settings (tests/helpers/__init__.py, which every subprocess of the tests uses too): the tests'
# programs are small, so compile time is most of their time.
from helpers import FAST_COMPILE_XLA_FLAGS  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_finish(session):
  """Fails the run when `--dist loadgroup` did not group: the shared tiny run and the two-process workers would
  then be built once per worker, minutes each (pytest-xdist#1386: pytest 9.2 with pytest-xdist 3.8)."""
  if not getattr(session.config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
    return
  lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if lost:
    raise RuntimeError(f"--dist loadgroup lost the xdist_group of {len(lost)} tests (first: {lost[0]}); install the "
                       "pytest of requirements.txt (pytest-xdist#1386)")
