"""Snakemake and DVC declare the same DAG: the same stages (matched by their outputs), the same dependencies (data,
code and params.yaml blocks) and both cover the toy settings; with the paper rows in `pipeline.settings`,
`snakemake -n reproduce_all` lists every job of every setting, also under the SLURM profile. Dry runs only: no stage
is run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from micro import REPO, make_micro_project

BIN = Path(sys.executable).parent
STAGES = ("teacher", "pairs", "distill", "sample", "evaluate", "report_setting")


def _dry_run(project: Path, *args) -> str:
    proc = subprocess.run([str(BIN / "snakemake"), "-n", *args], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def snakemake_jobs(project: Path, target: str = "reproduce_all", *args) -> list[dict]:
    """The jobs of a dry run: rule, inputs, outputs, wildcards (and resources), parsed from Snakemake's job listing."""
    jobs = []
    for block in re.split(r"\n(?=rule \S+:\n)", _dry_run(project, target, *args)):
        head = re.match(r"rule (\S+):\n", block)
        if not head:
            continue
        job = {"rule": head.group(1)}
        for key in ("input", "output", "wildcards", "resources"):
            line = re.search(rf"^    {key}: (.*)$", block, re.M)
            job[key] = [] if line is None else [x.strip() for x in line.group(1).split(", ")]
        jobs.append(job)
    return jobs


def _rule_sources(project: Path) -> dict[str, str]:
    text = "\n".join(p.read_text() for p in [project / "workflow" / "Snakefile",
                                               *sorted((project / "workflow" / "rules").glob("*.smk"))])
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule \w+:|^\S|\Z)", text, re.M | re.S)}


def snakemake_params(project: Path, rule: str, wildcards: dict) -> set[str]:
    """The params.yaml keys a rule passes as `params:` (its rerun trigger), in DVC's dotted spelling."""
    body = _rule_sources(project)[rule]
    params = body.split("params:", 1)[1] if "params:" in body else ""
    params = re.split(r"\n    \w+:\n", params, maxsplit=1)[0]
    keys = set()
    for blocks in re.findall(r"setting_block\(([^)]*)\)", params):
        keys |= {f"settings.{wildcards['setting']}.{b.strip().strip(chr(34))}" for b in blocks.split(",") if b.strip()}
    if "PIPELINE" in params:
        keys.add("pipeline.settings")
    if "ABLATION" in params:
        keys.add("pipeline.ablation")
    if "T2I" in params:
        keys.add("pipeline.text_to_image")
    return keys


def dvc_stages(project: Path) -> list[dict]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    stages = []
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            params = set()
            deps = []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    params |= set(dep.params)
                else:
                    deps.append(dep.def_path)
            stages.append({"name": stage.name, "deps": deps, "params": params,
                           "outs": [out.def_path for out in stage.outs]})
    return stages


