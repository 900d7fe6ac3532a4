"""params.yaml: every paper row with the paper's values, and one clear error for every bad file."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dd.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def test_every_setting_is_present():
    params = load_params(PARAMS)
    assert set(params.settings) == {"var-d16", "var-d20", "var-d24", "llamagen-b", "llamagen-l",
                                    "llamagen-xl-t2i", "toy-var", "toy-llamagen"}
    assert params.pipeline.settings == ["toy-llamagen", "toy-var"]


@pytest.mark.parametrize("name, t_list, split", [
    ("var-d16", [0, 5], 5), ("var-d20", [0, 4], 4), ("var-d24", [0, 4], 4),
    ("llamagen-b", [0, 80], 80), ("llamagen-l", [0, 80], 130)])
def test_paper_timesteps_and_split(name, t_list, split):
    s = load_params(PARAMS).setting(name)
    assert s.distill.t_list == t_list and s.distill.split == split
    assert s.paper_row and s.teacher.source == "hub" and s.image_size == 256


def test_paper_teacher_sampling():
    params = load_params(PARAMS)
    for name in ("var-d16", "var-d20", "var-d24"):
        ts = params.setting(name).teacher_sampling
        assert (ts.cfg, ts.top_k, ts.top_p) == (2.0, 900, 0.95)
    for name in ("llamagen-b", "llamagen-l"):
        ts = params.setting(name).teacher_sampling
        assert (ts.cfg, ts.top_k, ts.top_p, ts.temperature) == (2.0, 8000, 1.0, 1.0)
    assert params.setting("var-d16").sample.batch_size == 64
    assert params.setting("llamagen-l").sample.batch_size == 256
    assert all(params.setting(n).sample.num_samples == 50000 for n in ("var-d16", "llamagen-b"))


def _write(tmp_path, mutate):
    raw = yaml.safe_load(PARAMS.read_text())
    mutate(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["settings"]["toy-var"]["distill"].update(lr_typo=1.0), "settings.toy-var.distill.lr_typo"),
    (lambda r: r["settings"]["var-d16"]["pairs"].pop("shard_size"), "settings.var-d16.pairs.shard_size"),
    (lambda r: r["settings"]["llamagen-b"]["sample"].update(batch_size="big"), "settings.llamagen-b.sample.batch_size"),
    (lambda r: r["settings"]["toy-var"]["teacher_sampling"].update(cfg=True), "settings.toy-var.teacher_sampling.cfg"),
    (lambda r: r.pop("tracking"), "tracking"),
    (lambda r: r["pipeline"].update(settings=["toy-vr"]), "pipeline.settings[0]"),
    (lambda r: r["settings"]["var-d20"].update(family="diffusion"), "settings.var-d20.family"),
])
def test_bad_file_names_the_key(tmp_path, mutate, key):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert f"'{key}'" in msg and str(path) in msg and "\n" not in msg


def _dd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dd", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_broken_params_exits_2_and_writes_nothing(tmp_path):
    path = _write(tmp_path, lambda r: r["settings"]["toy-llamagen"]["teacher"]["train"].update(epochs=3))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["settings"], ["teacher", "--setting", "toy-llamagen"]):
        proc = _dd(*args, "--params", str(path), cwd=tmp_path)
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "settings.toy-llamagen.teacher.train.epochs" in lines[0]
        assert str(path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_unknown_setting_exits_2(tmp_path):
    proc = _dd("teacher", "--setting", "var-d99", "--params", str(PARAMS), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown setting 'var-d99'" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_cli_settings_lists_all():
    proc = _dd("settings", cwd=REPO)
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == list(load_params(PARAMS).settings)
