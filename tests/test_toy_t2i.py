"""toy-t2i (issue 15): the caption-conditioned pipeline through the same stages as the class-conditional one.

A micro run of text features -> toy t2i teacher -> pairs -> distill -> sample -> evaluate, in process, with budgets
cut to seconds: it checks the plumbing of the condition (caption rows stored, Captions read back), not quality
(benchmarks/RESULTS.md has the full-size numbers)."""
import json

import pytest
import torch
import yaml

from dd.conditions import CaptionConditions, ClassConditions, conditions_for, spread
from dd.config import ConfigError, load_params
from dd.errors import StageError
from dd.teacher import Captions
from micro import MICRO_GATES, MICRO_TEACHER_TRAIN, REPO


def micro_t2i_params(dest):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"] = {"mlflow_uri": "sqlite:///mlflow.db", "experiment": "tests"}
    raw["pipeline"] = {"settings": ["toy-t2i"]}
    s = raw["settings"]["toy-t2i"]
    s["teacher"] = dict(s["teacher"], train=dict(s["teacher"]["train"], **MICRO_TEACHER_TRAIN),
                        gates=dict(s["teacher"]["gates"], **MICRO_GATES))
    s["pairs"] = dict(s["pairs"], num_pairs=12, shard_size=6, batch_size=6)
    s["distill"] = dict(s["distill"], max_steps=2, batch_size=4, checkpoint_every=1, log_every=1)
    s["sample"] = dict(s["sample"], num_samples=12, batch_size=6, shard_size=6)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def test_prompts_block_is_required_for_t2i_and_refused_for_c2i(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = dict(raw, settings={"toy-t2i": dict(raw["settings"]["toy-t2i"])})
    bad["pipeline"] = {"settings": []}
    bad["settings"]["toy-t2i"].pop("prompts")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"toy-t2i.*text-to-image.*prompts"):
        load_params(tmp_path / "a.yaml")
    bad["settings"]["toy-t2i"]["prompts"] = dict(raw["settings"]["toy-t2i"]["prompts"], max_length=120)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"prompts.max_length.*cls_token_num = 16"):
        load_params(tmp_path / "b.yaml")
    c2i = dict(raw, settings={"toy-llamagen": dict(raw["settings"]["toy-llamagen"],
                                                   prompts=raw["settings"]["toy-t2i"]["prompts"])})
    c2i["pipeline"] = {"settings": []}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c2i))
    with pytest.raises(ConfigError, match=r"toy-llamagen.prompts.*class-conditional"):
        load_params(tmp_path / "c.yaml")


def test_paper_prompts_file_missing_names_what_to_put_where(tmp_path):
    import dataclasses

    from dd.prompts import read_captions_file

    params = load_params(REPO / "params.yaml")
    setting = params.setting("llamagen-xl-t2i")
    setting = dataclasses.replace(setting, prompts=dataclasses.replace(setting.prompts,
                                                                       file=str(tmp_path / "captions.txt")))
    with pytest.raises(StageError, match=r"captions.txt: .*one caption per line.*captions_val2014.json"):
        read_captions_file(params, setting)
    (tmp_path / "captions.txt").write_text("a cat\n\na dog\n")
    with pytest.raises(StageError, match=r"2 captions, but prompts.num_eval holds out 5000"):
        read_captions_file(params, setting)


def test_class_conditions_are_the_identity_and_the_methods_of_t2i_have_no_onestep():
    params = load_params(REPO / "params.yaml")
    conditions = conditions_for(params, params.setting("toy-llamagen"), "train")
    labels = torch.tensor([3, 1, 4])
    assert isinstance(conditions, ClassConditions) and conditions(labels) is labels and conditions.identity() is None
    from dd.methods import method_names

    assert method_names(params.setting("toy-t2i")) == ["teacher", "dd-1step", "dd-2step", "pre-trained-1-5"]
    assert method_names(params.setting("llamagen-xl-t2i"))[:3] == ["teacher", "dd-1step", "dd-2step"]
    assert spread(1000, 4).tolist() == [0, 333, 666, 999] and spread(3, 5).tolist() == [0, 1, 2, 0, 1]


def test_micro_toy_t2i_runs_every_stage_with_caption_conditions(tmp_path, monkeypatch):
    from dd.distill import run_distill_stage
    from dd.evaluate import run_evaluate_stage
    from dd.pairs import ShardedPairs, run_pairs_stage
    from dd.prompts import run_text_features_stage
    from dd.sample_stage import read_manifest, read_samples, run_sample_stage
    from dd.teacher import load_teacher
    from dd.teacher_stage import run_teacher_stage

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    params = micro_t2i_params(tmp_path / "project")
    setting = params.setting("toy-t2i")
    with pytest.raises(StageError, match="text-features --setting toy-t2i"):
        conditions_for(params, setting, "train")

    features = run_text_features_stage(params, setting, device="cpu")
    prompts = json.loads((features / "prompts.json").read_text())
    assert len(prompts["train"]["captions"]) == 4000 and len(prompts["eval"]["captions"]) == 1000
    assert prompts["train"]["captions"][0].split()[3] == "zero" and set(prompts["eval"]["classes"]) == set(range(10))
    evaluation = conditions_for(params, setting, "eval")
    assert isinstance(evaluation, CaptionConditions) and evaluation.count == 1000
    cond = evaluation(torch.tensor([0, 999]))
    assert isinstance(cond, Captions) and tuple(cond.features.shape) == (2, 16, 32)
    assert cond.mask[:, -1].all() and not cond.mask[:, 0].any(), "left-padded: real tokens at the end"

    teacher_dir = run_teacher_stage(params, setting)
    info = json.loads((teacher_dir / "teacher.json").read_text())
    assert {"caption_agreement", "caption_all_agreement"} <= set(info["metrics"])
    teacher = load_teacher(setting, teacher_dir, "cpu")
    assert teacher.caption_shape == (16, 32)

    pairs_dir = run_pairs_stage(params, setting, device="cpu")
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    assert manifest["conditions"]["count"] == 4000 and "conditions.count" in manifest["seed_rule"]
    labels = ShardedPairs(pairs_dir, teacher).get(torch.arange(12))[0]
    assert int(labels.max()) < 4000 and len(labels.unique()) > 1  # caption rows, not classes

    student = run_distill_stage(params, setting, device="cpu")
    assert "dd-1step.class_accuracy" in json.loads((student / "metrics.json").read_text())

    for method in ("teacher", "dd-1step", "pre-trained-1-5"):
        folder = run_sample_stage(params, setting, method, device="cpu")
        images, rows = read_samples(folder)
        assert images.shape == (12, 16, 16, 3) and rows.tolist() == list(range(12))
        assert read_manifest(folder)["conditions"]["count"] == 1000
    metrics = json.loads(run_evaluate_stage(params, setting, "dd-1step", device="cpu").read_text())
    assert {"class_accuracy", "caption_agreement", "caption_width_agreement", "fid"} <= set(metrics)
