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
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    judge_epochs: int = 8  # the evaluate stage's toy judge (dd.judge; ~0.98 test accuracy at 8); micro runs cut it


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
    # toy-t2i: mean share of the samples whose measured thickness / width / slant bin equals their caption's
    # (dd.toy_captions.measure_attributes, no network; chance 1/3)
    caption_agreement: float = 0.0


@dataclass(frozen=True)
class Teacher:
    source: str  # "hub": download the official checkpoints; "train": train the toy teacher here
    tokenizer: dict[str, Any]  # VQ architecture (VAR VQVAE / LlamaGen VQ kwargs)
    model: dict[str, Any]  # AR transformer architecture (VAR depth... / LlamaGen GPT preset or dims)
    tokenizer_artifact: str | None = None  # hub registry names (dd.hub.ARTIFACTS); hub source only
    model_artifact: str | None = None
    dd_artifact: str | None = None  # the released DD student, where one exists
    # hub source only: pinned sha256 per role (tokenizer / model / dd), checked by `dd fetch` before the file is
    # used; without a pin the hash seen at first download is recorded and re-checked (trust on first use)
    sha256: dict[str, str] | None = None
    train: TeacherTrain | None = None  # train source only
    gates: Gates | None = None  # train source only


@dataclass(frozen=True)
class TeacherSampling:
    """The teacher's sampling distribution: what the ancestral sampler draws from and what the flow
    map is fed. VAR: cfg ramps linearly over scales. top_k 0 and top_p 1.0 disable their filter in both
    families (top_p 0 is refused: the official VAR code reads it as off, LlamaGen's as greedy)."""
    cfg: float
    top_k: int
    top_p: float
    temperature: float
    cfg_interval: int  # LlamaGen only (-1 = guidance at every token); ignored for VAR

    def var_top_p(self) -> float:
        """top_p as VAR's filter reads it (0 = off): keeping all the mass (1.0) is VAR's 0."""
        return 0.0 if self.top_p >= 1.0 else self.top_p


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
    # share of each (micro-)batch the perceptual term decodes, in (0, 1]: the decoder's forward and backward are
    # most of a toy step (benchmarks/RESULTS.md), so a smaller share buys more steps in the same time
    perceptual_fraction: float = 1.0


@dataclass(frozen=True)
class Sample:
    num_samples: int
    batch_size: int
    seed: int
    # skip-n baselines of Table 1: the teacher stopped n AR steps early (dd.methods); increasing, each in
    # [1, AR steps of the teacher)
    skip: list[int] = field(default_factory=list)
    shard_size: int = 1000  # images per samples shard (the unit a killed sample stage resumes from)
    # the DD student the sample stage uses: "released" (the released DD checkpoint the teacher stage links,
    # teacher.dd_artifact) or "distilled" (results/<setting>/student, the distill stage); default: released
    # where the setting names a dd_artifact, else distilled
    student: Optional[str] = None
    # text-to-image paper rows: a folder of reference images (relative to params.yaml); FID is computed against the
    # statistics of their Inception features (as clean-fid's custom statistics), cached by the folder's content
    fid_reference: Optional[str] = None
    # text-to-image paper rows: the CLIP model of the CLIP score beside the FID (dd.clip_score), a hub folder artifact
    # in CLIP_MODELS; null = no CLIP score. Not for toy settings (toy-t2i's captions are judged by dd.toy_captions).
    clip_model: Optional[str] = None
    # precision of the VQ decoder that turns sampled tokens into images: "float32" (the paper's), or "bfloat16" (bf16
    # autocast: 3-4x faster decoding on a CPU with bf16 units; its FID cost: benchmarks/RESULTS.md "Decoder precision")
    decoder_dtype: str = "float32"

    def student_source(self, dd_artifact: Optional[str]) -> str:
        return self.student or ("released" if dd_artifact else "distilled")


