"""VAR's multi-scale residual VQVAE ("VQVAE" + "VectorQuantizer2" of FoundationVision/VAR).

State_dict keys are the official ones, so `vae_ch160v4096z32.pth` loads with strict=True into
`VQVAE(vocab_size=4096, z_channels=32, ch=160, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))`.
Unlike the official class, `ch_mult` / `num_res_blocks` / `in_channels` are arguments, so the toy setting can
train a small one (e.g. ch=32, ch_mult=(1, 2, 2) on 32x32 images: latent 8x8).

Token layout used everywhere: scale k holds pn_k^2 tokens, row-major over (h, w); a "token list" is a
list of int64 [B, pn_k^2] tensors, coarse to fine; a continuous sequence is [B, L, Cvae] with the scales
concatenated (L = sum pn_k^2). Images live in [-1, 1] unless a method says otherwise.
Facts: ../shared/reference/var-architecture.md §2.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dd.models.layout import decoder_layout


# ----------------------------------------------------------------------------------- conv backbone
def group_norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"VQVAE: GroupNorm(32) needs channel counts divisible by 32, got {channels}; "
                         f"pick ch (and ch * ch_mult) as multiples of 32")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        # Without autograd (sampling), activations and the residual sum work in place: the decoder is most of a
        # one-step image on the CPU, and every saved full-resolution allocation counts. Same values either way.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        return h.add_(self.nin_shortcut(x)) if inplace else self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (LDM style, one fused 1x1 qkv conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 1, 3, C, H * W).transpose(3, 4).unbind(2)  # each [B, 1, HW, C]
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, 1, HW, C]
        return x + self.proj_out(attended.transpose(2, 3).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # asymmetric pad (right/bottom), as the official


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
    """conv_in -> per level: num_res_blocks ResnetBlocks (+AttnBlock after each at the last level), downsample
    between levels -> mid (block, attn, block) -> norm, SiLU, conv_out to z_channels."""

    def __init__(self, ch, ch_mult, num_res_blocks, dropout, in_channels, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        last = len(ch_mult) - 1
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if level == last:
                    stage.attn.append(AttnBlock(block_in))
            if level != last:
                stage.downsample = Downsample2x(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> levels from coarse to fine (stored as up.{level}), num_res_blocks + 1 ResnetBlocks each
    (+AttnBlock after each at the coarsest level), upsample between levels -> norm, SiLU, conv_out."""

    def __init__(self, ch, ch_mult, num_res_blocks, dropout, in_channels, z_channels):
        super().__init__()
        last = len(ch_mult) - 1
        block_in = ch * ch_mult[last]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
                if level == last:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample2x(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)   # up[0] is the finest level, as in the checkpoint
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------- quantiser
def phi_index_per_scale(num_scales: int, num_phi: int) -> list[int]:
    """Which of the `num_phi` shared Phi convs serves each scale: the official tick rule.

    Scale k sits at k/(S-1) on [0, 1]; it takes the Phi whose tick is nearest, in float64 numpy. Several scales are
    exact ties in real arithmetic (S=10: k=2 and k=7), so the rounding of this very computation decides: keep it.
    """
    if num_scales < 2:
        raise ValueError(f"VQVAE: patch_nums needs at least 2 scales (the Phi rule divides by S-1), got {num_scales}")
    K = num_phi
    margin = 1 / (3 * K) if K == 4 else 1 / (2 * K)
    ticks = np.linspace(margin, 1 - margin, K)
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the learned refinement added to every upsampled residual."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h):
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PartiallySharedPhi(nn.Module):
    """K Phi convs (`qresi_ls.{j}`) shared among the S scales by `phi_index_per_scale`."""

    def __init__(self, channels: int, resi_ratio: float, num_phi: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, resi_ratio) for _ in range(num_phi)])
        self.index_of_scale = phi_index_per_scale(num_scales, num_phi)

    def __getitem__(self, scale_index: int) -> Phi:
        return self.qresi_ls[self.index_of_scale[scale_index]]


def downsample_area(x, size: int):
    """Adaptive average pooling (F.interpolate 'area'); overlapping windows when the ratio is not an integer."""
    return F.interpolate(x, size=(size, size), mode="area")


