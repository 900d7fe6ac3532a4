"""Shared set-up of the conformance tests: where the shared folders are, what happens when they are absent,
and the numerical settings each fixture set was recorded under.

- Outside CI an absent ../shared (fixtures, reference manifests) skips the tests that need it: a user without
  the folder can still run the suite. Under CI (env CI=true) an absent folder fails the run with one line
  (checked once in tests/conftest.py): a CI run without the golden vectors must not look green.
- The VAR set was recorded with torch.use_deterministic_algorithms(True) and torch.set_num_threads(1)
  (fixtures/var/config.json `deterministic`). At 2 threads the more_smooth replay drifts by ~2e-4 (the
  gumbel-softmax mixture amplifies the decoder's summation order), past the README's 1e-4. So each replay runs
  under the settings its set names, restored afterwards; a set that names none (the LlamaGen set, recorded at
  2 threads, drift 1 vs 2 threads <= 8e-6, 12x under its 1e-4 tolerance) runs at the default.
"""
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def absent(folder: Path, variable: str) -> str:
    return f"{folder} is absent (set {variable} or put the shared folder next to the repository)"


def require_folder(folder: Path, variable: str):
    """Skip when the folder is absent; under CI fail the whole run with one line."""
    if folder.is_dir():
        return
    if under_ci():
        pytest.exit(f"CI: {absent(folder, variable)}", returncode=1)
    pytest.skip(absent(folder, variable))


def recorded_threads(deterministic: str | None) -> int | None:
    """Thread count a fixture set names in its `deterministic` note ("... torch.set_num_threads(1)")."""
    match = re.search(r"set_num_threads\((\d+)\)", deterministic or "")
    return int(match.group(1)) if match else None


@contextmanager
def recorded_numerics(deterministic: str | None):
    """Run under the thread count and determinism a fixture set was recorded with, then restore both."""
    threads, previous_threads = recorded_threads(deterministic), torch.get_num_threads()
    wants_determinism = "use_deterministic_algorithms(True)" in (deterministic or "")
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if wants_determinism:
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_determinism)
