"""Toy ablation of the distillation recipe, judged as the evaluate stage judges (dd.judge, which no training step
sees): which loss terms, which intermediate timestep, how many pairs (the paper's Fig. 8), how long (Fig. 7).

    python -m dd ablation --setting S          one setting's variants -> results/ablation/<S>/
    python -m dd ablation-report               every toy setting's variants -> reports/toy_ablation.md / .csv
    snakemake --cores all reproduce_ablation   (or dvc repro ablation_report) both, inside the DAG

Needs results/<S>/teacher, results/<S>/pairs and results/<S>/metrics/teacher.json (the teacher's own FID under the
same judge: every FID below is also given as a multiple of it). Every variant trains a student from the same
teacher, pairs and seed with the setting's distill recipe changed in one place, then draws the DD 1-step and 2-step
samples exactly as the sample stage would (the setting's sample count, balanced labels and seed) and judges them
with dd.evaluate.toy_metrics: FID against the 1000 test digits, precision / recall, class accuracy, same-class
diversity. The variants (`variants`):
  recipe                the setting's own recipe; also judged at 1/4 and 1/2 of its steps (recipe@N: Fig. 7's
                        training length, the same run, so the rows differ only in how far it got)
  loss=...              ce | ce + perceptual + mse (the recipe is ce + perceptual); ce with split = the whole
                        sequence (all positions from the logit head: CE alone never trains the continuous head)
  perceptual=feature    the perceptual term through the digit classifier's features (trained to ignore style)
                        instead of the recipe's random-feature distance: the collapse of issue 12
  t2=...                other intermediate timesteps t_list[1]
  pairs=N               the first N of the setting's pairs (Fig. 8's axis)
A finished variant is stored in results/ablation/<S>/<variant>.json (results/ablation/<S>.partial/ until every variant
is done) and skipped by a rerun with the same plan (distill recipe, pairs, sample block); a killed variant resumes
from its checkpoint. Each variant is one MLflow run <S>/ablation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

from dd.atomic import atomic_file, publish_dir, write_json
from dd.config import ConfigError, Params, Setting, load_params
from dd.errors import StageError

LOSS_VARIANTS = {"ce": {"ce": 1.0, "perceptual": 0.0, "mse": 0.0},
                 "ce+perceptual": {"ce": 1.0, "perceptual": 1.0, "mse": 0.0},
                 "ce+perceptual+mse": {"ce": 1.0, "perceptual": 1.0, "mse": 1.0}}
LENGTH_FRACTIONS = (4, 2)  # the recipe run is also judged at max_steps / 4 and max_steps / 2 (Fig. 7)
PAIR_FRACTIONS = (4, 2)  # pairs=N variants: the first num_pairs / 4 and num_pairs / 2 pairs (Fig. 8)
METHODS = ("dd-1step", "dd-2step")
JUDGED = ("fid", "precision", "recall", "class_accuracy", "diversity")  # the metrics a row keeps
RESULT = Path("results") / "ablation"  # results/ablation/<S>/
REPORT = Path("reports") / "toy_ablation"


def ablation_dir(params: Params, setting: str) -> Path:
    return params.path.parent / RESULT / setting


def intermediate_timesteps(family: str, num_units: int) -> list[int]:
    """t_list[1] candidates in the teacher's AR steps (num_units of them), those short of the whole sequence.
    VAR: 2, 3 or 4 scales given; LlamaGen: 1, 2 or 4 rows of the square token grid given."""
    if family == "var":
        return [k for k in (2, 3, 4) if k < num_units]
    side = math.isqrt(num_units)
    return [rows * side for rows in (1, 2, 4) if rows * side < num_units]


def variants(setting: Setting, num_units: int, num_pairs: int) -> dict[str, dict]:
    """name -> {"change": the distill fields it changes, "pairs": how many pairs it trains on, "also": names of
    variants that equal it}; the setting's own recipe is "recipe". num_units: the teacher's AR steps
    (Teacher.num_steps); num_pairs: how many pairs the pairs stage made."""
    cfg = setting.distill
    # the loss variants train the continuous head: from the recipe's split, or from t_list[1] when the recipe
    # samples every position from the logit head (split = the whole sequence: no continuous position to train)
    hybrid = {} if cfg.split < num_units else {"split": min(cfg.t_list[1], num_units)}
    out = {"recipe": {}}
    for name, weights in LOSS_VARIANTS.items():
        out[f"loss={name}"] = {"loss_weights": weights, **hybrid}
    out["loss=ce,split=all"] = {"loss_weights": LOSS_VARIANTS["ce"], "split": num_units}
    out["perceptual=feature"] = {"loss_weights": LOSS_VARIANTS["ce+perceptual"], "perceptual": "feature", **hybrid}
    for t2 in intermediate_timesteps(setting.family, num_units):
        out[f"t2={t2}"] = {"t_list": [0, t2]}
    for fraction in PAIR_FRACTIONS:
        out[f"pairs={num_pairs // fraction}"] = {"pairs": num_pairs // fraction}
    out[f"pairs={num_pairs}"] = {}
    unique, seen = {}, {}
    for name, change in out.items():
        change = dict(change)
        pairs = change.pop("pairs", num_pairs)
        distill = dataclasses.replace(cfg, **change)
        if distill.loss_weights.get("perceptual", 0.0) == 0.0:
            distill = dataclasses.replace(distill, perceptual=cfg.perceptual)  # unused: not a difference
        key = json.dumps([dataclasses.asdict(distill), pairs], sort_keys=True)
        if key in seen:
            unique[seen[key]]["also"].append(name)
            continue
        seen[key] = name
        unique[name] = {"change": change, "pairs": pairs, "also": []}
    return unique


class FirstPairs:
    """The first n pairs of a pair set (ShardedPairs interface: len, get, identity)."""

    def __init__(self, pairs, n: int):
        if not 0 < n <= len(pairs):
            raise StageError(f"ablation: {n} pairs asked for, the pairs stage made {len(pairs)}")
        self.pairs, self.n = pairs, n
        self.identity = pairs.identity if n == len(pairs) else f"{pairs.identity}[:{n}]"

    def __len__(self) -> int:
        return self.n

    def get(self, indices):
        return self.pairs.get(indices)


def judge_student(student, teacher, setting: Setting, reference: dict) -> dict:
    """{method: toy metrics} of the DD 1-step and 2-step samples of `student`, drawn as the sample stage draws them
    (the setting's sample count, balanced labels, seed and batch size; uint8 pixels; the t_list and split of
    setting.distill, i.e. the variant's own) and judged by dd.judge."""
    import torch

    from dd import sampling
    from dd.evaluate import toy_metrics
    from dd.sample_stage import balanced_labels, to_uint8

    ops = sampling.student_ops(student)
    cfg, sample = setting.distill, setting.sample
    labels = balanced_labels(sample.num_samples, setting.num_classes, sample.seed)
    methods = sampling.methods_for(setting.name, cfg.t_list, cfg.split)
    out = {}
    with torch.no_grad(), torch.random.fork_rng():  # judging mid-training must not move the training's RNG
        for name in METHODS:
            images = torch.cat([to_uint8(x) for _, x in sampling.sample_batches(
                ops, methods[name], labels, sample.seed, sample.batch_size, teacher)])
            metrics = toy_metrics(reference, images, labels)
            out[name] = {k: metrics[k] for k in JUDGED}
    return out


def run_variant(params: Params, setting: Setting, name: str, spec: dict, teacher, pairs, reference: dict,
                folder: Path) -> dict:
    """Train, judge and record one variant (its record is returned; a finished one is read back)."""
    from dd.distill import train_student
    from dd.losses import perceptual_distance
    from dd.teacher_stage import teacher_dir
    from dd.tracking import stage_run

    cfg = dataclasses.replace(setting.distill, **spec["change"])
    plan = {"distill": dataclasses.asdict(cfg), "pairs": spec["pairs"], "pairs_identity": pairs.identity,
            "samples": dataclasses.asdict(setting.sample)}
    record_path = folder / f"{name}.json"
    if record_path.is_file() and json.loads(record_path.read_text()).get("plan") == plan:
        return json.loads(record_path.read_text())
    snapshot_steps = sorted({cfg.max_steps // f for f in LENGTH_FRACTIONS}) if name == "recipe" else []

    def snapshot_path(step: int) -> Path:
        return folder / f"{name}@{step}.snapshot"

    variant_setting = dataclasses.replace(setting, distill=cfg)  # its t_list and split are those the sampler uses

    def judge_snapshot(step, ema):  # written at once: a resumed run does not pass the earlier steps again
        if step in snapshot_steps:
            write_json(snapshot_path(step), {"plan": plan, "metrics": judge_student(ema, teacher, variant_setting,
                                                                                     reference)})

    perceptual = perceptual_distance(cfg.perceptual, teacher_dir(params, setting)) \
        if cfg.loss_weights.get("perceptual", 0.0) else None
    work = folder / f"{name}.partial"
    with stage_run(params, variant_setting, "ablation", {"ablation.variant": name, "ablation.pairs": spec["pairs"]}) \
            as mlflow:
        result = train_student(teacher, FirstPairs(pairs, spec["pairs"]), cfg, work, perceptual=perceptual, cpu=True,
                               tracker=mlflow, ema_callback=judge_snapshot if snapshot_steps else None)
        snapshots = {}
        for step in snapshot_steps:
            saved = json.loads(snapshot_path(step).read_text()) if snapshot_path(step).is_file() else {}
            if saved.get("plan") != plan:
                raise StageError(f"ablation {setting.name} {name}: step {step} was not judged (its run resumed "
                                 f"past it); delete {work} and rerun")
            snapshots[str(step)] = saved["metrics"]
        judged = judge_student(result.ema, teacher, variant_setting, reference)
        record = {"setting": setting.name, "variant": name, "change": spec["change"], "pairs": spec["pairs"],
                  "steps": cfg.max_steps, "final_loss": result.history[-1]["loss"], "seconds": result.seconds,
                  "metrics": judged, "snapshots": snapshots,
                  "resumed_from": result.resumed_from, "plan": plan}
        mlflow.log_metrics({f"{m}.{k}": v for m, values in judged.items() for k, v in values.items()})
    write_json(record_path, record)
    shutil.rmtree(work, ignore_errors=True)
    for step in snapshot_steps:
        snapshot_path(step).unlink()
    return record


def teacher_metrics(params: Params, setting: Setting) -> dict:
    """The evaluate stage's metrics of the teacher (and of onestep* when present): the scale of every FID here."""
    from dd.evaluate import metrics_path

    path = metrics_path(params, setting, "teacher")
    if not path.is_file():
        raise StageError(f"{path}: missing; the ablation reports FIDs as multiples of the teacher's: run "
                         f"`dd sample` and `dd evaluate --setting {setting.name} --method teacher` first")
    out = {"teacher": json.loads(path.read_text())}
    onestep = metrics_path(params, setting, "onestep")
    if onestep.is_file():
        out["onestep"] = json.loads(onestep.read_text())
    return out


def run_ablation_stage(params: Params, setting: Setting) -> Path:
    """Every variant of one toy setting -> results/ablation/<S>/ (variant records + index.json); returns the folder."""
    from dd.evaluate import toy_reference
    from dd.pairs import ShardedPairs, pairs_dir
    from dd.teacher import load_teacher
    from dd.teacher_stage import teacher_dir

    if setting.paper_row:
        raise StageError(f"setting '{setting.name}' is a paper row; the ablation judges digits with dd.judge, so it "
                         f"runs on the toy settings only")
    final = ablation_dir(params, setting.name)
    work = final.with_name(final.name + ".partial")
    reference_metrics = teacher_metrics(params, setting)
    teacher = load_teacher(setting, teacher_dir(params, setting), "cpu")
    pairs = ShardedPairs(pairs_dir(params, setting), teacher)
    reference = toy_reference(params, setting, setting.sample.num_samples)
    work.mkdir(parents=True, exist_ok=True)
    if final.is_dir():  # a rerun (a changed input) keeps every variant whose plan did not change
        for record in final.glob("*.json"):
            if record.name != "index.json" and not (work / record.name).exists():
                shutil.copy2(record, work / record.name)
    rows = []
    for name, spec in variants(setting, teacher.num_steps, len(pairs)).items():
        record = run_variant(params, setting, name, spec, teacher, pairs, reference, work)
        rows.append({**record, "also": spec["also"]})
        one, two = record["metrics"]["dd-1step"], record["metrics"]["dd-2step"]
        print(f"[ablation] {setting.name} {name}: dd-1step FID {one['fid']:.3g} recall {one['recall']:.3f}, "
              f"dd-2step FID {two['fid']:.3g} ({record['seconds']:.0f}s)", flush=True)
    write_json(work / "index.json", {"setting": setting.name, "variants": rows,
                                     "teacher": _judge_part(reference_metrics["teacher"]),
                                     "onestep": _judge_part(reference_metrics.get("onestep")),
                                     "fid_floor": reference["fid_floor"]})
    publish_dir(work, final)
    return final


def _judge_part(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in JUDGED}


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
QUESTIONS = {
    "recipe": "the setting's recipe, as the distill stage trains it",
    "recipe@": "the same run stopped early (Fig. 7: training length)",
    "loss=ce": "CE alone with the continuous head from `split` on: that head gets no training signal",
    "loss=ce+perceptual": "CE + the perceptual term (random conv features) through the continuous head from `split` "
                          "on, as the paper's students",
    "loss=ce+perceptual+mse": "as loss=ce+perceptual, plus the MSE between the continuous head and the target "
                              "embeddings",
    "loss=ce,split=all": "CE alone, every position from the logit head",
    "perceptual=feature": "as loss=ce+perceptual, through the digit classifier's features (trained to ignore style)",
    "t2=": "another intermediate timestep t_list[1]",
    "pairs=": "fewer pairs (Fig. 8: pair count)",
}


def _question(name: str) -> str:
    if name in QUESTIONS:
        return QUESTIONS[name]
    return next(text for key, text in QUESTIONS.items() if key.endswith(("@", "=")) and name.startswith(key))


def reading(row: dict, recipe: dict, teacher_fid: float) -> str:
    """One sentence of what the row's numbers say against the recipe's (measured, not written in advance)."""
    if row is recipe:
        one, two = row["dd1_fid"], row["dd2_fid"]
        steps = "better than" if two < 0.95 * one else "worse than" if two > 1.05 * one else "about as good as"
        return f"dd-1step {one / teacher_fid:.2f}x the teacher's FID; 2 steps {steps} 1 (FID x{two / one:.2f})"
    ratio = row["dd1_fid"] / recipe["dd1_fid"]
    verdict = "better than" if ratio < 0.95 else "worse than" if ratio > 1.05 else "about as good as"
    text = f"dd-1step {verdict} the recipe (FID x{ratio:.2f}, recall {row['dd1_recall']:.2f} vs " \
           f"{recipe['dd1_recall']:.2f}, diversity x{row['dd1_diversity'] / recipe['dd1_diversity']:.2f})"
    if row["dd1_class_acc"] < 0.5:
        text += "; class accuracy near chance: the images are not digits of their class"
    return text


def table_rows(index: dict) -> list[dict]:
    """One row per judged student: every variant, and the recipe's early snapshots before the recipe."""
    teacher_fid = index["teacher"]["fid"]
    rows = []
    for record in index["variants"]:
        judged = [(record["variant"], record["steps"], record["metrics"])]
        judged = [(f"{record['variant']}@{step}", int(step), m) for step, m in record["snapshots"].items()] + judged
        for name, steps, metrics in judged:
            one, two = metrics["dd-1step"], metrics["dd-2step"]
            rows.append({
                "setting": index["setting"], "variant": name + "".join(f" (= {a})" for a in record["also"]
                                                                       if "@" not in name),
                "split": record["plan"]["distill"]["split"], "steps": steps, "pairs": record["pairs"],
                "dd1_fid": one["fid"], "dd1_x_teacher": one["fid"] / teacher_fid, "dd2_fid": two["fid"],
                "dd2_x_teacher": two["fid"] / teacher_fid, "dd1_recall": one["recall"],
                "dd1_diversity": one["diversity"], "dd1_class_acc": one["class_accuracy"],
                "final_loss": record["final_loss"] if "@" not in name else None,
                "train_s": record["seconds"] if "@" not in name else None, "_name": name})
    recipe = next(r for r in rows if r["_name"] == "recipe")
    for row in rows:
        row["reading"] = f"{_question(row['_name'])}: {reading(row, recipe, teacher_fid)}"
    return rows


def write_report(params: Params, settings: list[str], out: Path) -> None:
    import pandas as pd

    lines = ["# Toy ablation of the distillation recipe", "",
             "Made by the DAG target `reproduce_ablation` (`python -m dd ablation --setting S` per toy setting, then "
             "`python -m dd ablation-report`; src/dd/ablation.py). Every row trains a student from the same teacher, "
             "pairs and seed with the setting's recipe changed in one place, draws its DD 1-step and 2-step samples "
             "as the sample stage does, and judges them with the evaluate stage's judge (dd.judge: no training step "
             "sees it): FID against the 1000 test digits, also as a multiple of the teacher's own FID (`x_teacher`), "
             "recall, same-class pixel diversity, class accuracy. `recipe@N`: the recipe's run judged after N steps. "
             "`train_s`: training wall time on the machine that made the table (a record, not a benchmark).", ""]
    frames = []
    for name in settings:
        path = ablation_dir(params, name) / "index.json"
        if not path.is_file():
            raise StageError(f"{path}: missing; run `python -m dd ablation --setting {name}` first")
        index = json.loads(path.read_text())
        rows = table_rows(index)
        teacher, onestep = index["teacher"], index["onestep"]
        recipe = next(v for v in index["variants"] if v["variant"] == "recipe")["plan"]["distill"]
        lines += [f"## {name}", "",
                  f"Recipe (every row changes it in one place): loss "
                  f"{' + '.join(k for k, v in recipe['loss_weights'].items() if v)}"
                  + (f" ({recipe['perceptual']} features)" if recipe["loss_weights"].get("perceptual") else "")
                  + f", t_list {recipe['t_list']}, split {recipe['split']}, {recipe['max_steps']} steps of "
                  f"{recipe['batch_size']}, lr {recipe['lr']:g}, seed {recipe['seed']}.", "",
                  f"Teacher: FID {teacher['fid']:.3g}, recall {teacher['recall']:.2f}, diversity "
                  f"{teacher['diversity']:.2f}, class accuracy {teacher['class_accuracy']:.3f}"
                  + (f"; onestep* FID {onestep['fid']:.3g} ({onestep['fid'] / teacher['fid']:.2f}x)" if onestep else "")
                  + f"; real-vs-real floor {index['fid_floor']:.3g}.", ""]
        frame = pd.DataFrame(rows).drop(columns=["_name"])
        frames.append(frame)
        shown = frame.drop(columns=["setting", "reading"])
        lines += [shown.to_markdown(index=False, floatfmt=".3g"), "", "Reading:", ""]
        lines += [f"- `{r['variant']}`: {r['reading']}." for r in rows] + [""]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out.with_suffix(".csv")) as tmp:
        pd.concat(frames).to_csv(tmp, index=False, float_format="%.5g")
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """python -m dd.ablation [--params P] [--setting S ...]: every setting's variants, then the table (the two DAG
    jobs in one command)."""
    from dd import cli

    parser = argparse.ArgumentParser(prog="python -m dd.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--setting", action="append", help="a toy setting (repeatable; default: pipeline.ablation)")
    args = parser.parse_args(argv)
    try:
        settings = args.setting or load_params(args.params).pipeline.ablation
    except ConfigError as err:
        print(f"dd.ablation: error: {err}", file=sys.stderr)
        return 2
    for name in settings:
        code = cli.main(["ablation", "--params", args.params, "--setting", name])
        if code:
            return code
    return cli.main(["ablation-report", "--params", args.params, *(x for n in settings for x in ("--setting", n))])


if __name__ == "__main__":
    sys.exit(main())
