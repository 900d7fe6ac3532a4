"""The Teacher seam with a text-to-image LlamaGen teacher: Captions are the condition and the only difference
from class labels. Tiny random t2i GPT: the sampler's distribution equals next_probs and the CFG formula on
teacher-forced logits, the flow map is deterministic and row-independent, padded caption positions are
invisible, and params.yaml's t2i row builds the official t2i_XL_stage1_256 layout."""
import json
import os
from pathlib import Path

import pytest
import torch

from dd.config import TeacherSampling, load_params
from dd.models.llamagen import GPTConfig, LlamaGenGPT, sampling_probs
from dd.models.llamagen_vq import VQConfig, VQModel
from dd.teacher import Captions, LlamaGenTeacher
from dd.text_encoder import left_pad_captions
from dd.models.build import build_models, setting_model_kwargs

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = Path(os.environ.get("DD_MANIFESTS", REPO.parent / "shared" / "reference" / "manifests"))
CAPTION_LEN, CAPTION_DIM = 6, 8


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 1), decoder_ch_mult=(1, 1),
                          z_channels=32, ch=32, num_res_blocks=1))
    model = LlamaGenGPT(GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=16, model_type="t2i",
                                  cls_token_num=CAPTION_LEN, caption_dim=CAPTION_DIM))
    torch.nn.init.normal_(model.output.weight, std=0.3)  # the official init zeroes it: uniform p
    sampling = TeacherSampling(cfg=3.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
    return LlamaGenTeacher(vq, model, sampling)


def captions(batch: int, seed: int = 1) -> Captions:
    """Random right-padded 'encoder outputs' of 1..CAPTION_LEN tokens, left-padded as the t2i GPT reads them."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, CAPTION_LEN + 1, (batch,), generator=generator)
    right_mask = (torch.arange(CAPTION_LEN)[None] < lengths[:, None]).long()
    raw = torch.randn(batch, CAPTION_LEN, CAPTION_DIM, generator=generator) * right_mask[..., None]
    return Captions(*left_pad_captions(raw, right_mask))


def greedy(probs, step):
    return probs.argmax(-1)


def test_next_probs_is_the_distribution_the_sampler_draws_from(teacher):
    cond = captions(4)
    generator = torch.Generator().manual_seed(5)
    seen = {}

    def recording_draw(probs, step):
        seen[step] = probs.clone()
        return torch.multinomial(probs[:, 0], 1, generator=generator)

    tokens = teacher.sample_tokens(cond, draw=recording_draw)
    assert tokens.shape == (4, 16) and sorted(seen) == list(range(16))
    for step in (0, 1, 7, 15):
        torch.testing.assert_close(teacher.next_probs(tokens[:, :step], cond), seen[step], atol=1e-5, rtol=1e-4)
    # the first step from the model's teacher-forced logits: CFG against the null caption, same caption mask
    model, s = teacher.model, teacher.sampling
    with torch.no_grad():
        cond_logits = model(tokens[:, :0], cond.features, cond.mask)[:, -1]
        null = model.null_condition(cond.features)
        uncond_logits = model(tokens[:, :0], null, cond.mask)[:, -1]
    expected = sampling_probs(uncond_logits + (cond_logits - uncond_logits) * s.cfg, s.temperature, s.top_k, s.top_p)
    torch.testing.assert_close(teacher.next_probs(tokens[:, :0], cond), expected[:, None], atol=1e-5, rtol=1e-4)


def test_padded_caption_positions_are_invisible(teacher):
    """Whatever sits at the padded (masked) caption positions, the image tokens' distributions are the same;
    the real caption tokens do matter."""
    cond = captions(3, seed=2)
    assert not cond.mask.all()
    tokens = teacher.sample_tokens(cond, draw=greedy)
    junk = torch.randn(cond.features.shape) * 5
    noisy = Captions(torch.where(cond.mask[..., None] != 0, cond.features, junk), cond.mask)
    torch.testing.assert_close(teacher.next_probs(tokens[:, :9], noisy), teacher.next_probs(tokens[:, :9], cond),
                               atol=1e-5, rtol=1e-4)
    other = Captions(cond.features + cond.mask[..., None] * torch.randn(cond.features.shape), cond.mask)
    assert not torch.allclose(teacher.next_probs(tokens[:, :9], other), teacher.next_probs(tokens[:, :9], cond))


def test_flow_tokens_with_captions_are_deterministic_and_row_independent(teacher):
    cond = captions(5, seed=3)
    noise = torch.randn(5, teacher.num_tokens, teacher.token_dim, generator=torch.Generator().manual_seed(4))
    tokens = teacher.flow_tokens(noise, cond)
    assert torch.equal(tokens, teacher.flow_tokens(noise, cond))
    assert torch.equal(tokens[1:3], teacher.flow_tokens(noise[1:3], cond[1:3]))
    assert torch.equal(tokens[[4, 0]], teacher.flow_tokens(noise[[4, 0]], cond[[4, 0]]))
    # greedy continuation of a prefix reproduces the greedy run, as for class labels
    full = teacher.sample_tokens(cond, draw=greedy)
    assert torch.equal(teacher.sample_tokens(cond, draw=greedy, prefix=full[:, :5]), full)


def test_wrong_condition_is_one_clear_error(teacher):
    with pytest.raises(ValueError, match=r"takes Captions with features \(B, 6, 8\)"):
        teacher.sample_tokens(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"takes Captions"):
        teacher.sample_tokens(Captions(torch.zeros(2, CAPTION_LEN, 3), torch.ones(2, CAPTION_LEN)))
    with pytest.raises(ValueError, match="Captions: need features"):
        Captions(torch.zeros(2, CAPTION_LEN, CAPTION_DIM), torch.ones(2, CAPTION_LEN + 1))


def test_paper_t2i_setting_builds_the_official_layout():
    """params.yaml's llamagen-xl-t2i row builds exactly the state_dict of t2i_XL_stage1_256.pt."""
    path = MANIFEST_DIR / "t2i" / "llamagen-gpt-xl-t2i-256.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} absent (set DD_MANIFESTS)")
    setting = load_params(REPO / "params.yaml").setting("llamagen-xl-t2i")
    with torch.device("meta"):
        _, model = build_models(setting.family, *setting_model_kwargs(setting))
    state = model.state_dict()
    expected = json.loads(path.read_text())["state_dict"]
    assert set(state) == set(expected)
    assert all(list(v.shape) == expected[k]["shape"] for k, v in state.items())
