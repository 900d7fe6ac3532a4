"""dd.distill: data order, pairs reading, the losses learn, kill/resume reproduces the uninterrupted run, 2-process
CPU DDP (gloo, through `accelerate launch`) matches one process on the same global batch, and `dd distill` runs
end to end on a tiny project (pairs stage output -> student folder -> load_student -> sampling)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import yaml

from dd import cli, distill, losses, sampling
from dd.config import load_params
from dd.data import DigitClassifier, DigitClassifierConfig, load_classifier, save_classifier
from dd.errors import StageError
from dd.hub import sha256_of
from dd.models.students import init_student, load_student
from dd.pairs import ShardedPairs, TensorPairs
from dd.teacher import load_teacher
from dd.toy_teacher import toy_gate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dd_tiny import tiny_distill, tiny_pairs, tiny_teacher  # noqa: E402
from distill_worker import run as run_worker  # noqa: E402
from tiny_teacher import single_thread, tiny_params_dict, write_teacher_folder  # noqa: E402,F401

WORKER = Path(__file__).resolve().parent / "distill_worker.py"
BIN = Path(sys.executable).parent


def _env():
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def var_pairs(tmp_path_factory):
    """48 flow-map pairs of the tiny VAR teacher, saved once for every process of this module."""
    path = tmp_path_factory.mktemp("pairs") / "var.safetensors"
    pairs = tiny_pairs(tiny_teacher("var"), count=48)
    save_file({"labels": pairs.labels, "noise": pairs.noise, "tokens": pairs.tokens}, str(path))
    return path


def curve(history):
    return torch.tensor([[h["loss"], h["loss.ce"], h["loss.mse"]] for h in history], dtype=torch.float64)


# ------------------------------------------------------------------------------------------- data
def test_data_order_is_a_function_of_seed_and_step():
    n, batch = 10, 4
    steps = [distill.global_batch(n, batch, seed=3, step=s) for s in range(5)]  # 20 draws = 2 epochs
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:]), "every epoch must have its own permutation"
    assert torch.equal(distill.global_batch(n, batch, seed=3, step=2), steps[2])  # no hidden state
    assert not torch.equal(distill.global_batch(n, batch, seed=4, step=0), steps[0])
    t = distill.global_timesteps([0, 5], 1000, seed=0, step=7)
    assert set(t.tolist()) == {0, 5} and 400 < int((t == 5).sum()) < 600
    assert torch.equal(t, distill.global_timesteps([0, 5], 1000, seed=0, step=7))


def test_sharded_pairs_reads_the_pairs_stage_layout(tmp_path):
    teacher = tiny_teacher("llamagen")
    g = torch.Generator().manual_seed(0)
    shards = [{"noise": torch.randn(n, 16, 4, generator=g), "tokens": torch.randint(0, 32, (n, 16), generator=g),
               "labels": torch.randint(0, 4, (n,), generator=g)} for n in (5, 3)]
    entries = []
    for i, shard in enumerate(shards):
        save_file(shard, str(tmp_path / f"shard-{i:05d}.safetensors"))
        entries.append({"index": i, "file": f"shard-{i:05d}.safetensors", "count": len(shard["labels"]),
                        "sha256": sha256_of(tmp_path / f"shard-{i:05d}.safetensors")})
    manifest = {"complete": True, "codebook_sha256": teacher.codebook_sha256(), "setting": "tiny", "shards": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pairs = ShardedPairs(tmp_path, teacher)
    assert len(pairs) == 8
    indices = torch.tensor([6, 0, 4, 5, 7, 1])
    labels, noise, tokens = pairs.get(indices)
    whole = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert torch.equal(labels, whole["labels"][indices]) and torch.equal(tokens, whole["tokens"][indices])
    assert torch.equal(noise, whole["noise"][indices])
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "codebook_sha256": "0" * 64}))
    with pytest.raises(StageError, match="another codebook"):
        ShardedPairs(tmp_path, teacher)


def test_a_bad_pair_shard_is_one_line_naming_the_file(tmp_path):
    """Shards are verified against the manifest's sha256 before training: a truncated, changed or missing shard
    is one StageError naming the file (not a raw ValueError from the reader mid-training)."""
    teacher = tiny_teacher("llamagen")
    shard = {"noise": torch.randn(4, 16, 4), "tokens": torch.randint(0, 32, (4, 16)), "labels": torch.arange(4)}
    path = tmp_path / "shard-00000.safetensors"
    save_file(shard, str(path))
    good = path.read_bytes()
    manifest = {"complete": True, "codebook_sha256": teacher.codebook_sha256(), "setting": "tiny",
                "shards": [{"index": 0, "file": path.name, "count": 4, "sha256": sha256_of(path)}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert len(ShardedPairs(tmp_path, teacher)) == 4
    for damage in (lambda: path.write_bytes(good[:-100]),                         # truncated
                   lambda: path.write_bytes(good[:-1] + bytes([good[-1] ^ 1])),  # one bit changed
                   lambda: path.unlink()):                                       # missing
        damage()
        with pytest.raises(StageError) as err:
            ShardedPairs(tmp_path, teacher)
        assert str(path) in str(err.value) and "\n" not in str(err.value) and "dd pairs" in str(err.value)
        path.write_bytes(good)
    # without the hash check, the truncated shard is still one line naming the file (the reader's own check)
    path.write_bytes(good[:-100])
    with pytest.raises(StageError, match="not a readable pair shard") as err:
        ShardedPairs(tmp_path, teacher, verify=False)
    assert str(path) in str(err.value)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips' torchvision call
def test_lpips_offline_is_one_clear_error(monkeypatch, tmp_path):
    """LPIPS needs torchvision's ImageNet trunk; offline (simulated: the download raises like urllib does without
    a network, and the hub cache is empty) the perceptual term fails with a message saying where to put it."""
    import urllib.error

    import torchvision.models._api as tv_api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    distance = losses.perceptual_distance("lpips")
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(StageError, match=r"vgg16-397923af\.pth") as err:
        distance(images, images)
    assert str(tmp_path) in str(err.value)


def test_random_feature_distance_is_fixed_and_sees_style():
    """The toy's perceptual network: the same weights in every process (seeded), zero on equal images, and a
    thicker stroke of the same digit is farther than the digit itself (a style change the classifier ignores)."""
    from dd.data import load_mnist

    digits, _ = load_mnist("test", 16)
    digits = digits[:8]
    first, second = losses.RandomFeatureDistance(), losses.RandomFeatureDistance()
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert torch.all(first(digits, digits) == 0)
    thicker = torch.nn.functional.max_pool2d(digits, 3, stride=1, padding=1)  # dilated strokes
    assert torch.all(first(thicker, digits) > 0.05)
    images = digits.clone().requires_grad_()
    first(images, thicker).sum().backward()
    assert images.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- training
def test_losses_decrease_with_every_term(tmp_path):
    """CE, the continuous-head MSE and the perceptual term (decoded images, feature distance) all fall."""
    teacher = tiny_teacher("llamagen")
    pairs = tiny_pairs(teacher, count=32)
    torch.manual_seed(0)
    perceptual = losses.FeatureDistance(DigitClassifier())  # untrained: a fixed random feature network
    cfg = tiny_distill(max_steps=20, batch_size=8, lr=2e-3, log_every=4, checkpoint_every=1000,
                       loss_weights={"ce": 1.0, "perceptual": 1.0, "mse": 1.0})
    history = distill.train_student(teacher, pairs, cfg, tmp_path, perceptual=perceptual, cpu=True,
                                    progress=False).history
    for term in ("loss.ce", "loss.mse", "loss.perceptual"):
        first, last = history[0][term], history[-1][term]
        assert last < 0.8 * first, f"{term} did not fall: {[round(h[term], 4) for h in history]}"


def test_perceptual_fraction_takes_the_term_over_the_first_rows_only():
    """distill.perceptual_fraction 0.5: the perceptual term of a batch of 8 is that of its first 4 examples (the other
    terms still see all 8); 1.0 is the whole batch."""
    teacher = tiny_teacher("llamagen")
    pairs = tiny_pairs(teacher, count=8)
    labels, noise, tokens = pairs.get(torch.arange(8))
    t = torch.tensor([0, 2] * 4)
    torch.manual_seed(0)
    perceptual = losses.FeatureDistance(DigitClassifier())
    student = sampling.student_ops(init_student(teacher, 0).eval())
    weights = {"ce": 1.0, "perceptual": 1.0, "mse": 1.0}
    with torch.no_grad():
        _, half = losses.distill_loss(student, teacher, None, labels, noise, tokens, t, 2, weights, perceptual, 0.5)
        _, first = losses.distill_loss(student, teacher, None, labels[:4], noise[:4], tokens[:4], t[:4], 2, weights,
                                       perceptual)
        _, whole = losses.distill_loss(student, teacher, None, labels, noise, tokens, t, 2, weights, perceptual)
    torch.testing.assert_close(half["perceptual"], first["perceptual"])
    torch.testing.assert_close(half["ce"], whole["ce"])
    assert not torch.allclose(half["perceptual"], whole["perceptual"])


def test_kill_and_resume_reproduces_the_uninterrupted_run(var_pairs, tmp_path):
    """SIGKILL the training process after its step-4 checkpoint; a rerun resumes there and gives the same loss
    curve and weights as a run that was never interrupted. Drop-path is on, so the saved RNG state matters."""
    overrides = {"max_steps": 10, "checkpoint_every": 4}
    work = tmp_path / "student.partial"
    killed = subprocess.run([sys.executable, str(WORKER), "--family", "var", "--pairs", str(var_pairs),
                             "--work", str(work), "--out", str(tmp_path / "killed"), "--drop-path", "0.2",
                             "--overrides", json.dumps(overrides), "--kill-at", "6"],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in work.glob("step-*")] == ["step-00000004"]

    resumed = run_worker("var", var_pairs, work, tmp_path / "resumed", 0.2, overrides)
    assert resumed.resumed_from == 4
    fresh = run_worker("var", var_pairs, tmp_path / "fresh.partial", tmp_path / "fresh", 0.2, overrides)
    assert fresh.resumed_from == 0 and len(resumed.history) == len(fresh.history) == 10
    torch.testing.assert_close(curve(resumed.history), curve(fresh.history), rtol=1e-6, atol=1e-7)
    for name, value in fresh.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    # without drop-path RNG restore the curve would differ: the drop-path draws do matter here
    plain = run_worker("var", var_pairs, tmp_path / "plain.partial", tmp_path / "plain", 0.0, overrides)
    assert not torch.allclose(curve(plain.history), curve(fresh.history))


class Crash(Exception):
    pass


def crash_at(step_to_crash: int):
    def callback(step, record):
        if step == step_to_crash:
            raise Crash(step)
    return callback


def train(teacher, pairs, work, crash=None, **overrides):
    cfg = tiny_distill(**{"max_steps": 10, "checkpoint_every": 4, "log_every": 1, **overrides})
    return distill.train_student(teacher, pairs, cfg, work, cpu=True, progress=False,
                                 callback=crash_at(crash) if crash else None)


def crashed_run(teacher, pairs, work, crash: int, **overrides):
    with pytest.raises(Crash):
        train(teacher, pairs, work, crash=crash, **overrides)
    return sorted(p.name for p in work.glob("step-*"))


def test_resume_is_tied_to_the_pairs_not_their_count(var_pairs, tmp_path):
    """Checkpoints of a run on other pairs of the same count are discarded, not resumed."""
    teacher = tiny_teacher("var")
    pairs = TensorPairs(**load_file(var_pairs))
    other = TensorPairs(pairs.labels, pairs.noise.flip(0), pairs.tokens.flip(0))
    assert len(other) == len(pairs) and other.identity != pairs.identity
    work = tmp_path / "student.partial"
    assert crashed_run(teacher, pairs, work, crash=5) == ["step-00000004"]
    assert train(teacher, other, work, max_steps=4, checkpoint_every=2).resumed_from == 0
    assert crashed_run(teacher, pairs, work, crash=5) == ["step-00000004"]   # the other run's checkpoints are gone
    assert train(teacher, pairs, work, max_steps=6).resumed_from == 4


def test_logging_cadence_and_a_raised_max_steps_continue_the_run(var_pairs, tmp_path):
    """log_every, checkpoint_every and max_steps are not part of the fingerprint: changing them resumes; the
    resumed run's first steps are those of the interrupted run (same data order, same weights)."""
    teacher = tiny_teacher("var")
    pairs = TensorPairs(**load_file(var_pairs))
    work = tmp_path / "student.partial"
    crashed_run(teacher, pairs, work, crash=6)
    state = json.loads((work / "step-00000004" / "state.json").read_text())
    resumed = train(teacher, pairs, work, max_steps=14, log_every=2, checkpoint_every=5)
    assert resumed.resumed_from == 4
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 6, 8, 10, 12, 14]
    assert resumed.history[:4] == state["history"]
    # a recipe change that matters (the learning rate) starts over
    crashed_run(teacher, pairs, tmp_path / "other", crash=6)
    assert train(teacher, pairs, tmp_path / "other", lr=5e-4, max_steps=6).resumed_from == 0


