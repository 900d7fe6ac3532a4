"""The report stage: the paper's tables and figures from the metrics, samples and MLflow runs of the pipeline.

Inputs (what the earlier stages leave behind; reference/dd-paper.md §3 for the paper's side):
    results/<setting>/metrics/<method>.json     the evaluate stage (one file per sampling method)
    results/<setting>/samples/<method>/         the sample stage (manifest.json + safetensors shards)
    the MLflow run `<setting>/distill`          training curves (loss terms per logged step)
    reports/paper_numbers.csv                   the paper's Tables 1-3, transcribed by hand (committed)
Two steps, so that each workflow job has a fixed set of inputs (DVC cannot list a variable number of deps):
    `dd report-setting --setting S` -> reports/settings/S/
        metrics.json   every method's metrics (null = not run), collected from results/S/metrics/
        samples.png    the same noise (same sample index) through teacher / dd-2step / dd-1step (Appendix F)
        training.png   the distill stage's loss curves read back from MLflow
    `dd report` (tables) and `dd report --only figures` -> reports/
        table1.md/.csv   teachers, skip-n, onestep*, DD 1/2-step (class-conditional settings)
        table2.md/.csv   teacher-involved rows (pre-trained-n-m)
        table3.md/.csv   text-to-image settings (empty when none is in scope); a CLIP score column where measured
        figures/fid_vs_latency.png   the paper's Fig. 3: every method a point, FID against seconds per image (log x)

An input that was not produced reads "not run" in every table and figure, never a number; a value the evaluate
stage did not measure (null in its file) reads "–". The toy settings have no paper row of their own: they are
compared through ratios to their own teacher (FID ratio, speed-up) beside the same ratios of the paper's rows of
that family (TOY_ANALOGUE).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

from dd.config import Params, Setting
from dd.errors import StageError

NOT_RUN = "not run"
NOT_MEASURED = "–"
PAPER_NUMBERS = Path(__file__).resolve().parents[2] / "reports" / "paper_numbers.csv"

# The paper row whose ratios a toy setting is read against: VAR-d16 and LlamaGen-L are the only rows of their
# family with latencies, skip-n, onestep* and teacher-involved rows in the paper.
TOY_ANALOGUE = {"var": "var-d16", "llamagen": "llamagen-l"}
GRID_METHODS = ("teacher", "dd-2step", "dd-1step")  # Appendix F order: the teacher, then fewer steps
GRID_COLUMNS = 10
TEXT_TO_IMAGE = {"llamagen-xl-t2i", "toy-t2i"}  # Table 3 settings (paper: LAION-COCO prompts, FID on 5k images)


class ReportError(StageError):
    """An input of the report exists but cannot be read (names the file and how to rebuild it)."""


# --------------------------------------------------------------------------------------------------
# Methods and tables
# --------------------------------------------------------------------------------------------------
def setting_methods(setting: Setting) -> list[str]:
    """Every sampling method of a setting, in table order (dd.methods owns the list)."""
    from dd.methods import method_names

    return method_names(setting)


def table_of(setting: Setting, method: str) -> int:
    """Which paper table a method's row belongs to: 2 = teacher-involved, 3 = text-to-image, else 1."""
    if setting.name in TEXT_TO_IMAGE or setting.text_to_image:
        return 3
    return 2 if method.startswith("pre-trained-") else 1


def table_methods(setting: Setting, table: int) -> list[str]:
    """The methods of one table for one setting; the teacher is the reference row of every table."""
    methods = [m for m in setting_methods(setting) if table_of(setting, m) == table]
    if methods and "teacher" not in methods:
        methods.insert(0, "teacher")
    return methods


def table_settings(params: Params, settings: list[str], table: int) -> list[str]:
    return [s for s in settings if table_methods(params.setting(s), table)]


# --------------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------------
def results_root(params: Params) -> Path:
    return params.path.parent / "results"


