"""The report stage on synthetic inputs in a throw-away project: tables beside the paper's numbers, "not run" for
every input that was not produced, figures from sample shards and from MLflow runs."""
import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dd import cli, report
from dd.config import load_params

REPO = Path(__file__).resolve().parents[1]
PAPER_MD = REPO.parent / "shared" / "reference" / "dd-paper.md"


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _metrics(project, setting, method, **values):
    base = {"setting": setting, "method": method, "fid": None, "is": None, "precision": None, "recall": None,
            "n_samples": 1000, "steps": 1, "latency_s": None, "params": None}
    path = project / "results" / setting / "metrics" / f"{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**base, **values}))


def _samples(project, setting, method, n=12, value=0):
    folder = project / "results" / setting / "samples" / method
    folder.mkdir(parents=True)
    images = np.full((n, 16, 16, 3), value, dtype=np.uint8)
    save_file({"images": images, "labels": np.arange(n, dtype=np.int64) % 10}, str(folder / "shard-00000.safetensors"))
    sha = hashlib.sha256((folder / "shard-00000.safetensors").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({
        "setting": setting, "method": method, "num_samples": n, "shard_size": n, "image_size": 16, "seed": 0,
        "steps": 1, "source": "student", "complete": True,
        "shards": [{"file": "shard-00000.safetensors", "count": n, "sha256": sha}]}))
    return folder


def _rows(path):
    with open(path, newline="") as f:
        return {(r["setting"], r["method"]): r for r in csv.DictReader(f)}


def test_tables_put_ours_beside_the_paper_and_mark_missing_inputs(project):
    params = load_params(project / "params.yaml")
    _metrics(project, "toy-var", "teacher", fid=4.0, latency_s=0.02, steps=4, class_accuracy=0.98)
    _metrics(project, "toy-var", "dd-1step", fid=10.0, latency_s=0.004, class_accuracy=0.95, params=1234567)
    _metrics(project, "var-d16", "dd-1step", fid=10.5, latency_s=0.03, steps=1)
    for name in ("toy-var", "var-d16"):
        report.run_setting_report(params, params.setting(name), track=False)
    report.run_report(params, ["toy-var", "var-d16"], figures=False)

    rows = _rows(project / "reports" / "table1.csv")
    toy = rows[("toy-var", "dd-1step")]
    assert float(toy["fid_ratio"]) == pytest.approx(2.5)
    assert float(toy["speedup"]) == pytest.approx(5.0)
    # the toy row is read against the paper's VAR-d16 ratios: 9.94 / 4.19 and 0.133 / 0.021
    assert float(toy["paper_fid_ratio"]) == pytest.approx(9.94 / 4.19)
    assert float(toy["paper_speedup"]) == pytest.approx(0.133 / 0.021)
    assert rows[("toy-var", "dd-2step")]["fid"] == "not run"
    assert rows[("toy-var", "dd-2step")]["fid_ratio"] == "not run"
    paper = rows[("var-d16", "dd-1step")]
    assert (paper["fid"], paper["paper_fid"], paper["paper_is"]) == ("10.5", "9.94", "193.6")
    assert rows[("var-d16", "teacher")]["fid"] == "not run"
    assert rows[("var-d16", "teacher")]["paper_fid"] == "4.19"
    # var-d16's teacher is not run: no ratio may appear as a number
    assert paper["speedup"] == "not run"

    md = (project / "reports" / "table1.md").read_text()
    for section in md.split("\n## ")[1:]:
        table = [[c.strip() for c in l.strip("|").split("|")] for l in section.splitlines() if l.startswith("|")]
        header, body = table[0], table[2:]
        for row in body:
            if row[0] == "dd-2step" or section.startswith("var-d16") and row[0] != "dd-1step":
                ours = [c for h, c in zip(header, row) if h != "Method" and not h.startswith("paper")
                        and h != "#Step"]
                assert set(ours) == {"not run"}, (header, row)
    assert "| dd-1step | 1 | 10 | 2.5 |" in md

    table2 = _rows(project / "reports" / "table2.csv")
    assert table2[("var-d16", "pre-trained-5-6")]["paper_fid"] == "6.54"
    assert table2[("var-d16", "pre-trained-5-6")]["fid"] == "not run"
    assert "No setting in scope" in (project / "reports" / "table3.md").read_text()  # no text-to-image setting


