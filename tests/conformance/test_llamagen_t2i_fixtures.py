"""Golden vectors of the official LlamaGen text-to-image GPT (shared/fixtures/llamagen-t2i, see its README.md):
build the model from the json sidecar, load the official state dict strictly and replay every recorded call.

Fixture folder: $DD_FIXTURES_LLAMAGEN_T2I, default ../shared/fixtures/llamagen-t2i next to the repository.
The tests skip only when that folder is absent. Tolerances from the README: logits atol=rtol=1e-4, tokens
exact. Sizes (batch, caption length and width, block size) come from the sidecar and the tensors.
"""
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd.models.llamagen import GPTConfig, LlamaGenGPT, generate, precompute_freqs_cis_2d
from dd.text_encoder import left_pad_captions

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("DD_FIXTURES_LLAMAGEN_T2I", REPO_ROOT.parent / "shared" / "fixtures" / "llamagen-t2i"))
ABSENT = f"LlamaGen t2i fixture folder {FIXTURES} is absent (set DD_FIXTURES_LLAMAGEN_T2I)"

# The recorded tensors every test below consumes; a key outside these is a recorded call nobody replays.
INPUT_KEYS = {"caption_emb_raw", "valid_len", "c_indices", "emb_masks", "uncond_embedding", "freqs_cis"}


def close(actual, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def exact(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.long(), expected.long()), f"{(actual.long() != expected.long()).sum()} entries differ"


@lru_cache(maxsize=None)
def sidecar() -> dict:
    return json.loads((FIXTURES / "gpt_t2i.json").read_text())


@lru_cache(maxsize=None)
def io() -> dict:
    return load_file(FIXTURES / "gpt_t2i_io.safetensors")


def generate_cases():
    if not FIXTURES.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="absent")]
    return [pytest.param(case, id=case["name"]) for case in sidecar()["generate_cases"]]


@pytest.fixture(autouse=True)
def fixtures_present():
    if not FIXTURES.is_dir():
        pytest.skip(ABSENT)


def build_gpt() -> LlamaGenGPT:
    model = LlamaGenGPT(GPTConfig(**sidecar()["model_args"]))
    model.load_state_dict(load_file(FIXTURES / "gpt_t2i.safetensors"), strict=True)
    return model.eval()


def greedy(probs, position):
    """sample_logits=False in the official sampler: arg-max of the sampling distribution."""
    return probs.argmax(dim=-1)


def test_every_recorded_tensor_is_replayed():
    generated = {f"generate.{case['name']}.tokens" for case in sidecar()["generate_cases"]}
    unreplayed = sorted(set(io()) - INPUT_KEYS - generated - {"kv_logits.cond_masked"})
    assert not unreplayed, f"{FIXTURES}: recorded tensors without a test: {unreplayed}"


def test_config_and_null_caption():
    args = sidecar()["model_args"]
    model = build_gpt()
    assert args["model_type"] == "t2i"
    caption = io()["c_indices"]
    assert caption.shape[1:] == (args["cls_token_num"], args["caption_dim"])
    # the null caption is a buffer of the state dict: the strict load restored the recorded one
    exact(model.cls_embedding.uncond_embedding.view(torch.int32), io()["uncond_embedding"].view(torch.int32))
    exact(model.null_condition(caption)[0].view(torch.int32), io()["uncond_embedding"].view(torch.int32))


def test_rope_table():
    args, model = sidecar()["model_args"], build_gpt()
    close(model.freqs_cis, io()["freqs_cis"], atol=0, rtol=0)
    grid = int(args["block_size"] ** 0.5)
    head_dim = args["dim"] // args["n_head"]
    close(precompute_freqs_cis_2d(grid, head_dim, args["rope_base"], args["cls_token_num"]), io()["freqs_cis"],
          atol=0, rtol=0)
    assert not io()["freqs_cis"][:args["cls_token_num"]].any()  # caption rows are zeros, not the identity


def test_left_padding_of_caption_features():
    """The official sampler's move of right-padded T5 features to the end of the caption window."""
    raw, valid = io()["caption_emb_raw"], io()["valid_len"]
    right_mask = (torch.arange(raw.shape[1])[None] < valid[:, None]).long()
    features, mask = left_pad_captions(raw, right_mask)
    close(features, io()["c_indices"], atol=0, rtol=0)
    exact(mask, io()["emb_masks"])


@pytest.mark.parametrize("case", generate_cases())
@torch.no_grad()
def test_generate(case):
    block = sidecar()["model_args"]["block_size"]
    assert not case["sample_logits"]
    tokens = generate(build_gpt(), io()["c_indices"], block, cfg_scale=case["cfg_scale"], draw=greedy,
                      caption_mask=io()["emb_masks"] if case["emb_masks"] else None)
    exact(tokens, io()[f"generate.{case['name']}.tokens"])


@torch.no_grad()
def test_kv_cached_and_teacher_forced_logits_with_caption_mask():
    """kv_logits.cond_masked: the conditional stream's logits teacher-forced on generate.cfg4p5_mask.tokens,
    replayed through the KV cache (generate with the recorded tokens as its draws) and in one causal pass."""
    expected = io()["kv_logits.cond_masked"]
    tokens = io()["generate.cfg4p5_mask.tokens"].long()
    caption, mask = io()["c_indices"], io()["emb_masks"]
    model = build_gpt()
    replayed, logits = generate(model, caption, tokens.shape[1], cfg_scale=1.0, caption_mask=mask,
                                draw=lambda probs, position: tokens[:, position], return_logits=True)
    exact(replayed, tokens)
    close(logits, expected)
    close(model(tokens[:, :-1], caption, caption_mask=mask), expected)
    # the caption mask matters here: without it the same pass gives other logits
    unmasked = model(tokens[:, :-1], caption)
    assert (unmasked - expected).abs().max() > 1e-2