def reports_dir(params: Params) -> Path:
    return params.path.parent / "reports"


def metrics_path(params: Params, setting: str, method: str) -> Path:
    return results_root(params) / setting / "metrics" / f"{method}.json"


def read_metrics(params: Params, setting: str, method: str) -> dict | None:
    """The evaluate stage's numbers for one method, or None when the file was not produced."""
    path = metrics_path(params, setting, method)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not readable JSON ({err}); delete it and rerun "
                          f"`python -m dd evaluate --setting {setting}`") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    for key, want in (("setting", setting), ("method", method)):
        if data.get(key, want) != want:
            raise ReportError(f"{path}: records {key} {data.get(key)!r}, expected {want!r} (file copied from "
                              f"elsewhere?); delete it and rerun `python -m dd evaluate --setting {setting}`")
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ReportError(f"{path}: {key} is {value}; a metric must be a finite number or null")
    return data


def load_paper_numbers(path: Path | str = PAPER_NUMBERS) -> dict[tuple[str, str, int], dict]:
    """(setting, method, table) -> the paper's row as strings (empty = not reported by the paper)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ReportError(f"{path}: cannot read the paper's numbers ({err}); it is committed in reports/") from err
    need = {"table", "setting", "method", "model", "fid", "is", "precision", "recall", "params", "steps", "time_s"}
    if not rows or not need <= set(rows[0]):
        raise ReportError(f"{path}: expected the columns {sorted(need)}")
    return {(r["setting"], r["method"], int(r["table"])): r for r in rows if r["setting"]}


def _number(text) -> float | None:
    """A paper cell as a number ('0.021', '>45' -> None: not a point value)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
OURS = ("fid", "is", "precision", "recall", "params", "steps", "latency_s")
PAPER_COLUMN = {"fid": "fid", "is": "is", "precision": "precision", "recall": "recall", "params": "params",
                "steps": "steps", "latency_s": "time_s"}
TOY_EXTRA = ("class_accuracy", "diversity", "fid_floor")
T2I_EXTRA = ("clip_score",)  # text-to-image paper rows (dd.clip_score; the paper reports no CLIP score)


