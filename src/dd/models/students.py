"""DD students: construction (the official DD init, then the distillation start from the teacher), what
student.json records to rebuild one, and loading a trained one back (results/<setting>/student/).

A student mirrors its teacher's architecture: VARDD for VAR, LlamaGenDD for LlamaGen (dd_var.py, dd_llamagen.py);
the teacher's codebook is attached so that it can snap its continuous output to tokens."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from dd.errors import StageError
from dd.models.dd_llamagen import LlamaGenDD, student_config
from dd.models.dd_var import VARDD
from dd.models.llamagen import GPTConfig
from dd.models.var import VARConfig

if TYPE_CHECKING:
    from dd.teacher import Teacher


def new_student(teacher: Teacher) -> torch.nn.Module:
    """An untrained student of the teacher's architecture (official DD init), with the codebook attached."""
    if teacher.family == "var":
        student = VARDD(teacher.model.config)
        student.init_weights()
        student.attach_codebook(teacher.codebook)
        return student
    return LlamaGenDD(student_config(teacher.model.config), teacher.codebook)


def init_student(teacher: Teacher, seed: int) -> torch.nn.Module:
    """The student at the start of distillation: new_student + init_from_teacher, seeded (the global RNG is
    restored afterwards)."""
    cuda = [teacher.device.index or 0] if teacher.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        student = new_student(teacher).to(teacher.device)
        student.init_from_teacher(teacher.model)
    return student


def student_constructor(student: torch.nn.Module) -> dict:
    """What student.json records to rebuild the student: its class and config fields."""
    return {"class": type(student).__name__, "config": json.loads(json.dumps(dataclasses.asdict(student.config),
                                                                             default=list))}


def load_student(student_dir: Path | str, teacher: Teacher) -> torch.nn.Module:
    """A trained student from results/<S>/student/ (EMA weights, strict load), codebook attached, eval mode."""
    student_dir = Path(student_dir)
    info_path = student_dir / "student.json"
    if not info_path.is_file():
        raise StageError(f"{student_dir}: no student.json; run `dd distill --setting <setting>` first")
    info = json.loads(info_path.read_text())
    if info.get("codebook_sha256") != teacher.codebook_sha256():
        raise StageError(f"{info_path}: the student was trained with another codebook than this teacher's; "
                         f"re-run `dd distill --setting {info.get('setting')}`")
    config = info["model"]["config"]
    if info["model"]["class"] == "VARDD":
        student = VARDD(VARConfig(**config))
        student.attach_codebook(teacher.codebook)
    elif info["model"]["class"] == "LlamaGenDD":
        student = LlamaGenDD(GPTConfig(**config), teacher.codebook)
    else:
        raise StageError(f"{info_path}: unknown student class {info['model']['class']!r}")
    student.load_state_dict(load_file(student_dir / info["weights"]), strict=True)
    return student.to(teacher.device).eval()