def test_a_broken_metrics_file_is_one_clear_error(project, capsys):
    path = project / "results" / "toy-var" / "metrics" / "teacher.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    params_file = str(project / "params.yaml")
    code = cli.main(["report-setting", "--params", params_file, "--setting", "toy-var", "--no-track"])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert str(path) in err and "dd evaluate --setting toy-var" in err
    assert not (project / "reports" / "settings" / "toy-var").exists()  # nothing that looks finished
    _metrics(project, "toy-var", "teacher", fid=float("inf"))
    assert cli.main(["report-setting", "--params", params_file, "--setting", "toy-var", "--no-track"]) == 1
    # the tables need the per-setting step first
    assert cli.main(["report", "--params", params_file, "--setting", "toy-var"]) == cli.EXIT_FAILED
    assert "dd report-setting --setting toy-var" in capsys.readouterr().err
    assert cli.main(["report", "--params", params_file, "--setting", "nope"]) == cli.EXIT_BAD_INPUT


def test_figures_from_samples_and_mlflow(project):
    from PIL import Image

    from dd.tracking import experiment_name, stage_run

    params = load_params(project / "params.yaml")
    setting = params.setting("toy-var")
    _metrics(project, "toy-var", "teacher", fid=4.0, latency_s=0.02)
    _metrics(project, "toy-var", "dd-1step", fid=10.0, latency_s=0.004)
    _samples(project, "toy-var", "teacher", value=255)
    one_step = _samples(project, "toy-var", "dd-1step", value=128)
    with stage_run(params, setting, "distill") as mlflow:
        for step in (25, 50, 75):
            mlflow.log_metrics({"loss": 1.0 / step, "loss.ce": 0.5 / step, "grad_norm": 1.0}, step=step)

    curves = report.distill_history(params, setting)
    assert set(curves) == {"loss", "loss.ce"}
    assert [s for s, _ in curves["loss"]] == [25, 50, 75]
    import mlflow
    assert mlflow.get_experiment_by_name(experiment_name(params, setting)) is not None
    assert experiment_name(params, setting) == "distilled-decoding/toy-var"
    assert report.distill_history(params, params.setting("toy-llamagen")) is None

    report.run_setting_report(params, setting, track=True)
    assert cli.main(["report", "--params", str(project / "params.yaml"), "--setting", "toy-var",
                     "--only", "figures"]) == 0
    assert not (project / "reports" / "table1.md").exists()
    for path in report.figure_paths(params, ["toy-var"]):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200

    images, labels = report.first_samples(one_step, 10)
    assert images.shape == (10, 16, 16, 3) and int(images[0, 0, 0, 0]) == 128
    assert labels.tolist() == list(range(10))
    # a damaged shard is refused, naming the file
    shard = one_step / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(report.ReportError, match="shard-00000"):
        report.first_samples(one_step, 10)

    runs = mlflow.search_runs(experiment_names=[experiment_name(params, setting)],
                              filter_string="tags.stage = 'report'")
    assert len(runs) == 1
    assert runs["metrics.report.methods_evaluated"].iloc[0] == 2


@pytest.mark.skipif(not PAPER_MD.is_file(), reason="reference/dd-paper.md is outside this checkout")
def test_paper_numbers_match_the_paper_digest():
    """Every row of Tables 1-3 in reference/dd-paper.md is in reports/paper_numbers.csv with the same cells (the
    latencies the csv adds from DD2's Table 1 say so in their note)."""
    lines = PAPER_MD.read_text().splitlines()
    start = lines.index("### Table 1 — class-conditional ImageNet 256×256 [TAB]")
    end = next(i for i, l in enumerate(lines) if l.startswith("### Ablations"))
    digest = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines[start:end]
              if l.startswith("| ") and not l.startswith(("| Type", "| Model"))]
    digest = [c for c in digest if len(c) in (6, 9)]
    with open(REPO / "reports" / "paper_numbers.csv", newline="") as f:
        ours = list(csv.DictReader(f))
    assert len(ours) == len(digest) == 43

    def cell(v):
        return "" if v in ("–", "-") else re.sub(r"\s*\(.*\)", "", v)

    for row, cells in zip(ours, digest):
        columns = (["fid", "is", "precision", "recall", "params", "steps", "time_s"] if len(cells) == 9
                   else ["fid", "params", "steps", "time_s"])
        got = [row["type"], row["model"]] + [row[c] for c in columns]
        want = cells[:2] + [cell(c) for c in cells[2:]]
        if got[-1] != want[-1] and want[-1] == "":
            assert "DD2 Table 1" in row["note"], row
            got[-1] = ""
        assert got == want, row