def upsample_bicubic(x, size: int):
    return F.interpolate(x, size=(size, size), mode="bicubic")


class VectorQuantizer2(nn.Module):
    """Residual quantisation over scales: each scale quantises the area-downsampled residual of the previous ones,
    and the bicubic-upsampled, Phi-refined code map is added to f_hat (official `VectorQuantizer2`)."""

    def __init__(self, vocab_size, Cvae, beta, patch_nums, quant_resi, share_quant_resi):
        super().__init__()
        if share_quant_resi < 2:
            raise ValueError(f"VQVAE: only the partially shared Phi layout of the released checkpoints "
                             f"(share_quant_resi >= 2, default 4) is implemented, "
                             f"got share_quant_resi={share_quant_resi}")
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.patch_nums = tuple(patch_nums)
        self.quant_resi = PartiallySharedPhi(Cvae, quant_resi, share_quant_resi, len(self.patch_nums))
        # per-scale code-usage statistics, kept in training (EMA); persistent because the checkpoint has it
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @property
    def pn_last(self) -> int:
        return self.patch_nums[-1]

    def nearest_code(self, z_NC):
        """argmin_v ||z - e_v||^2 in the official expansion |z|^2 + |e|^2 - 2 z.e (same rounding, same ties)."""
        codebook = self.embedding.weight.detach()
        distance = z_NC.square().sum(1, keepdim=True) + codebook.square().sum(1)
        distance = distance.addmm(z_NC, codebook.T, alpha=-2, beta=1)
        return distance.argmin(dim=1)

    def scale_contribution(self, k: int, h_BChw):
        """phi_k(bicubic(h_k, pn_last)); the last scale is already full size and is not resampled."""
        if k != len(self.patch_nums) - 1:
            h_BChw = upsample_bicubic(h_BChw, self.pn_last)
        return self.quant_resi[k](h_BChw)

    def _residual_quantise(self, f):
        """Yields (k, idx_N [B*pn*pn], contribution h_k [B, C, H, W]) scale by scale, updating the residual."""
        B, C, H, W = f.shape
        if H != self.pn_last or W != self.pn_last:
            raise ValueError(f"VQVAE: latent is {H}x{W} but patch_nums ends at {self.pn_last}; the image side must be "
                             f"pn_last * 2^(len(ch_mult) - 1)")
        rest = f.detach().clone()
        for k, pn in enumerate(self.patch_nums):
            z = downsample_area(rest, pn) if k != len(self.patch_nums) - 1 else rest
            idx_N = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.scale_contribution(k, self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2))
            rest = rest - h.detach()
            yield k, idx_N, h

    def f_to_idx_list(self, f):
        """Encoder latent [B, C, pn_last, pn_last] -> list of int64 [B, pn_k^2]."""
        return [idx_N.view(f.shape[0], -1) for _, idx_N, _ in self._residual_quantise(f)]

    def f_to_fhat_list(self, f):
        """Encoder latent -> the cumulative f_hat after each scale (list of [B, C, pn_last, pn_last])."""
        f_hat, out = torch.zeros_like(f), []
        for _, _, h in self._residual_quantise(f):
            f_hat = f_hat + h
            out.append(f_hat)
        return out

    def forward(self, f):
        """Training pass: (straight-through f_hat, VQ loss). The loss is VAR's: mean over scales of
        beta * ||sg(f_hat_k) - f||^2 (commitment, to the encoder) + ||f_hat_k - sg(f)||^2 (codebook and Phi),
        f_hat_k being the cumulative reconstruction after scale k."""
        f_hat = torch.zeros_like(f)
        vq_loss = f.new_zeros(())
        for k, idx_N, h in self._residual_quantise(f):
            f_hat = f_hat + h
            vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
            if self.training:
                self._record_hits(k, idx_N)
        vq_loss = vq_loss / len(self.patch_nums)
        return f_hat.detach() - f.detach() + f, vq_loss   # straight-through: decoder gradients flow into f

    @torch.no_grad()
    def _record_hits(self, k: int, idx_N):
        hits = idx_N.bincount(minlength=self.vocab_size).float()
        if self.record_hit == 0:
            self.ema_vocab_hit_SV[k].copy_(hits)
        else:
            decay = 0.9 if self.record_hit < 100 else 0.99
            self.ema_vocab_hit_SV[k].mul_(decay).add_(hits, alpha=1 - decay)
        if k == len(self.patch_nums) - 1:
            self.record_hit += 1

    def idx_to_h(self, k: int, idx_Bl):
        """Tokens of scale k [B, pn^2] -> code map [B, Cvae, pn, pn]."""
        pn = self.patch_nums[k]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)

    def embed_to_fhat(self, h_list, all_to_max_scale=True, last_one=False):
        """Code maps [B, Cvae, pn_k, pn_k] per scale -> f_hat (the last one) or the list of partial sums.

        all_to_max_scale=False is the official experimental path (upsample the running f_hat scale by scale, result
        at pn_last); VAR never uses it, it is kept because the fixtures record it."""
        B = h_list[0].shape[0]
        partial = []
        if all_to_max_scale:
            f_hat = h_list[0].new_zeros(B, self.Cvae, self.pn_last, self.pn_last)
            for k, h in enumerate(h_list):
                f_hat = f_hat + self.scale_contribution(k, h)
                partial.append(f_hat)
        else:
            f_hat = h_list[0].new_zeros(B, self.Cvae, self.patch_nums[0], self.patch_nums[0])
            for k, (pn, h) in enumerate(zip(self.patch_nums, h_list)):
                f_hat = upsample_bicubic(f_hat, pn) + self.quant_resi[k](h)
                partial.append(f_hat)
        return partial[-1] if last_one else partial

    def idx_list_to_var_input(self, idx_list):
        """Teacher-forcing input of VAR: after adding scale k (k < S-1) emit area(f_hat, pn_{k+1}) flattened ->
        [B, L - pn_0^2, Cvae]."""
        B = idx_list[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, self.pn_last, self.pn_last)
        next_scales = []
        for k in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_contribution(k, self.idx_to_h(k, idx_list[k]))
            nxt = downsample_area(f_hat, self.patch_nums[k + 1])
            next_scales.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def next_autoregressive_input(self, k: int, f_hat, h_BChw):
        """One inference step: f_hat + phi_k(up(h_k)); returns (new f_hat, input map of the next scale
        area(f_hat, pn_{k+1}) — f_hat itself after the last scale). Out of place (the official mutates f_hat)."""
        f_hat = f_hat + self.scale_contribution(k, h_BChw)
        if k == len(self.patch_nums) - 1:
            return f_hat, f_hat
        return f_hat, downsample_area(f_hat, self.patch_nums[k + 1])


