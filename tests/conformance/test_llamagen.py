"""Unit tests of the LlamaGen family beyond the golden vectors: grouped-query attention in cached
generation, no state left behind by generate, prefix continuation for any cfg_scale, cfg_interval,
the sampling distribution that generate draws from, the DD student's helpers, VQ training pieces and
CUDA agreement (skipped without a GPU). Small random models, seconds on a CPU."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dd.models.dd_llamagen import LlamaGenDD, student_config
from dd.models.llamagen import GPT_CONFIGS, GPTConfig, LlamaGenGPT, gpt_config, generate, sampling_probs
from dd.models.llamagen_vq import VQ_CONFIGS, VQConfig, VQModel

TINY = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=16, num_classes=5,
                 token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def tiny_gpt(n_kv_head=None, seed=0, **overrides) -> LlamaGenGPT:
    """A tiny teacher with a non-zero logits head and non-unit norms (the official init zeroes the head,
    which would make every logit 0 and hide bugs)."""
    torch.manual_seed(seed)
    model = LlamaGenGPT(replace(TINY, n_kv_head=n_kv_head, **overrides))
    with torch.no_grad():
        model.output.weight.normal_(std=0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def guided(model, tokens, cond, scale):
    """Teacher-forced CFG logits for every position of `tokens` (the reference for cached generation)."""
    with torch.no_grad():
        cond_logits = model(tokens[:, :-1], cond)
        if scale <= 1.0:
            return cond_logits
        uncond_logits = model(tokens[:, :-1], torch.full_like(cond, model.config.num_classes))
    return uncond_logits + (cond_logits - uncond_logits) * scale


# ------------------------------------------------------------------------------------------- teacher

@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_generation_equals_teacher_forcing(n_kv_head, cfg_scale):
    model = tiny_gpt(n_kv_head)
    assert model.layers[0].attention.wqkv.weight.shape[0] == (4 + 2 * n_kv_head) * 16
    cond = torch.tensor([0, 3, 4])
    gen = torch.Generator().manual_seed(1)
    tokens, step_logits = generate(model, cond, 16, cfg_scale=cfg_scale, generator=gen, return_logits=True)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.int64
    torch.testing.assert_close(step_logits, guided(model, tokens, cond, cfg_scale), atol=1e-4, rtol=1e-4)


def test_cached_steps_in_chunks_equal_teacher_forcing():
    """next_logits (the stepping API a teacher adapter uses) with multi-token chunks after cached positions."""
    model = tiny_gpt(n_kv_head=2)
    idx, cond = torch.randint(0, 32, (2, 16)), torch.tensor([2, 4])
    with torch.no_grad():
        full = model(idx, cond)
        caches = model.new_kv_caches(2, 17)
        torch.testing.assert_close(model.next_logits(caches, 0, cond=cond), full[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.next_logits(caches, 1, idx=idx[:, :6]), full[:, 6], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.next_logits(caches, 7, idx=idx[:, 6:7]), full[:, 7], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.next_logits(caches, 8, idx=idx[:, 7:]), full[:, 16], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        model.next_logits(model.new_kv_caches(2, 4), 0, idx=idx[:, :4], cond=cond)


def test_meta_built_model_materialises():
    reference = tiny_gpt()
    with torch.device("meta"):
        model = LlamaGenGPT(reference.config)
    model.to_empty(device="cpu").load_state_dict(reference.state_dict())
    idx, cond = torch.randint(0, 32, (2, 16)), torch.tensor([0, 1])
    torch.testing.assert_close(model.eval()(idx, cond), reference(idx, cond), atol=0, rtol=0)


def test_generate_leaves_no_state_behind():
    model = tiny_gpt(n_kv_head=2).train()  # generate must run in eval mode and restore train mode
    keys = list(model.state_dict())
    idx, cond = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    model.eval()
    before = model(idx, cond)
    model.train()
    tokens_from_train = generate(model, cond, 16, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    assert model.training
    assert list(model.state_dict()) == keys  # no kv_cache.* entries appear
    assert not [m for m in model.modules() if getattr(m, "kv_cache", None) is not None]
    model.eval()
    torch.testing.assert_close(model(idx, cond), before, atol=0, rtol=0)  # a later forward just works
    tokens_from_eval = generate(model, cond, 16, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(tokens_from_train, tokens_from_eval)  # dropout was off while generating


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_prefix_continues_like_a_full_generation(cfg_scale):
    model = tiny_gpt(n_kv_head=2)
    cond = torch.tensor([4, 0, 2])
    full, full_logits = generate(model, cond, 16, cfg_scale=cfg_scale, top_k=1, return_logits=True)
    tail, tail_logits = generate(model, cond, 11, cfg_scale=cfg_scale, top_k=1, prefix=full[:, :5],
                                 return_logits=True)
    assert tail.shape == (3, 16)
    assert torch.equal(tail, full)
    torch.testing.assert_close(tail_logits, full_logits[:, 5:], atol=1e-4, rtol=1e-4)
    # and from an arbitrary prefix, against teacher forcing
    prefix = torch.randint(0, 32, (3, 7))
    tokens, logits = generate(model, cond, 6, cfg_scale=cfg_scale, prefix=prefix, return_logits=True,
                              generator=torch.Generator().manual_seed(3))
    assert tokens.shape == (3, 13) and torch.equal(tokens[:, :7], prefix)
    torch.testing.assert_close(logits, guided(model, tokens, cond, cfg_scale)[:, 7:], atol=1e-4, rtol=1e-4)


def test_cfg_interval_switches_guidance_off_after_the_interval():
    model = tiny_gpt()
    cond = torch.tensor([1, 3])
    tokens, logits = generate(model, cond, 16, cfg_scale=4.0, cfg_interval=3, return_logits=True,
                              generator=torch.Generator().manual_seed(0))
    cfg, plain = guided(model, tokens, cond, 4.0), guided(model, tokens, cond, 1.0)
    # token 0 (prefill) and decode steps i = 0..3 (tokens 1..4) are guided, later tokens are not
    torch.testing.assert_close(logits[:, :5], cfg[:, :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[:, 5:], plain[:, 5:], atol=1e-4, rtol=1e-4)
    assert (cfg[:, 5:] - plain[:, 5:]).abs().max() > 1e-2  # the two references do differ


def test_generate_draws_from_sampling_probs():
    model = tiny_gpt(n_kv_head=2)
    cond = torch.tensor([0, 1, 2, 3])
    settings = dict(temperature=0.7, top_k=9, top_p=0.8)
    seen = []
    gen = torch.Generator().manual_seed(11)

    def recording_draw(probs, position):
        seen.append((position, probs.clone()))
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    prefix = torch.randint(0, 32, (4, 3))
    tokens, logits = generate(model, cond, 10, cfg_scale=2.0, prefix=prefix, draw=recording_draw,
                              return_logits=True, **settings)
    assert [position for position, _ in seen] == list(range(3, 13))
    for i, (_, probs) in enumerate(seen):
        assert torch.equal(probs, sampling_probs(logits[:, i], **settings))
        assert (probs[torch.arange(4), tokens[:, 3 + i]] > 0).all()  # drawn tokens are in the support
    # the default draw is torch.multinomial with `generator`, i.e. exactly this hook
    default = generate(model, cond, 10, cfg_scale=2.0, prefix=prefix,
                       generator=torch.Generator().manual_seed(11), **settings)
    assert torch.equal(default, tokens)


def test_sampling_probs_filters():
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    torch.testing.assert_close(sampling_probs(logits, top_k=1), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))  # ties kept
    torch.testing.assert_close(sampling_probs(logits), logits.softmax(-1))
    torch.testing.assert_close(sampling_probs(logits, temperature=0.5), (logits / 0.5).softmax(-1))
    log_p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # nucleus keeps the token that crosses top_p: 0.5 < 0.6, then 0.8 >= 0.6 -> keep two
    torch.testing.assert_close(sampling_probs(log_p, top_p=0.6), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(sampling_probs(log_p, top_p=0.4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # top-k first (drops 0.05), then nucleus on the renormalised rest: 0.526, 0.842 < 0.9 -> keep all three
    torch.testing.assert_close(sampling_probs(log_p, top_k=3, top_p=0.9),
                               torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    with pytest.raises(ValueError, match="top_k"):
        sampling_probs(logits, top_k=-1)


def test_generate_rejects_bad_requests():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        generate(model, torch.tensor([1]), 12, prefix=torch.zeros(1, 5, dtype=torch.long))
    no_null = tiny_gpt(class_dropout_prob=0.0)
    assert no_null.cls_embedding.embedding_table.num_embeddings == 5
    with pytest.raises(ValueError, match="null-class"):
        generate(no_null, torch.tensor([1]), 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="square"):
        replace(TINY, block_size=15)
    with pytest.raises(ValueError, match="t2i"):
        replace(TINY, model_type="x2i")
    with pytest.raises(ValueError, match="one class token"):
        replace(TINY, cls_token_num=120)


def test_train_loss_uses_class_dropout_in_train_mode_only():
    model = tiny_gpt(class_dropout_prob=1.0)  # every label becomes the null class in training
    idx, cond = torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2])
    null = torch.full_like(cond, 5)
    logits = model(idx[:, :-1], cond)
    expected = F.cross_entropy(logits.reshape(-1, 32), idx.reshape(-1))
    torch.testing.assert_close(model.train_loss(idx, cond), expected)  # eval: labels untouched
    model.train()
    torch.testing.assert_close(model.train_loss(idx, cond), model.eval().train_loss(idx, null))


def test_official_init_and_configs():
    model = LlamaGenGPT(TINY)
    assert torch.count_nonzero(model.output.weight) == 0
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.003
    assert GPT_CONFIGS["GPT-L"].ffn_hidden_dim == 2816 and GPT_CONFIGS["GPT-3B"].ffn_hidden_dim == 8704
    assert gpt_config("GPT-B", block_size=576).grid_size == 24
    with pytest.raises(KeyError, match="GPT-Q"):
        gpt_config("GPT-Q")


# ------------------------------------------------------------------------------------------- DD student

def tiny_dd(seed=0):
    torch.manual_seed(seed)
    codebook = F.normalize(torch.randn(32, 8), dim=-1)
    model = LlamaGenDD(student_config(TINY), codebook)
    with torch.no_grad():
        model.output.weight.normal_(std=0.3)
    return model.eval()


def test_dd_init_from_teacher_copies_the_trunk_only():
    teacher, student = tiny_gpt(n_kv_head=None), tiny_dd()
    kept = {k: v.clone() for k, v in student.state_dict().items()
            if k.startswith(("tok_embeddings", "n_d_embed", "final_layer_conti"))}
    student.init_from_teacher(teacher)
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key in kept:
            assert torch.equal(value, kept[key]), key
        else:
            assert torch.equal(value, teacher_state[key]), key
    with pytest.raises(ValueError, match="class table"):
        student.init_from_teacher(tiny_gpt(class_dropout_prob=0.0))


def test_dd_helpers():
    model = tiny_dd()
    assert "codebook" not in model.state_dict() and "codebook" in dict(model.named_buffers())
    x = torch.randn(2, 16, 8)
    brute = (model.codebook[:, None, None, :] - x).square().sum(-1).argmin(0)
    assert torch.equal(model.nearest_code(x), brute)
    data, noise = model.codebook[torch.randint(0, 32, (2, 16))], torch.randn(2, 16, 8)
    t = torch.tensor([3, 11])
    x_t = model.perturb(data, t, noise)
    assert torch.equal(x_t[0, :3], data[0, :3]) and torch.equal(x_t[0, 3:], noise[0, 3:])
    tokens, logits = model.final_predict(x_t, torch.tensor([1, 4]), t)
    assert torch.equal(tokens[1, :11], data[1, :11])
    assert torch.isinf(logits[0, :3]).sum() == 3 * 31 and not torch.isinf(logits[0, 3:]).any()
    final = model.final_sequence(tokens, logits, split=5)
    assert torch.equal(final[:, :3], data[:, :3]) and torch.equal(final[:, 5:], tokens[:, 5:])
    # integer and float timesteps mean the same thing
    torch.testing.assert_close(model(x_t, torch.tensor([1, 4]), t), model(x_t, torch.tensor([1, 4]), t.float()))
    with pytest.raises(ValueError, match="block_size|16"):
        model(x[:, :15], torch.tensor([1, 4]), t)
    with pytest.raises(ValueError, match="codebook"):
        LlamaGenDD(TINY, torch.zeros(31, 8))


# ------------------------------------------------------------------------------------------- VQ

def test_vq_toy_training_pieces():
    torch.manual_seed(0)
    config = VQConfig(codebook_size=64, codebook_embed_dim=4, z_channels=32, ch=32,
                      encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2])
    vq = VQModel(config)
    assert torch.allclose(vq.quantize.embedding.weight.norm(dim=-1), torch.ones(64))  # official init
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, codebook_loss, commit_loss = vq(img)
    assert recon.shape == img.shape
    torch.testing.assert_close(commit_loss, codebook_loss * 0.25)  # same distance, beta-weighted
    (F.mse_loss(recon, img) + codebook_loss + commit_loss).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(vq.quantize.codebook_used) > 0  # usage tracked in train mode
    quant, indices = vq.eval().encode(img)
    assert quant.shape == (2, 4, 4, 4) and indices.shape == (32,)
    torch.testing.assert_close(vq.decode_code(indices, (2, 4, 4, 4)), vq.decode(quant))
    assert VQ_CONFIGS["VQ-8"].downsample == 8 and VQ_CONFIGS["VQ-16"].downsample == 16
    with pytest.raises(ValueError, match="multiple of 32"):
        VQConfig(ch=48)


# ------------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = tiny_gpt(n_kv_head=2)
    cond = torch.tensor([0, 3, 4])
    cpu_tokens, cpu_logits = generate(model, cond, 16, cfg_scale=2.0, top_k=1, return_logits=True)
    model.cuda()
    tokens, logits = generate(model, cond, 16, cfg_scale=2.0, top_k=1, return_logits=True)
    assert tokens.is_cuda and torch.equal(tokens.cpu(), cpu_tokens)
    torch.testing.assert_close(logits.cpu(), cpu_logits, atol=1e-3, rtol=1e-3)
    sampled = generate(model, cond, 16, cfg_scale=2.0, generator=torch.Generator("cuda").manual_seed(0))
    assert sampled.is_cuda and sampled.shape == (3, 16)
    student = tiny_dd()
    x, t = torch.randn(2, 16, 8), torch.tensor([0, 7])
    cpu_out = student.final_predict(x, torch.tensor([1, 2]), t)
    student.cuda()
    assert student.codebook.is_cuda  # the codebook follows the module
    out = student.final_predict(x.cuda(), torch.tensor([1, 2]).cuda(), t.cuda())
    torch.testing.assert_close(out[0].cpu(), cpu_out[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out[1].cpu(), cpu_out[1], atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name, teacher_params, student_params", [
    ("GPT-B", 110_888_448, 98_321_672), ("GPT-L", 342_910_976, 326_155_272),
    ("GPT-XL", 774_699_520, 753_754_888), ("GPT-XXL", 1_410_972_672, 1_385_839_112),
    ("GPT-XXXL", 3_893_027_840, None), ("GPT-3B", 3_096_659_200, None),
])
def test_parameter_counts_of_the_reference_table(name, teacher_params, student_params):
    """Sizes without a manifest (XXL, XXXL, 3B, DD-XL/XXL), from reference/llamagen-architecture.md §1."""
    with torch.device("meta"):
        teacher = LlamaGenGPT(GPT_CONFIGS[name])
        assert sum(p.numel() for p in teacher.parameters()) == teacher_params
        if student_params is not None:
            student = LlamaGenDD(student_config(GPT_CONFIGS[name]), torch.empty(16384, 8))
            assert sum(p.numel() for p in student.parameters()) == student_params
