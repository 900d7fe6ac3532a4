"""The sample stage (dd.sample_stage, `dd sample`) and the method list (dd.methods): every method of the paper's
tables in order with honest step counts, params.yaml's DVC list in sync, the skip-n fill rule, onestep* frequencies,
shards that hold exactly what the samplers make (index offsets across shards), verified reading, and a SIGKILLed run
that resumes to the same bytes as an uninterrupted one. Tiny random teachers (tests/tiny_teacher.py)."""
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dd import hub, sampling
from dd.cli import main
from dd.config import ConfigError, load_params
from dd.distill import STUDENT_FILE
from dd.models.students import load_student, new_student, student_constructor
from dd.errors import StageError
from dd.methods import all_methods, sample_jobs
from dd.sample_stage import (balanced_labels, build_sampler, read_manifest, read_samples, run_sample_stage,
                             samples_dir, to_uint8)
from dd.teacher import load_teacher
from tiny_teacher import REPO, single_thread, tiny_params_dict, write_teacher_folder  # noqa: F401

TINY_SAMPLE = {"num_samples": 10, "batch_size": 3, "shard_size": 4, "seed": 3}


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


def project(dest: Path, sample: dict | None = None, settings=("toy-var", "toy-llamagen")):
    """A tiny project: params.yaml (sample block shrunk), teacher folders, and a random student per setting in the
    distill stage's format (DD rows read results/<S>/student)."""
    raw = tiny_params_dict()
    for name in settings:
        raw["settings"][name]["sample"] = dict(raw["settings"][name]["sample"], **(sample or TINY_SAMPLE))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(dest / "params.yaml")
    for name in settings:
        setting = params.setting(name)
        write_teacher_folder(dest / "results" / name / "teacher", setting)
        teacher = load_teacher(setting, dest / "results" / name / "teacher")
        torch.manual_seed(1)
        student = new_student(teacher)
        folder = dest / "results" / name / "student"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(folder / STUDENT_FILE))
        (folder / "student.json").write_text(json.dumps({
            "setting": name, "family": setting.family, "model": student_constructor(student),
            "weights": STUDENT_FILE, "codebook_sha256": teacher.codebook_sha256()}))
    return params


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ methods
def test_every_setting_lists_the_paper_methods_in_table_order_with_their_step_counts():
    params = load_params(REPO / "params.yaml")
    var, llamagen = params.setting("var-d16"), params.setting("llamagen-l")
    assert list(all_methods(var)) == ["teacher", "skip-1", "skip-2", "onestep", "dd-1step", "dd-2step",
                                      "pre-trained-5-6", "pre-trained-4-6", "pre-trained-1-6"]
    assert list(all_methods(llamagen))[:6] == ["teacher", "skip-106", "skip-156", "onestep", "dd-1step", "dd-2step"]
    # Table 1's #Step column: VAR 10 / 9 / 8 / 1 / 1 / 2, LlamaGen 256 / 150 / 100 / 1; Table 2: 3, 4, 6 and 22, 42, 81
    assert [m.steps(10) for m in all_methods(var).values()] == [10, 9, 8, 1, 1, 2, 3, 4, 6]
    assert [m.steps(256) for m in all_methods(llamagen).values()] == [256, 150, 100, 1, 1, 2, 22, 42, 81]
    assert list(all_methods(params.setting("toy-var"))) == ["teacher", "skip-1", "skip-2", "onestep", "dd-1step",
                                                             "dd-2step", "pre-trained-1-3"]
    assert params.setting("toy-var").sample.num_samples >= 2000 and var.sample.num_samples == 50000


