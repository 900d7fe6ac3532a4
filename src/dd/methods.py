"""The named sampling methods of a setting, in the order of the paper's tables. No torch here: config.py (validation),
the Snakefile and dvc.yaml's method list derive from this module without importing a model.

Kinds of method (reference/dd-paper.md §3, Tables 1 and 2):
    teacher        the teacher's own ancestral sampling (setting's teacher_sampling), KV-cached; #Step = AR steps
    skip-<n>       the teacher stopped n AR steps before the end (DD2 §5.1, "directly skip the last n steps").
                   How the skipped content is filled is not recovered from the paper; ours, for both families:
                   the skipped steps contribute NOTHING to the latent the tokenizer decodes -- VAR decodes the
                   partial f_hat of the scales it ran (the last scales' residuals left empty), LlamaGen decodes
                   its latent grid with zero vectors at the skipped raster positions. No network pass fills them,
                   so #Step = AR steps run (VAR skip-1: 9, LlamaGen skip-106: 150, as the paper counts).
    onestep        (class-conditional settings) onestep*: every position drawn independently from its per-position,
                   per-class token frequencies
                   counted on the pairs data (the teacher's own token sequences; Proposition 3.1's closed-form
                   optimum of one-step set prediction). No network; #Step = 1 as the paper's table counts it (one
                   parallel step; it is a table look-up, not a forward pass).
    dd-1step, dd-2step, pre-trained-n-m
                   the DD student (dd.sampling.Method; few-step and teacher-involved).

Table order: teacher, skip-n (increasing n), onestep, dd-1step, dd-2step, then the teacher-involved rows.
"""
from __future__ import annotations

from dataclasses import dataclass