@dataclass(frozen=True)
class Prompts:
    """Text-to-image settings only: the captions (training prompts for the pairs, evaluation prompts for the
    sample stage) and the text encoder that turns them into the cached caption features (dd.prompts)."""
    # "toy-digits": captions measured from the toy's train digits (training prompts) and test digits (evaluation
    # prompts), dd.toy_captions; "file": a text file of captions, one per line (e.g. COCO captions)
    source: str
    encoder: str  # "toy": the offline seeded tiny T5 of dd.toy_captions; "flan-t5-xl": the hub folder artifact
    max_length: int  # caption tokens (the teacher's cls_token_num; the official t2i GPT reads 120)
    file: Optional[str] = None  # source "file": path of the captions file (relative to params.yaml)
    num_eval: int = 0  # source "file": captions held out for evaluation (the rest train); toy: every test digit
    num_train: int = 0  # source "file": training prompts kept of the rest (0 = all); the features are held in memory
    split_seed: int = 0  # source "file": the seed of the shuffle that splits the file into eval / train
    shard_size: int = 1024  # captions per feature shard
    batch_size: int = 32  # captions per encoder call
    dtype: str = "float32"  # of the stored features: float32, bfloat16 or float16


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
    prompts: Optional[Prompts] = None  # text-to-image settings only

    @property
    def text_to_image(self) -> bool:
        """A caption-conditioned (LlamaGen t2i) teacher: the condition is a caption, not a class label."""
        return self.teacher.model.get("model_type") == "t2i"


@dataclass(frozen=True)
class Tracking:
    mlflow_uri: str  # relative sqlite paths are taken from the params file's folder
    experiment: str


@dataclass(frozen=True)
class Pipeline:
    settings: list[str]  # what `dvc repro` and Snakemake's default target run
    # torch CPU threads of every `dd` stage, under Snakemake and DVC alike (0 = OMP_NUM_THREADS when set, else
    # every core this process may use); the DD_NUM_THREADS environment variable overrides it
    num_threads: int = 0
    # every (setting, method) of `settings`, keyed "<setting>_<method>": dvc.yaml's sample/evaluate stages iterate
    # it (DVC cannot derive it); load_params checks it equals dd.methods.sample_jobs, so it cannot drift
    methods: Optional[dict[str, dict[str, str]]] = None
    # toy settings whose distill recipe dd.ablation varies (the DAG target reproduce_ablation; `dvc repro` runs it
    # with everything else): each a toy setting of `settings`; [] = no ablation
    ablation: list[str] = field(default_factory=list)
    # text-to-image settings (Table 3) that `dvc repro`, `snakemake --cores all` and reproduce_table3 run; kept out of
    # `settings` so that reproduce_table1 (make reproduce) stays as short as it is
    text_to_image: list[str] = field(default_factory=list)
    # every setting of `settings` + `text_to_image` with the conditions its stages read (dd.methods.setting_jobs):
    # dvc.yaml's teacher/pairs/distill stages iterate it; checked like `methods`
    stages: Optional[dict[str, dict[str, str]]] = None


@dataclass(frozen=True)
class Params:
    path: Path
    tracking: Tracking
    pipeline: Pipeline
    settings: dict[str, Setting]

    def stage_dir(self, setting: Setting, stage: str) -> Path:
        """results/<setting>/<stage> next to the params file: where a stage writes (the paths Snakemake and
        dvc.yaml declare, relative to the project root)."""
        return self.path.parent / "results" / setting.name / stage

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
            _require(math.isfinite(value), file, key, value, "a finite number")
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
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{file}: missing key '{prefix}.{name}'")
        kwargs[name] = _check(data[name], hints[name], f"{prefix}.{name}", file)
    return cls(**kwargs)


