"""The text-features stage of a text-to-image setting: its prompts, split into training and evaluation prompts, and
their caption features, encoded once so that the teacher (toy), pairs, distillation and sampling never run the text
encoder again.

    dd text-features --setting S      ->  results/S/text_features/

Output results/<setting>/text_features/:
    prompts.json     source (where the captions come from), encoder, and per split the captions in order
                     (toy-digits: also each caption's digit class and attribute bins, and the tercile cut points)
    train/           caption features of the training prompts (dd.caption_features layout): the pairs stage draws
                     its conditions from these rows, the toy teacher trains on them
    eval/            caption features of the evaluation prompts: the sample stage conditions sample i on row
                     i mod len(eval)

Sources (settings.<S>.prompts.source):
    toy-digits   the captions dd.toy_captions measures from the toy's 4000 train digits (training prompts, row i =
                 train digit i, which the toy teacher learns to draw) and its 1000 test digits (evaluation prompts);
                 attribute bins cut at the train digits' terciles.
    file         a text file of captions, one per line (`prompts.file`, relative to params.yaml). The paper's
                 LAION-COCO prompts are not public; the documented fallback is the COCO 2014 val captions that
                 LlamaGen's own t2i evaluation samples from (annotations/captions_val2014.json of
                 https://cocodataset.org, the "caption" fields, one per line). A seeded shuffle (`split_seed`)
                 holds out `num_eval` captions for evaluation; the first `num_train` (0 = all) of the rest train.

Encoders: "toy" (dd.toy_captions.toy_caption_encoder: offline, seeded, tiny T5) or "flan-t5-xl" (dd.hub folder
artifact, fetched into checkpoints/flan-t5-xl/; offline, the error names every file and where to put it).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dd.atomic import publish_dir, write_json
from dd.caption_features import captions_sha256, write_caption_features
from dd.config import Params, Setting
from dd.errors import StageError

PROMPTS = "prompts.json"
FORMAT = "dd-prompts/1"
COCO_HINT = ("e.g. the COCO 2014 val captions LlamaGen's t2i evaluation uses: the 'caption' fields of "
             "annotations/captions_val2014.json from http://images.cocodataset.org/annotations/"
             "annotations_trainval2014.zip, one per line")


def text_features_dir(params: Params, setting: Setting) -> Path:
    return params.stage_dir(setting, "text_features")


def _toy_prompts(setting: Setting) -> dict:
    from dd import data
    from dd.toy_captions import AttributeBins

    train_x, train_y = data.load_mnist("train", setting.image_size)
    test_x, test_y = data.load_mnist("test", setting.image_size)
    bins = AttributeBins.fit(train_x)
    splits = {}
    for split, (images, labels) in {"train": (train_x, train_y), "eval": (test_x, test_y)}.items():
        measured = bins.bins(images)
        splits[split] = {"captions": bins.captions(images, labels), "classes": labels.tolist(),
                         "attributes": {name: values.tolist() for name, values in measured.items()}}
    return {"source": "toy-digits: captions measured (dd.toy_captions) from the toy's train digits (train) and "
                      "test digits (eval); row i is digit i of dd.data.load_mnist(split)",
            "attribute_bins": bins.to_dict(), **splits}


def read_captions_file(params: Params, setting: Setting) -> list[str]:
    p = setting.prompts
    path = Path(p.file)
    path = path if path.is_absolute() else params.path.parent / path
    if not path.is_file():
        raise StageError(f"{path}: the captions file of settings.{setting.name}.prompts.file is missing; put a text "
                         f"file there with one caption per line ({COCO_HINT}), or point prompts.file at yours")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(captions) <= p.num_eval:
        raise StageError(f"{path}: {len(captions)} captions, but prompts.num_eval holds out {p.num_eval} for "
                         f"evaluation and the pairs need training prompts too; use a larger file or lower num_eval")
    return captions


def _file_prompts(params: Params, setting: Setting) -> dict:
    p = setting.prompts
    captions = read_captions_file(params, setting)
    order = list(range(len(captions)))
    random.Random(p.split_seed).shuffle(order)
    train = [captions[i] for i in order[p.num_eval:]]
    if p.num_train:
        train = train[:p.num_train]
    return {"source": f"file {p.file} ({len(captions)} captions, sha256 {captions_sha256(captions)}): num_eval held "
                      f"out by a shuffle seeded {p.split_seed}, the rest train",
            "train": {"captions": train}, "eval": {"captions": [captions[i] for i in order[:p.num_eval]]}}


def make_encoder(params: Params, setting: Setting, device: str | torch.device = "cpu"):
    """(the setting's T5CaptionEncoder, its identity for the feature manifests)."""
    p = setting.prompts
    if p.encoder == "toy":
        from dd.toy_captions import toy_caption_encoder

        kwargs = {"max_length": p.max_length, "d_model": setting.teacher.model.get("caption_dim", 32)}
        return toy_caption_encoder(**kwargs), {"encoder": "toy", **kwargs, "seed": 0}
    from dd import hub
    from dd.teacher_stage import checkpoints_dir
    from dd.text_encoder import T5CaptionEncoder

    folder = hub.fetch_folder(p.encoder, checkpoints_dir(params))
    files = {path.name: hub.sha256_of(path) for path in sorted(folder.iterdir()) if path.is_file()
             and not path.name.endswith(".sha256")}
    return T5CaptionEncoder.from_folder(folder, p.max_length, device), {"encoder": p.encoder, "files": files}


def run_text_features_stage(params: Params, setting: Setting, device: str | None = None) -> Path:
    """Make results/<setting>/text_features/ (module docstring); returns its path. Resumable: the caption feature
    folders are written shard by shard under text_features.partial/."""
    from dd.tracking import stage_run

    if not setting.text_to_image:
        raise StageError(f"setting '{setting.name}' is class-conditional; text features are for text-to-image "
                         f"settings (teacher.model.model_type: t2i)")
    p = setting.prompts
    final = text_features_dir(params, setting)
    work = final.with_name(final.name + ".partial")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with stage_run(params, setting, "text_features", {"prompts.source": p.source, "prompts.encoder": p.encoder}) \
            as mlflow:
        prompts = _toy_prompts(setting) if p.source == "toy-digits" else _file_prompts(params, setting)
        encoder, encoder_id = make_encoder(params, setting, device)
        work.mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval"):
            write_caption_features(encoder, prompts[split]["captions"], work / split, shard_size=p.shard_size,
                                   batch_size=p.batch_size, dtype=p.dtype, encoder_id=encoder_id)
        write_json(work / PROMPTS, {"format": FORMAT, "setting": setting.name, "encoder": encoder_id,
                                    "max_length": p.max_length, **prompts})
        publish_dir(work, final)
        counts = {f"prompts.{split}": len(prompts[split]["captions"]) for split in ("train", "eval")}
        mlflow.log_metrics(counts)
        mlflow.log_text("\n".join(prompts["eval"]["captions"][:200]), "eval_prompts_head.txt")
    print(f"[text-features] {setting.name}: {counts['prompts.train']} training and {counts['prompts.eval']} evaluation "
          f"prompts ({p.encoder} encoder, {p.max_length} tokens) -> {final}", flush=True)
    return final


def read_prompts(folder: Path | str, setting: Setting) -> dict:
    """prompts.json of a finished text_features folder, checked against the setting."""
    path = Path(folder) / PROMPTS
    if not path.is_file():
        raise StageError(f"{folder}: no {PROMPTS}; run `python -m dd text-features --setting {setting.name}` first")
    prompts = json.loads(path.read_text())
    if prompts.get("format") != FORMAT or prompts.get("max_length") != setting.prompts.max_length:
        raise StageError(f"{path}: made for other settings (format {prompts.get('format')}, max_length "
                         f"{prompts.get('max_length')}); re-run `python -m dd text-features --setting {setting.name}`")
    return prompts