@pytest.mark.parametrize("damaged", ["model.safetensors", "optim.pt", "state.json"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(var_pairs, tmp_path, damaged):
    teacher = tiny_teacher("var")
    pairs = TensorPairs(**load_file(var_pairs))
    work = tmp_path / "student.partial"
    assert crashed_run(teacher, pairs, work, crash=9) == ["step-00000004", "step-00000008"]
    target = work / "step-00000008" / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
                       if damaged != "state.json" else data[:-20])
    resumed = train(teacher, pairs, work)
    assert resumed.resumed_from == 4
    fresh = train(teacher, pairs, tmp_path / "fresh")
    torch.testing.assert_close(curve(resumed.history), curve(fresh.history), rtol=1e-6, atol=1e-7)
    # both checkpoints unreadable: start over
    assert crashed_run(teacher, pairs, work, crash=9) == ["step-00000004", "step-00000008"]
    for folder in work.glob("step-*"):
        (folder / "ema.safetensors").write_bytes(b"\0" * 16)
    assert train(teacher, pairs, work).resumed_from == 0


def test_micro_batches_accumulate_to_the_whole_batch(var_pairs, tmp_path):
    """--micro-batch is a memory setting: 2 micro-batches of 4 give the update of one batch of 8."""
    teacher = tiny_teacher("var")
    pairs = TensorPairs(**load_file(var_pairs))
    cfg = tiny_distill(max_steps=4, checkpoint_every=1000)
    whole = distill.train_student(teacher, pairs, cfg, tmp_path / "whole", cpu=True, progress=False)
    split = distill.train_student(teacher, pairs, cfg, tmp_path / "split", cpu=True, micro_batch=4, progress=False)
    torch.testing.assert_close(curve(split.history), curve(whole.history), rtol=1e-5, atol=1e-6)
    with pytest.raises(StageError, match="micro-batch"):
        distill.train_student(teacher, pairs, cfg, tmp_path / "bad", cpu=True, micro_batch=3, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(var_pairs, tmp_path):
    """accelerate launch, 2 CPU processes over gloo, each 4 of the global 8 examples per step, against one
    process on all 8: the same loss curve and final weights up to float reduction order."""
    overrides = {"max_steps": 8, "checkpoint_every": 1000}
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(WORKER), "--family", "var", "--pairs", str(var_pairs), "--work", str(tmp_path / "ddp.partial"),
           "--out", str(tmp_path / "ddp"), "--overrides", json.dumps(overrides)]
    ddp = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_log = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp_log["num_processes"] == 2
    single = run_worker("var", var_pairs, tmp_path / "single.partial", tmp_path / "single", 0.0, overrides)
    assert single.num_processes == 1
    # measured: losses within 5e-7, EMA weights within 1e-7 (gloo all-reduce order vs one sum)
    torch.testing.assert_close(curve(ddp_log["history"]), curve(single.history), rtol=1e-5, atol=1e-6)
    ddp_weights = load_file(tmp_path / "ddp.safetensors")
    for name, value in single.ema.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # and it is not trivially equal: the weights moved
    assert not torch.allclose(single.ema.state_dict()["head.weight"],
                              init_student(tiny_teacher("var"), 0).state_dict()["head.weight"])


# ------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def stage_project(tmp_path_factory):
    """A tiny project for both toy settings: params.yaml (tiny architectures, 6 distill steps), teacher folders
    with a random digit classifier, and the pairs stage's output (`dd pairs`)."""
    root = tmp_path_factory.mktemp("stage")
    raw = tiny_params_dict({"num_pairs": 24, "shard_size": 10, "batch_size": 8, "seed": 0})
    for name in ("toy-llamagen", "toy-var"):
        s = raw["settings"][name]
        s["distill"] = dict(s["distill"], max_steps=6, batch_size=8, checkpoint_every=3, log_every=2, warmup_steps=2)
        if name == "toy-llamagen":  # 4x4 tokens here: two rows given at the intermediate step
            s["distill"].update(t_list=[0, 8], split=8)
        s["teacher"]["gates"] = dict(s["teacher"]["gates"], num_samples=12)
        s["sample"] = dict(s["sample"], batch_size=6)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)  # MLflow puts artifacts under ./mlruns of the working directory
        for name in ("toy-llamagen", "toy-var"):
            teacher_dir = root / "results" / name / "teacher"
            write_teacher_folder(teacher_dir, params.setting(name))
            torch.manual_seed(0)  # a random digit classifier: the perceptual term and the gate need one to exist
            save_classifier(DigitClassifier(DigitClassifierConfig(image_size=params.setting(name).image_size)),
                            teacher_dir / "classifier.safetensors")
            assert cli.main(["pairs", "--params", str(root / "params.yaml"), "--setting", name]) == 0
    return params