def _ratio(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _paper_row(paper, setting: Setting, method: str, table: int):
    """The paper row a row of ours is compared with: its own row (paper settings) or the analogue's (toy)."""
    name = setting.name if setting.paper_row else (
        "llamagen-xl-t2i" if setting.text_to_image else TOY_ANALOGUE.get(setting.family, ""))
    for t in (table, 1, 2):  # the teacher row of Table 2 repeats Table 1's
        if (name, method, t) in paper:
            return paper[(name, method, t)]
    return None


def table_rows(params: Params, settings: list[str], table: int, paper=None, lookup=None) -> list[dict]:
    """One dict per (setting, method): our numbers (None = not measured, NOT_RUN = no metrics file), the
    paper's (strings, '' = not reported) and the ratios to the setting's own teacher. lookup(setting, method) ->
    metrics dict or None (default: the evaluate stage's files)."""
    paper = load_paper_numbers() if paper is None else paper
    read = (lambda s, m: read_metrics(params, s, m)) if lookup is None else lookup
    rows = []
    for name in settings:
        setting = params.setting(name)
        teacher = read(name, "teacher")
        teacher_paper = _paper_row(paper, setting, "teacher", table)
        for method in table_methods(setting, table):
            metrics = read(name, method)
            row = {"setting": name, "kind": "paper" if setting.paper_row else "toy", "method": method}
            p = _paper_row(paper, setting, method, table)
            row["paper_model"] = "" if p is None else (p["model"] if setting.paper_row else f"{p['model']} ({p['setting']})")
            for key in OURS + TOY_EXTRA + T2I_EXTRA:
                row[key] = NOT_RUN if metrics is None else metrics.get(key)
            for key, column in PAPER_COLUMN.items():
                row[f"paper_{key}"] = "" if p is None else p[column]
            ours_ok = metrics is not None and teacher is not None
            row["fid_ratio"] = _ratio(metrics.get("fid"), teacher.get("fid")) if ours_ok else NOT_RUN
            row["speedup"] = _ratio(teacher.get("latency_s"), metrics.get("latency_s")) if ours_ok else NOT_RUN
            if p is not None and teacher_paper is not None:
                row["paper_fid_ratio"] = _ratio(_number(p["fid"]), _number(teacher_paper["fid"]))
                row["paper_speedup"] = _ratio(_number(teacher_paper["time_s"]), _number(p["time_s"]))
            else:
                row["paper_fid_ratio"] = row["paper_speedup"] = None
            rows.append(row)
    return rows


def _cell(value, digits=3) -> str:
    if isinstance(value, str):
        return value if value else NOT_MEASURED
    if value is None:
        return NOT_MEASURED
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 100000 else str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if abs(value) < 0.01 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _params_cell(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    return _cell(value)


def _x(value) -> str:
    return _cell(value, 2) + ("×" if isinstance(value, float) else "")


PAPER_MD = [("Method", "method"), ("#Step", "steps"), ("paper #Step", "paper_steps"), ("FID", "fid"),
            ("paper FID", "paper_fid"), ("IS", "is"), ("paper IS", "paper_is"), ("Pre", "precision"),
            ("paper Pre", "paper_precision"), ("Rec", "recall"), ("paper Rec", "paper_recall"), ("#Para", "params"),
            ("paper #Para", "paper_params"), ("Time (s)", "latency_s"), ("paper Time (s)", "paper_latency_s"),
            ("speed-up", "speedup"), ("paper speed-up", "paper_speedup")]
TOY_MD = [("Method", "method"), ("#Step", "steps"), ("FID (judge)", "fid"), ("FID / teacher", "fid_ratio"),
          ("paper analogue", "paper_model"), ("paper FID / teacher", "paper_fid_ratio"),
          ("class acc.", "class_accuracy"), ("diversity", "diversity"), ("Pre", "precision"), ("Rec", "recall"),
          ("#Para", "params"), ("Time (s)", "latency_s"), ("speed-up", "speedup"), ("paper speed-up", "paper_speedup")]


def _format(key: str, value) -> str:
    if key in ("params",):
        return _params_cell(value)
    if key in ("speedup", "paper_speedup"):
        return _x(value)
    if key == "latency_s" and isinstance(value, float):
        return f"{value:.4g}"
    return _cell(value)


TITLES = {1: "Table 1: class-conditional generation (teacher, baselines, DD 1/2-step)",
          2: "Table 2: teacher-involved sampling (pre-trained-n-m)",
          3: "Table 3: text-to-image (FID on 5k images)"}


def table_markdown(rows: list[dict], table: int) -> str:
    lines = [f"# {TITLES[table]}", "",
             "Generated by `python -m dd report` from results/<setting>/metrics/*.json beside the paper's numbers "
             "(reports/paper_numbers.csv, from reference/dd-paper.md §3). `not run`: the stage that makes the "
             f"number has not produced its output; `{NOT_MEASURED}`: not measured / not reported. Speed-up = the "
             "setting's teacher time / the row's time.", ""]
    for kind, columns in (("paper", PAPER_MD), ("toy", TOY_MD)):
        for name in dict.fromkeys(r["setting"] for r in rows if r["kind"] == kind):
            lines += [f"## {name}" + (" (toy: ratios to its own teacher; the paper's ratios of the analogue row)"
                                      if kind == "toy" else ""), ""]
            if kind == "toy":
                floors = [r["fid_floor"] for r in rows if r["setting"] == name and isinstance(r["fid_floor"], float)]
                lines += [f"Judge FID floor (real training digits against real test digits, the same judge): "
                          f"{_cell(floors[0]) if floors else NOT_RUN}.", ""]
            shown = columns
            if any(isinstance(r.get("clip_score"), float) for r in rows if r["setting"] == name):
                shown = columns + [("CLIP score", "clip_score")]  # only where the evaluate stage measured one
            lines.append("| " + " | ".join(title for title, _ in shown) + " |")
            lines.append("|" + "---|" * len(shown))
            for r in (r for r in rows if r["setting"] == name):
                lines.append("| " + " | ".join(_format(key, r.get(key)) for _, key in shown) + " |")
            lines.append("")
    if not rows:
        lines.append("No setting in scope has rows in this table.")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["setting", "kind", "method", "paper_model", *OURS, *(f"paper_{k}" for k in PAPER_COLUMN),
               "fid_ratio", "paper_fid_ratio", "speedup", "paper_speedup", *TOY_EXTRA]


def write_table(params: Params, settings: list[str], table: int, out_dir: Path, paper=None, lookup=None) -> list[dict]:
    from dd.atomic import atomic_file

    rows = table_rows(params, settings, table, paper, lookup)
    columns = CSV_COLUMNS + (list(T2I_EXTRA) if table == 3 else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / f"table{table}.md") as tmp:
        tmp.write_text(table_markdown(rows, table))
    with atomic_file(out_dir / f"table{table}.csv") as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return rows


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _category(method: str) -> tuple[str, str]:
    """(legend group, marker) of a method in Fig. 3."""
    if method == "teacher":
        return "teacher", "*"
    if method.startswith("skip-"):
        return "skip-n", "s"
    if method == "onestep":
        return "onestep*", "X"
    if method.startswith("pre-trained-"):
        return "teacher-involved", "^"
    return "DD", "o"


COLORS = {"teacher": "black", "skip-n": "tab:orange", "onestep*": "tab:red", "teacher-involved": "tab:green",
          "DD": "tab:blue"}


def _scatter(ax, points, title, missing):
    seen = set()
    for method, latency, fid in points:
        group, marker = _category(method)
        ax.scatter(latency, fid, marker=marker, s=90 if marker == "*" else 50, color=COLORS[group],
                   label=None if group in seen else group, zorder=3)
        seen.add(group)
        ax.annotate(method, (latency, fid), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if points:
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seconds per image (log)")
    ax.set_ylabel("FID")
    ax.grid(True, which="both", alpha=0.3)
    if missing:
        ax.text(0.02, 0.02, "not run: " + ", ".join(missing), transform=ax.transAxes, fontsize=7, va="bottom",
                wrap=True, color="dimgray")
    if not points:
        ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", fontsize=14, color="gray")


def fid_latency_figure(params: Params, settings: list[str], out: Path, paper=None, lookup=None) -> Path:
    """Fig. 3: one panel per setting in scope (our points) and one per paper row with latencies (the paper's)."""
    paper = load_paper_numbers() if paper is None else paper
    read = (lambda s, m: read_metrics(params, s, m)) if lookup is None else lookup
    panels = []
    for name in settings:
        setting = params.setting(name)
        points, missing = [], []
        for method in setting_methods(setting):
            m = read(name, method)
            if m is None or m.get("fid") is None or m.get("latency_s") is None:
                missing.append(method if m is None else f"{method} (no FID/latency)")
            else:
                points.append((method, float(m["latency_s"]), float(m["fid"])))
        panels.append((f"{name} (ours{', judge FID' if not setting.paper_row else ''})", points, missing))
    for paper_setting in ("var-d16", "llamagen-l"):
        points = [(method, _number(r["time_s"]), _number(r["fid"])) for (s, method, _), r in paper.items()
                  if s == paper_setting and _number(r["time_s"]) and _number(r["fid"])]
        panels.append((f"{paper_setting} (paper, Tables 1-2)", sorted(set(points)), []))
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, (title, points, missing) in zip(axes.flat, panels):
        _scatter(ax, points, title, missing)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("FID against generation time per image (paper Fig. 3)")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    from dd.atomic import atomic_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return out


def first_samples(folder: Path, count: int):
    """The first `count` images and labels of a finished sample folder, reading only the shards needed (a paper
    row's 50k images would not fit in memory at once). Checks the manifest and each shard's sha256."""
    import numpy as np
    from safetensors.numpy import load_file

    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{manifest_path}: unreadable sample manifest ({err}); rerun the sample stage") from err
    if not manifest.get("complete"):
        raise ReportError(f"{manifest_path}: the sample folder is not complete; rerun the sample stage")
    images, labels = [], []
    for shard in manifest.get("shards", []):
        path = folder / shard["file"]
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise ReportError(f"{path}: missing sample shard ({err}); rerun the sample stage") from err
        if "sha256" in shard and hashlib.sha256(blob).hexdigest() != shard["sha256"]:
            raise ReportError(f"{path}: sha256 differs from {manifest_path}; the shard is damaged, rerun the "
                              f"sample stage")
        tensors = load_file(str(path))
        images.append(tensors["images"])
        labels.append(tensors["labels"])
        if sum(len(x) for x in labels) >= count:
            break
    if not images:
        raise ReportError(f"{manifest_path}: lists no shards")
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def samples_dir(params: Params, setting: str, method: str) -> Path:
    return results_root(params) / setting / "samples" / method


def sample_grid_figure(params: Params, setting: str, out: Path, columns: int = GRID_COLUMNS) -> Path:
    """Appendix F: the same noise (same sample index) through the teacher, DD 2-step and DD 1-step, one row each.
    With the sample stage's seeding, index i has the same noise and class label under every method."""
    import numpy as np

    plt = _pyplot()
    rows = []
    for method in GRID_METHODS:
        folder = samples_dir(params, setting, method)
        rows.append((method, first_samples(folder, columns) if (folder / "manifest.json").is_file() else None))
    labels = [r[1][1] for r in rows if r[1] is not None]
    same_labels = all(np.array_equal(labels[0][:len(x)], x[:len(labels[0])]) for x in labels) if labels else True
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 1.1, 1.4 * len(rows) + 0.6), squeeze=False)
    for ax, (method, data) in zip(axes[:, 0], rows):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(method, rotation=0, ha="right", va="center", fontsize=10)
        if data is None:
            ax.set_facecolor("0.93")
            ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="gray")
            continue
        images, _ = data
        ax.imshow(np.concatenate(list(images), axis=1), interpolation="nearest")
    title = f"{setting}: sample indices 0-{columns - 1}, the same noise in every row"
    if labels:
        title += f"; classes {' '.join(str(int(c)) for c in labels[0])}"
    if not same_labels:
        title += " (WARNING: class labels differ between rows)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def distill_history(params: Params, setting: Setting) -> dict[str, list[tuple[int, float]]] | None:
    """Loss curves of the setting's latest finished `<setting>/distill` MLflow run: {metric: [(step, value)]}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dd.tracking import experiment_name, tracking_uri

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name(params, setting))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.stage = 'distill' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    keys = sorted(k for k in run.data.metrics if k == "loss" or k.startswith("loss."))
    curves = {}
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        if len(history) > 1:
            curves[key] = history
    return curves or None


def training_figure(params: Params, setting: str, out: Path) -> Path:
    plt = _pyplot()
    curves = distill_history(params, params.setting(setting))
    fig, ax = plt.subplots(figsize=(6, 4))
    if curves is None:
        ax.text(0.5, 0.5, NOT_RUN, transform=ax.transAxes, ha="center", fontsize=14, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        for key, history in curves.items():
            steps, values = zip(*history)
            ax.plot(steps, values, label=key, linewidth=1.4 if key == "loss" else 1.0)
        if all(v > 0 for h in curves.values() for _, v in h):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (mean over the logging window)")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    ax.set_title(f"{setting}: distillation loss (MLflow run {setting}/distill)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------------------------------
# The stages: one per setting (collect its numbers, draw its pictures), then the tables over all settings
# --------------------------------------------------------------------------------------------------
def setting_report_dir(params: Params, setting: str) -> Path:
    """reports/settings/<setting>/: the per-setting stage's output (metrics.json, samples.png, training.png)."""
    return reports_dir(params) / "settings" / setting