def _covers(dvc_dep: str, path: str) -> bool:
    return path == dvc_dep or path.startswith(dvc_dep.rstrip("/") + "/")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = make_micro_project(tmp_path_factory.mktemp("dag"))
    # the real params.yaml (the micro one only shortens budgets; the DAG is the same)
    (dest / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return dest


def test_snakemake_and_dvc_declare_the_same_stages(project):
    jobs = [j for j in snakemake_jobs(project) if j["output"]]  # target rules (reproduce_*) have no outputs
    stages = dvc_stages(project)
    by_outputs = {tuple(sorted(s["outs"])): s for s in stages}
    assert len(by_outputs) == len(stages)
    matched = set()
    for job in jobs:
        outs = tuple(sorted(job["output"]))
        assert outs in by_outputs, f"Snakemake job {job['rule']} -> {outs}: no DVC stage has these outputs"
        stage = by_outputs[outs]
        matched.add(stage["name"])
        assert stage["name"].split("@")[0] == job["rule"], (stage["name"], job["rule"])
        # every Snakemake input is a DVC dep or inside one (a DVC folder dep covers several files) ...
        for path in job["input"]:
            assert any(_covers(d, path) for d in stage["deps"]), f"{stage['name']}: {path} is not a DVC dep"
        # ... and every DVC dep covers at least one Snakemake input: the same code and data on both sides
        for dep in stage["deps"]:
            assert any(_covers(dep, path) for path in job["input"]), f"{stage['name']}: DVC dep {dep} not in Snakemake"
        wildcards = dict(w.split("=", 1) for w in job["wildcards"])
        assert snakemake_params(project, job["rule"], wildcards) == stage["params"], stage["name"]
    assert matched == {s["name"] for s in stages}, "DVC stages without a Snakemake job"

    # both run the toy settings, every stage
    for setting in ("toy-llamagen", "toy-var"):
        for name in STAGES:
            assert any(j["rule"] == name and f"setting={setting}" in j["wildcards"] for j in jobs), (name, setting)
    for name in ("report", "report_figures", "ablation_report"):
        assert any(j["rule"] == name for j in jobs)
    # the toy ablation: one job per setting of pipeline.ablation, under both tools
    ablation = yaml.safe_load((project / "params.yaml").read_text())["pipeline"]["ablation"]
    assert ablation and {w for j in jobs if j["rule"] == "ablation" for w in j["wildcards"]} == {
        f"setting={name}" for name in ablation}
    assert {s["name"] for s in stages if s["name"].startswith("ablation@")} == {f"ablation@{n}" for n in ablation}


def _paper_project(project: Path, tmp_path: Path) -> Path:
    """The same project with every setting of params.yaml in pipeline.settings (the paper rows enabled)."""
    from dd.config import load_params
    from dd.methods import sample_jobs, setting_jobs

    dest = tmp_path / "paper"
    subprocess.run(["cp", "-a", str(project), str(dest)], check=True)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    text_to_image = [name for name, s in raw["settings"].items() if s["teacher"]["model"].get("model_type") == "t2i"]
    raw["pipeline"]["settings"] = [name for name in raw["settings"] if name not in text_to_image]
    raw["pipeline"]["text_to_image"] = text_to_image
    raw["pipeline"]["methods"] = raw["pipeline"]["stages"] = None
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(dest / "params.yaml", check_methods=False)
    raw["pipeline"]["methods"] = sample_jobs(params)
    raw["pipeline"]["stages"] = setting_jobs(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def test_paper_rows_dry_run_lists_every_job_of_every_setting_under_the_slurm_profile(project, tmp_path):
    """With every setting in pipeline.settings, the dry run under the SLURM profile lists every job of every setting
    with per-rule resources (one dry run for both checks: each costs tens of seconds with the paper rows)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from dd.config import load_params
    from dd.methods import method_names

    paper = _paper_project(project, tmp_path)
    params = load_params(paper / "params.yaml")
    jobs = snakemake_jobs(paper, "reproduce_all", "--profile", "workflow/profiles/slurm")
    for name, setting in params.settings.items():
        for rule in ("teacher", "pairs_merge", "distill", "report_setting"):
            assert sum(j["rule"] == rule and f"setting={name}" in j["wildcards"] for j in jobs) == 1, (rule, name)
        assert sum(j["rule"] == "pairs_part" and f"setting={name}" in j["wildcards"] for j in jobs) > 1
        for method in method_names(setting):
            for rule, path in (("sample", f"results/{name}/samples/{method}"),
                               ("evaluate", f"results/{name}/metrics/{method}.json")):
                assert any(j["rule"] == rule and path in j["output"] for j in jobs), (rule, name, method)
    assert {"report", "report_figures"} <= {j["rule"] for j in jobs}
    # DVC sees the same settings
    names = {s["name"] for s in dvc_stages(paper)}
    assert {f"distill@{n}" for n in params.settings} <= names

    resources = {j["rule"]: dict(r.split("=", 1) for r in j["resources"] if "=" in r) for j in jobs}
    # per-rule limits, not one limit for every rule
    assert resources["distill"]["gpu"] == "8" and resources["teacher"]["gpu"] == "0"
    # the profile splits pairs into shard-range jobs on one GPU each, merged on a CPU
    assert resources["pairs_part"]["gpu"] == "1" and resources["pairs_merge"]["slurm_partition"] == "cpu"
    assert int(resources["distill"]["runtime"]) > int(resources["evaluate"]["runtime"]) > int(
        resources["report"]["runtime"])
    assert resources["report"]["slurm_partition"] == "cpu" and resources["sample"]["slurm_partition"] == "gpu"
    assert len({r["runtime"] for r in resources.values()}) >= 4


def test_pairs_split_over_shard_ranges_dry_run(project):
    """--config pairs_jobs=N: every setting's shards split into N contiguous ranges (pairs_part), joined by
    pairs_merge, which the distill stage reads as before."""
    from dd.config import load_params

    params = load_params(project / "params.yaml")
    jobs = snakemake_jobs(project, "reproduce_all", "--config", "pairs_jobs=3")
    assert not any(j["rule"] == "pairs" for j in jobs)
    for name in params.pipeline.settings:
        p = params.setting(name).pairs
        parts = sorted(j["output"][0] for j in jobs if j["rule"] == "pairs_part" and f"setting={name}" in j["wildcards"])
        bounds = [tuple(int(x) for x in path.rsplit("shards-", 1)[1].split("-")) for path in parts]
        assert len(bounds) == 3 and bounds[0][0] == 0 and bounds[-1][1] == -(-p.num_pairs // p.shard_size)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        merge = next(j for j in jobs if j["rule"] == "pairs_merge" and f"setting={name}" in j["wildcards"])
        assert sorted(merge["input"]) == parts and merge["output"] == [f"results/{name}/pairs"]


def test_plan_prints_sourced_costs(capsys):
    from dd import cli

    assert cli.main(["plan", "--params", str(REPO / "params.yaml"), "--setting", "var-d16"]) == 0
    out = capsys.readouterr().out
    distill = next(line for line in out.splitlines() if line.startswith("distill"))
    assert "2,375.2" in distill and "DD2 Table 3" in distill  # 296.9 h x 8 A800
    pairs = next(line for line in out.splitlines() if line.startswith("pairs"))
    assert "46.5" in pairs and "RESULTS.md" in pairs  # 1.2M x 0.133 s x 1.05 / 3600
    for name in ("var-d20", "var-d24", "llamagen-b", "llamagen-l", "llamagen-xl-t2i", "toy-var", "toy-llamagen"):
        assert cli.main(["plan", "--params", str(REPO / "params.yaml"), "--setting", name]) == 0
    out = capsys.readouterr().out
    assert "GUESS" in out and "5,181.6" in out  # LlamaGen-L: 647.7 h x 8
