"""The latency harness (dd.latency, `dd bench`): seconds per image in steady state at the setting's batch size,
warm-up batches excluded, median of the timed repeats; `dd bench` times the teacher and the DD rows with speed-ups
and says when it falls back to random weights. Tiny random teachers (tests/tiny_teacher.py)."""
import statistics
import time
from pathlib import Path

import pytest
import torch
import yaml

from dd.cli import main
from dd.config import load_params
from dd.latency import measure_latency, run_bench
from dd.methods import TeacherMethod
from dd.sample_stage import Sampler
from tiny_teacher import single_thread, tiny_params_dict, write_teacher_folder  # noqa: F401

SAMPLE = {"num_samples": 10, "batch_size": 4, "shard_size": 4, "seed": 0}


def tiny_project(dest: Path):
    raw = tiny_params_dict()
    raw["settings"]["toy-var"]["sample"] = dict(raw["settings"]["toy-var"]["sample"], **SAMPLE)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(dest / "params.yaml")
    write_teacher_folder(dest / "results" / "toy-var" / "teacher", params.setting("toy-var"))
    return params


def test_warmup_is_excluded_and_the_median_per_image_is_reported(tmp_path):
    """The bookkeeping, with a sampler of known timings: its first batch is slow (a cold start), the timed batches
    take 20 / 60 / 40 ms; the latency must be the median of the timed batches over the batch size."""
    params = tiny_project(tmp_path)
    setting = params.setting("toy-var")
    delays = iter([0.5, 0.02, 0.06, 0.04])
    calls = []

    def images(labels, first_index):
        calls.append((labels.shape[0], first_index))
        time.sleep(next(delays))
        return torch.zeros(labels.shape[0], 3, 8, 8)

    sampler = Sampler(TeacherMethod("teacher"), 4, "teacher", {}, images, torch.device("cpu"), 0)
    result = measure_latency(params, setting, "teacher", repeats=3, warmup=1, sampler=sampler)
    assert calls == [(4, 0)] * 4  # warm-up + 3 repeats, each a batch of the setting's batch size
    assert result["batch_size"] == 4 and result["repeats"] == 3 and len(result["times_s"]) == 3
    assert result["latency_s"] == pytest.approx(statistics.median(result["times_s"]) / 4)
    assert 0.04 / 4 <= result["latency_s"] < 0.2 / 4  # the 0.5 s warm-up batch is not in it
    assert result["latency_min_s"] == pytest.approx(min(result["times_s"]) / 4)
    assert result["latency_min_s"] <= result["latency_s"]
    assert result["device"] == "cpu" and result["num_threads"] == torch.get_num_threads()


def test_measure_latency_runs_the_real_sampler(tmp_path):
    params = tiny_project(tmp_path)
    result = measure_latency(params, "toy-var", "skip-1", device="cpu", repeats=2, warmup=1)
    assert result["latency_s"] > 0 and result["steps"] == 3 and result["source"] == "teacher"
    assert result["batch_size"] == 4 and result["params"] > 0


def test_bench_times_teacher_and_dd_rows_with_random_weights_when_nothing_is_trained(tmp_path, capsys):
    params = tiny_project(tmp_path)
    rows = run_bench(params, params.setting("toy-var"), device="cpu", repeats=1, warmup=1)
    out = capsys.readouterr().out
    assert "no trained student" in out and "random weights" in out
    assert [r["method"] for r in rows] == ["teacher", "dd-1step", "dd-2step", "pre-trained-1-3"]
    assert [r["steps"] for r in rows] == [4, 1, 2, 3]
    assert rows[0]["speedup"] == 1.0 and all(r["speedup"] > 0 and r["random_weights"] for r in rows)
    for r in rows:
        assert f"{r['method']}" in out and f"{r['speedup']:.1f}x" in out


def test_bench_cli_refuses_an_unknown_method(tmp_path, capsys):
    tiny_project(tmp_path)
    code = main(["bench", "--params", str(tmp_path / "params.yaml"), "--setting", "toy-var", "--method", "skip-9"])
    assert code == 2 and "no sampling method 'skip-9'" in capsys.readouterr().err
