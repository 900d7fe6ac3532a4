"""Tiny random teachers for the teacher-seam and pairs tests, in the toy teacher stage's folder format.

`tiny_project(dest)` writes a params.yaml derived from the real one (the toy settings shrunk to 8x8
images, a 16-code vocabulary and 2-layer transformers) and, for each toy setting, the folder
results/<setting>/teacher/ that dd.toy_teacher would write (teacher.json with the constructor kwargs,
tokenizer.safetensors, teacher.safetensors), holding seeded random weights whose logits are peaked
enough for token statistics to mean something (the official inits give near-uniform logits).
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from dd.config import load_params
from dd.models.build import build_models, teacher_kwargs, tokenizer_kwargs

REPO = Path(__file__).resolve().parents[1]
TOY_SETTINGS = ("toy-var", "toy-llamagen")

TINY_BLOCKS = {
    "toy-var": {
        "image_size": 8, "num_classes": 4,
        "tokenizer": {"vocab_size": 16, "z_channels": 8, "ch": 32, "ch_mult": [1, 2], "share_quant_resi": 4,
                      "patch_nums": [1, 2, 3, 4]},
        "model": {"depth": 2, "embed_dim": 64, "num_heads": 4, "shared_aln": False, "attn_l2_norm": True},
    },
    "toy-llamagen": {
        "image_size": 8, "num_classes": 4,
        "tokenizer": {"codebook_size": 16, "codebook_embed_dim": 4, "ch": 32, "encoder_ch_mult": [1, 2],
                      "decoder_ch_mult": [1, 2], "z_channels": 32},
        "model": {"dim": 64, "n_layer": 2, "n_head": 4, "block_size": 16, "num_classes": 4},
    },
}
TINY_PAIRS = {"num_pairs": 10, "shard_size": 4, "batch_size": 3, "seed": 0}
TINY_SKIP = {"toy-var": [1, 2], "toy-llamagen": [6, 10]}  # the toy values scaled to 16 tokens


def tiny_params_dict(pairs: dict | None = None) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"] = {"mlflow_uri": "sqlite:///mlflow.db", "experiment": "tests"}
    for name in TOY_SETTINGS:
        s = raw["settings"][name]
        block = TINY_BLOCKS[name]
        s["image_size"], s["num_classes"] = block["image_size"], block["num_classes"]
        s["teacher"] = dict(s["teacher"], tokenizer=block["tokenizer"], model=block["model"])
        # top-k is checked against the codebook at load: keep it inside the 16 codes (same filter: all of them)
        vocab = block["tokenizer"].get("vocab_size", block["tokenizer"].get("codebook_size"))
        s["teacher_sampling"] = dict(s["teacher_sampling"], top_k=min(s["teacher_sampling"]["top_k"], vocab))
        s["pairs"] = dict(pairs or TINY_PAIRS)
        if name == "toy-llamagen":  # 4x4 tokens here: two rows given at the intermediate step (t_list inside 16)
            s["distill"] = dict(s["distill"], t_list=[0, 8], split=8)
        s["sample"] = dict(s["sample"], skip=TINY_SKIP[name])
    raw["pipeline"].pop("methods", None)  # its skip-n names follow the real settings; dd.methods derives them
    return raw


def peaked_models(setting, seed: int = 0):
    """Random (tokenizer, model) of the setting with large enough head weights for peaked logits."""
    tok_kwargs = tokenizer_kwargs(setting)
    model_kwargs = teacher_kwargs(setting, tok_kwargs)
    torch.manual_seed(seed)
    tokenizer, model = build_models(setting.family, tok_kwargs, model_kwargs)
    with torch.no_grad():
        if setting.family == "var":
            model.init_weights(init_adaln=0.5, init_adaln_gamma=1.0, init_head=4.0)
        else:
            model.output.weight.normal_(std=0.3)
    return tokenizer.eval(), model.eval(), tok_kwargs, model_kwargs


def write_teacher_folder(folder: Path, setting, seed: int = 0) -> None:
    tokenizer, model, tok_kwargs, model_kwargs = peaked_models(setting, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for module, name in ((tokenizer, "tokenizer.safetensors"), (model, "teacher.safetensors")):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / name))
    info = {"setting": setting.name, "family": setting.family, "source": "train",
            "tokenizer": {"class": type(tokenizer).__name__, "kwargs": tok_kwargs},
            "model": {"class": type(model).__name__, "kwargs": model_kwargs},
            "files": {"tokenizer": "tokenizer.safetensors", "teacher": "teacher.safetensors"}}
    (folder / "teacher.json").write_text(json.dumps(info, indent=2))


def tiny_project(dest: Path, pairs: dict | None = None):
    """params.yaml + tiny teacher folders under `dest`; returns the loaded Params."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(pairs), sort_keys=False))
    params = load_params(dest / "params.yaml")
    for name in TOY_SETTINGS:
        write_teacher_folder(dest / "results" / name / "teacher", params.setting(name))
    return params


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread for the module: these models are tiny, and on a shared 2-core machine the
    thread pool's synchronisation costs far more than it saves (100x measured under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
