"""LlamaGen VQ tokenizer (VQ-16 / VQ-8), key-for-key the official `VQModel` (vq_ds16_c2i.pt).

Conv encoder -> 1x1 `quant_conv` to a small code dimension (8) -> l2-normalised nearest-codebook
quantisation -> 1x1 `post_quant_conv` -> conv decoder. Facts: shared/reference/llamagen-architecture.md
section 8. The base width `ch` and `num_res_blocks` are config fields here (the official code hard-codes
them as Encoder/Decoder defaults, 128 and 2) so that small tokenizers can be trained.

Training: `forward` returns the reconstruction and the two VQ losses of the official training
(codebook loss + beta * commitment loss, straight-through gradients). The official entropy loss is
not implemented: its weight (entropy_loss_ratio) is 0.0 in every released config.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dd.models.layout import decoder_layout

USAGE_WINDOW = 65536  # the official `codebook_used` buffer: the most recent code indices (as floats)


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keeps the `quantize.codebook_used` buffer (in the checkpoints)
    encoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    commit_loss_beta: float = 0.25

    def __post_init__(self):
        self.encoder_ch_mult = tuple(self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(self.decoder_ch_mult)
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            widths = [self.ch * m for m in getattr(self, name)]
            if not widths or any(w % 32 for w in widths) or self.ch % 32:
                raise ValueError(f"VQConfig: every width ch * {name} (ch={self.ch}, {name}={getattr(self, name)})"
                                 " must be a positive multiple of 32 (GroupNorm with 32 groups)")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("VQConfig: encoder_ch_mult and decoder_ch_mult need the same number of levels "
                             "(the decoder must undo the encoder's downsampling)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


VQ_CONFIGS = {
    "VQ-16": VQConfig(),  # vq_ds16_c2i.pt, 16x downsampling
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),  # vq_ds8_c2i.pt
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        # Without autograd (sampling), activations and the residual sum work in place (same values, fewer
        # full-resolution allocations: the decoder is most of a one-step image on the CPU).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut) if inplace else shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (scale 1/sqrt(C)), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: one zero row/column right and bottom


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each followed by an AttnBlock if with_attn), then an optional
    resampler registered as `downsample` or `upsample` (the official key names)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool, resample, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if with_attn else 0))
        self.resample = resample
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, h):
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample == "down":
            h = self.downsample(h)
        elif self.resample == "up":
            h = self.upsample(h)
        return h


def middle(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f); attention only at the
    lowest resolution."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, n = config.ch, config.encoder_ch_mult, len(config.encoder_ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        widths_in = (1,) + mult
        self.conv_blocks = nn.ModuleList(
            Level(ch * widths_in[i], ch * mult[i], config.num_res_blocks, with_attn=i == n - 1,
                  resample="down" if i < n - 1 else None, dropout=config.dropout_p)
            for i in range(n))
        self.mid = middle(ch * mult[-1], config.dropout_p)
        self.norm_out = group_norm(ch * mult[-1])
        self.conv_out = nn.Conv2d(ch * mult[-1], config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> image (B, 3, h*f, w*f); levels in reverse width order, one more
    ResnetBlock per level than the encoder, attention only at the first (lowest-resolution) level."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, n = config.ch, len(config.decoder_ch_mult)
        widths = [ch * m for m in reversed(config.decoder_ch_mult)]
        self.conv_in = nn.Conv2d(config.z_channels, widths[0], 3, padding=1)
        self.mid = middle(widths[0], config.dropout_p)
        self.conv_blocks = nn.ModuleList(
            Level(widths[max(i - 1, 0)], widths[i], config.num_res_blocks + 1, with_attn=i == 0,
                  resample="up" if i < n - 1 else None, dropout=config.dropout_p)
            for i in range(n))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.beta = config.commit_loss_beta
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))
        self.reset_codebook()

    def reset_codebook(self):
        """Official init: U(-1/V, 1/V), then rows l2-normalised (when codebook_l2_norm)."""
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.embedding.num_embeddings, 1.0 / self.embedding.num_embeddings)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        """The code vectors actually used: the l2-normalised rows (trained weights are not unit norm)."""
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def forward(self, z: torch.Tensor):
        """z (B, C, h, w) -> (quant (B, C, h, w) with straight-through gradients, indices (B*h*w,) in
        raster order per image, codebook loss, beta * commitment loss)."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        flat = z.reshape(-1, z.shape[-1])
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * flat @ codebook.t())
        indices = distances.argmin(dim=1)
        z_q = codebook[indices].view(z.shape)
        if self.training and hasattr(self, "codebook_used"):
            with torch.no_grad():
                recent = torch.cat([self.codebook_used, indices.to(self.codebook_used.dtype)])
                self.codebook_used.copy_(recent[-USAGE_WINDOW:])
        codebook_loss = (z_q - z.detach()).pow(2).mean()
        commit_loss = self.beta * (z_q.detach() - z).pow(2).mean()
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), indices, codebook_loss, commit_loss


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, img: torch.Tensor):
        """img (B, 3, H, W) in [-1, 1] -> (quant (B, C, H/f, W/f), indices (B*h*w,) raster order per image)."""
        quant, indices, _, _ = self.quantize(self.quant_conv(self.encoder(img)))
        return quant, indices

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, C, h, w) -> image (B, 3, h*f, w*f) contiguous NCHW, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(decoder_layout(quant))).contiguous()

    def decode_code(self, indices: torch.Tensor, shape) -> torch.Tensor:
        """Indices with B*h*w entries (any layout, raster order per image) and shape (B, C, h, w) -> image."""
        B, C, h, w = shape
        if indices.numel() != B * h * w or C != self.config.codebook_embed_dim:
            raise ValueError(f"decode_code: {indices.numel()} indices do not fit shape {tuple(shape)} "
                             f"(need B*h*w indices and C = codebook_embed_dim = {self.config.codebook_embed_dim})")
        codes = self.quantize.codebook()[indices.reshape(-1).long()]
        return self.decode(codes.view(B, h, w, C).permute(0, 3, 1, 2).contiguous())

    def codebook_l2(self) -> torch.Tensor:
        """The l2-normalised codebook (V, C): the vectors DD's flow and student work with."""
        return F.normalize(self.quantize.embedding.weight, dim=-1)

    def codebook_usage(self) -> float:
        """Fraction of the codebook seen among the last 65536 training indices (the official metric;
        the buffer starts as zeros, so index 0 counts as used until the window has filled)."""
        if not hasattr(self.quantize, "codebook_used"):
            raise ValueError("codebook_usage: this VQ was built with codebook_show_usage=False")
        return torch.unique(self.quantize.codebook_used).numel() / self.config.codebook_size

    def forward(self, img: torch.Tensor):
        """Training pass: (reconstruction, codebook loss, beta * commitment loss).

        The official total adds these two to the reconstruction/perceptual/GAN losses; gradients reach
        the encoder through the straight-through estimator.
        """
        quant, _, codebook_loss, commit_loss = self.quantize(self.quant_conv(self.encoder(img)))
        return self.decode(quant), codebook_loss, commit_loss
