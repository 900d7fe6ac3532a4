"""Properties of the VAR family that need no fixture: small random models (seeded), CPU (CUDA where present).

The official-code conformance lives in test_var_fixtures.py (golden vectors) and test_var_manifests.py (layouts).
"""
import pytest
import torch

from dd.models.dd_var import VARDD
from dd.models.var import VAR, filter_logits, sampling_probs, var_config_for_depth
from dd.models.var_vqvae import VQVAE, phi_index_per_scale

PATCH_NUMS = (1, 2, 3, 4)


def small_vqvae(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=PATCH_NUMS)   # 8x8 images
    kwargs.update(overrides)
    return VQVAE(**kwargs).eval()


def small_config(**overrides):
    fields = dict(num_classes=5, vocab_size=32, latent_channels=8, patch_nums=PATCH_NUMS)
    fields.update(overrides)
    return var_config_for_depth(2, **fields)


def small_var(seed=0, **overrides):
    """Random VAR whose attention/FFN branches and head matter (official init with large gamma / head factors)."""
    torch.manual_seed(seed)
    model = VAR(small_config(**overrides))
    model.init_weights(init_adaln=0.5, init_adaln_gamma=1.0, init_head=4.0)
    return model.eval()


def guided_teacher_forced(model, vae, label, idx_list, cfg):
    """(1+t) cond - t uncond of the masked (teacher-forced) forward, per scale."""
    x = vae.idx_list_to_var_input(idx_list)
    cond = model(label, x)
    uncond = model(torch.full_like(label, model.num_classes), x)
    out = []
    for k, (begin, end) in enumerate(model.begin_ends):
        t = cfg * k / (model.num_scales - 1)
        out.append((1 + t) * cond[:, begin:end] - t * uncond[:, begin:end])
    return out


# ----------------------------------------------------------------------------------- VQVAE
def test_phi_rule_tables():
    """The official tick rule, including the float64 tie-breaking of the 10-scale table."""
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_per_scale(4, 4) == [0, 1, 2, 3]
    assert phi_index_per_scale(3, 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="at least 2 scales"):
        phi_index_per_scale(1, 4)


def test_vqvae_round_trips_and_decodes_tokens():
    vae = small_vqvae()
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        idx_list = vae.img_to_idx_list(img)
        assert [tuple(i.shape) for i in idx_list] == [(2, pn * pn) for pn in PATCH_NUMS]
        tokens = vae.idx_list_to_tokens(idx_list)
        # the DD decode of codebook vectors is the token decode, mapped to [0, 1]
        torch.testing.assert_close(vae.tokens_to_img(tokens), (vae.idx_list_to_img(idx_list) + 1) / 2)
        torch.testing.assert_close(vae.idx_list_to_img(idx_list), vae.img_to_reconstructed_img(img))
    with pytest.raises(ValueError, match="expects 8x8"):
        vae.img_to_idx_list(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="do not follow patch_nums"):
        vae.idx_list_to_img([torch.zeros(1, 4, dtype=torch.long)])


def test_toy_vqvae_trains_with_straight_through():
    """The toy tokenizer (32x32 images, ch_mult (1, 2, 2), 6 scales up to 8x8): every part gets gradients, usage
    statistics are recorded, and a few steps on one batch lower the loss."""
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 3, 4, 6, 8)).train()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, stats = vae.train_loss(img)
    loss.backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "decoder.conv_out.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert vae.quantize.ema_vocab_hit_SV.sum(1).tolist() == [2 * pn * pn for pn in (1, 2, 3, 4, 6, 8)]
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    first = loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = vae.train_loss(img)
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    assert set(stats) == {"rec", "vq"}


# ----------------------------------------------------------------------------------- VAR
def test_config_for_depth_is_the_builder_rule():
    config = var_config_for_depth(20)
    assert (config.embed_dim, config.num_heads) == (1280, 20)
    assert config.drop_path_rate == pytest.approx(0.1 * 20 / 24)
    assert config.seq_len == 680
    with pytest.raises(ValueError, match="not divisible"):
        var_config_for_depth(4, embed_dim=100, num_heads=3)


