"""`dd plan --setting S`: the estimated cost of each stage of a setting, every number with its source.

Paper rows: GPU-hours from the paper's reported costs where they exist (DD2 Table 3: DD1 training on 8 x A800;
Tables 1-3: seconds per image), otherwise derived from them with our own measured ratios (benchmarks/RESULTS.md:
pairs / plain teacher sampling), otherwise a stated GUESS. Toy settings: the CPU times measured on the 2-core machine
(params.yaml comments, benchmarks/RESULTS.md). workflow/profiles/slurm/config.yaml sizes its per-rule limits from
the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from dd.config import Params, Setting
from dd.methods import all_methods

# DD2 Table 3, "Cost (8xGPU h)" of DD1 training on 8 NVIDIA A800 (reference/dd-paper.md §2); whether data generation
# is included is unstated, so the pairs stage is estimated separately below.
DD1_TRAINING_8XA800_HOURS = {"var-d16": 296.9, "var-d20": 484.4, "var-d24": 604.2, "llamagen-l": 647.7}
# DD student parameters (Table 1 / Table 3 #Para), to scale a reported training cost to an unreported row.
DD_PARAMS_M = {"var-d16": 327, "var-d20": 635, "var-d24": 1090, "llamagen-b": 98.3, "llamagen-l": 326,
               "llamagen-xl-t2i": 756}
# Teacher seconds per image (steady state): Table 1 (var-d16, llamagen-l), DD2 Table 1 (var-d20, var-d24), Table 3
# (t2i). LlamaGen-B has none: LlamaGen-L's is used as an upper bound (same 256 steps, a smaller network).
TEACHER_SECONDS = {"var-d16": (0.133, "Table 1"), "var-d20": (0.184, "DD2 Table 1"),
                   "var-d24": (0.251, "DD2 Table 1"), "llamagen-l": (5.01, "Table 1"),
                   "llamagen-b": (5.01, "GUESS: LlamaGen-L's Table 1 time as an upper bound"),
                   "llamagen-xl-t2i": (7.90, "Table 3")}
# Pairs stage cost / plain teacher sampling of the same batch, measured here (benchmarks/RESULTS.md "Pairs
# throughput", CPU, random weights): VAR-d16 1.050, LlamaGen-B 1.233.
PAIRS_OVER_SAMPLING = {"var": (1.050, "RESULTS.md pairs/plain VAR-d16"),
                       "llamagen": (1.233, "RESULTS.md pairs/plain LlamaGen-B")}
# Per-method seconds per image reported by the paper (Tables 1-3; DD2 Table 1 for VAR-d20/d24).
METHOD_SECONDS = {
    ("var-d16", "skip-1"): 0.113, ("var-d16", "skip-2"): 0.098, ("var-d16", "dd-1step"): 0.021,
    ("var-d16", "dd-2step"): 0.036, ("var-d16", "pre-trained-1-6"): 0.090, ("var-d16", "pre-trained-4-6"): 0.062,
    ("var-d16", "pre-trained-5-6"): 0.045, ("var-d20", "dd-1step"): 0.027, ("var-d20", "dd-2step"): 0.047,
    ("var-d24", "dd-1step"): 0.034, ("var-d24", "dd-2step"): 0.059, ("llamagen-l", "skip-106"): 2.94,
    ("llamagen-l", "skip-156"): 1.95, ("llamagen-l", "dd-1step"): 0.023, ("llamagen-l", "dd-2step"): 0.043,
    ("llamagen-l", "pre-trained-1-81"): 1.725, ("llamagen-l", "pre-trained-41-81"): 0.880,
    ("llamagen-l", "pre-trained-61-81"): 0.447, ("llamagen-xl-t2i", "dd-1step"): 0.052,
    ("llamagen-xl-t2i", "dd-2step"): 0.085,
}
# GUESS: FID/IS/precision/recall of 50k 256-px images with Inception-v3 on one GPU, about 10 minutes per method
# (not measured here: no GPU was lent for it).
EVALUATE_GPU_HOURS_PER_50K = 0.17
# Toy settings on the 2-core CPU, measured (benchmarks/RESULTS.md; the toy distill at its 1500-step default).
TOY_SECONDS = {
    "toy-llamagen": {"teacher": (159, "RESULTS.md 'make reproduce on a fresh clone': 2 min 39 s, idle"),
                     "pairs": (42, "RESULTS.md 'make reproduce on a fresh clone': 6000 pairs in 42 s, idle"),
                     "distill": (78, "RESULTS.md 'Toy fidelity': 1500 steps in 78 s, idle")},
    "toy-var": {"teacher": (200, "RESULTS.md 'make reproduce on a fresh clone': 3 min 20 s, idle"),
                "pairs": (63, "RESULTS.md 'make reproduce on a fresh clone': 6000 pairs in 63 s, idle"),
                "distill": (149, "RESULTS.md 'Toy fidelity': 1500 steps in 149 s, idle")},
    "toy-t2i": {"text_features": (13, "RESULTS.md 'The 1500-step default in the DAG'"),
                "teacher": (482, "RESULTS.md 'The 1500-step default in the DAG' (30 teacher epochs)"),
                "pairs": (36, "RESULTS.md 'The 1500-step default in the DAG': 167 pairs/s"),
                "distill": (125, "RESULTS.md 'The 1500-step default in the DAG': 1500 steps")},
}


@dataclass
class StageCost:
    stage: str
    gpu_hours: float | None  # None: CPU-only or unknown
    cpu_hours: float | None
    source: str


def _dd_method_seconds(setting: Setting, method: str, method_obj) -> tuple[float, str]:
    """Seconds per image of one sampling method: the paper's where reported, else scaled from the teacher's."""
    if (setting.name, method) in METHOD_SECONDS:
        return METHOD_SECONDS[(setting.name, method)], "paper time"
    teacher_s, _ = TEACHER_SECONDS[setting.name]
    if method == "teacher":
        return teacher_s, "paper teacher time"
    if method == "onestep":
        return 0.0, "table look-up, no network"
    if method.startswith("dd-"):
        # GUESS: the family's reported DD time (VAR-d16 / LlamaGen-L) scaled by the student's parameter count.
        ref = "var-d16" if setting.family == "var" else "llamagen-l"
        scale = DD_PARAMS_M[setting.name] / DD_PARAMS_M[ref]
        return METHOD_SECONDS[(ref, method)] * scale, f"GUESS: {ref}'s time x params ratio {scale:.2f}"
    units = method_obj.steps(10 if setting.family == "var" else 256)
    full = 10 if setting.family == "var" else 256
    return teacher_s * units / full, f"GUESS: teacher time x {units}/{full} steps"


def plan(params: Params, setting: Setting) -> list[StageCost]:
    """The estimated cost of each stage of the setting (see the module docstring for the sources)."""
    if not setting.paper_row:
        toy = TOY_SECONDS.get(setting.name, {})
        costs = [StageCost(stage, None, seconds / 3600, source) for stage, (seconds, source) in toy.items()]
        costs.append(StageCost("sample+evaluate", None, None, "CPU minutes (toy: 2000 images per method)"))
        return costs
    name = setting.name
    teacher_s, teacher_src = TEACHER_SECONDS[name]
    ratio, ratio_src = PAIRS_OVER_SAMPLING[setting.family]
    n_pairs = setting.pairs.num_pairs
    costs = [StageCost("teacher", 0.0, 0.1, "download of the official checkpoints (hub.py registry); network-bound"),
             StageCost("pairs", n_pairs * teacher_s * ratio / 3600, None,
                       f"{n_pairs:,} pairs x teacher {teacher_s} s/image ({teacher_src}) x pairs/plain {ratio} "
                       f"({ratio_src})")]
    if name in DD1_TRAINING_8XA800_HOURS:
        hours = DD1_TRAINING_8XA800_HOURS[name]
        costs.append(StageCost("distill", 8 * hours, None, f"DD2 Table 3: DD1 {name} training {hours} h on 8xA800"))
    else:
        ref = "llamagen-l"
        scale = DD_PARAMS_M[name] / DD_PARAMS_M[ref]
        costs.append(StageCost("distill", 8 * DD1_TRAINING_8XA800_HOURS[ref] * scale, None,
                               f"GUESS: DD2 Table 3's {ref} cost x student params ratio {scale:.2f} (not reported)"))
    n_images = setting.sample.num_samples
    sample_hours, parts = 0.0, []
    for method, obj in all_methods(setting).items():
        seconds, src = _dd_method_seconds(setting, method, obj)
        sample_hours += n_images * seconds / 3600
        parts.append(f"{method} {seconds:.3g}s ({src})")
    costs.append(StageCost("sample", sample_hours, None, f"{n_images:,} images per method: " + "; ".join(parts)))
    n_methods = len(all_methods(setting))
    costs.append(StageCost("evaluate", n_methods * EVALUATE_GPU_HOURS_PER_50K * n_images / 50000, None,
                           f"GUESS: ~{EVALUATE_GPU_HOURS_PER_50K} GPU-h per 50k images (Inception), {n_methods} "
                           f"methods"))
    costs.append(StageCost("report", None, 0.01, "tables and figures, CPU seconds"))
    return costs


def print_plan(params: Params, setting: Setting, gpu: str = "A800") -> None:
    costs = plan(params, setting)
    print(f"Estimated cost of {setting.name} ({'paper row' if setting.paper_row else 'toy setting'}; GPU-hours on "
          f"{gpu}-class GPUs as the paper's reported costs; see src/dd/plan.py for every source)")
    print(f"{'stage':<16} {'GPU-h':>10} {'CPU-h':>8}  source")
    total = 0.0
    for c in costs:
        gpu_h = "-" if c.gpu_hours is None else f"{c.gpu_hours:,.1f}"
        cpu_h = "-" if c.cpu_hours is None else f"{c.cpu_hours:.2f}"
        total += c.gpu_hours or 0.0
        print(f"{c.stage:<16} {gpu_h:>10} {cpu_h:>8}  {c.source}")
    if setting.paper_row:
        print(f"{'total':<16} {total:>10,.1f}           = {total / 8:,.1f} h on one 8-GPU node")
        print("The paper's times are seconds per image in steady state at its own batch size and GPU (not recovered); "
              "pairs and sample at a large batch may take less: read these as upper bounds.")