def figure_paths(params: Params, settings: list[str]) -> list[Path]:
    return [reports_dir(params) / "figures" / "fid_vs_latency.png",
            *(setting_report_dir(params, s) / name for s in settings for name in ("samples.png", "training.png"))]


def run_setting_report(params: Params, setting: Setting, track: bool = True) -> Path:
    """Collect a setting's metrics (null for a method not run) and draw its sample grid and training curves."""
    from dd.atomic import atomic_dir

    methods = setting_methods(setting)
    collected = {m: read_metrics(params, setting.name, m) for m in methods}
    final = setting_report_dir(params, setting.name)
    with atomic_dir(final) as out:
        (out / "metrics.json").write_text(json.dumps(
            {"setting": setting.name, "methods": methods, "metrics": collected}, indent=2, sort_keys=True) + "\n")
        sample_grid_figure(params, setting.name, out / "samples.png")
        training_figure(params, setting.name, out / "training.png")
    not_run = [m for m, v in collected.items() if v is None]
    print(f"[report] {setting.name}: {len(methods) - len(not_run)}/{len(methods)} methods evaluated"
          + (f" (not run: {', '.join(not_run)})" if not_run else "") + f" -> {final}", flush=True)
    if track:
        from dd.tracking import stage_run

        with stage_run(params, setting, "report", {"report.methods": ",".join(methods)}) as mlflow:
            mlflow.log_metrics({"report.methods_evaluated": len(methods) - len(not_run),
                                "report.methods_not_run": len(not_run)})
            for name in ("samples.png", "training.png", "metrics.json"):
                mlflow.log_artifact(str(final / name), artifact_path="report")
    return final