@pytest.mark.parametrize("name", ["toy-llamagen", "toy-var"])
def test_distill_stage_end_to_end(stage_project, monkeypatch, name):
    """`dd distill` after `dd pairs`; the student folder is complete, loads strictly and samples."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(stage_project.path.parent)
    root, setting = stage_project.path.parent, stage_project.setting(name)
    assert cli.main(["distill", "--params", str(stage_project.path), "--setting", name]) == 0

    out = root / "results" / name / "student"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "samples.png", "student.json",
                                                    distill.STUDENT_FILE]
    assert not (root / "results" / name / "student.partial").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]
    info = json.loads((out / "student.json").read_text())
    assert info["t_list"] == setting.distill.t_list and info["split"] == setting.distill.split
    teacher = load_teacher(setting, root / "results" / name / "teacher")
    student = load_student(out, teacher)
    # the reported toy gate is the classifier's verdict on the saved student's samples, recomputed here
    classifier = load_classifier(root / "results" / name / "teacher" / "classifier.safetensors")
    assert toy_gate(student, teacher, setting, classifier) == {
        k: metrics[k] for k in ("dd-1step.class_accuracy", "dd-2step.class_accuracy")}
    assert student.state_dict().keys() == load_file(out / distill.STUDENT_FILE).keys()
    ops = sampling.student_ops(student)
    method = sampling.methods_for(name, setting.distill.t_list, setting.distill.split)["dd-2step"]
    images = next(sampling.sample_batches(ops, method, torch.arange(4) % 4, 0, 4, teacher))[1]
    assert images.shape == (4, 3, setting.image_size, setting.image_size) and torch.isfinite(images).all()


def test_ablation_stage_and_report(stage_project, monkeypatch):
    """dd ablation: every variant trains and is judged by dd.judge; the recipe row is the distill stage's student
    judged exactly as `dd sample` + `dd evaluate` judge it; a rerun reuses the finished variants; dd ablation-report
    writes the table with every variant and the recipe's early snapshots."""
    from dd import ablation, judge

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(stage_project.path.parent)
    root = stage_project.path.parent
    raw = yaml.safe_load(stage_project.path.read_text())
    raw["settings"]["toy-var"]["sample"].update(num_samples=20, batch_size=10, shard_size=10)
    raw["pipeline"]["ablation"] = ["toy-var"]
    path = root / "params-ablation.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    setting = params.setting("toy-var")
    torch.manual_seed(0)
    judge.save_judge(judge.DigitJudge(judge.JudgeConfig(image_size=setting.image_size)),
                     root / "results" / "toy-var" / "teacher" / judge.FILE)
    run = ["--params", str(path), "--setting", "toy-var"]
    assert cli.main(["ablation", *run]) == 1  # the teacher's metrics are the scale of every FID: needed first
    for method in ("teacher", "dd-1step"):
        if method == "dd-1step":
            assert cli.main(["distill", *run]) == 0
        assert cli.main(["sample", *run, "--method", method]) == 0
        assert cli.main(["evaluate", *run, "--method", method, "--no-latency"]) == 0

    assert cli.main(["ablation", *run]) == 0
    folder = root / "results" / "ablation" / "toy-var"
    index = json.loads((folder / "index.json").read_text())
    names = [v["variant"] for v in index["variants"]]
    assert names == list(ablation.variants(setting, 4, 24))  # tiny VAR: 4 scales; 24 pairs
    # the toy recipe: CE alone, every scale from the logit head; the loss variants train the continuous head from
    # t_list[1] = 2 on
    assert setting.distill.split == 4 and not setting.distill.loss_weights["perceptual"]
    assert {"loss=ce", "loss=ce+perceptual", "loss=ce+perceptual+mse", "perceptual=feature", "t2=3", "pairs=6",
            "pairs=12"} <= set(names)
    recipe = next(v for v in index["variants"] if v["variant"] == "recipe")
    assert set(recipe["snapshots"]) == {"1", "3"}  # 6 steps: judged after 6 // 4 and 6 // 2 too
    evaluated = json.loads((root / "results" / "toy-var" / "metrics" / "dd-1step.json").read_text())
    for key in ("fid", "precision", "recall", "class_accuracy", "diversity"):
        assert recipe["metrics"]["dd-1step"][key] == pytest.approx(evaluated[key], rel=1e-6, abs=1e-9), key
    assert all(v["pairs"] == 6 for v in index["variants"] if v["variant"] == "pairs=6")
    # CE alone trains the same student whatever the split; the variant's own split decides how it samples
    by_name = {v["variant"]: v for v in index["variants"]}
    assert by_name["loss=ce"]["plan"]["distill"]["split"] == 2
    assert by_name["loss=ce"]["final_loss"] == by_name["recipe"]["final_loss"]
    assert by_name["loss=ce"]["metrics"] != by_name["recipe"]["metrics"]

    stamp = (folder / "recipe.json").stat().st_mtime_ns
    assert cli.main(["ablation", *run]) == 0  # nothing left to train: the records are reused
    assert (folder / "recipe.json").stat().st_mtime_ns == stamp

    assert cli.main(["ablation-report", "--params", str(path)]) == 0
    markdown = (root / "reports" / "toy_ablation.md").read_text()
    assert "## toy-var" in markdown and "recipe@1" in markdown and "Reading:" in markdown
    rows = (root / "reports" / "toy_ablation.csv").read_text().splitlines()
    assert len(rows) == 1 + len(names) + 2  # header, every variant, the recipe's two snapshots


def test_ablation_refuses_paper_rows_and_unknown_settings(stage_project, tmp_path):
    raw = yaml.safe_load(stage_project.path.read_text())
    raw["pipeline"]["ablation"] = ["var-d16"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(Exception, match=r"pipeline\.ablation\[0\].*var-d16.*toy settings"):
        load_params(path)
