"""Pairs generation split over shard ranges (`dd pairs --shards a:b`, then `--merge`): independent jobs produce one
pair set, byte for byte the single run's; gaps, overlaps and damaged shards are refused. Tiny random teachers."""
import pytest

import dd.pairs as pairs
from dd import cli
from dd.errors import StageError
from tiny_teacher import single_thread, tiny_project  # noqa: F401


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tiny_project(tmp_path / "project")


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shard_ranges_merge_to_the_single_run(project, capsys):
    setting = project.setting("toy-var")  # 10 pairs in shards of 4: shards 0:3
    params_file = str(project.path)
    single = _bytes(pairs.run_pairs_stage(project, setting, device="cpu"))
    final = pairs.pairs_dir(project, setting)
    final.rename(final.with_name("pairs.single"))

    assert cli.main(["pairs", "--params", params_file, "--setting", "toy-var", "--shards", "0:1", "--device", "cpu"]) == 0
    # a gap is named, with the command that fills it
    assert cli.main(["pairs", "--params", params_file, "--setting", "toy-var", "--merge"]) == cli.EXIT_FAILED
    assert "shards 1:3 of 0:3 are not made yet" in capsys.readouterr().err
    assert not final.exists()
    assert cli.main(["pairs", "--params", params_file, "--setting", "toy-var", "--shards", "1:3", "--device", "cpu"]) == 0
    assert cli.main(["pairs", "--params", params_file, "--setting", "toy-var", "--merge"]) == 0
    assert _bytes(final) == single
    assert not pairs.parts_dir(project, setting).exists()


def test_bad_ranges_overlaps_and_damage_are_refused(project):
    setting = project.setting("toy-var")
    with pytest.raises(StageError, match="has shards 0:3"):
        pairs.run_pairs_stage(project, setting, device="cpu", shards=(2, 5))
    with pytest.raises(StageError, match="START:STOP"):
        pairs.parse_shards("3")
    with pytest.raises(StageError, match="no finished parts"):
        pairs.merge_pairs(project, setting)
    first = pairs.run_pairs_stage(project, setting, device="cpu", shards=(0, 2))
    pairs.run_pairs_stage(project, setting, device="cpu", shards=(1, 3))
    with pytest.raises(StageError, match="shard 1 is also in"):
        pairs.merge_pairs(project, setting)
    (pairs.parts_dir(project, setting) / pairs.part_name(1, 3)).rename(
        pairs.parts_dir(project, setting) / "elsewhere")
    pairs.run_pairs_stage(project, setting, device="cpu", shards=(2, 3))
    shard = first / pairs.shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(StageError, match="do not match"):
        pairs.merge_pairs(project, setting)
    assert not pairs.pairs_dir(project, setting).exists()
