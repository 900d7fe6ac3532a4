"""Tiny random teachers (behind the real Teacher seam) and their flow-map pairs, for the distill and sampling tests.

Everything is seeded: the same call gives the same teacher and the same pairs in any process.
"""
import torch

from dd.config import Distill, TeacherSampling
from dd.models.llamagen import GPTConfig, LlamaGenGPT
from dd.models.llamagen_vq import VQConfig, VQModel
from dd.models.var import VAR, var_config_for_depth
from dd.models.var_vqvae import VQVAE
from dd.pairs import TensorPairs
from dd.teacher import LlamaGenTeacher, VarTeacher

NUM_CLASSES = 4


def tiny_teacher(family: str, drop_path_rate: float = 0.0, seed: int = 0, device: str = "cpu"):
    """A random teacher: VAR (2 blocks, scales 1, 2, 4: 21 tokens; drop-path reaches the second block) or
    LlamaGen (4x4 = 16 tokens), vocabulary 32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "var":
            vae = VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
            config = var_config_for_depth(2, embed_dim=64, num_heads=2, num_classes=NUM_CLASSES, vocab_size=32,
                                          latent_channels=8, patch_nums=(1, 2, 4), drop_path_rate=drop_path_rate)
            model = VAR(config)
            model.init_weights(init_head=1.0)  # peaked, class-dependent token distributions
            sampling = TeacherSampling(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
            return VarTeacher(vae.to(device), model.to(device), sampling)
        vq = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 1), decoder_ch_mult=(1, 1),
                              z_channels=32, ch=32, num_res_blocks=1))
        model = LlamaGenGPT(GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=32, block_size=16,
                                      num_classes=NUM_CLASSES))
        torch.nn.init.normal_(model.output.weight, std=0.3)  # the official init zeroes it: uniform p
        sampling = TeacherSampling(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0, cfg_interval=-1)
        return LlamaGenTeacher(vq.to(device), model.to(device), sampling)


def tiny_pairs(teacher, count: int = 64, seed: int = 0) -> TensorPairs:
    """`count` pairs of the teacher's flow map: uniform labels, Gaussian noise, the trajectory endpoints."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, teacher.num_classes, (count,), generator=generator)
    noise = torch.randn(count, teacher.num_tokens, teacher.token_dim, generator=generator)
    return TensorPairs(labels, noise, teacher.flow_tokens(noise, labels).cpu())


def tiny_distill(**overrides) -> Distill:
    fields = dict(t_list=[0, 2], split=2, batch_size=8, lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], grad_clip=1.0,
                  ema_decay=0.99, max_steps=10, warmup_steps=2, checkpoint_every=4, log_every=1,
                  loss_weights={"ce": 1.0, "perceptual": 0.0, "mse": 0.5}, perceptual="feature", seed=0)
    fields.update(overrides)
    return Distill(**fields)
