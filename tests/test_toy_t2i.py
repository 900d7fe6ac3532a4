"""Text-to-image settings (issue 15): the prompts block, conditions by index, the methods, the paper row's FID against
a reference folder. The micro run of toy-t2i through every stage (text features -> teacher -> pairs -> distill ->
sample -> evaluate) is in tests/test_workflow.py, inside the DAG under both tools."""
import pytest
import torch
import yaml

from dd.conditions import ClassConditions, conditions_for, spread
from dd.config import ConfigError, load_params
from dd.errors import StageError
from micro import REPO
from test_evaluate import TinyInception


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


def test_text_to_image_fid_against_a_reference_folder(tmp_path, monkeypatch):
    """Paper t2i rows: FID against the statistics of a folder of reference images (no download: a tiny stand-in for
    the Inception, whose own conformance is in test_evaluate.py), cached by the folder's content; a missing folder
    names what to put where."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from dd import evaluate as ev

    monkeypatch.setenv("DD_CHECKPOINTS", str(tmp_path / "checkpoints"))
    params = load_params(REPO / "params.yaml")
    setting = params.setting("llamagen-xl-t2i")
    setting = dataclasses.replace(setting, image_size=64, sample=dataclasses.replace(
        setting.sample, fid_reference=str(tmp_path / "reference")))
    with pytest.raises(StageError, match=r"reference: no reference images.*val2014.zip.*fid_reference"):
        ev.text_to_image_metrics(params, setting, [], 0, "cpu", model=object())
    rng = np.random.default_rng(0)
    (tmp_path / "reference").mkdir()
    for i in range(6):  # odd sizes: shorter side resized to 64, then center-cropped
        Image.fromarray(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)).save(tmp_path / "reference" / f"{i}.png")
    torch.manual_seed(0)
    model = TinyInception()  # FidInception's interface with 64-d features (a 2048-d sqrtm takes minutes here)
    files = ev.reference_image_files(tmp_path / "reference")
    same = next(ev.load_reference_images(files, 64))
    assert same.shape == (6, 64, 64, 3) and same.dtype == torch.uint8
    first = ev.text_to_image_metrics(params, setting, [same], 6, "cpu", model=model)
    other = ev.text_to_image_metrics(params, setting, [255 - same], 6, "cpu", model=model)
    assert first["fid"] < other["fid"] and first["is"] > 0 and "6 images" in first["fid_reference"]
    assert len(list((tmp_path / "checkpoints" / "eval").glob("fid-reference-*-64.npz"))) == 1  # computed once


def test_paper_text_features_offline_name_the_encoder_file_and_where_to_put_it(tmp_path, monkeypatch, capsys):
    """The paper row's text-features stage with its captions file in place but no network: one line naming the
    flan-t5-xl file, its URL and the path to put it at, exit code 1, and no finished-looking output."""
    from dd import cli

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"] = {"mlflow_uri": "sqlite:///mlflow.db", "experiment": "tests"}
    raw["settings"]["llamagen-xl-t2i"]["prompts"].update(file="captions.txt", num_eval=2, num_train=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "captions.txt").write_text("a red bus\na cat on a sofa\ntwo dogs\na bowl of fruit\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("DD_CHECKPOINTS", str(tmp_path / "checkpoints"))
    code = cli.main(["text-features", "--params", str(tmp_path / "params.yaml"), "--setting", "llamagen-xl-t2i"])
    err = capsys.readouterr().err
    assert code == 1
    assert "flan-t5-xl:config.json" in err and "huggingface.co/google/flan-t5-xl" in err
    assert str(tmp_path / "checkpoints" / "flan-t5-xl") in err
    assert not (tmp_path / "results" / "llamagen-xl-t2i" / "text_features").exists()
