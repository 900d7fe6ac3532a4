"""dd.clip_score: the CLIP score of text-to-image samples, its hub folder artifact and its place in the evaluate stage
and Table 3. Offline: a tiny randomly initialised CLIPModel and a character-level CLIP BPE tokenizer built here."""
import dataclasses
import json
import shutil
import string

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from dd import clip_score as cs
from dd import evaluate as ev
from dd import hub
from dd.config import CLIP_MODELS, ConfigError, load_params
from dd.errors import StageError
from test_evaluate import REPO, TinyInception, _write_samples

NAME = "clip-vit-large-patch14"
SIZE = 32  # the tiny model's input resolution (224 for CLIP ViT-L/14)
WINDOW = 77  # CLIP's text window, start and end token included
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def tiny_vocab() -> dict[str, int]:
    """One token per letter, inside a word and at its end (CLIP's BPE marks word ends with </w>); no merges, so a
    one-letter word is exactly one token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for letter in string.ascii_lowercase:
            vocab[letter + suffix] = len(vocab)
    return vocab


def tiny_clip_folder(folder, seed=0):
    """save_pretrained of a tiny random CLIP (model, tokenizer, image processor) plus the registered files that
    transformers 5 no longer writes (vocab.json, merges.txt, special_tokens_map.json), so the folder has every file
    of the hub folder artifact."""
    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=WINDOW)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=WINDOW, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    return folder


@pytest.fixture
def scorer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cs.ClipScorer.from_folder(tiny_clip_folder(tmp_path / NAME))


CAPTIONS = ["a red bus", "a cat on a sofa", "two dogs", "a bowl of fruit", "", "a tall tower at night"]


def images(n=6, seed=0, size=48):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def direct_cosines(scorer, imgs, captions):
    """The cosines computed the plain way: the original CLIP preprocessing by hand (PIL bicubic resize of the
    square image, /255, CLIP's mean/std), the tokenizer padded to the longest caption, CLIPModel.forward's
    normalised embeddings."""
    pixels = []
    for image in imgs.numpy():
        resized = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 255
        pixels.append(torch.from_numpy((resized - np.array(MEAN, np.float32)) / np.array(STD, np.float32)))
    tokens = scorer.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(pixel_values=torch.stack(pixels).permute(0, 3, 1, 2), **tokens)
    return (out.image_embeds.double() * out.text_embeds.double()).sum(-1)


def test_score_is_100_times_the_cosine_clipped_at_0_per_sample(scorer):
    imgs = images()
    cos = direct_cosines(scorer, imgs, CAPTIONS)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: the per-sample clipping matters here
    got = cs.clip_score(scorer, [(imgs, CAPTIONS)], len(imgs))
    assert got["clip_score"] == pytest.approx((100 * cos.clamp(min=0)).mean().item(), rel=1e-5)
    assert got["clip_score"] != pytest.approx(max(100 * cos.mean().item(), 0.0), rel=1e-3)  # not the clamped mean
    assert got["clip_truncated"] == 0


def test_score_does_not_depend_on_batch_size_or_shards(scorer):
    """Padding the captions of a batch to the longest one changes nothing (the attention mask, the end token)."""
    imgs = images()
    alone = torch.cat([scorer.cosines(imgs[i:i + 1], CAPTIONS[i:i + 1])[0] for i in range(6)])
    torch.testing.assert_close(scorer.cosines(imgs, CAPTIONS)[0], alone, rtol=0, atol=1e-6)
    whole = cs.clip_score(scorer, [(imgs, CAPTIONS)], 6, batch_size=6)["clip_score"]
    shards = [(imgs[:2], CAPTIONS[:2]), (imgs[2:], CAPTIONS[2:])]
    for pairs, batch_size in (([(imgs, CAPTIONS)], 1), ([(imgs, CAPTIONS)], 4), (shards, 3)):
        assert cs.clip_score(scorer, pairs, 6, batch_size=batch_size)["clip_score"] == pytest.approx(whole, abs=1e-4)


def test_long_captions_are_truncated_to_the_window_keeping_the_end_token(scorer):
    letters = [string.ascii_lowercase[i % 26] for i in range(100)]  # one-letter words: one token each
    long, kept, shorter = (" ".join(letters[:n]) for n in (100, WINDOW - 2, WINDOW - 3))
    ids, truncated = scorer.tokenize([long, kept])
    assert ids["input_ids"].shape[1] == WINDOW and truncated == 1  # 75 words + start + end fit exactly
    assert ids["input_ids"][0, -1].item() == scorer.tokenizer.eos_token_id  # CLIP reads its embedding there
    image = images(1)
    cos_long, cut = scorer.cosines(image, [long])
    assert cut == 1
    assert cos_long.item() == pytest.approx(scorer.cosines(image, [kept])[0].item(), rel=1e-6)
    assert cos_long.item() != pytest.approx(scorer.cosines(image, [shorter])[0].item(), rel=1e-6)
    assert cs.clip_score(scorer, [(image.expand(2, -1, -1, -1), [long, kept])], 2)["clip_truncated"] == 1


def test_bad_inputs_are_refused(scorer, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        scorer.cosines(images().float(), CAPTIONS)
    with pytest.raises(ValueError, match="6 images but 2 captions"):
        scorer.cosines(images(), CAPTIONS[:2])
    with pytest.raises(ValueError, match="list of strings"):
        scorer.tokenize("one caption, not a list")
    with pytest.raises(FileNotFoundError, match="fetch_folder"):
        cs.ClipScorer.from_folder(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------ hub / config

def test_clip_is_a_registered_folder_artifact_and_the_config_allows_only_it(tmp_path, monkeypatch):
    assert set(CLIP_MODELS) <= set(hub.FOLDERS)
    members = hub.FOLDERS[NAME]
    assert {hub.ARTIFACTS[m].filename for m in members} >= {"config.json", "preprocessor_config.json", "tokenizer.json",
                                                           "tokenizer_config.json", "model.safetensors"}
    for m in members:
        art = hub.ARTIFACTS[m]
        assert art.repo_id == "openai/clip-vit-large-patch14" and art.kind == "eval_net"
        assert art.load_layout == "hf_folder" and art.sha256 is None  # trust on first use, like flan-t5-xl
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(hub.HubError) as info:
        hub.fetch_folder(NAME, tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/config.json" in str(info.value)
    assert str(tmp_path / "dest" / NAME / "config.json") in str(info.value)

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["settings"]["llamagen-xl-t2i"]["sample"]["clip_model"] == NAME
    raw["pipeline"] = {"settings": []}
    for setting, value, match in (("llamagen-xl-t2i", "clip-vit-base-patch32", r"sample.clip_model' must be one of"),
                                  ("toy-t2i", NAME, r"toy-t2i.sample.clip_model' is for text-to-image paper rows"),
                                  ("var-d16", NAME, r"var-d16.sample.clip_model' is for text-to-image paper rows")):
        bad = dict(raw, settings={setting: dict(raw["settings"][setting])})
        bad["settings"][setting]["sample"] = dict(raw["settings"][setting]["sample"], clip_model=value)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=match):
            load_params(tmp_path / "p.yaml")


# ------------------------------------------------------------------------------------------ evaluate stage

PROMPTS = ["a red bus", "a cat on a sofa", "two dogs", "a bowl of fruit"]


@pytest.fixture
def t2i_project(tmp_path, monkeypatch):
    """llamagen-xl-t2i with 6 samples of dd-1step (caption rows 0..3, 0, 1), its evaluation prompts, 6 reference
    images and a tiny stand-in for the Inception; no network."""
    from dd.caption_features import captions_sha256
    from dd.sample_stage import MANIFEST, samples_dir

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DD_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    params = load_params(tmp_path / "params.yaml")
    setting = params.setting("llamagen-xl-t2i")
    features = tmp_path / "results" / setting.name / "text_features"
    features.mkdir(parents=True)
    (features / "prompts.json").write_text(json.dumps({"format": "dd-prompts/1", "max_length": 120,
                                                       "eval": {"captions": PROMPTS}}))
    samples = samples_dir(params, setting, "dd-1step")
    rows = torch.tensor([0, 1, 2, 3, 0, 1])
    _write_samples(samples, setting, "dd-1step", images(6, size=setting.image_size), rows)
    manifest = json.loads((samples / MANIFEST).read_text())
    manifest["conditions"] = {"captions_sha256": captions_sha256(PROMPTS)}
    (samples / MANIFEST).write_text(json.dumps(manifest))
    reference = tmp_path / setting.sample.fid_reference
    reference.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(images(1, seed=10 + i, size=64)[0].numpy()).save(reference / f"{i}.png")
    torch.manual_seed(0)
    net = TinyInception()
    monkeypatch.setattr(ev, "load_inception", lambda params, device: net)
    return params, setting, rows


def test_evaluate_stage_adds_the_clip_score_of_each_sample_against_its_caption(t2i_project, tmp_path):
    from dd.report import table_markdown, table_rows

    params, setting, rows = t2i_project
    tiny_clip_folder(tmp_path / "ckpt" / "eval" / NAME, seed=1)  # hand-placed: verified, recorded, used offline
    record = json.loads(ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False).read_text())
    scorer = cs.ClipScorer.from_folder(tmp_path / "ckpt" / "eval" / NAME)
    cos = direct_cosines(scorer, images(6, size=setting.image_size), [PROMPTS[i] for i in rows.tolist()])
    assert record["clip_score"] == pytest.approx((100 * cos.clamp(min=0)).mean().item(), rel=1e-5)
    assert record["clip_model"] == f"{NAME} (openai/clip-vit-large-patch14)" and record["clip_truncated"] == 0
    assert record["fid"] is not None and record["precision"] is None
    assert (tmp_path / "ckpt" / "eval" / NAME / "model.safetensors.sha256").is_file()
    summary = ev.summary_table(setting, ev.summary_rows(params, setting)).splitlines()  # `dd summary`
    assert "| CLIP score |" in summary[0]
    assert next(line for line in summary if line.startswith("| dd-1step")).count(f"| {record['clip_score']:.2f} |") == 1

    # Table 3 shows the CLIP score where the evaluate stage measured one, and no such column where it did not
    metrics = {"dd-1step": record}
    rows3 = table_rows(params, [setting.name], 3, paper={}, lookup=lambda s, m: metrics.get(m))
    lines = table_markdown(rows3, 3).splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert header.endswith("| CLIP score |")
    dd_row = next(line for line in lines if line.startswith("| dd-1step"))
    assert dd_row.endswith(f"| {round(record['clip_score'], 3):g} |")
    metrics["dd-1step"] = dict(record, clip_score=None)
    lines = table_markdown(table_rows(params, [setting.name], 3, paper={}, lookup=lambda s, m: metrics.get(m)), 3)
    assert "CLIP score" not in lines


def test_missing_clip_folder_stops_the_stage_before_any_work(t2i_project, tmp_path, monkeypatch):
    params, setting, _ = t2i_project
    monkeypatch.setattr(ev, "load_inception", lambda *a: pytest.fail("the stage started before checking CLIP"))
    with pytest.raises(StageError) as info:
        ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False)
    msg = str(info.value)
    folder = tmp_path / "ckpt" / "eval" / NAME
    assert f"model folder {folder} is not usable: missing config.json, preprocessor_config.json" in msg
    assert f"hub.fetch_folder('{NAME}', '{tmp_path / 'ckpt' / 'eval'}')" in msg
    assert "https://huggingface.co/openai/clip-vit-large-patch14" in msg and "clip_model: null" in msg
    assert not ev.metrics_path(params, setting, "dd-1step").exists()

    # samples drawn from other prompts than the text features hold now: refused before any work, too
    features = tmp_path / "results" / setting.name / "text_features" / "prompts.json"
    features.write_text(json.dumps({"format": "dd-prompts/1", "max_length": 120, "eval": {"captions": PROMPTS[::-1]}}))
    with pytest.raises(StageError, match=r"drawn from other evaluation prompts.*dd sample --setting llamagen-xl-t2i"):
        ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False)


def test_missing_reference_images_stop_the_stage_before_any_work(t2i_project, tmp_path, monkeypatch):
    """The FID's reference folder is checked with the other inputs, before an MLflow run is opened."""
    import dd.tracking

    params, setting, _ = t2i_project
    shutil.rmtree(tmp_path / setting.sample.fid_reference)
    monkeypatch.setattr(dd.tracking, "stage_run", lambda *a, **k: pytest.fail("a run was opened before the check"))
    monkeypatch.setattr(ev, "load_inception", lambda *a: pytest.fail("the stage started before the check"))
    with pytest.raises(StageError, match=r"no reference images .*point sample.fid_reference at yours"):
        ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False)
    assert not ev.metrics_path(params, setting, "dd-1step").exists()


def test_clip_model_null_gives_no_clip_score(t2i_project):
    params, setting, _ = t2i_project
    setting = dataclasses.replace(setting, sample=dataclasses.replace(setting.sample, clip_model=None))
    record = json.loads(ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False).read_text())
    assert record["clip_score"] is None and record["clip_model"] is None and record["fid"] is not None
