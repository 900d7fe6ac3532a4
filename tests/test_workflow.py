"""The DAG end to end at micro scale, through both tools: Snakemake and DVC run the toy settings'
stages via the `dd` CLI in a throw-away project, and every stage is recorded in MLflow."""
import json
import os
import signal
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
    proc = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _finished_runs(project: Path) -> set[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return {name for (name,) in db.execute("select name from runs where status = 'FINISHED'")}


def _stage_outputs(project: Path, setting: str) -> list[Path]:
    results = project / "results" / setting
    return [results / "teacher" / "teacher.json", results / "pairs" / "manifest.json",
            results / "student" / "student.json"]


# What every toy metrics file must hold (the evaluate stage's contract; null only where a value is not measured).
METRIC_KEYS = ("fid", "precision", "recall", "n_samples", "steps", "latency_s", "params", "device", "torch_version",
               "num_threads", "class_accuracy", "diversity", "fid_floor")


def _check_evaluated(project: Path, setting: str) -> None:
    """Every method of the setting was sampled and evaluated, with every metric key measured."""
    from dd.config import load_params
    from dd.methods import method_names

    for method in method_names(load_params(project / "params.yaml").setting(setting)):
        assert (project / "results" / setting / "samples" / method / "manifest.json").is_file(), (setting, method)
        metrics = json.loads((project / "results" / setting / "metrics" / f"{method}.json").read_text())
        # onestep* has no network (a frequency table): its parameter count is null by design
        missing = [key for key in METRIC_KEYS if metrics.get(key) is None and not (key == "params" and method == "onestep")]
        assert not missing, (setting, method, missing)
        assert metrics["n_samples"] == 16 and metrics["latency_s"] > 0, (setting, method)


def _check_toy_t2i(project: Path) -> None:
    """toy-t2i went through every stage with caption conditions: pairs hold caption rows of the training prompts,
    samples the rows of the evaluation prompts, and the metrics judge each sample against its caption."""
    from dd.sample_stage import read_samples

    results = project / "results" / "toy-t2i"
    prompts = json.loads((results / "text_features" / "prompts.json").read_text())
    assert len(prompts["train"]["captions"]) == 4000 and len(prompts["eval"]["captions"]) == 1000
    teacher = json.loads((results / "teacher" / "teacher.json").read_text())
    assert {"caption_agreement", "caption_all_agreement", "sample_accuracy"} <= set(teacher["metrics"])
    pairs = json.loads((results / "pairs" / "manifest.json").read_text())
    assert pairs["conditions"]["count"] == 4000 and "conditions.count" in pairs["seed_rule"]
    assert "dd-1step.class_accuracy" in json.loads((results / "student" / "metrics.json").read_text())
    _, rows = read_samples(results / "samples" / "dd-1step")
    assert rows.tolist() == list(range(16))  # evaluation prompts 0..15, not balanced class labels
    _check_evaluated(project, "toy-t2i")
    metrics = json.loads((results / "metrics" / "dd-1step.json").read_text())
    assert 0 <= metrics["caption_agreement"] <= 1 and "caption_slant_agreement" in metrics


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_micro_project(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def dvc_repro(tmp_path_factory):
    """`dvc repro` in a micro project of its own, started in the background as soon as a test asks for it.

    DVC runs its stages one after another, each a one-thread Python process mostly starting up (torch, MLflow), so
    it leaves a core idle; started beside the Snakemake test it takes that core, and the two tools' runs take about
    the time of the longer one instead of their sum. Yields (project, process); the process group is killed at the
    end if it is still running (a failed test must not leave DVC behind)."""
    project = make_micro_project(tmp_path_factory.mktemp("micro_dvc"))
    with open(project / "dvc-repro.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=_env(project), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    yield project, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# The micro jobs are mostly process start-up (torch, MLflow): one thread each lets Snakemake run two at once on the
# 2-core CI machine (the real toy stages take every core, cpu_threads), which also exercises concurrent jobs
# writing the one MLflow store.
ONE_THREAD_EACH = ["--set-threads", *(f"{rule}=1" for rule in ("text_features", "teacher", "pairs", "distill", "sample",
                                                                 "evaluate"))]


def test_snakemake_runs_the_toy_dag(project, dvc_repro):  # dvc_repro: DVC's run starts now, beside this one
    dry = _run([str(BIN / "snakemake"), "-n", "all_settings"], project)
    for name in ("var-d16", "var-d20", "var-d24", "llamagen-b", "llamagen-l", "llamagen-xl-t2i",
                 "toy-var", "toy-llamagen"):
        for stage in ("teacher", "pairs", "student"):
            assert f"results/{name}/{stage}" in dry.stdout
    # make reproduce's target never waits for the text-to-image settings (their own target: reproduce_table3)
    assert "toy-t2i" not in _run([str(BIN / "snakemake"), "-n", "reproduce_table1"], project).stdout
    _run([str(BIN / "snakemake"), "--cores", "2", "reproduce_table1", "reproduce_table3", *ONE_THREAD_EACH], project)
    _check_toy_t2i(project)
    assert "toy-t2i" in (project / "reports" / "table3.md").read_text()
    for setting in ("toy-llamagen", "toy-var"):
        for out in _stage_outputs(project, setting):
            assert out.is_file(), out
        for stage in ("teacher", "pairs", "distill"):
            assert f"{setting}/{stage}" in _finished_runs(project)
        _check_evaluated(project, setting)
    table = (project / "reports" / "table1.md").read_text()
    assert "toy-var" in table and "toy-llamagen" in table
    again = _run([str(BIN / "snakemake"), "--cores", "2", "reproduce_table1", "reproduce_table3", *ONE_THREAD_EACH],
                 project)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dvc_repro_runs_the_toy_dag(dvc_repro):
    # DVC builds every output on its own, in a project Snakemake never touched
    project, proc = dvc_repro
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("dvc repro did not finish within 30 min")
    log = (project / "dvc-repro.log").read_text()
    assert proc.returncode == 0, f"dvc repro failed:\n{log[-6000:]}"
    for setting in ("toy-llamagen", "toy-var", "toy-t2i"):
        for out in _stage_outputs(project, setting):
            assert out.is_file(), out
        _check_evaluated(project, setting)
    _check_toy_t2i(project)
    status = _run([str(BIN / "dvc"), "status"], project)
    assert "up to date" in status.stdout
