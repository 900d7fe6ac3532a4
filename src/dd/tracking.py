"""MLflow helpers: every stage opens one run named `<setting>/<stage>` in the setting's own experiment
`<tracking.experiment>/<setting>` (e.g. `distilled-decoding/toy-var`), logs its settings as params, its numbers
as metrics and its pictures as artifacts.

The tracking URI comes from params.yaml (`tracking.mlflow_uri`, default sqlite:///mlflow.db next to
params.yaml); the MLFLOW_TRACKING_URI environment variable overrides it. Browse with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from dd.config import Params, Setting

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(params: Params) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    uri = params.tracking.mlflow_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((params.path.parent / uri[len(prefix):]).resolve())
    return uri


def _flatten(obj, prefix=""):
    if hasattr(obj, "__dataclass_fields__"):
        obj = {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def experiment_name(params: Params, setting: Setting) -> str:
    """One experiment per setting: the runs of a setting's stages sit together in the MLflow UI."""
    return f"{params.tracking.experiment}/{setting.name}"


@contextlib.contextmanager
def stage_run(params: Params, setting: Setting, stage: str, extra_params: dict | None = None):
    """Open an MLflow run for one stage of one setting; yields the mlflow module.

    The run is marked FAILED (and the exception re-raised) if the stage fails.
    """
    import mlflow
    from filelock import FileLock

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        # Parallel stages (snakemake --cores N) may all open a new mlflow.db at once; its schema
        # migration is not safe under concurrency ("duplicate column name"), so serialise it.
        with FileLock(uri[len("sqlite:///"):] + ".lock"):
            mlflow.set_experiment(experiment_name(params, setting))
    else:
        mlflow.set_experiment(experiment_name(params, setting))
    import torch

    # Float reductions depend on the thread count, so two runs of one commit and seed agree bit for bit
    # only with the same torch build and threads: record both with every run.
    tags = {"setting": setting.name, "stage": stage, "family": setting.family, "torch_version": torch.__version__,
            "torch_num_threads": str(torch.get_num_threads())}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    with mlflow.start_run(run_name=f"{setting.name}/{stage}", tags=tags) as run:
        flat = _flatten(setting)
        flat.update(extra_params or {})
        # MLflow caps a param value at 6000 chars; our values are short but stay safe.
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        try:
            yield mlflow
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        del run
