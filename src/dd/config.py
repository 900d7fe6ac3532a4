"""Typed settings loaded from params.yaml.

params.yaml holds one block per setting under `settings:` (the paper's rows and the embedded toy
settings), plus project-wide `tracking`. Every block is checked against the dataclasses below: an
unknown key, a missing key, a wrong type or an unknown setting name raises ConfigError with a
one-line message naming the key and the file. Nothing here imports torch, so `dd settings` is fast.

Free-form architecture blocks (`teacher.tokenizer`, `teacher.model`) are dictionaries here; the model
builders in dd.teacher check their keys against the model config dataclasses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FAMILIES = ("var", "llamagen")


class ConfigError(Exception):
    """A bad params file. The message is one line: what, where (key and file), how to fix."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherTrain:
    """Toy teachers only: training budget of the tokenizer, the AR teacher and the digit classifier."""
    seed: int
    classifier_epochs: int
    tokenizer_epochs: int
    tokenizer_lr: float
    tokenizer_batch_size: int
    teacher_epochs: int
    teacher_lr: float
    teacher_batch_size: int
    # tokenized copies of the train split the AR teacher sees: 1 = the digits as they are; k > 1 adds k - 1
    # randomly shifted copies (more variety, but a harder distribution that needs far more teacher epochs)
    teacher_token_copies: int
    num_threads: int  # torch CPU threads; 0 = torch's default


@dataclass(frozen=True)
class Gates:
    """Quality gates of the toy teacher stage (issue: classifier >= 97 %, reconstructions >= 95 %,
    teacher samples >= 90 %). With enforce=false the stage only reports them (used by micro runs)."""
    classifier_accuracy: float
    reconstruction_accuracy: float
    sample_accuracy: float
    num_samples: int  # teacher samples drawn to measure sample_accuracy
    enforce: bool
    # Distribution gates (issue 12: class accuracy alone passes a mode-collapsed teacher). 0 = not checked.
    # sample_diversity: the samples' same-class pixel diversity / the test digits' (at least this);
    # sample_fid_ratio: Frechet distance of the samples to the test digits over that of train digits to the test
    # digits, both in the gate classifier's features (at most this).
    sample_diversity: float = 0.0
    sample_fid_ratio: float = 0.0


@dataclass(frozen=True)
class Teacher:
    source: str  # "hub": download the official checkpoints; "train": train the toy teacher here
    tokenizer: dict[str, Any]  # VQ architecture (VAR VQVAE / LlamaGen VQ kwargs)
    model: dict[str, Any]  # AR transformer architecture (VAR depth... / LlamaGen GPT preset or dims)
    tokenizer_artifact: str | None = None  # hub registry names (dd.hub.ARTIFACTS); hub source only
    model_artifact: str | None = None
    dd_artifact: str | None = None  # the released DD student, where one exists
    train: TeacherTrain | None = None  # train source only
    gates: Gates | None = None  # train source only


@dataclass(frozen=True)
class TeacherSampling:
    """The teacher's sampling distribution: what the ancestral sampler draws from and what the flow
    map is fed. VAR: cfg ramps linearly over scales, top_p=0 disables; LlamaGen: top_p=1 disables."""
    cfg: float
    top_k: int
    top_p: float
    temperature: float
    cfg_interval: int  # LlamaGen only (-1 = guidance at every token); ignored for VAR


@dataclass(frozen=True)
class Flow:
    """Solver of the per-token flow-matching ODE (dd.flow.tokens_from_noise keyword arguments)."""
    solver: dict[str, Any]


@dataclass(frozen=True)
class Pairs:
    num_pairs: int
    shard_size: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class Distill:
    t_list: list[int]  # code timesteps the student is trained to jump from (paper X_{t+1})
    split: int  # loss_split_t / split_t: logit head before, continuous head from here on
    batch_size: int
    lr: float
    weight_decay: float
    betas: list[float]
    grad_clip: float
    ema_decay: float
    max_steps: int
    warmup_steps: int
    checkpoint_every: int
    log_every: int
    loss_weights: dict[str, float]  # ce / perceptual / mse
    perceptual: str  # "lpips" (paper rows), "random" (toy: random-weight conv features) or "feature" (classifier)
    seed: int


@dataclass(frozen=True)
class Sample:
    num_samples: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class Setting:
    name: str
    family: str  # "var" | "llamagen"
    description: str
    paper_row: bool  # a row of the paper's tables (full-size, hub checkpoints)
    image_size: int
    num_classes: int
    teacher: Teacher
    teacher_sampling: TeacherSampling
    flow: Flow
    pairs: Pairs
    distill: Distill
    sample: Sample

    def results_dir(self, root: Path | str = "results") -> Path:
        return Path(root) / self.name


@dataclass(frozen=True)
class Tracking:
    mlflow_uri: str  # relative sqlite paths are taken from the params file's folder
    experiment: str


@dataclass(frozen=True)
class Pipeline:
    settings: list[str]  # what `dvc repro` and Snakemake's default target run


