import os
from pathlib import Path

import pytest

import dd

dd.shim_torchvision()  # before any test imports clean-fid, torch-fidelity, lpips or transformers

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# The shared folders the conformance tests read (golden vectors of the official code, reference manifests).
SHARED_FOLDERS = {"DD_FIXTURES_VAR": REPO.parent / "shared" / "fixtures" / "var",
                  "DD_FIXTURES_LLAMAGEN": REPO.parent / "shared" / "fixtures" / "llamagen",
                  "DD_MANIFESTS": REPO.parent / "shared" / "reference" / "manifests"}


def pytest_configure(config):
    """Under CI (env CI=true) an absent shared folder fails the run with one line instead of letting the
    conformance tests skip: a CI run without the golden vectors must not look green. Elsewhere they skip."""
    if os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes"):
        return
    for variable, default in SHARED_FOLDERS.items():
        folder = Path(os.environ.get(variable, default))
        if not folder.is_dir():
            raise pytest.UsageError(f"CI: {folder} is absent (set {variable} or put the shared folder "
                                    "next to the repository)")
