"""The official LlamaGen text-to-image layouts (reference/manifests/t2i/llamagen-*.json): the teacher
t2i_XL_stage1_256.pt and the DD student on its backbone. Build the full-size model on the meta device from
the manifest's `constructor` string and compare the state_dict with the manifest exactly (keys, shapes,
dtypes, the saved null-caption buffer) plus the parameter count (775M / 756M in the paper's Table 3).

Manifest folder: $DD_MANIFESTS, default ../shared/reference/manifests next to the repository (its t2i/
subfolder).
"""
import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch

from dd.models.dd_llamagen import LlamaGenDD, student_config
from dd.models.llamagen import LlamaGenGPT, gpt_config

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = Path(os.environ.get("DD_MANIFESTS", REPO_ROOT.parent / "shared" / "reference" / "manifests")) / "t2i"

# e.g. "dd.GPT_models['GPT-XL'](vocab_size=16384, ..., model_type='t2i', codebook_dim=8, codebook=<...>)"
CALL = re.compile(r"^\s*(?P<dd>dd\.)?GPT_models\['(?P<size>[^']+)'\]\((?P<args>.*)\)")
LITERAL_KWARG = re.compile(r"(\w+)=('[^']*'|-?[\w.]+)\s*(?=[,)]|$)")


def manifest_params():
    paths = sorted(MANIFEST_DIR.glob("llamagen-*.json"))
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no llamagen-*.json manifests in {MANIFEST_DIR} "
                                                                  "(set DD_MANIFESTS)"), id="no-manifests")]
    return [pytest.param(path, id=path.stem) for path in paths]


def build_from_constructor(constructor: str) -> torch.nn.Module:
    call = CALL.match(constructor)
    if call is None:
        raise ValueError(f"unrecognised manifest constructor {constructor!r}")
    kwargs = {k: ast.literal_eval(v) for k, v in LITERAL_KWARG.findall(call["args"])}
    if call["dd"]:
        codebook_dim = kwargs.pop("codebook_dim")
        config = student_config(gpt_config(call["size"], **kwargs))
        return LlamaGenDD(config, torch.empty(config.vocab_size, codebook_dim))
    return LlamaGenGPT(gpt_config(call["size"], **kwargs))


@pytest.mark.parametrize("manifest_path", manifest_params())
def test_t2i_state_dict_matches_manifest(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    with torch.device("meta"):
        model = build_from_constructor(manifest["constructor"])
    assert model.config.model_type == "t2i"
    state = model.state_dict()
    expected = manifest["state_dict"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    wrong = [(k, list(v.shape), str(v.dtype), expected[k]) for k, v in state.items()
             if list(v.shape) != expected[k]["shape"] or str(v.dtype) != "torch." + expected[k]["dtype"]]
    assert not wrong, f"{len(wrong)} keys differ, e.g. {wrong[:3]}"
    assert len(state) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(v.numel() for v in state.values()) == manifest["num_state_dict_elements"]
    buffers_saved = sorted(name for name, _ in model.named_buffers() if name in state)
    assert buffers_saved == sorted(manifest["buffers_in_state_dict"])
