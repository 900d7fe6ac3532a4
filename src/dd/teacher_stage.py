"""The teacher stage: make results/<setting>/teacher/ for every setting.

Paper rows download the official checkpoints (dd.hub) and link them there; toy settings train a
small tokenizer + AR teacher + digit classifier on MNIST (dd.toy_teacher). Either way the folder is
written atomically and ends with teacher.json, which later stages read to build the Teacher.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dd import hub
from dd.atomic import atomic_dir, write_json
from dd.config import Params, Setting
from dd.tracking import stage_run


def teacher_dir(params: Params, setting: Setting) -> Path:
    return params.stage_dir(setting, "teacher")


def checkpoints_dir(params: Params) -> Path:
    """Where official checkpoints are linked (and where to put them by hand when offline).

    Outside results/ on purpose: Snakemake and DVC delete a stage's outputs before re-running it,
    and a hand-placed multi-GB file must survive that. DD_CHECKPOINTS overrides the location.
    """
    return Path(os.environ.get("DD_CHECKPOINTS") or params.path.parent / "checkpoints").resolve()


def fetch_teacher(params: Params, setting: Setting, include_dd: bool = True) -> Path:
    """Download (or find in the cache / in place) the setting's official checkpoints."""
    t = setting.teacher
    if t.source != "hub":
        from dd.errors import StageError
        raise StageError(f"setting '{setting.name}' trains its teacher (teacher.source: train); "
                         f"run `dd teacher --setting {setting.name}` instead of `dd fetch`")
    roles = {"tokenizer": t.tokenizer_artifact, "model": t.model_artifact}
    if include_dd and t.dd_artifact:
        roles["dd"] = t.dd_artifact
    final = teacher_dir(params, setting)
    with stage_run(params, setting, "teacher", {"teacher.roles": roles}) as mlflow:
        with atomic_dir(final) as out:
            files = {}
            for role, name in roles.items():
                art = hub.ARTIFACTS[name]
                pinned = (t.sha256 or {}).get(role)
                if pinned is not None:  # params.yaml's pin is checked as the registry's own sha256 would be
                    art = dataclasses.replace(art, sha256=pinned, pinned_by=f"{params.path} key "
                                              f"settings.{setting.name}.teacher.sha256.{role}")
                path = hub.fetch(art, checkpoints_dir(params))
                (out / path.name).symlink_to(path)
                files[role] = {"artifact": name, "file": path.name, "url": art.url,
                               "load_layout": art.load_layout}
                print(f"[teacher] {setting.name}: {role} <- {name} ({path.name})")
            write_json(out / "teacher.json", {"setting": setting.name, "family": setting.family,
                                              "source": "hub", "files": files})
        mlflow.log_artifact(str(final / "teacher.json"))
    return final


def run_teacher_stage(params: Params, setting: Setting) -> Path:
    if setting.teacher.source == "hub":
        return fetch_teacher(params, setting)
    from dd.toy_teacher import train_toy_teacher

    return train_toy_teacher(params, setting, teacher_dir(params, setting))
