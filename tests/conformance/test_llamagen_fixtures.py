"""Golden vectors of the official LlamaGen code (shared/fixtures/llamagen, see its README.md): build every
model from its json sidecar, load the official state dict strictly and reproduce every recorded call.

Fixture folder: $DD_FIXTURES_LLAMAGEN, default ../shared/fixtures/llamagen next to the repository. The
tests skip only when that folder is absent. Tolerances from the README: logits/latents atol=rtol=1e-4,
images atol 1e-4, integers exact, -inf positions compared by mask.
"""
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd.models.dd_llamagen import LlamaGenDD
from dd.models.llamagen import GPTConfig, LlamaGenGPT, generate
from dd.models.llamagen_vq import VQConfig, VQModel
from fixture_env import require_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("DD_FIXTURES_LLAMAGEN", REPO_ROOT.parent / "shared" / "fixtures" / "llamagen"))
ABSENT = f"LlamaGen fixture folder {FIXTURES} is absent (set DD_FIXTURES_LLAMAGEN)"


def close(actual, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def close_image(actual, expected):
    close(actual, expected, atol=1e-4, rtol=0)


def exact(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.long(), expected.long()), f"{(actual.long() != expected.long()).sum()} entries differ"


def close_log_probs(actual, expected):
    """-inf entries must coincide; the finite rest within tolerance."""
    inf = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), inf) and torch.equal(actual[inf], expected[inf])
    close(actual[~inf], expected[~inf])


# Official class (the sidecar's `official_class`, after the colon) -> our role. The folder's content decides the
# file names: each sidecar <stem>.json has its state dict in <stem>.safetensors and its recorded calls in
# <stem>_io.safetensors.
ROLES = {"VQModel": "vq", "Transformer": "gpt", "DDTransformer": "dd"}
READ: dict[str, set] = {}  # io tensors read by the tests that ran, per io file (test_every_io_tensor_is_used)


@lru_cache(maxsize=None)
def stems() -> dict[str, str]:
    """role -> file stem of its sidecar, from the folder's content."""
    found = {}
    for path in sorted(FIXTURES.glob("*.json")):
        official = json.loads(path.read_text()).get("official_class", "")
        cls = official.split(":")[-1].split()[0] if official else None
        assert cls in ROLES, f"{path.name}: official class {official!r} has no counterpart here ({', '.join(ROLES)})"
        assert ROLES[cls] not in found, f"two {cls} sidecars: {found[ROLES[cls]]}.json and {path.name}"
        found[ROLES[cls]] = path.stem
    return found


@lru_cache(maxsize=None)
def sidecar(role: str) -> dict:
    return json.loads((FIXTURES / f"{stems()[role]}.json").read_text())


class Recorded(dict):
    """An io file's tensors; remembers which were read."""

    def __init__(self, name: str, data: dict):
        super().__init__(data)
        self.name = name

    def __getitem__(self, key):
        READ.setdefault(self.name, set()).add(key)
        return super().__getitem__(key)


@lru_cache(maxsize=None)
def tensors(name: str) -> dict:
    """"vq" / "gpt" / "dd" (state dicts) or "vq_io" / "gpt_io" / "dd_io" (recorded calls), by role."""
    role, _, io = name.partition("_")
    path = FIXTURES / f"{stems()[role]}{'_io' if io else ''}.safetensors"
    return Recorded(path.name, load_file(path)) if io else load_file(path)


def cases(name: str, key: str):
    """Parametrize over the cases a sidecar lists (a single skipped param when the folder is absent)."""
    if not FIXTURES.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="absent")]
    return [pytest.param(case, id=case["name"]) for case in sidecar(name)[key]]


@pytest.fixture(autouse=True)
def fixtures_present():
    require_folder(FIXTURES, "DD_FIXTURES_LLAMAGEN")


def build_vq() -> VQModel:
    meta = sidecar("vq")
    args = dict(meta["model_args"])
    # the official entropy loss is not implemented; the fixture (like every release) has it switched off
    assert args.pop("entropy_loss_ratio") == 0.0
    model = VQModel(VQConfig(**args, ch=meta["ch"], num_res_blocks=meta["num_res_blocks"]))
    model.load_state_dict(tensors("vq"), strict=True)
    return model.eval()