# Keyword arguments of dd.flow.tokens_from_noise a setting may pin under flow.solver, with their allowed values
# (kept here because this module does not import torch; tests/test_config.py checks them against dd.flow).
FLOW_SOLVERS = ("adaptive", "euler", "dpm2m")
FLOW_SCHEDULES = ("log", "uniform", "power")
FLOW_SOLVER_KEYS = {
    "solver": (lambda v: v in FLOW_SOLVERS, f"one of {', '.join(FLOW_SOLVERS)}"),
    "tol": (lambda v: _number(v) and v > 0, "a number > 0"),
    "order": (lambda v: v in (2, 3) and not isinstance(v, bool), "2 or 3"),
    "steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "schedule": (lambda v: v in FLOW_SCHEDULES, f"one of {', '.join(FLOW_SCHEDULES)}"),
    "t_min": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "decided_tol": (lambda v: _number(v) and 0 < v < 0.5, "a number in (0, 0.5)"),
    "chunk_elements": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 (or null: the default)"),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(ok: bool, file: Path, key: str, value, allowed: str):
    """One line: the file, the key, the value found and what is allowed."""
    if not ok:
        raise ConfigError(f"{file}: key '{key}' = {value!r} is out of range; allowed: {allowed}")


def _check_architecture_value(file: Path, key: str, value):
    """Architecture blocks are free-form here: sizes (integers, lists of them) must be positive, rates and
    epsilons (floats) finite and >= 0, and patch_nums (VAR scales) strictly increasing."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if _integer(value):
        _require(value > 0, file, key, value, "an integer > 0")
    elif _number(value):
        _require(value >= 0, file, key, value, "a finite number >= 0")
    elif isinstance(value, float):
        _require(False, file, key, value, "a finite number >= 0")
    elif isinstance(value, list):
        _require(bool(value) and all(_integer(v) and v > 0 for v in value), file, key, value,
                 "a non-empty list of integers > 0")
        if key.endswith(".patch_nums"):
            _require(all(a < b for a, b in zip(value, value[1:])), file, key, value, "strictly increasing")


def ar_steps(s: Setting) -> int | None:
    """Number of autoregressive steps of the setting's teacher (VAR: scales, LlamaGen: tokens), from its
    architecture block; None where only a preset names it (the distill stage checks against the built model)."""
    if s.family == "var":
        patch_nums = s.teacher.tokenizer.get("patch_nums")
        return len(patch_nums) if isinstance(patch_nums, list) and patch_nums else None
    block_size = s.teacher.model.get("block_size")
    return block_size if _integer(block_size) and block_size > 0 else None


def vocab_size(s: Setting) -> int | None:
    size = s.teacher.tokenizer.get("vocab_size" if s.family == "var" else "codebook_size")
    return size if _integer(size) and size > 0 else None


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
    for block in ("tokenizer", "model"):  # key names are checked by the model builders (dd.teacher)
        for key, value in getattr(t, block).items():
            _check_architecture_value(file, f"{where}.teacher.{block}.{key}", value)
    for role, digest in (t.sha256 or {}).items():
        if role not in ("tokenizer", "model", "dd"):
            raise ConfigError(f"{file}: unknown key '{where}.teacher.sha256.{role}' (allowed here: tokenizer, model, dd)")
        _require(isinstance(digest, str) and len(digest) == 64 and not set(digest) - set("0123456789abcdef"),
                 file, f"{where}.teacher.sha256.{role}", digest, "64 lowercase hex digits (`sha256sum FILE`)")
    if t.source == "train" and (t.train is None or t.gates is None):
        raise ConfigError(f"{file}: setting '{s.name}' trains its teacher: set "
                          f"'{where}.teacher.train' and '{where}.teacher.gates'")

    def require(ok: bool, key: str, value, allowed: str):
        _require(ok, file, f"{where}.{key}", value, allowed)

    def positive(key: str, value):
        require(value > 0, key, value, "> 0")

    def seed(key: str, value):
        require(value >= 0, key, value, "an integer >= 0")

    def probability(key: str, value):
        require(0.0 <= value <= 1.0, key, value, "[0, 1]")

    # counts and rates
    for key in ("image_size", "num_classes"):
        positive(key, getattr(s, key))
    for key in ("num_pairs", "shard_size", "batch_size"):
        positive(f"pairs.{key}", getattr(s.pairs, key))
    seed("pairs.seed", s.pairs.seed)
    for key in ("num_samples", "batch_size"):
        positive(f"sample.{key}", getattr(s.sample, key))
    seed("sample.seed", s.sample.seed)
    if t.train is not None:
        for key in ("classifier_epochs", "tokenizer_epochs", "tokenizer_batch_size", "teacher_epochs",
                    "teacher_batch_size", "teacher_token_copies", "tokenizer_lr", "teacher_lr", "judge_epochs"):
            positive(f"teacher.train.{key}", getattr(t.train, key))
        seed("teacher.train.seed", t.train.seed)
        require(t.train.num_threads >= 0, "teacher.train.num_threads", t.train.num_threads,
                "an integer >= 0 (0 = torch's default)")
    if t.gates is not None:
        for key in ("classifier_accuracy", "reconstruction_accuracy", "sample_accuracy"):
            probability(f"teacher.gates.{key}", getattr(t.gates, key))
        positive("teacher.gates.num_samples", t.gates.num_samples)
        probability("teacher.gates.sample_diversity", t.gates.sample_diversity)
        probability("teacher.gates.caption_agreement", t.gates.caption_agreement)
        require(t.gates.sample_fid_ratio >= 0, "teacher.gates.sample_fid_ratio", t.gates.sample_fid_ratio,
                ">= 0 (0 = not checked)")

    # the teacher's sampling distribution: one meaning per key across both families
    ts, vocab = s.teacher_sampling, vocab_size(s)
    require(ts.cfg >= 0, "teacher_sampling.cfg", ts.cfg, ">= 0")
    require(ts.top_k >= 0 and (vocab is None or ts.top_k <= vocab), "teacher_sampling.top_k", ts.top_k,
            f"0 (off) to {vocab if vocab else 'the codebook size'}")
    require(0.0 < ts.top_p <= 1.0, "teacher_sampling.top_p", ts.top_p,
            "(0, 1], 1.0 = no nucleus filtering in both families (0 is refused: VAR's code reads it as off, "
            "LlamaGen's as greedy; use top_k 1 for greedy)")
    positive("teacher_sampling.temperature", ts.temperature)
    require(ts.cfg_interval >= -1, "teacher_sampling.cfg_interval", ts.cfg_interval, "-1 (every token) or >= 0")

    for key, value in s.flow.solver.items():
        if key not in FLOW_SOLVER_KEYS:
            raise ConfigError(f"{file}: unknown key '{where}.flow.solver.{key}' "
                              f"(allowed here: {', '.join(FLOW_SOLVER_KEYS)})")
        ok, allowed = FLOW_SOLVER_KEYS[key]
        require(ok(value), f"flow.solver.{key}", value, allowed)

    # distillation recipe
    d, steps = s.distill, ar_steps(s)
    inside = f"inside the teacher's {steps} AR steps, [0, {steps})" if steps else "integers >= 0"
    require(bool(d.t_list) and d.t_list[0] == 0 and all(a < b for a, b in zip(d.t_list, d.t_list[1:]))
            and (steps is None or d.t_list[-1] < steps),
            "distill.t_list", d.t_list, f"strictly increasing from 0, {inside}")
    require(d.split >= 0 and (steps is None or d.split <= steps), "distill.split", d.split,
            f"[0, {steps}] (the teacher's AR steps)" if steps else "an integer >= 0")
    for key in ("batch_size", "lr", "grad_clip", "max_steps", "checkpoint_every", "log_every"):
        positive(f"distill.{key}", getattr(d, key))
    require(d.weight_decay >= 0, "distill.weight_decay", d.weight_decay, ">= 0")
    require(len(d.betas) == 2 and all(0.0 <= b < 1.0 for b in d.betas), "distill.betas", d.betas,
            "two numbers in [0, 1)")
    require(0.0 <= d.ema_decay < 1.0, "distill.ema_decay", d.ema_decay, "[0, 1)")
    # a warm-up longer than the run is allowed: the rate then never reaches lr (micro test runs do this)
    require(d.warmup_steps >= 0, "distill.warmup_steps", d.warmup_steps, "an integer >= 0")
    seed("distill.seed", d.seed)
    if d.perceptual not in ("lpips", "random", "feature"):
        raise ConfigError(f"{file}: key '{where}.distill.perceptual' must be 'lpips', 'random' or 'feature' "
                          f"(got {d.perceptual!r})")
    require(0.0 < d.perceptual_fraction <= 1.0, "distill.perceptual_fraction", d.perceptual_fraction, "(0, 1]")
    unknown = set(d.loss_weights) - {"ce", "perceptual", "mse"}
    if unknown:
        raise ConfigError(f"{file}: unknown key '{where}.distill.loss_weights.{sorted(unknown)[0]}' "
                          f"(allowed here: ce, perceptual, mse)")
    for key, value in d.loss_weights.items():
        require(value >= 0, f"distill.loss_weights.{key}", value, ">= 0")
    require(any(v > 0 for v in d.loss_weights.values()), "distill.loss_weights", d.loss_weights,
            "at least one of ce, perceptual, mse > 0")
    _validate_sample(s, file)
    _validate_prompts(s, file)


def _validate_prompts(s: Setting, file: Path):
    where, p = f"settings.{s.name}.prompts", s.prompts
    if not s.text_to_image:
        if p is not None:
            raise ConfigError(f"{file}: key '{where}' is for text-to-image settings (teacher.model.model_type: t2i); "
                              f"remove it from this class-conditional setting")
        return
    if p is None:
        raise ConfigError(f"{file}: setting '{s.name}' is text-to-image (teacher.model.model_type: t2i): set "
                          f"'{where}' (source, encoder, max_length)")
    if p.source not in ("toy-digits", "file"):
        raise ConfigError(f"{file}: key '{where}.source' must be 'toy-digits' or 'file' (got {p.source!r})")
    if p.encoder not in ("toy", "flan-t5-xl"):
        raise ConfigError(f"{file}: key '{where}.encoder' must be 'toy' or 'flan-t5-xl' (got {p.encoder!r})")
    if p.source == "file" and not p.file:
        raise ConfigError(f"{file}: key '{where}.file' must name the captions file (one caption per line) when "
                          f"source is 'file'")
    if p.source == "file":
        _require(p.num_eval > 0, file, f"{where}.num_eval", p.num_eval, "> 0 (captions held out for evaluation)")
    cls_tokens = s.teacher.model.get("cls_token_num", 120)
    _require(p.max_length == cls_tokens, file, f"{where}.max_length", p.max_length,
             f"the teacher's caption positions, teacher.model.cls_token_num = {cls_tokens}")
    for key in ("shard_size", "batch_size"):
        _require(getattr(p, key) > 0, file, f"{where}.{key}", getattr(p, key), "> 0")
    _require(p.num_train >= 0, file, f"{where}.num_train", p.num_train, "an integer >= 0 (0 = all)")
    _require(p.split_seed >= 0, file, f"{where}.split_seed", p.split_seed, "an integer >= 0")
    _require(p.dtype in ("float32", "bfloat16", "float16"), file, f"{where}.dtype", p.dtype,
             "float32, bfloat16 or float16")


DECODER_DTYPES = ("float32", "bfloat16")  # sample.decoder_dtype (dd.teacher.Teacher.decoder_precision)
CLIP_MODELS = ("clip-vit-large-patch14",)  # dd.hub folder artifacts a CLIP score can use (sample.clip_model)


def _validate_sample(s: Setting, file: Path):
    from dd.methods import num_units_of

    where = f"settings.{s.name}.sample"
    if s.sample.shard_size <= 0:
        raise ConfigError(f"{file}: key '{where}.shard_size' must be positive")
    _require(s.sample.decoder_dtype in DECODER_DTYPES, file, f"{where}.decoder_dtype", s.sample.decoder_dtype,
             " or ".join(DECODER_DTYPES))
    skip = s.sample.skip
    if sorted(set(skip)) != skip or any(n <= 0 for n in skip):
        raise ConfigError(f"{file}: key '{where}.skip' must be increasing positive AR-step counts (got {skip})")
    units = num_units_of(s.family, s.teacher.tokenizer, s.teacher.model)
    if units is not None and skip and skip[-1] >= units:
        raise ConfigError(f"{file}: key '{where}.skip' asks to skip {skip[-1]} of the teacher's {units} AR steps; "
                          f"each value must lie in [1, {units - 1}]")
    if s.sample.student not in (None, "released", "distilled"):
        raise ConfigError(f"{file}: key '{where}.student' must be 'released' or 'distilled' (got {s.sample.student!r})")
    if s.sample.student == "released" and not s.teacher.dd_artifact:
        raise ConfigError(f"{file}: key '{where}.student' is 'released' but settings.{s.name}.teacher.dd_artifact is "
                          f"not set (no released DD checkpoint); use 'distilled'")
    clip = s.sample.clip_model
    if clip is not None and not (s.paper_row and s.text_to_image):
        raise ConfigError(f"{file}: key '{where}.clip_model' is for text-to-image paper rows (the CLIP score beside "
                          f"Table 3's FID); remove it from setting '{s.name}'")
    if clip is not None and clip not in CLIP_MODELS:
        raise ConfigError(f"{file}: key '{where}.clip_model' must be one of {', '.join(CLIP_MODELS)} or null "
                          f"(no CLIP score) (got {clip!r})")


def load_params(path: Path | str = "params.yaml", check_methods: bool = True) -> Params:
    """Load and validate a params file. Raises ConfigError (one line) on any problem. check_methods=False skips the
    pipeline.methods check (`dd methods --yaml` prints its replacement)."""
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
    for i, name in enumerate(pipeline.text_to_image):
        if name not in settings or not settings[name].text_to_image:
            raise ConfigError(f"{file}: key 'pipeline.text_to_image[{i}]' names '{name}', which is not a text-to-image "
                              f"setting of this file (teacher.model.model_type: t2i)")
    for i, name in enumerate(pipeline.settings):
        if settings[name].text_to_image:
            raise ConfigError(f"{file}: key 'pipeline.settings[{i}]' names the text-to-image setting '{name}'; list it "
                              f"under pipeline.text_to_image (Table 3 has its own targets)")
    for i, name in enumerate(pipeline.ablation):
        if name not in pipeline.settings or settings[name].paper_row:
            raise ConfigError(f"{file}: key 'pipeline.ablation[{i}]' is '{name}'; allowed: the toy settings of "
                              f"pipeline.settings ({', '.join(n for n in pipeline.settings if not settings[n].paper_row)})")
    params = Params(path=file, tracking=tracking, pipeline=pipeline, settings=settings)
    if pipeline.num_threads < 0:
        raise ConfigError(f"{file}: key 'pipeline.num_threads' must be >= 0 (0 = every core)")
    if pipeline.methods is not None and check_methods:
        from dd.methods import sample_jobs

        want = sample_jobs(params)
        if pipeline.methods != want:
            extra = sorted(set(pipeline.methods) - set(want))
            missing = sorted(set(want) - set(pipeline.methods))
            detail = (f"missing {missing[:4]}" if missing else "") + (f" unexpected {extra[:4]}" if extra else "")
            raise ConfigError(f"{file}: key 'pipeline.methods' does not list exactly the methods of "
                              f"pipeline.settings ({detail.strip() or 'entries differ'}); regenerate it with "
                              f"`python -m dd methods --params {file} --yaml` and paste it under pipeline")
    if pipeline.stages is not None and check_methods:
        from dd.methods import setting_jobs

        if pipeline.stages != setting_jobs(params):
            raise ConfigError(f"{file}: key 'pipeline.stages' does not list exactly the settings of pipeline.settings "
                              f"and pipeline.text_to_image with their conditions; regenerate it with "
                              f"`python -m dd methods --params {file} --yaml` and paste it under pipeline")
    return params