def test_params_method_list_for_dvc_is_in_sync_and_bad_sample_blocks_are_refused(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.pipeline.methods == sample_jobs(params)
    jobs = sample_jobs(params)
    assert jobs["toy-var_onestep"]["upstream"] == "results/toy-var/pairs"
    assert jobs["toy-var_dd-1step"]["upstream"] == "results/toy-var/student"
    assert jobs["toy-var_skip-1"]["upstream"] == "results/toy-var/teacher"
    # the paper rows sample DD from the released checkpoints the teacher stage links
    assert sample_jobs(params, ["var-d16"])["var-d16_dd-1step"]["upstream"] == "results/var-d16/teacher"

    def refused(edit, match):
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        edit(raw)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(ConfigError, match=match):
            load_params(path)

    refused(lambda raw: raw["pipeline"]["methods"].pop("toy-var_skip-2"), "pipeline.methods.*missing.*toy-var_skip-2")
    refused(lambda raw: raw["settings"]["toy-var"]["sample"].update(skip=[4]), r"skip.*\[1, 3\]")
    refused(lambda raw: raw["settings"]["toy-var"]["sample"].update(skip=[2, 1]), "increasing")
    refused(lambda raw: raw["settings"]["toy-var"]["sample"].update(student="released"), "dd_artifact")
    refused(lambda raw: raw["settings"]["toy-var"]["sample"].update(shard_size=0), "shard_size")


def test_labels_are_balanced_and_seeded_and_pixels_follow_the_rule():
    labels = balanced_labels(2005, 10, seed=0)
    assert torch.bincount(labels).tolist() == [201] * 5 + [200] * 5
    assert torch.equal(labels, balanced_labels(2005, 10, seed=0)) and not torch.equal(labels, balanced_labels(2005, 10, 1))
    images = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(images).shape == (1, 1, 6, 3)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


# ----------------------------------------------------------------------------------- skip-n, onestep
@pytest.mark.parametrize("name", ["toy-var", "toy-llamagen"])
def test_skip_n_decodes_only_the_steps_it_ran(tmp_path, name):
    """decode_prefix: the full sequence decodes as decode_tokens; a prefix decodes as if the missing steps added
    nothing to the latent (VAR: the partial f_hat; LlamaGen: zero vectors), and the result depends on the prefix only."""
    params = project(tmp_path, settings=(name,))
    teacher = load_teacher(params.setting(name), tmp_path / "results" / name / "teacher")
    labels = torch.tensor([0, 1, 2])
    tokens = teacher.sample_tokens(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher.decode_prefix(tokens), teacher.decode_tokens(tokens))
    cut = teacher.step_starts[-2]  # skip the last AR step
    partial = teacher.decode_prefix(tokens[:, :cut])
    if teacher.family == "var":
        h = [teacher.tokenizer.quantize.idx_to_h(k, t) for k, t in enumerate(tokens[:, :cut].split(teacher.schedule[:-1], 1))]
        expected = teacher.tokenizer.fhat_to_img(teacher.tokenizer.embed_to_fhat(h, last_one=True))
    else:
        x = teacher.embed(tokens).clone()
        x[:, cut:] = 0
        expected = teacher.decode_embeddings(x)
    torch.testing.assert_close(partial, expected)
    assert not torch.allclose(partial, teacher.decode_tokens(tokens))
    other = tokens.clone()
    other[:, cut:] = (other[:, cut:] + 1) % teacher.vocab_size  # what was skipped cannot matter
    assert torch.equal(teacher.decode_prefix(other[:, :cut]), partial)
    with pytest.raises(ValueError, match="boundar"):
        teacher.decode_prefix(torch.cat([tokens, tokens[:, :1]], dim=1))


def test_onestep_draws_each_position_from_its_per_class_frequencies():
    # class 0: position 0 is token 3 in 3 of 4 sequences and token 5 in 1; position 1 always token 7. class 1: 9, 9.
    tokens = torch.tensor([[3, 7], [3, 7], [5, 7], [3, 7], [9, 9]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    table = sampling.TokenFrequencies(tokens, labels, num_classes=3)
    n = 4000
    drawn = table.sample(torch.zeros(n, dtype=torch.long), range(n), seed=0)
    assert (drawn[:, 1] == 7).all() and set(drawn[:, 0].tolist()) == {3, 5}
    assert abs((drawn[:, 0] == 3).float().mean().item() - 0.75) < 0.03
    assert (table.sample(torch.ones(5, dtype=torch.long), range(5), seed=0) == 9).all()
    # sample i depends on (seed, i) only
    assert torch.equal(table.sample(torch.zeros(3, dtype=torch.long), [10, 11, 12], 0), drawn[10:13])
    with pytest.raises(ValueError, match="class"):
        table.sample(torch.tensor([2]), [0], seed=0)


# ------------------------------------------------------------------------------------------ the stage
def test_stage_writes_what_the_samplers_make_with_a_manifest(tmp_path, mlflow_db):
    params = project(tmp_path)
    setting = params.setting("toy-var")
    labels = balanced_labels(10, setting.num_classes, 3)
    for method in ["teacher", "skip-1", "dd-1step", "pre-trained-1-3"]:
        folder = run_sample_stage(params, setting, method, device="cpu")
        assert folder == samples_dir(params, setting, method) and not folder.with_name(method + ".partial").exists()
        images, stored_labels = read_samples(folder)
        assert images.dtype == torch.uint8 and images.shape == (10, 8, 8, 3) and torch.equal(stored_labels, labels)
        manifest = read_manifest(folder)
        assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
        assert (manifest["setting"], manifest["method"], manifest["num_samples"], manifest["shard_size"],
                manifest["image_size"], manifest["seed"]) == ("toy-var", method, 10, 4, 8, 3)
        assert manifest["source"] == ("teacher" if method.startswith(("teacher", "skip")) else "student")
        assert manifest["steps"] == {"teacher": 4, "skip-1": 3, "dd-1step": 1, "pre-trained-1-3": 3}[method]
        # shard 1 (samples 4..7) runs batches [4, 5, 6] and [7]: the stored images are what the sampler makes there
        sampler = build_sampler(params, setting, method, "cpu")
        assert torch.equal(images[4:7], to_uint8(sampler.images(labels[4:7], 4)))
    # the DD rows: sample i's noise is sample_noise(seed, i) (Appendix F: one noise, every method), so any grouping
    # (here across the shard boundary at 8) gives the stored images
    teacher = load_teacher(setting, tmp_path / "results" / "toy-var" / "teacher")
    ops = sampling.student_ops(load_student(tmp_path / "results" / "toy-var" / "student", teacher))
    method = all_methods(setting)["dd-1step"]
    expected = teacher.decode_embeddings(sampling.dd_sample(ops, labels[6:9], sampling.sample_noise(ops, range(6, 9), 3),
                                                            method.t_list, method.split))
    assert torch.equal(read_samples(samples_dir(params, setting, "dd-1step"))[0][6:9], to_uint8(expected))
    with sqlite3.connect(mlflow_db) as db:
        runs = dict(db.execute("select name, status from runs").fetchall())
    assert runs["toy-var/sample/dd-1step"] == "FINISHED" and runs["toy-var/sample/skip-1"] == "FINISHED"


def test_bfloat16_decoder_is_recorded_and_used_by_the_stage(tmp_path, mlflow_db):
    """sample.decoder_dtype: the float32 manifest has no such key (its bytes as before the option); bfloat16 is
    recorded in the manifest (so a changed setting re-samples) and its images are the bf16 decoder's."""
    params = project(tmp_path, settings=("toy-llamagen",))
    setting = params.setting("toy-llamagen")
    plain = read_manifest(run_sample_stage(params, setting, "dd-1step", device="cpu"))
    assert "decoder_dtype" not in plain
    fast_setting = dataclasses.replace(setting, sample=dataclasses.replace(setting.sample, decoder_dtype="bfloat16"))
    sampler = build_sampler(params, fast_setting, "dd-1step", "cpu")
    folder = run_sample_stage(params, fast_setting, "dd-1step", device="cpu")
    manifest = read_manifest(folder)
    assert manifest["decoder_dtype"] == "bfloat16" and manifest["shards"] != plain["shards"]
    labels = balanced_labels(10, setting.num_classes, 3)
    assert torch.equal(read_samples(folder)[0][:3], to_uint8(sampler.images(labels[:3], 0)))


def test_onestep_stage_reads_the_pairs(tmp_path, mlflow_db):
    from dd.pairs import run_pairs_stage

    params = project(tmp_path, settings=("toy-llamagen",))
    setting = params.setting("toy-llamagen")
    with pytest.raises(StageError, match="pairs"):
        run_sample_stage(params, setting, "onestep", device="cpu")
    run_pairs_stage(params, setting, device="cpu")
    folder = run_sample_stage(params, setting, "onestep", device="cpu")
    manifest = read_manifest(folder)
    assert manifest["source"] == "frequencies" and manifest["steps"] == 1
    assert set(manifest["weights"]) == {"tokenizer", "pairs_manifest"}
    assert read_samples(folder)[0].shape == (10, 8, 8, 3)


def test_unknown_method_and_damaged_samples_give_one_clear_error(tmp_path, mlflow_db, capsys):
    params = project(tmp_path, settings=("toy-llamagen",))
    setting = params.setting("toy-llamagen")
    with pytest.raises(ConfigError, match="no sampling method 'skip-3'.*skip-6"):
        run_sample_stage(params, setting, "skip-3", device="cpu")
    folder = run_sample_stage(params, setting, "skip-6", device="cpu")
    shard = folder / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError, match="shard-00001.safetensors: sha256"):
        read_samples(folder)
    shard.unlink()
    with pytest.raises(StageError, match="shard-00001.safetensors: missing"):
        read_samples(folder)
    with pytest.raises(StageError, match="no manifest.json"):
        read_samples(folder.with_name("teacher"))
    # the CLI: bad input is exit code 2 with one line
    code = main(["sample", "--params", str(tmp_path / "params.yaml"), "--setting", "toy-llamagen", "--method", "nope"])
    assert code == 2 and "no sampling method 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, mlflow_db):
    """`dd sample` as a subprocess, SIGKILLed once its first shard is recorded, then run again: the finished
    shards are kept and the folder ends byte-identical to an uninterrupted run's."""
    sizes = {"num_samples": 800, "batch_size": 50, "shard_size": 100, "seed": 1}
    project(tmp_path / "killed", sample=sizes, settings=("toy-llamagen",))
    reference_params = project(tmp_path / "reference", sample=sizes, settings=("toy-llamagen",))
    env = dict(os.environ, DD_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-m", "dd", "sample", "--setting", "toy-llamagen", "--method", "teacher",
               "--device", "cpu"]
    samples = tmp_path / "killed" / "results" / "toy-llamagen" / "samples"
    proc = subprocess.Popen(command, cwd=tmp_path / "killed", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = samples / "teacher.partial" / "manifest.json"
    deadline = time.monotonic() + 120
    while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard finished within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = json.loads(manifest.read_text())["shards"]
    assert not (samples / "teacher").exists() and 0 < len(recorded) < 8
    kept = {entry["file"]: (samples / "teacher.partial" / entry["file"]).stat().st_mtime_ns for entry in recorded}
    rerun = subprocess.run(command, cwd=tmp_path / "killed", env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"resuming, {len(recorded)} of 8 shards" in rerun.stdout + rerun.stderr
    assert not (samples / "teacher.partial").exists()
    for name, mtime in kept.items():  # finished shards were kept, not remade
        assert (samples / "teacher" / name).stat().st_mtime_ns == mtime
    torch.set_num_threads(1)
    reference = run_sample_stage(reference_params, reference_params.setting("toy-llamagen"), "teacher", device="cpu")
    assert folder_bytes(samples / "teacher") == folder_bytes(reference)
    assert hub.sha256_of(samples / "teacher" / "manifest.json") == hub.sha256_of(reference / "manifest.json")


@pytest.mark.parametrize("name,layout", [("toy-var", "dd_var"), ("toy-llamagen", "dd_llamagen")])
def test_released_dd_checkpoint_is_loaded_strictly_in_its_official_layout(tmp_path, name, layout):
    """sample.student: released reads the checkpoint the teacher stage linked (teacher.json role "dd") in the
    official training-dict layout; it gives the same images as the same weights from results/<S>/student, and a
    checkpoint that does not fit the architecture is one clear error."""
    params = project(tmp_path, settings=(name,))
    setting = params.setting(name)
    teacher_dir = tmp_path / "results" / name / "teacher"
    teacher = load_teacher(setting, teacher_dir)
    state = load_student(tmp_path / "results" / name / "student", teacher).state_dict()
    wrapped = {"trainer": {"ema_parameters": state}} if layout == "dd_var" else {"ema": state}
    torch.save(wrapped, teacher_dir / "released.pth")
    info = json.loads((teacher_dir / "teacher.json").read_text())
    info["files"]["dd"] = {"artifact": "test", "file": "released.pth", "load_layout": layout}
    (teacher_dir / "teacher.json").write_text(json.dumps(info))
    released = dataclasses.replace(setting, teacher=dataclasses.replace(setting.teacher, dd_artifact="test"),
                                   sample=dataclasses.replace(setting.sample, student="released"))
    labels = balanced_labels(4, setting.num_classes, 0)
    from_release = build_sampler(params, released, "dd-2step", "cpu")
    assert from_release.source == "released-dd" and from_release.files["student"].name == "released.pth"
    assert torch.equal(from_release.images(labels, 0), build_sampler(params, setting, "dd-2step", "cpu").images(labels, 0))
    state.pop(next(iter(state)))
    torch.save({"trainer": {"ema_parameters": state}} if layout == "dd_var" else {"ema": state}, teacher_dir / "released.pth")
    with pytest.raises(StageError, match="released.pth: does not fit"):
        build_sampler(params, released, "dd-1step", "cpu")
