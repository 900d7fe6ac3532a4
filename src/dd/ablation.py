"""Toy ablation of the distillation recipe: which loss terms, which intermediate timestep t_list[1].

    python -m dd.ablation --setting toy-llamagen --setting toy-var [--steps N] [--out reports/toy_ablation]

Needs results/<S>/teacher and results/<S>/pairs (`dd teacher`, `dd pairs`). Every variant trains a student from the
same teacher, pairs and seed with the setting's distill recipe, changed in one place, for --steps steps (default:
the setting's max_steps; shorter runs are marked in the table), then judges DD 1-step and 2-step samples with the
digit classifier (the share classified as their conditioning class; the setting's sample labels and seed):
  loss terms  ce | ce + perceptual | ce + perceptual + mse       (the setting's t_list)
              ce with split = the whole sequence (all positions from the logit head)
  t_list[1]   a few intermediate timesteps                       (the setting's loss weights)
A finished variant is stored in results/<S>/ablation/<variant>.json and skipped by a rerun; a killed variant resumes
from its checkpoint. The table goes to <out>.csv and <out>.md; each variant is one MLflow run <S>/ablation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from dd.atomic import atomic_file, write_json
from dd.config import ConfigError, Params, Setting, load_params
from dd.errors import StageError

LOSS_VARIANTS = {"ce": {"ce": 1.0, "perceptual": 0.0, "mse": 0.0},
                 "ce+perceptual": {"ce": 1.0, "perceptual": 1.0, "mse": 0.0},
                 "ce+perceptual+mse": {"ce": 1.0, "perceptual": 1.0, "mse": 1.0}}


def intermediate_timesteps(family: str, num_units: int) -> list[int]:
    """t_list[1] candidates in the teacher's AR steps (num_units of them), those short of the whole sequence.
    VAR: 2, 3 or 4 scales given; LlamaGen: 1, 2 or 4 rows of the square token grid given."""
    if family == "var":
        return [k for k in (2, 3, 4) if k < num_units]
    side = math.isqrt(num_units)
    return [rows * side for rows in (1, 2, 4) if rows * side < num_units]


def variants(setting: Setting, num_units: int) -> dict[str, dict]:
    """name -> {"change": the distill fields it changes, "also": names of variants that equal it}; the setting's
    own recipe appears once. num_units: the teacher's AR steps (Teacher.num_steps)."""
    cfg = setting.distill
    out = {}
    for name, weights in LOSS_VARIANTS.items():
        out[f"loss={name}"] = {"loss_weights": weights}
    # CE alone never trains the continuous head, which the sampler uses from `split` on: also judge CE with every
    # position taken from the logits (split = the whole sequence)
    out["loss=ce,split=all"] = {"loss_weights": LOSS_VARIANTS["ce"], "split": num_units}
    for t2 in intermediate_timesteps(setting.family, num_units):
        out[f"t2={t2}"] = {"t_list": [0, t2]}
    unique, seen = {}, {}
    for name, change in out.items():
        key = json.dumps(dataclasses.asdict(dataclasses.replace(cfg, **change)), sort_keys=True)
        if key in seen:
            unique[seen[key]]["also"].append(name)
            continue
        seen[key] = name
        unique[name] = {"change": change, "also": []}
    return unique