def collected_metrics(params: Params, settings: list[str]):
    """lookup(setting, method) over the per-setting stage's files; a setting without one is an error."""
    data = {}
    for name in settings:
        path = setting_report_dir(params, name) / "metrics.json"
        try:
            data[name] = json.loads(path.read_text())["metrics"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ReportError(f"{path}: missing or unreadable ({err}); run `python -m dd report-setting --setting "
                              f"{name}` first (snakemake/dvc run it as the report_setting stage)") from err
    return lambda setting, method: data[setting].get(method)


def run_report(params: Params, settings: list[str] | None = None, tables=(1, 2, 3), figures: bool = True) -> list[Path]:
    """Write the tables (3 says so when no text-to-image setting is in scope) and Fig. 3 from the
    per-setting reports; returns the files written."""
    settings = list(params.pipeline.settings) if settings is None else settings
    for name in settings:
        params.setting(name)  # an unknown name is one clear ConfigError
    lookup = collected_metrics(params, settings)
    out_dir = reports_dir(params)
    paper = load_paper_numbers(out_dir / "paper_numbers.csv" if (out_dir / "paper_numbers.csv").is_file()
                               else PAPER_NUMBERS)
    written = []
    for table in tables:
        in_scope = table_settings(params, settings, table)
        rows = write_table(params, in_scope, table, out_dir, paper, lookup)
        written += [out_dir / f"table{table}.md", out_dir / f"table{table}.csv"]
        not_run = sum(1 for r in rows if r["fid"] == NOT_RUN)
        print(f"[report] table {table}: {len(rows)} rows over {len(in_scope)} setting(s), {not_run} not run "
              f"-> {out_dir / f'table{table}.md'}", flush=True)
    if figures:
        written.append(fid_latency_figure(params, settings, out_dir / "figures" / "fid_vs_latency.png", paper,
                                          lookup))
        print(f"[report] figure -> {written[-1]}", flush=True)
    return written
