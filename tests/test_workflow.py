"""The DAG end to end at micro scale, through both tools: Snakemake and DVC run the toy settings'
stages via the `dd` CLI in a throw-away project, and every stage is recorded in MLflow."""
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from micro import make_micro_project

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(project: Path) -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's params.yaml decides: sqlite mlflow.db there
    return env


def _run(cmd, project):
    proc = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _finished_runs(project: Path) -> set[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return {name for (name,) in db.execute("select name from runs where status = 'FINISHED'")}


def _stage_outputs(project: Path, setting: str) -> list[Path]:
    results = project / "results" / setting
    return [results / "teacher" / "teacher.json", results / "pairs" / "manifest.json",
            results / "student" / "student.json"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_micro_project(tmp_path_factory.mktemp("micro"))


def test_snakemake_runs_the_toy_dag(project):
    dry = _run([str(BIN / "snakemake"), "-n", "all_settings"], project)
    for name in ("var-d16", "var-d20", "var-d24", "llamagen-b", "llamagen-l", "llamagen-xl-t2i",
                 "toy-var", "toy-llamagen"):
        for stage in ("teacher", "pairs", "student"):
            assert f"results/{name}/{stage}" in dry.stdout
    _run([str(BIN / "snakemake"), "--cores", "2", "reproduce_table1"], project)
    for setting in ("toy-llamagen", "toy-var"):
        for out in _stage_outputs(project, setting):
            assert out.is_file(), out
        for stage in ("teacher", "pairs", "distill"):
            assert f"{setting}/{stage}" in _finished_runs(project)
    again = _run([str(BIN / "snakemake"), "--cores", "2", "reproduce_table1"], project)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dvc_repro_runs_the_toy_dag(project):
    # A fresh results/ for DVC: it must build the same outputs on its own.
    subprocess.run(["rm", "-rf", "results"], cwd=project, check=True)
    _run([str(BIN / "dvc"), "repro"], project)
    for setting in ("toy-llamagen", "toy-var"):
        for out in _stage_outputs(project, setting):
            assert out.is_file(), out
    status = _run([str(BIN / "dvc"), "status"], project)
    assert "up to date" in status.stdout
