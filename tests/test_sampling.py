"""dd.sampling: the few-step and teacher-involved samplers reproduce the official outputs recorded in the fixtures
(shared/fixtures/{var,llamagen}/dd_io.safetensors), the presets follow Table 2, and sampling is deterministic.

Fixture folders: $DD_FIXTURES_VAR / $DD_FIXTURES_LLAMAGEN (default ../shared/fixtures/...); the fixture tests skip
only when a folder is absent. Tolerances from the fixture READMEs: latents atol=rtol=1e-4, images atol 1e-4,
integers exact.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd import sampling
from dd.config import TeacherSampling
from dd.models.dd_llamagen import LlamaGenDD, student_config
from dd.models.dd_var import VARDD
from dd.models.llamagen import GPTConfig, LlamaGenGPT
from dd.models.llamagen_vq import VQConfig, VQModel
from dd.models.var import VAR, var_config_for_depth
from dd.models.var_vqvae import VQVAE
from dd.teacher import LlamaGenTeacher, VarTeacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_teacher import single_thread  # noqa: E402,F401  (autouse: one torch thread for these tiny models)

REPO = Path(__file__).resolve().parents[1]
VAR_FIXTURES = Path(os.environ.get("DD_FIXTURES_VAR", REPO.parent / "shared" / "fixtures" / "var"))
LLAMAGEN_FIXTURES = Path(os.environ.get("DD_FIXTURES_LLAMAGEN", REPO.parent / "shared" / "fixtures" / "llamagen"))


def close(actual, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def need(folder: Path):
    if not folder.is_dir():
        pytest.skip(f"fixture folder {folder} is absent (set DD_FIXTURES_VAR / DD_FIXTURES_LLAMAGEN)")


def greedy(cfg=2.0, top_p=1.0, cfg_interval=-1):
    return TeacherSampling(cfg=cfg, top_k=1, top_p=top_p, temperature=1.0, cfg_interval=cfg_interval)


def var_fixture_models():
    need(VAR_FIXTURES)
    side = lambda name: json.loads((VAR_FIXTURES / f"{name}.json").read_text())  # noqa: E731
    kw = side("vqvae_state")["kwargs"]
    vae = VQVAE(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
                share_quant_resi=kw["share_quant_resi"], patch_nums=kw["v_patch_nums"], dropout=kw["dropout"],
                beta=kw["beta"], quant_resi=kw["quant_resi"]).eval()
    vae.load_state_dict({k: v.float() for k, v in load_file(VAR_FIXTURES / "vqvae_state.safetensors").items()})
    dd_kw = side("dd_state")["kwargs"]
    config = var_config_for_depth(dd_kw["depth"], num_classes=dd_kw["num_classes"], vocab_size=vae.V,
                                  latent_channels=vae.Cvae, patch_nums=dd_kw["patch_nums"])
    student = VARDD(config).eval()
    student.load_state_dict(load_file(VAR_FIXTURES / "dd_state.safetensors"), strict=True)
    student.attach_codebook(vae.quantize.embedding.weight)
    teacher_config = var_config_for_depth(dd_kw["depth"], num_classes=dd_kw["num_classes"], vocab_size=vae.V,
                                          latent_channels=vae.Cvae, patch_nums=dd_kw["patch_nums"])
    var = VAR(teacher_config).eval()
    var.load_state_dict(load_file(VAR_FIXTURES / "var_state.safetensors"), strict=True)
    return student, VarTeacher(vae, var, greedy())


def llamagen_fixture_models():
    need(LLAMAGEN_FIXTURES)
    side = lambda name: json.loads((LLAMAGEN_FIXTURES / f"{name}.json").read_text())  # noqa: E731
    io = load_file(LLAMAGEN_FIXTURES / "dd_io.safetensors")
    vq_meta = side("vq")
    vq_args = {k: v for k, v in vq_meta["model_args"].items() if k != "entropy_loss_ratio"}
    vq = VQModel(VQConfig(**vq_args, ch=vq_meta["ch"], num_res_blocks=vq_meta["num_res_blocks"])).eval()
    vq.load_state_dict(load_file(LLAMAGEN_FIXTURES / "vq.safetensors"), strict=True)
    gpt = LlamaGenGPT(GPTConfig(**side("gpt")["model_args"])).eval()
    gpt.load_state_dict(load_file(LLAMAGEN_FIXTURES / "gpt.safetensors"), strict=True)
    dd_args = {k: v for k, v in side("dd")["model_args"].items() if k not in ("codebook", "codebook_dim")}
    student = LlamaGenDD(GPTConfig(**dd_args), io["codebook"]).eval()
    student.load_state_dict(load_file(LLAMAGEN_FIXTURES / "dd.safetensors"), strict=True)
    combine = side("dd")["combine"]
    # the fixture's teacher-involved run used a greedy teacher (top_k=1): its draws do not depend on the RNG
    teacher = LlamaGenTeacher(vq, gpt, greedy(combine["cfg_scale"], cfg_interval=combine["cfg_interval"]))
    return student, teacher, io, side("dd")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("name", ["fewstep_0", "fewstep_0_2"])
def test_var_fewstep_matches_official(name):
    student, teacher = var_fixture_models()
    io = load_file(VAR_FIXTURES / "dd_io.safetensors")
    config = json.loads((VAR_FIXTURES / "config.json").read_text())
    call = next(c for c in config["calls"]["dd_io"] if c["name"] == name)
    label, noise = (io[k] for k in call["inputs"])
    t_list = [int(k.split(".step_t")[1].split(".")[0]) for k in call["outputs"] if ".step_t" in k]
    split = config["dd_sampling"]["loss_split_t"]
    x = sampling.dd_sample(sampling.student_ops(student), label, noise, t_list, split)
    close(x, io[f"{name}.step_t{t_list[-1]}.out"])
    close((teacher.decode_embeddings(x) + 1) / 2, io[f"{name}.out.img"], rtol=0)


@pytest.mark.parametrize("case", ["1step", "2step"])
def test_llamagen_fewstep_matches_official(case):
    student, teacher, io, meta = llamagen_fixture_models()
    t_list = next(c["t_list"] for c in meta["fewstep"] if c["name"] == case)
    x = sampling.dd_sample(sampling.student_ops(student), io["sample_cond"], io["sample_noise"], t_list,
                           meta["split_t"])
    close(x, io[f"fewstep_{case}_x"])
    # the official scripts decode without clamping; the seam returns images in [-1, 1]
    close(teacher.decode_embeddings(x), io[f"fewstep_{case}_image"].clamp(-1, 1), rtol=0)


def test_llamagen_teacher_involved_matches_official():
    student, teacher, io, meta = llamagen_fixture_models()
    combine = meta["combine"]
    x = sampling.teacher_involved_sample(sampling.student_ops(student), teacher, io["sample_cond"],
                                         io["sample_noise"], combine["t_list"], combine["teacher_start_t"],
                                         meta["split_t"])
    close(x, io["combine_x"])
    close(teacher.decode_embeddings(x), io["combine_image"].clamp(-1, 1), rtol=0)


# ---------------------------------------------------------------------------------------------- presets
def test_table2_presets_and_step_counts():
    var = sampling.methods_for("var-d16", [0, 5], 5)
    assert {name: (m.teacher_start, m.split, m.network_steps) for name, m in var.items()} == {
        "dd-1step": (None, 5, 1), "dd-2step": (None, 5, 2), "pre-trained-5-6": (4, 5, 3),
        "pre-trained-4-6": (3, 8, 4), "pre-trained-1-6": (0, 9, 6)}
    llama = sampling.methods_for("llamagen-l", [0, 80], 130)
    assert {name: (m.teacher_start, m.split, m.network_steps) for name, m in llama.items()} == {
        "dd-1step": (None, 130, 1), "dd-2step": (None, 130, 2), "pre-trained-61-81": (60, 180, 22),
        "pre-trained-41-81": (40, 180, 42), "pre-trained-1-81": (0, 220, 81)}
    toy = sampling.methods_for("toy-var", [0, 3], 3)
    assert set(toy) == {"dd-1step", "dd-2step", "pre-trained-1-4"}
    with pytest.raises(ValueError, match="teacher_start"):
        sampling.Method("bad", (0, 5), 5, teacher_start=5)


# ---------------------------------------------------------------------------------------------- determinism
def tiny_var():
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4)).eval()
    config = var_config_for_depth(1, embed_dim=64, num_heads=2, num_classes=4, vocab_size=32, latent_channels=8,
                                  patch_nums=(1, 2, 4), drop_path_rate=0.0)
    teacher = VAR(config).eval()
    teacher.init_weights()
    student = VARDD(config).eval()
    student.init_weights()
    student.attach_codebook(vae.quantize.embedding.weight)
    student.init_from_teacher(teacher)
    sampling_args = TeacherSampling(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
    return student, VarTeacher(vae, teacher, sampling_args)


def tiny_llamagen():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 1), decoder_ch_mult=(1, 1),
                          z_channels=32, ch=32, num_res_blocks=1)).eval()
    config = GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=32, block_size=16, num_classes=4)
    teacher = LlamaGenGPT(config).eval()
    student = LlamaGenDD(student_config(config), vq.codebook_l2()).eval()
    student.init_from_teacher(teacher)
    sampling_args = TeacherSampling(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
    return student, LlamaGenTeacher(vq, teacher, sampling_args)


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_sampling_is_seeded_and_batch_size_independent(family):
    student, teacher = tiny_var() if family == "var" else tiny_llamagen()
    ops = sampling.student_ops(student)
    methods = sampling.methods_for(f"toy-{family}", [0, 2], 2)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    def run(method, seed, batch_size):
        return torch.cat([x for _, x in sampling.sample_batches(ops, method, labels, seed, batch_size, teacher)])

    for method in methods.values():
        a, b = run(method, 7, 4), run(method, 7, 4)
        assert a.shape == (6, 3, *a.shape[-2:]) and torch.isfinite(a).all()
        assert torch.equal(a, b), f"{method.name}: not deterministic"
        assert not torch.equal(a, run(method, 8, 4)), f"{method.name}: the seed has no effect"
    # pure DD depends on the noise only: the same sample index gives the same image at any batch size
    one = methods["dd-1step"]
    assert torch.allclose(run(one, 7, 4), run(one, 7, 6), atol=1e-5)
    # the second step re-inserts the ORIGINAL noise: with a sequence that already holds the first step's
    # output beyond t2, the result must not depend on it
    noise = sampling.sample_noise(ops, range(2), seed=1)
    x1 = sampling.dd_sample(ops, labels[:2], noise, [0], 2)
    tampered = x1.clone()
    tampered[:, ops.prefix_len(2):] += 5.0
    assert torch.equal(sampling.dd_steps(ops, labels[:2], x1, noise, [2], 2),
                       sampling.dd_steps(ops, labels[:2], tampered, noise, [2], 2))