@dataclass(frozen=True)
class Params:
    path: Path
    tracking: Tracking
    pipeline: Pipeline
    settings: dict[str, Setting]

    def setting(self, name: str) -> Setting:
        if name not in self.settings:
            raise ConfigError(
                f"{self.path}: unknown setting '{name}'; known settings: {', '.join(self.settings)} "
                f"(run `dd settings` to list them)")
        return self.settings[name]


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value, tp, key: str, file: Path):
    """Validate `value` against the annotation `tp`; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, key, file)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: key '{key}' must be a mapping (got {type(value).__name__})")
        return _build(tp, value, key, file)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{file}: key '{key}' must be a list (got {type(value).__name__}: {value!r})")
        return [_check(v, item_tp, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: key '{key}' must be a mapping (got {type(value).__name__})")
        if item_tp is Any:
            return dict(value)
        return {k: _check(v, item_tp, f"{key}.{k}", file) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{file}: key '{key}' must be {_type_name(tp)} (got {type(value).__name__}: {value!r})")


def _build(cls, data: dict, prefix: str, file: Path, **given):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields or key in given:
            raise ConfigError(
                f"{file}: unknown key '{prefix}.{key}' (allowed here: {', '.join(k for k in fields if k not in given)})")
    kwargs = dict(given)
    for name, f in fields.items():
        if name in given:
            continue
        if name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{file}: missing key '{prefix}.{name}'")
        kwargs[name] = _check(data[name], hints[name], f"{prefix}.{name}", file)
    return cls(**kwargs)


def _validate_setting(s: Setting, file: Path):
    where = f"settings.{s.name}"
    if s.family not in FAMILIES:
        raise ConfigError(f"{file}: key '{where}.family' must be one of {FAMILIES} (got {s.family!r})")
    t = s.teacher
    if t.source not in ("hub", "train"):
        raise ConfigError(f"{file}: key '{where}.teacher.source' must be 'hub' or 'train' (got {t.source!r})")
    if t.source == "hub" and not (t.tokenizer_artifact and t.model_artifact):
        raise ConfigError(f"{file}: setting '{s.name}' downloads its teacher: set "
                          f"'{where}.teacher.tokenizer_artifact' and '{where}.teacher.model_artifact'")
    if t.source == "train" and (t.train is None or t.gates is None):
        raise ConfigError(f"{file}: setting '{s.name}' trains its teacher: set "
                          f"'{where}.teacher.train' and '{where}.teacher.gates'")
    d = s.distill
    if not d.t_list or d.t_list[0] != 0 or sorted(set(d.t_list)) != d.t_list:
        raise ConfigError(f"{file}: key '{where}.distill.t_list' must start at 0 and increase (got {d.t_list})")
    if d.perceptual not in ("lpips", "random", "feature"):
        raise ConfigError(f"{file}: key '{where}.distill.perceptual' must be 'lpips', 'random' or 'feature' "
                          f"(got {d.perceptual!r})")
    unknown = set(d.loss_weights) - {"ce", "perceptual", "mse"}
    if unknown:
        raise ConfigError(f"{file}: unknown key '{where}.distill.loss_weights.{sorted(unknown)[0]}' "
                          f"(allowed here: ce, perceptual, mse)")
    counts = {f"{section}.{key}": getattr(getattr(s, section), key) for section, key in (
        ("pairs", "num_pairs"), ("pairs", "shard_size"), ("pairs", "batch_size"), ("distill", "batch_size"),
        ("sample", "num_samples"), ("sample", "batch_size"))}
    if t.train is not None:
        counts.update({f"teacher.train.{key}": getattr(t.train, key) for key in (
            "classifier_epochs", "tokenizer_epochs", "tokenizer_batch_size", "teacher_epochs", "teacher_batch_size",
            "teacher_token_copies")})
    for key, value in counts.items():
        if value <= 0:
            raise ConfigError(f"{file}: key '{where}.{key}' must be positive")


def load_params(path: Path | str = "params.yaml") -> Params:
    """Load and validate a params file. Raises ConfigError (one line) on any problem."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: params file not found (pass --params PATH, default ./params.yaml)")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: top level must be a mapping with keys 'tracking', 'pipeline' and 'settings'")
    for key in raw:
        if key not in ("tracking", "pipeline", "settings"):
            raise ConfigError(f"{file}: unknown key '{key}' (allowed here: tracking, pipeline, settings)")
    for key in ("tracking", "pipeline", "settings"):
        if key not in raw:
            raise ConfigError(f"{file}: missing key '{key}'")
    tracking = _check(raw["tracking"], Tracking, "tracking", file)
    if not isinstance(raw["settings"], dict) or not raw["settings"]:
        raise ConfigError(f"{file}: key 'settings' must be a non-empty mapping of setting name -> block")
    settings = {}
    for name, block in raw["settings"].items():
        if not isinstance(block, dict):
            raise ConfigError(f"{file}: key 'settings.{name}' must be a mapping")
        setting = _build(Setting, block, f"settings.{name}", file, name=str(name))
        _validate_setting(setting, file)
        settings[str(name)] = setting
    pipeline = _check(raw["pipeline"], Pipeline, "pipeline", file)
    for i, name in enumerate(pipeline.settings):
        if name not in settings:
            raise ConfigError(f"{file}: key 'pipeline.settings[{i}]' names unknown setting '{name}' "
                              f"(known: {', '.join(settings)})")
    return Params(path=file, tracking=tracking, pipeline=pipeline, settings=settings)
