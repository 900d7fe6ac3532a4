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
                                    "llamagen-xl-t2i", "toy-var", "toy-llamagen", "toy-t2i"}
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


# Every bad value the hardening issue names (and a few more): (setting, dotted path, value).
BAD_VALUES = [
    ("toy-var", "distill.lr", -1), ("toy-var", "distill.lr", 0), ("toy-var", "distill.ema_decay", 5),
    ("toy-var", "distill.ema_decay", 1.0), ("toy-var", "distill.checkpoint_every", 0),
    ("toy-var", "distill.log_every", 0), ("toy-var", "distill.t_list", [0, 999]), ("toy-var", "distill.t_list", [5, 0]),
    ("toy-var", "distill.t_list", [0, 2, 2]), ("toy-var", "distill.split", 999), ("toy-var", "distill.split", -1),
    ("toy-llamagen", "distill.t_list", [0, 64]), ("toy-llamagen", "distill.split", 65),
    ("var-d16", "distill.t_list", [0, 10]), ("llamagen-b", "distill.split", 257),
    ("toy-var", "distill.max_steps", 0), ("toy-var", "distill.warmup_steps", -1), ("toy-var", "distill.grad_clip", 0),
    ("toy-var", "distill.weight_decay", -0.1), ("toy-var", "distill.betas", [0.9, 1.0]),
    ("toy-var", "distill.betas", [0.9]), ("toy-var", "distill.batch_size", 0), ("toy-var", "distill.seed", -1),
    ("toy-var", "distill.perceptual_fraction", 0.0), ("toy-var", "distill.perceptual_fraction", 1.5),
    ("toy-var", "distill.loss_weights", {"ce": -1.0}), ("toy-var", "distill.loss_weights", {"ce": 0.0, "perceptual": 0.0}),
    ("toy-var", "teacher_sampling.temperature", 0), ("toy-var", "teacher_sampling.top_p", 7),
    ("toy-var", "teacher_sampling.top_p", 0.0), ("toy-llamagen", "teacher_sampling.top_p", 0.0),
    ("toy-var", "teacher_sampling.top_k", -3), ("toy-var", "teacher_sampling.top_k", 1025),
    ("toy-var", "teacher_sampling.cfg", -1.0), ("toy-llamagen", "teacher_sampling.cfg_interval", -2),
    ("toy-var", "teacher_sampling.temperature", float("nan")),
    ("toy-var", "flow.solver", {"sovler": "euler"}), ("toy-var", "flow.solver", {"solver": "rk4"}),
    ("toy-var", "flow.solver", {"tol": 0}), ("toy-var", "flow.solver", {"order": 4}),
    ("toy-var", "flow.solver", {"steps": 0}), ("toy-var", "flow.solver", {"schedule": "cosine"}),
    ("toy-var", "flow.solver", {"t_min": 1.5}), ("toy-var", "flow.solver", {"decided_tol": 0.7}),
    ("toy-var", "sample.num_samples", 0), ("toy-var", "sample.batch_size", -5), ("toy-var", "sample.seed", -1),
    ("var-d16", "sample.decoder_dtype", "float16"),
    ("toy-var", "pairs.num_pairs", 0), ("toy-var", "pairs.shard_size", 0), ("toy-var", "pairs.seed", -2),
    ("toy-var", "image_size", 0), ("toy-var", "num_classes", 0),
    ("toy-var", "teacher.train.teacher_lr", 0), ("toy-var", "teacher.train.num_threads", -1),
    ("toy-var", "teacher.train.teacher_epochs", 0), ("toy-var", "teacher.gates.sample_accuracy", 1.5),
    ("toy-var", "teacher.gates.num_samples", 0),
    ("var-d16", "teacher.sha256", {"model": "abc"}), ("var-d16", "teacher.sha256", {"teacher": "0" * 64}),
    ("toy-var", "teacher.tokenizer.vocab_size", 0), ("toy-var", "teacher.model.depth", -2),
    ("toy-var", "teacher.tokenizer.patch_nums", [1, 4, 2]), ("toy-llamagen", "teacher.model.n_layer", 0),
]


def _set(raw, setting, dotted, value):
    block = raw["settings"][setting]
    *parents, leaf = dotted.split(".")
    for key in parents:
        block[key] = dict(block[key])  # YAML anchors share blocks between settings: copy before editing
        block = block[key]
    block[leaf] = value


@pytest.mark.parametrize("setting, dotted, value", BAD_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v in BAD_VALUES])
def test_bad_value_is_refused_at_load_naming_key_value_and_range(tmp_path, setting, dotted, value):
    path = _write(tmp_path, lambda r: _set(r, setting, dotted, value))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    print(f"{setting}.{dotted} = {value!r}: {msg.split(': ', 1)[1]}")  # the table of the closing note (-s)
    assert "\n" not in msg and str(path) in msg
    assert f"'settings.{setting}.{dotted}" in msg   # the key (flow.solver: the key below it)
    assert "unknown key" in msg or ("allowed:" in msg and repr(value if not isinstance(value, dict) else
                                                              next(iter(value.values()))) in msg)


def test_flow_solver_keys_match_the_solver():
    """config.py lists the solver's keywords without importing torch; they must be the solver's."""
    import inspect

    from dd import config, flow
    keywords = [p.name for p in inspect.signature(flow.tokens_from_noise).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(keywords) == sorted(config.FLOW_SOLVER_KEYS)
    assert config.FLOW_SOLVERS == flow.SOLVERS and config.FLOW_SCHEDULES == flow.SCHEDULES
    defaults = {name: getattr(flow, f"DEFAULT_{name.upper()}") for name in keywords if name != "chunk_elements"}
    for name, value in defaults.items():   # every default passes its own check
        assert config.FLOW_SOLVER_KEYS[name][0](value), name


def test_top_p_one_is_off_in_both_families():
    """One meaning: 1.0 keeps every token in both samplers (VAR's filter is handed its own 'off', 0)."""
    import torch

    from dd.config import TeacherSampling
    from dd.models import llamagen, var
    logits = torch.randn(3, 50)
    s = TeacherSampling(cfg=1.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
    assert s.var_top_p() == 0.0 and TeacherSampling(1.0, 0, 0.9, 1.0, -1).var_top_p() == 0.9
    full = logits.softmax(-1)
    torch.testing.assert_close(var.sampling_probs(logits, 0, s.var_top_p()), full)
    torch.testing.assert_close(llamagen.sampling_probs(logits, 1.0, 0, s.top_p), full)


def test_cli_bad_value_exits_2_with_one_line_for_settings_and_a_stage(tmp_path):
    path = _write(tmp_path, lambda r: _set(r, "toy-var", "distill.ema_decay", 5))
    for args in (["settings"], ["distill", "--setting", "toy-var"], ["pairs", "--setting", "toy-llamagen"]):
        proc = _dd(*args, "--params", str(path), cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "'settings.toy-var.distill.ema_decay' = 5.0 is out of range; allowed: [0, 1)" in lines[0]
    assert not (tmp_path / "results").exists()
