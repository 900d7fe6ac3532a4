"""The VQ decoders' inference path (no autograd: channels_last on the CPU, in-place activations and residual sums,
scaled_dot_product_attention) gives the images of the reference path (autograd on: NCHW, out of place) within float
tolerance, on small random models of both families; the attention blocks equal the explicit formula."""
import pytest
import torch

from dd.models import llamagen_vq, var_vqvae
from dd.models.layout import decoder_layout


def randomise_norms(model: torch.nn.Module) -> None:
    """GroupNorm affine parameters away from (1, 0), so that a normalisation mix-up shows in the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.3)
                module.bias.add_(torch.randn_like(module.bias) * 0.3)


def small_vqvae():
    torch.manual_seed(0)
    vae = var_vqvae.VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 4)).eval()
    randomise_norms(vae)
    return vae


def small_vq():
    torch.manual_seed(0)
    config = llamagen_vq.VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 2, 2),
                                  decoder_ch_mult=(1, 2, 2), z_channels=32, ch=32, num_res_blocks=1)
    vq = llamagen_vq.VQModel(config).eval()
    randomise_norms(vq)
    return vq


def reference_and_fast(decode, z):
    with torch.enable_grad():
        reference = decode(z).detach()
    with torch.inference_mode():
        fast = decode(z)
    return reference, fast


@pytest.mark.parametrize("batch", [1, 3])
def test_var_decoder_inference_path_matches_reference(batch):
    vae = small_vqvae()
    f_hat = torch.randn(batch, 8, 4, 4)
    reference, fast = reference_and_fast(vae.fhat_to_img, f_hat)
    assert fast.is_contiguous() and fast.shape == (batch, 3, 16, 16)
    assert reference.std() > 0.05 and (reference.abs() < 1).float().mean() > 0.5   # not a saturated image
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-5)
    tokens = [torch.randint(0, 32, (batch, pn * pn)) for pn in (1, 2, 4)]
    reference, fast = reference_and_fast(vae.idx_list_to_img, tokens)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-5)


def test_var_encoder_tokens_unchanged_by_inference_path():
    vae = small_vqvae()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.enable_grad():
        reference = vae.img_to_idx_list(img)
    with torch.no_grad():
        fast = vae.img_to_idx_list(img)
    for a, b in zip(reference, fast, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [1, 3])
def test_llamagen_decoder_inference_path_matches_reference(batch):
    vq = small_vq()
    quant = torch.randn(batch, 4, 4, 4)
    reference, fast = reference_and_fast(vq.decode, quant)
    assert fast.is_contiguous() and fast.shape == (batch, 3, 16, 16)
    assert reference.std() > 0.05
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-5)
    indices = torch.randint(0, 32, (batch * 16,))
    reference, fast = reference_and_fast(lambda i: vq.decode_code(i, (batch, 4, 4, 4)), indices)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-5)


def explicit_attention(x, norm, q, k, v, proj_out):
    """x + proj_out(v softmax(q^T k / sqrt(C))^T): the LDM attention block written out."""
    B, C, H, W = x.shape
    h = norm(x)
    q, k, v = (t.reshape(B, C, H * W) for t in (q(h), k(h), v(h)))
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)
    return x + proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W))


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_blocks_equal_the_formula(channels_last):
    torch.manual_seed(1)
    x = torch.randn(2, 32, 5, 3)
    x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    var_block = var_vqvae.AttnBlock(32).eval()
    q, k, v = (lambda h, i=i: var_block.qkv(h)[:, 32 * i:32 * (i + 1)] for i in range(3))
    with torch.no_grad():
        torch.testing.assert_close(var_block(x_in), explicit_attention(x, var_block.norm, q, k, v, var_block.proj_out),
                                   atol=1e-5, rtol=1e-5)
        llamagen_block = llamagen_vq.AttnBlock(32).eval()
        b = llamagen_block
        torch.testing.assert_close(b(x_in), explicit_attention(x, b.norm, b.q, b.k, b.v, b.proj_out),
                                   atol=1e-5, rtol=1e-5)


def test_decoder_layout_only_for_cpu_inference():
    z = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert decoder_layout(z).is_contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        assert decoder_layout(z) is z
