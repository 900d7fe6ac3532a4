"""Under CI an absent shared folder fails the run with one line (tests/conftest.py), it does not skip."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_pytest(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co",
                           "tests/conformance/test_ci_shared_folder.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_ci_fails_with_one_line_when_fixtures_are_absent(tmp_path):
    missing = tmp_path / "no-fixtures"
    result = run_pytest({"CI": "true", "DD_FIXTURES_VAR": str(missing)})
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [f"ERROR: CI: {missing} is absent (set DD_FIXTURES_VAR or put the shared folder next to "
                     "the repository)"]


def test_outside_ci_an_absent_folder_does_not_stop_the_run(tmp_path):
    result = run_pytest({"CI": "", "DD_FIXTURES_VAR": str(tmp_path / "no-fixtures")})
    assert result.returncode == 0, result.stdout + result.stderr