def run_variant(params: Params, setting: Setting, name: str, change: dict, steps: int, teacher, pairs, classifier,
                perceptual) -> dict:
    from dd.distill import train_student
    from dd.toy_teacher import toy_gate
    from dd.tracking import stage_run

    folder = params.stage_dir(setting, "ablation")
    record_path = folder / f"{name}.json"
    cfg = dataclasses.replace(setting.distill, **change, max_steps=steps,
                              warmup_steps=min(setting.distill.warmup_steps, steps // 10),
                              checkpoint_every=min(setting.distill.checkpoint_every, max(1, steps // 4)))
    plan = dataclasses.asdict(cfg)
    if record_path.is_file() and json.loads(record_path.read_text()).get("distill") == plan:
        return json.loads(record_path.read_text())
    variant_setting = dataclasses.replace(setting, distill=cfg)
    with stage_run(params, variant_setting, "ablation", {"ablation.variant": name}) as mlflow:
        work = folder / f"{name}.partial"
        result = train_student(teacher, pairs, cfg, work, perceptual=perceptual if cfg.loss_weights.get(
            "perceptual", 0.0) else None, cpu=True, tracker=mlflow)
        gate = toy_gate(result.ema, teacher, variant_setting, classifier)
        last = result.history[-1]
        record = {"setting": setting.name, "variant": name, "t_list": cfg.t_list, "split": cfg.split,
                  "loss_weights": cfg.loss_weights, "steps": steps, "full_steps": setting.distill.max_steps,
                  "final_loss": last["loss"], "final_ce": last.get("loss.ce"), "seconds": result.seconds,
                  **gate, "distill": plan}
        mlflow.log_metrics({k: v for k, v in record.items() if isinstance(v, float)})
    write_json(record_path, record)
    shutil.rmtree(work, ignore_errors=True)
    return record


def ablate(params: Params, setting: Setting, steps: int | None) -> list[dict]:
    from dd.data import load_classifier
    from dd.losses import perceptual_distance
    from dd.pairs import ShardedPairs, pairs_dir
    from dd.teacher import load_teacher
    from dd.teacher_stage import teacher_dir
    from dd.toy_teacher import FILES

    if setting.paper_row:
        raise StageError(f"setting '{setting.name}' is a paper row; the ablation judges samples with the toy "
                         f"digit classifier, so it runs on the toy settings only")
    t_dir = teacher_dir(params, setting)
    teacher = load_teacher(setting, t_dir, "cpu")
    pairs = ShardedPairs(pairs_dir(params, setting), teacher)
    classifier = load_classifier(t_dir / FILES["classifier"])
    perceptual = perceptual_distance(setting.distill.perceptual, t_dir)
    teacher_rate = json.loads((t_dir / "teacher.json").read_text()).get("metrics", {}).get("sample_accuracy")
    rows = []
    for name, spec in variants(setting, teacher.num_steps).items():
        started = time.perf_counter()
        record = run_variant(params, setting, name, spec["change"], steps or setting.distill.max_steps, teacher,
                             pairs, classifier, perceptual)
        record = {**record, "also": spec["also"], "teacher_class_accuracy": teacher_rate}
        rows.append(record)
        print(f"[ablation] {setting.name} {name}: dd-1step {record['dd-1step.class_accuracy']:.3f}, dd-2step "
              f"{record.get('dd-2step.class_accuracy', float('nan')):.3f} ({time.perf_counter() - started:.0f}s)",
              flush=True)
    return rows


def write_table(rows: list[dict], out: Path, command: str) -> None:
    import pandas as pd

    table = pd.DataFrame([{
        "setting": r["setting"], "variant": r["variant"] + "".join(f" (= {a})" for a in r["also"]),
        "loss_weights": " ".join(f"{k}={v:g}" for k, v in r["loss_weights"].items() if v),
        "t_list": ",".join(map(str, r["t_list"])), "split": r["split"], "steps": r["steps"],
        "full_steps": r["full_steps"], "final_ce": r["final_ce"],
        "dd1_class_acc": r["dd-1step.class_accuracy"], "dd2_class_acc": r.get("dd-2step.class_accuracy"),
        "teacher_class_acc": r["teacher_class_accuracy"], "train_s": r["seconds"]} for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    shorter = any(r["steps"] < r["full_steps"] for r in rows)
    lines = ["# Toy ablation of the distillation recipe", "",
             f"Made by `{command}` (src/dd/ablation.py). Each row trains a student from the same teacher, pairs and "
             f"seed with the setting's recipe changed in one place; `dd1/dd2_class_acc` = share of DD 1-step / "
             f"2-step samples (balanced labels, the setting's sample seed and count) that the digit classifier "
             f"assigns to their conditioning class; `teacher_class_acc` = the teacher's own samples (teacher stage). "
             f"`loss=ce,split=all`: CE alone does not train the continuous head that the sampler uses from `split` "
             f"on, so this row samples every position from the logit head. `train_s`: wall time of the variant's training "
             f"on the machine that made the table (a record, not a benchmark).", ""]
    if shorter:
        lines += ["**Shorter runs:** `steps` < `full_steps` (the setting's max_steps) — the budget of this table; "
                  "absolute accuracies are below those of a full `dd distill`, the comparison between rows is the "
                  "point.", ""]
    lines += [table.to_markdown(index=False, floatfmt=".3f"), ""]
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dd.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--setting", action="append", required=True, help="a toy setting (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default: the setting's max_steps)")
    parser.add_argument("--out", type=Path, default=Path("reports/toy_ablation"), help="table path without suffix")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        rows = [row for name in args.setting for row in ablate(params, params.setting(name), args.steps)]
    except ConfigError as err:
        print(f"dd.ablation: error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"dd.ablation: error: {err}", file=sys.stderr)
        return 1
    write_table(rows, args.out, "python -m dd.ablation " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"[ablation] table -> {args.out.with_suffix('.md')} and .csv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