@pytest.mark.parametrize("shared_aln", [False, True], ids=["per-block-adaln", "shared-adaln"])
def test_cached_sampling_equals_teacher_forced_logits(shared_aln):
    """The KV-cached, scale-by-scale guided logits equal those of the block-causal masked forward."""
    vae, model = small_vqvae(), small_var(shared_aln=shared_aln)
    label = torch.tensor([1, 4, 0])
    guided = {}
    img, idx_list = model.sample(vae, label, cfg=1.5, generator=torch.Generator().manual_seed(3),
                                 logits_hook=lambda k, logits: guided.__setitem__(k, logits))
    assert img.shape == (3, 3, 8, 8) and 0 <= img.min() and img.max() <= 1
    with torch.no_grad():
        reference = guided_teacher_forced(model, vae, label, idx_list, cfg=1.5)
    for k in range(model.num_scales):
        torch.testing.assert_close(guided[k], reference[k], atol=1e-4, rtol=1e-4)
    assert all(block.attn.cached_k is None and not block.attn.caching for block in model.blocks), "cache not freed"


def test_sampling_is_seeded_and_prefix_replay_continues_the_same_sequence():
    vae, model = small_vqvae(), small_var()
    label = torch.tensor([2, 3])
    run = lambda seed: model.sample(vae, label, cfg=2.0, top_k=10, top_p=0.9,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    (img_a, idx_a), (img_b, idx_b), (_, idx_c) = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b)) and torch.equal(img_a, img_b)
    assert not all(torch.equal(a, c) for a, c in zip(idx_a, idx_c))
    # greedy: a replayed prefix of 2 scales then 1 drawn scale reproduces the full greedy run's first 3 scales
    _, greedy = model.sample(vae, label, cfg=2.0, top_k=1)
    img, partial = model.sample(vae, label, cfg=2.0, top_k=1, prefix_idx=greedy[:2], end_scale=3)
    assert img is None and len(partial) == 3
    assert all(torch.equal(a, b) for a, b in zip(partial, greedy[:3]))
    with pytest.raises(ValueError, match="prefix_idx"):
        model.sample(vae, label, prefix_idx=greedy[:3], end_scale=2)
    # decode=False: the same seeded tokens, and no decoder pass (the Teacher seam decodes separately)
    img_none, idx_d = model.sample(vae, label, cfg=2.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7),
                                   decode=False)
    assert img_none is None and all(torch.equal(a, b) for a, b in zip(idx_a, idx_d))


def test_draw_hook_receives_the_sampling_distribution():
    """draw(probs, k) sees sampling_probs(guided logits) and its indices are the ones used."""
    vae, model = small_vqvae(), small_var()
    label = torch.tensor([0, 1])
    guided, seen = {}, {}

    def argmax_draw(probs, k):
        seen[k] = probs
        return probs.argmax(dim=-1)

    _, idx_list = model.sample(vae, label, cfg=1.0, top_k=5, top_p=0.8, draw=argmax_draw,
                               logits_hook=lambda k, logits: guided.__setitem__(k, logits))
    _, greedy = model.sample(vae, label, cfg=1.0, top_k=1)
    for k, pn in enumerate(PATCH_NUMS):
        assert seen[k].shape == (2, pn * pn, model.V)
        torch.testing.assert_close(seen[k].sum(-1), torch.ones(2, pn * pn))
        assert ((seen[k] > 0).sum(-1) <= 5).all(), "top-k support exceeded"
        torch.testing.assert_close(seen[k], sampling_probs(guided[k], top_k=5, top_p=0.8))
        assert torch.equal(idx_list[k], greedy[k])


def test_filter_logits_keeps_ties_and_the_top_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, False, True, True]]
    # top-p keeps the most likely token even when it alone exceeds the mass
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True, True]]
    torch.testing.assert_close(sampling_probs(logits), logits.softmax(-1))
    assert torch.equal(filter_logits(logits, top_k=100), logits), "top_k above V keeps everything"


def test_class_dropout_only_in_train_mode():
    model = small_var(cond_drop_rate=1.0, drop_path_rate=0.0)
    vae = small_vqvae()
    label = torch.tensor([1, 2])
    with torch.no_grad():
        x = vae.idx_list_to_var_input([torch.randint(0, 32, (2, pn * pn)) for pn in PATCH_NUMS])
        model.eval()
        eval_logits = model(label, x)
        null_logits = model(torch.full_like(label, model.num_classes), x)
        model.config.cond_drop_rate = 0.0
        torch.testing.assert_close(eval_logits, model(label, x), atol=0, rtol=0)
        model.config.cond_drop_rate = 1.0
        model.train()
        torch.testing.assert_close(model(label, x), null_logits, atol=0, rtol=0)
    assert not torch.allclose(eval_logits, null_logits)


