"""A micro version of params.yaml for pipeline tests: the toy settings with budgets cut to seconds
and the quality gates reported but not enforced. Derived from the real file so the two never drift."""
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

MICRO_TEACHER_TRAIN = {"classifier_epochs": 1, "tokenizer_epochs": 1, "teacher_epochs": 1, "judge_epochs": 1,
                       "num_threads": 1}
MICRO_GATES = {"num_samples": 20, "enforce": False}


def micro_params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in raw["pipeline"]["settings"] + raw["pipeline"].get("text_to_image", []):
        s = raw["settings"][name]
        s["teacher"] = dict(s["teacher"], train=dict(s["teacher"]["train"], **MICRO_TEACHER_TRAIN),
                            gates=dict(s["teacher"]["gates"], **MICRO_GATES))
        s["pairs"] = dict(s["pairs"], num_pairs=40, shard_size=20, batch_size=20)
        s["distill"] = dict(s["distill"], max_steps=4, batch_size=8, checkpoint_every=2, log_every=1)
        s["sample"] = dict(s["sample"], num_samples=16, batch_size=8)
    # the ablation stage once (DVC runs it; test_distill checks its records): every variant retrains, and a second
    # setting would only repeat the same code path
    raw["pipeline"]["ablation"] = raw["pipeline"]["ablation"][:1]
    return raw


def make_micro_project(dest: Path) -> Path:
    """A throw-away project folder: workflow/, dvc.yaml and a micro params.yaml, in its own git+dvc repo.

    The `dd` package itself comes from the installed (editable) checkout.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "workflow", dest / "workflow")
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    # dvc.yaml lists source files as deps: link the real ones so DVC can hash them.
    (dest / "src").symlink_to(REPO / "src")
    (dest / "reports").mkdir()
    shutil.copy(REPO / "reports" / "paper_numbers.csv", dest / "reports")  # the report stage's one committed input
    (dest / "params.yaml").write_text(yaml.safe_dump(micro_params(), sort_keys=False))
    (dest / ".gitignore").write_text("/results/\n/mlruns/\n/mlflow.db\n/mlflow.db.lock\n/.snakemake/\n")
    for cmd in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest
