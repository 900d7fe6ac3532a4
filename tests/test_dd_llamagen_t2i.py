"""The text-to-image DD student (dd.models.dd_llamagen with model_type 't2i'): the caption prefix takes the
class token's place. No official forward exists to compare with (the official DDTransformer left t2i "in
progress"), so these are the properties it must have: causal in the image tokens, blind to padded caption
positions, dependent on the real caption, initialised from a t2i teacher, and the kept data positions of
final_predict. Tiny random models, seconds on a CPU."""
import pytest
import torch

from dd.models.dd_llamagen import LlamaGenDD, student_config
from dd.models.llamagen import GPTConfig, LlamaGenGPT
from dd.text_encoder import left_pad_captions

T, D, L, C, V = 5, 8, 16, 4, 32
CONFIG = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=V, block_size=L, model_type="t2i", cls_token_num=T,
                   caption_dim=D)


def student(seed=0) -> LlamaGenDD:
    torch.manual_seed(seed)
    codebook = torch.nn.functional.normalize(torch.randn(V, C), dim=-1)
    model = LlamaGenDD(student_config(CONFIG), codebook)
    with torch.no_grad():  # the official init zeroes the logits head and biases: make them matter
        model.output.weight.normal_(std=0.3)
        model.tok_embeddings.bias.normal_(std=0.1)
    return model.eval()


def captions(batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (batch,), generator=generator)  # every row has padding
    right_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return left_pad_captions(torch.randn(batch, T, D, generator=generator) * right_mask[..., None], right_mask)


@torch.no_grad()
def test_outputs_are_causal_in_the_image_tokens():
    model = student()
    features, mask = captions(3)
    x = torch.randn(3, L, C)
    t = torch.tensor([0.0, 5.0, 16.0])
    tokens, logits = model(x, features, t, mask)
    assert tokens.shape == (3, L, C) and logits.shape == (3, L, V)
    changed = x.clone()
    changed[:, 9:] = torch.randn(3, L - 9, C)
    tokens2, logits2 = model(changed, features, t, mask)
    torch.testing.assert_close(tokens2[:, :9], tokens[:, :9])  # output i reads inputs 0..i only
    torch.testing.assert_close(logits2[:, :9], logits[:, :9])
    assert not torch.allclose(tokens2[:, 9:], tokens[:, 9:])


@torch.no_grad()
def test_padded_caption_positions_are_invisible_and_the_caption_matters():
    model = student()
    features, mask = captions(3, seed=2)
    x, t = torch.randn(3, L, C), torch.tensor([0.0, 3.0, 8.0])
    tokens, logits = model(x, features, t, mask)
    junk = torch.where(mask[..., None] != 0, features, torch.randn(features.shape) * 5)
    tokens2, logits2 = model(x, junk, t, mask)
    torch.testing.assert_close(tokens2, tokens)
    torch.testing.assert_close(logits2, logits)
    other = features + mask[..., None] * torch.randn(features.shape)
    tokens3, logits3 = model(x, other, t, mask)
    assert not torch.allclose(tokens3, tokens) and not torch.allclose(logits3, logits)


@torch.no_grad()
def test_final_predict_keeps_the_data_positions():
    model = student()
    features, mask = captions(2)
    x, t = torch.randn(2, L, C), torch.tensor([4.0, 10.0])
    tokens, logits = model.final_predict(x, features, t, mask)
    torch.testing.assert_close(tokens[0, :4], x[0, :4])
    torch.testing.assert_close(tokens[1, :10], x[1, :10])
    assert torch.equal(logits[0, :4].argmax(-1), model.nearest_code(x[0, :4]))
    assert torch.isinf(logits[1, :10]).sum() == 10 * (V - 1)


def test_init_from_a_t2i_teacher_and_condition_checks():
    torch.manual_seed(3)
    teacher = LlamaGenGPT(CONFIG)
    model = student()
    model.init_from_teacher(teacher)
    for name, value in teacher.state_dict().items():
        if name.startswith(("cls_embedding.", "layers.", "norm.", "output.")):
            assert torch.equal(model.state_dict()[name], value), name
    c2i = LlamaGenGPT(GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=V, block_size=L, num_classes=3))
    with pytest.raises(ValueError, match="c2i teacher cannot initialise a t2i student"):
        model.init_from_teacher(c2i)
    features, mask = captions(2)
    with pytest.raises(ValueError, match=r"t2i student takes cond = caption features \(B=2, 5, 8\)"):
        model(torch.randn(2, L, C), torch.tensor([0, 1]), torch.tensor([0.0, 0.0]))