def test_train_loss_is_cross_entropy_over_all_positions():
    vae, model = small_vqvae(), small_var()
    model.train()
    label = torch.tensor([0, 3])
    idx_list = [torch.randint(0, 32, (2, pn * pn)) for pn in PATCH_NUMS]
    x = vae.idx_list_to_var_input(idx_list)
    target = torch.cat(idx_list, dim=1)
    loss = model.train_loss(label, x, target)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.pos_1LC.grad.abs().sum() > 0
    model.eval()
    model.config.cond_drop_rate = 0.0
    with torch.no_grad():
        logits = model(label, x)
        expected = -logits.log_softmax(-1).gather(-1, target[..., None]).mean()
        torch.testing.assert_close(model.train_loss(label, x, target), expected)
    with pytest.raises(ValueError, match="x_BLCv_wo_first_l must be"):
        model(label, x[:, :-1])
    with pytest.raises(ValueError, match="labels must lie"):
        model(torch.tensor([0, 6]), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sampling_on_cuda_matches_cpu_greedy():
    vae, model = small_vqvae(), small_var()
    label = torch.tensor([1, 3])
    _, cpu = model.sample(vae, label, cfg=1.5, top_k=1)
    img, gpu = model.cuda().sample(vae.cuda(), label, cfg=1.5, top_k=1,
                                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert img.is_cuda
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


# ----------------------------------------------------------------------------------- VAR-DD
def small_student(seed=1):
    torch.manual_seed(seed)
    student = VARDD(small_config())
    student.init_weights(init_adaln=0.5, init_adaln_gamma=1.0, init_head=4.0)
    return student.eval()


def test_student_mask_and_bookkeeping():
    student = small_student()
    levels = student.lvl_1L[0]
    assert levels.tolist()[:6] == [0, 1, 2, 2, 2, 2]
    visible = student.attn_bias_for_masking[0, 0] == 0
    assert visible[2, 2] and not visible[2, 3], "tokens of one scale see only themselves"
    assert visible[5, 0] and visible[5, 1] and not visible[1, 5]
    assert student.tokens_in_scales_before(0) == 0 and student.tokens_in_scales_before(3) == 1 + 4 + 9
    assert student.tokens_in_scales_before(torch.tensor([0.0, 2.7])).tolist() == [0, 5]
    with pytest.raises(ValueError, match=r"t must lie in \[0, 3\]"):
        student(torch.tensor([0]), torch.zeros(1, 30, 8), torch.tensor([4.0]))


def test_student_prefix_handling_and_nearest_code():
    vae, student = small_vqvae(), small_student()
    with pytest.raises(RuntimeError, match="attach_codebook"):
        student.final_sequence(torch.zeros(1, 30, 8), torch.zeros(1, 30, 32), 1)
    student.attach_codebook(vae.quantize.embedding.weight)
    codebook = vae.quantize.embedding.weight
    x = torch.randn(2, 30, 8)
    brute = (x[:, :, None] - codebook[None, None]).square().sum(-1).argmin(-1)   # the official broadcast
    assert torch.equal(student.nearest_code(x), brute)
    label, t = torch.tensor([0, 4]), torch.tensor([2.0, 0.0])
    clean = codebook[torch.randint(0, 32, (2, 30))]
    x_t = student.perturb(clean, t, torch.randn(2, 30, 8))
    assert torch.equal(x_t[0, :5], clean[0, :5]) and not torch.equal(x_t[1, :5], clean[1, :5])
    with torch.no_grad():
        conti, logits = student.final_predict(label, x_t, t)
        seq = student.final_sequence(conti, logits, 2)
    assert torch.equal(conti[0, :5], clean[0, :5])                  # given scales returned as they are
    assert torch.equal(seq[0, :5], clean[0, :5])                    # and snapped to the same codes
    assert torch.isinf(logits[0, :5]).sum(-1).eq(31).all()          # one finite logit per given token
    assert torch.equal(seq[1, 5:], conti[1, 5:])


def test_init_from_teacher_copies_teacher_and_redraws_the_new_level_row():
    teacher, student = small_var(), small_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.init_from_teacher(teacher, init_std=0.02)
    assert torch.equal(student.class_emb.weight, teacher.class_emb.weight)
    assert not torch.equal(student.lvl_embed.weight[1], before["lvl_embed.weight"][1])
    assert torch.equal(student.lvl_embed.weight[2:], teacher.lvl_embed.weight[1:])
    assert torch.equal(student.pos_1LC[:, 2:], teacher.pos_1LC[:, 1:])
    assert torch.equal(student.blocks[1].ffn.fc2.weight, teacher.blocks[1].ffn.fc2.weight)
    assert torch.equal(student.final_layer_conti.linear.weight, before["final_layer_conti.linear.weight"])
    assert student.n_d_embed.weight.std() < 0.05
    with pytest.raises(ValueError, match="num_classes"):
        student.init_from_teacher(small_var(num_classes=7))