def build_gpt() -> LlamaGenGPT:
    model = LlamaGenGPT(GPTConfig(**sidecar("gpt")["model_args"]))
    model.load_state_dict(tensors("gpt"), strict=True)
    return model.eval()


def build_dd() -> LlamaGenDD:
    args = dict(sidecar("dd")["model_args"])
    args.pop("codebook")  # passed separately: the l2-normalised VQ codebook stored in dd_io
    codebook = tensors("dd_io")["codebook"]
    assert args.pop("codebook_dim") == codebook.shape[1]
    model = LlamaGenDD(GPTConfig(**args), codebook)
    model.load_state_dict(tensors("dd"), strict=True)
    return model.eval()


def decode_latents(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """(B, h*w, C) continuous tokens in raster order -> image, as the DD eval scripts do."""
    side = sidecar("vq")["latent_hw"]
    return vq.decode(x.reshape(x.shape[0], side, side, x.shape[-1]).permute(0, 3, 1, 2).contiguous())


# ------------------------------------------------------------------------------------------------ VQ

@torch.no_grad()
def test_vq_encode():
    io = tensors("vq_io")
    vq = build_vq()
    close(vq.quant_conv(vq.encoder(io["image"])), io["h_prequant"])
    quant, indices = vq.encode(io["image"])
    close(quant, io["quant"])
    exact(indices, io["indices"])


@torch.no_grad()
def test_vq_decode_and_codebook():
    io = tensors("vq_io")
    vq = build_vq()
    close_image(vq.decode(io["quant"]), io["recon_from_quant"])
    close_image(vq.decode_code(io["indices"], io["quant"].shape), io["decode_code_image"])
    close(vq.codebook_l2(), io["codebook_l2"])
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert norms.shape == (sidecar("vq")["model_args"]["codebook_size"],)
    assert not torch.allclose(norms, torch.ones_like(norms))  # stored rows are not unit: the l2 step is exercised


# ------------------------------------------------------------------------------------------------ GPT

@torch.no_grad()
def test_gpt_rope_table():
    close(build_gpt().freqs_cis, tensors("gpt_io")["freqs_cis"], atol=0, rtol=0)


@torch.no_grad()
def test_gpt_teacher_forcing():
    io = tensors("gpt_io")
    gpt = build_gpt()
    close(gpt(io["fwd_idx"], io["fwd_cond"]), io["fwd_logits_full"])
    close(gpt(io["fwd_idx"][:, :-1], io["fwd_cond"]), io["tf_logits"])
    close(gpt.train_loss(io["fwd_idx"], io["fwd_cond"]).reshape(1), io["tf_loss"])


@pytest.mark.parametrize("case", cases("gpt", "generate_cases"))
def test_gpt_generate(case):
    io, name = tensors("gpt_io"), case["name"]
    gpt, vq = build_gpt(), build_vq()
    block = sidecar("gpt")["model_args"]["block_size"]
    tokens, step_logits = generate(gpt, io["gen_cond"], block, cfg_scale=case["cfg_scale"],
                                   cfg_interval=case["cfg_interval"], top_k=1, return_logits=True)
    exact(tokens, io[f"gen_{name}_tokens"])
    close(step_logits, io[f"gen_{name}_step_logits"])
    side = sidecar("vq")["latent_hw"]
    with torch.no_grad():
        image = vq.decode_code(tokens, (tokens.shape[0], vq.config.codebook_embed_dim, side, side))
    close_image(image, io[f"gen_{name}_image"])


def test_gpt_intermediate_generate():
    io, setting = tensors("gpt_io"), sidecar("gpt")["intermediate_generate"]
    prefix = io["igen_prefix"]
    assert prefix.shape[1] == setting["t_start"]
    block = sidecar("gpt")["model_args"]["block_size"]
    tokens, step_logits = generate(build_gpt(), io["gen_cond"], block - setting["t_start"],
                                   cfg_scale=setting["cfg_scale"], top_k=1, prefix=prefix, return_logits=True)
    exact(tokens, io["igen_tokens"])
    close(step_logits, io["igen_step_logits"])


# ------------------------------------------------------------------------------------------------ DD

@pytest.mark.parametrize("case", cases("dd", "t_cases"))
@torch.no_grad()
def test_dd_t_case(case):
    io, key = tensors("dd_io"), case["name"]
    model = build_dd()
    t = io[f"{key}_t"]
    assert t.tolist() == case["t"]
    x_t = model.perturb(io["codebook"][io["data_idx"]], t, io["noise"])
    close(x_t, io[f"{key}_x_t"], atol=0, rtol=0)
    tokens, logits = model(x_t, io["cond"], t)
    close(tokens, io[f"{key}_tokens"])
    close(logits, io[f"{key}_logits"])
    exact(model.nearest_code(x_t), io[f"{key}_gt_idx"])
    fp_tokens, fp_logits = model.final_predict(x_t, io["cond"], t)
    close(fp_tokens, io[f"{key}_fp_tokens"])
    close_log_probs(fp_logits, io[f"{key}_fp_logits"])
    close(model.final_sequence(fp_tokens, fp_logits, sidecar("dd")["split_t"]), io[f"{key}_final_x"])


def dd_step(model, x, noise, cond, t: int):
    """One DD step of the eval scripts: keep the first t positions of x, the rest from the noise."""
    t_vec = torch.full((x.shape[0],), float(t))
    x_t = model.perturb(x, t_vec, noise)
    return model.final_sequence(*model.final_predict(x_t, cond, t_vec), sidecar("dd")["split_t"])


@pytest.mark.parametrize("case", cases("dd", "fewstep"))
@torch.no_grad()
def test_dd_fewstep_sampling(case):
    io = tensors("dd_io")
    model, vq = build_dd(), build_vq()
    noise = io["sample_noise"]
    x = noise
    for t in case["t_list"]:
        x = dd_step(model, x, noise, io["sample_cond"], t)
    close(x, io[f"fewstep_{case['name']}_x"])
    close_image(decode_latents(vq, x), io[f"fewstep_{case['name']}_image"])


@torch.no_grad()
def test_dd_teacher_involved_sampling():
    io, setting = tensors("dd_io"), sidecar("dd")["combine"]
    model, teacher, vq = build_dd(), build_gpt(), build_vq()
    noise, cond = io["sample_noise"], io["sample_cond"]
    first_t, teacher_end = setting["t_list"]
    start = setting["teacher_start_t"]
    x = dd_step(model, noise, noise, cond, first_t)
    prefix = model.nearest_code(x)[:, :start]
    exact(prefix, io["combine_step1_prefix_idx"])
    tokens = generate(teacher, cond, teacher_end - start, cfg_scale=setting["cfg_scale"],
                      cfg_interval=setting["cfg_interval"], top_k=1, prefix=prefix)
    exact(tokens, io["combine_teacher_tokens"])
    x = torch.cat([model.codebook[tokens], noise[:, teacher_end:]], dim=1)
    x = dd_step(model, x, noise, cond, teacher_end)
    close(x, io["combine_x"])
    close_image(decode_latents(vq, x), io["combine_image"])


# ------------------------------------------------------------------------------------------------ the folder

def test_every_file_of_the_folder_is_known():
    """Each file is a README, a model sidecar, its state dict or its recorded calls: nothing is ignored."""
    known = {"README.md"}
    for stem in stems().values():
        known |= {f"{stem}.json", f"{stem}.safetensors", f"{stem}_io.safetensors"}
    assert sorted(p.name for p in FIXTURES.iterdir() if p.name not in known) == []
    assert set(stems()) == set(ROLES.values())


def test_every_io_tensor_is_used(request):
    """Every recorded tensor was read by a test of this module (run last, after the replays). A new recorded call
    without a replay fails here."""
    option = request.config.option
    if option.keyword or option.markexpr or getattr(option, "lf", False) or \
            any("::" in arg for arg in request.config.args):
        pytest.skip("a partial run: needs every test of the module to have run")
    unread = {}
    for role in stems():
        io = tensors(f"{role}_io")
        missing = sorted(set(io) - READ.get(io.name, set()))
        if missing:
            unread[io.name] = missing
    assert unread == {}, f"recorded tensors no test reads: {unread}"