# ----------------------------------------------------------------------------------- the VQVAE
class VQVAE(nn.Module):
    def __init__(self, vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4,
                 patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 dropout=0.0, beta=0.25, quant_resi=0.5, in_channels=3):
        super().__init__()
        self.V, self.Cvae = vocab_size, z_channels
        self.patch_nums = tuple(patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        backbone = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, dropout=dropout,
                        in_channels=in_channels, z_channels=z_channels)
        self.encoder = Encoder(**backbone)
        self.decoder = Decoder(**backbone)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, beta, self.patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    @property
    def scale_lengths(self) -> list[int]:
        return [pn * pn for pn in self.patch_nums]

    # --- encoding
    def img_to_f(self, img):
        if img.shape[-1] != self.image_size or img.shape[-2] != self.image_size:
            raise ValueError(f"VQVAE: expects {self.image_size}x{self.image_size} images (patch_nums[-1] * "
                             f"{self.downsample}), got {tuple(img.shape[-2:])}")
        return self.quant_conv(self.encoder(img))

    def img_to_idx_list(self, img):
        """Images [B, 3, H, W] in [-1, 1] -> list of int64 [B, pn_k^2] (official `img_to_idxBl`)."""
        return self.quantize.f_to_idx_list(self.img_to_f(img))

    def img_to_reconstructed_img(self, img, last_one=True):
        fhat_list = self.quantize.f_to_fhat_list(self.img_to_f(img))
        if last_one:
            return self.fhat_to_img(fhat_list[-1])
        return [self.fhat_to_img(f_hat) for f_hat in fhat_list]

    # --- decoding
    def fhat_to_img(self, f_hat):
        """f_hat [B, Cvae, pn_last, pn_last] -> images clamped to [-1, 1] (contiguous NCHW)."""
        return self.decoder(self.post_quant_conv(decoder_layout(f_hat))).clamp(-1, 1).contiguous()

    def embed_to_fhat(self, h_list, all_to_max_scale=True, last_one=False):
        return self.quantize.embed_to_fhat(h_list, all_to_max_scale, last_one)

    def idx_list_to_img(self, idx_list, last_one=True, same_shape=True):
        """Token list -> images in [-1, 1]: the full reconstruction, or (last_one=False) one image per prefix of
        scales. same_shape=False selects the official experimental f_hat path (see `embed_to_fhat`)."""
        self._check_idx_list(idx_list)
        h_list = [self.quantize.idx_to_h(k, idx) for k, idx in enumerate(idx_list)]
        fhat = self.embed_to_fhat(h_list, all_to_max_scale=same_shape, last_one=last_one)
        return self.fhat_to_img(fhat) if last_one else [self.fhat_to_img(f) for f in fhat]

    def idx_list_to_var_input(self, idx_list):
        self._check_idx_list(idx_list)
        return self.quantize.idx_list_to_var_input(idx_list)

    def next_autoregressive_input(self, k: int, f_hat, h_BChw):
        return self.quantize.next_autoregressive_input(k, f_hat, h_BChw)

    def split_scales(self, x_BLC):
        """[B, L, Cvae] -> per-scale maps [B, Cvae, pn_k, pn_k]."""
        if x_BLC.shape[1] != sum(self.scale_lengths) or x_BLC.shape[2] != self.Cvae:
            raise ValueError(f"VQVAE: token sequence must be [B, {sum(self.scale_lengths)}, {self.Cvae}], "
                             f"got {tuple(x_BLC.shape)}")
        chunks = x_BLC.split(self.scale_lengths, dim=1)
        return [c.transpose(1, 2).reshape(x_BLC.shape[0], self.Cvae, pn, pn) for c, pn in zip(chunks, self.patch_nums)]

    def tokens_to_fhat(self, x_BLC):
        f_hat = x_BLC.new_zeros(x_BLC.shape[0], self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        for k, h in enumerate(self.split_scales(x_BLC)):
            f_hat, _ = self.next_autoregressive_input(k, f_hat, h)
        return f_hat

    def tokens_to_img(self, x_BLC):
        """Continuous per-scale token vectors [B, L, Cvae] (codebook rows or a student's predictions) -> images
        in [0, 1], as DD decodes (official `transfer_BLCv_to_B3HW`)."""
        return (self.fhat_to_img(self.tokens_to_fhat(x_BLC)) + 1) / 2

    def idx_list_to_tokens(self, idx_list):
        """Token list -> codebook vectors [B, L, Cvae] (DD's clean data layout)."""
        self._check_idx_list(idx_list)
        return self.quantize.embedding(torch.cat(list(idx_list), dim=1))

    # --- training
    def forward(self, img):
        """Training forward: (reconstruction [B, 3, H, W] unclamped, VQ loss); gradients reach the encoder through
        the straight-through estimator."""
        f_hat, vq_loss = self.quantize(self.img_to_f(img))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def train_loss(self, img):
        """Reconstruction MSE + multi-scale VQ loss; returns (loss, stats)."""
        rec, vq_loss = self(img)
        rec_loss = F.mse_loss(rec, img)
        return rec_loss + vq_loss, {"rec": rec_loss.detach(), "vq": vq_loss.detach()}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As the official: a checkpoint's `quantize.ema_vocab_hit_SV` made with another number of scales is
        replaced by ours (it is a training statistic, not a weight)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_idx_list(self, idx_list):
        lengths = [int(idx.shape[1]) for idx in idx_list]
        if lengths != self.scale_lengths[:len(lengths)] or len(lengths) == 0:
            raise ValueError(f"VQVAE: token list lengths {lengths} do not follow patch_nums {list(self.patch_nums)} "
                             f"(expected {self.scale_lengths})")