# --------------------------------------------------------------------------------------------------
# The DD student's methods
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One DD sampling recipe. teacher_start None = pure DD steps; otherwise teacher-involved (t_list = (0, t2))."""
    name: str
    t_list: tuple[int, ...]
    split: int
    teacher_start: int | None = None

    kind = "dd"

    def __post_init__(self):
        if not self.t_list or self.t_list[0] != 0 or list(self.t_list) != sorted(set(self.t_list)):
            raise ValueError(f"sampling method {self.name!r}: t_list must start at 0 and increase, got {self.t_list}")
        if self.teacher_start is not None:
            if len(self.t_list) != 2:
                raise ValueError(f"sampling method {self.name!r}: teacher-involved sampling needs t_list = (0, t2), "
                                 f"got {self.t_list}")
            if not 0 <= self.teacher_start < self.t_list[1]:
                raise ValueError(f"sampling method {self.name!r}: teacher_start must lie in [0, t2={self.t_list[1]}),"
                                 f" got {self.teacher_start}")

    @property
    def network_steps(self) -> int:
        """Forward passes per image (the paper's #Step): DD steps + teacher AR steps."""
        if self.teacher_start is None:
            return len(self.t_list)
        return (1 if self.teacher_start > 0 else 0) + (self.t_list[1] - self.teacher_start) + 1

    def steps(self, num_units: int) -> int:
        return self.network_steps

    @property
    def needs_student(self) -> bool:
        return True

    @property
    def needs_teacher_model(self) -> bool:
        return self.teacher_start is not None


def pretrained_name(teacher_start: int, t2: int) -> str:
    """The paper's 1-based name: the teacher regenerates units teacher_start+1 .. t2 (n .. m-1)."""
    return f"pre-trained-{teacher_start + 1}-{t2 + 1}"


# Table 2 (reference/dd-paper.md §5.1): (teacher_start, split) per row; t_list (0, 5) / (0, 80).
TABLE2 = {
    "var-d16": {"t_list": (0, 5), "rows": [(4, 5), (3, 8), (0, 9)]},          # 3, 4, 6 steps
    "llamagen-l": {"t_list": (0, 80), "rows": [(60, 180), (40, 180), (0, 220)]},  # 22, 42, 81 steps
}


def methods_for(setting_name: str, t_list, split: int) -> dict[str, Method]:
    """The named DD methods of a setting: dd-1step, dd-2step (the distill t_list and split), the paper's
    Table 2 teacher-involved rows where the setting has them, else one teacher-involved method in which the
    teacher makes the whole prefix up to t2 (pre-trained-1-{t2+1})."""
    t_list = tuple(int(t) for t in t_list)
    methods = {"dd-1step": Method("dd-1step", t_list[:1], split)}
    if len(t_list) > 1:
        methods["dd-2step"] = Method("dd-2step", t_list[:2], split)
        rows = TABLE2.get(setting_name)
        if rows is not None and rows["t_list"] == t_list[:2]:
            for start, row_split in rows["rows"]:
                name = pretrained_name(start, t_list[1])
                methods[name] = Method(name, t_list[:2], row_split, teacher_start=start)
        else:
            name = pretrained_name(0, t_list[1])
            methods[name] = Method(name, t_list[:2], split, teacher_start=0)
    return methods


# --------------------------------------------------------------------------------------------------
# The teacher and the Table 1 baselines
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherMethod:
    """The teacher's own sampling, stopped `skip` AR steps before the end (0 = the teacher row)."""
    name: str
    skip: int = 0

    kind = "teacher"

    def steps(self, num_units: int) -> int:
        return num_units - self.skip

    needs_student = False
    needs_teacher_model = True


@dataclass(frozen=True)
class OneStepMethod:
    """onestep*: independent per-position, per-class token frequencies of the pairs data (module docstring)."""
    name: str = "onestep"

    kind = "onestep"

    def steps(self, num_units: int) -> int:
        return 1

    needs_student = False
    needs_teacher_model = False


def skip_name(n: int) -> str:
    return f"skip-{n}"


def num_units_of(family: str, tokenizer: dict, model: dict) -> int | None:
    """AR steps of a teacher from its params blocks (VAR: scales; LlamaGen: tokens); None when the block leaves
    it to a preset (dd.teacher expands those)."""
    if family == "var":
        patch_nums = tokenizer.get("patch_nums")
        return len(patch_nums) if patch_nums else None
    return model.get("block_size")


def all_methods(setting) -> dict:
    """Every method of a setting (a dd.config.Setting), in table order: name -> Method | TeacherMethod |
    OneStepMethod."""
    methods = {"teacher": TeacherMethod("teacher")}
    for n in sorted(setting.sample.skip):
        methods[skip_name(n)] = TeacherMethod(skip_name(n), skip=n)
    if not setting.text_to_image:  # per-class token frequencies; a caption is (nearly) never seen twice
        methods["onestep"] = OneStepMethod()
    methods.update(methods_for(setting.name, setting.distill.t_list, setting.distill.split))
    return methods


def method_names(setting) -> list[str]:
    """all_methods(setting) as a plain list of names (the Snakefile's form)."""
    return list(all_methods(setting))


def upstream(setting, method_name: str) -> str:
    """The stage folder a method reads besides the teacher's (results/<setting>/...): "teacher" (the teacher,
    skip-n, and DD rows from the released checkpoint the teacher stage links), "pairs" (onestep) or "student"
    (DD rows from the distill stage). The one per-method input of the sample / evaluate jobs under both tools."""
    method = all_methods(setting)[method_name]
    if method.kind == "onestep":
        return "pairs"
    if method.needs_student and setting.sample.student_source(setting.teacher.dd_artifact) == "distilled":
        return "student"
    return "teacher"


def pipeline_settings(params) -> list[str]:
    """The settings the workflows run: pipeline.settings, then pipeline.text_to_image."""
    return list(params.pipeline.settings) + list(params.pipeline.text_to_image)


def conditions_input(setting) -> str:
    """What a setting's stages read to know their conditions (dd.conditions): the text-features stage's output of
    a text-to-image setting; for class labels, the code that says they are the condition."""
    return f"results/{setting.name}/text_features" if setting.text_to_image else "src/dd/conditions.py"


def sample_jobs(params, settings=None) -> dict[str, dict]:
    """{"<setting>_<method>": {"setting", "method", "upstream", "conditions"}} for the given settings (default: the
    pipeline's): the list params.yaml spells out for dvc.yaml (`pipeline.methods`), which cannot derive it."""
    names = pipeline_settings(params) if settings is None else settings
    jobs = {}
    for name in names:
        setting = params.setting(name)
        for method in method_names(setting):
            jobs[job_key(name, method)] = {"setting": name, "method": method,
                                           "upstream": f"results/{name}/{upstream(setting, method)}",
                                           "conditions": conditions_input(setting)}
    return jobs


def setting_jobs(params) -> dict[str, dict]:
    """{"<setting>": {"setting", "conditions"}} of the pipeline's settings: `pipeline.stages` for dvc.yaml."""
    return {name: {"setting": name, "conditions": conditions_input(params.setting(name))}
            for name in pipeline_settings(params)}


def job_key(setting: str, method: str) -> str:
    return f"{setting}_{method}"
