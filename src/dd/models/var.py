"""VAR: visual autoregressive modelling by next-scale prediction (FoundationVision/VAR), re-implemented.

State_dict keys, shapes and persistent buffers are the official ones, so `var_d{16,20,24,30}.pth` load with
strict=True into `VAR(var_config_for_depth(depth))`. The VQVAE is not part of the model: sampling takes it as an
argument (the official holds it through a tuple proxy, also outside the state_dict).

Differences from the official, on purpose:
* class dropout (label -> null class with prob. cond_drop_rate) happens in train mode only; the official also
  draws it in eval mode, which makes its eval forward random unless cond_drop_rate is zeroed first;
* sampling exposes the distribution it draws from (`sampling_probs`, the `draw` hook) so the flow-matching map of
  DD can replace the multinomial draw; with the default draw the RNG calls are the official ones, in order;
* no flash-attn / xformers / fused kernels (scaled_dot_product_attention computes the same math), no progressive
  training machinery (prog_si), no dropout layers (all released models use 0).
Facts: ../shared/reference/var-architecture.md §3.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024          # C (= condition width D)
    num_heads: int = 16
    num_classes: int = 1000        # the class table has one more row: the null (unconditional) class
    vocab_size: int = 4096         # V of the VQVAE
    latent_channels: int = 32      # Cvae of the VQVAE
    patch_nums: tuple = IMAGENET_PATCH_NUMS
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1 * 16 / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True

    def __post_init__(self):
        self.patch_nums = tuple(int(pn) for pn in self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VARConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.patch_nums) < 2:
            raise ValueError(f"VARConfig: patch_nums needs at least 2 scales, got {self.patch_nums}")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


def var_config_for_depth(depth: int, **overrides) -> VARConfig:
    """The official builder rule (build_vae_var): width 64 * depth, heads = depth (head dim 64),
    drop_path_rate 0.1 * depth / 24. `overrides` sets any other VARConfig field (num_classes, patch_nums, ...)."""
    fields = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)
    fields.update(overrides)
    return VARConfig(**fields)


# ----------------------------------------------------------------------------------- helpers
def trunc_normal_(tensor, std: float):
    """PyTorch's truncated normal with its default bounds a=-2, b=2 in absolute units, as the official uses."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std)


def scale_index_per_position(patch_nums) -> torch.Tensor:
    """[L] int64: the scale (level) each position belongs to."""
    return torch.cat([torch.full((pn * pn,), k, dtype=torch.long) for k, pn in enumerate(patch_nums)])


def block_causal_bias(levels: torch.Tensor) -> torch.Tensor:
    """[1, 1, L, L] additive mask: 0 where level(query) >= level(key), -inf elsewhere (full attention inside a scale
    and to all earlier scales)."""
    allowed = levels[:, None] >= levels[None, :]
    return torch.where(allowed, 0.0, -math.inf).reshape(1, 1, len(levels), len(levels))


def check_labels(label_B: torch.Tensor, num_classes: int, where: str):
    if label_B.ndim != 1 or label_B.dtype != torch.long:
        raise ValueError(f"{where}: label_B must be an int64 tensor [B], got {label_B.dtype} {list(label_B.shape)}")
    if label_B.numel() and (int(label_B.min()) < 0 or int(label_B.max()) > num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}] ({num_classes} = the null class)")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's top-k then top-p masking (official `sample_with_top_k_top_p_`, out of place): removed entries -> -inf.

    top-k: entries strictly below the k-th largest value go (ties with it are kept); k is capped at V.
    top-p: sort ascending, softmax, cumulative sum; entries whose cumulative mass is <= 1 - top_p go, never the
    largest. 0 disables either filter."""
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1, largest=True, sorted=False).values
        logits = logits.masked_fill(logits < kth_largest.amin(dim=-1, keepdim=True), -math.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits = logits.masked_fill(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -math.inf)
    return logits


def sampling_probs(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """The distribution VAR draws a token from: softmax of the (temperature-scaled) top-k/top-p filtered logits.
    VAR itself has no temperature (1.0, exact no-op)."""
    return filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)


def gumbel_softmax(logits, tau: float, generator: Optional[torch.Generator]):
    """Soft gumbel-softmax drawing its noise from `generator` (official `gumbel_softmax_with_rng`, hard=False)."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


# ----------------------------------------------------------------------------------- blocks
class DropPath(nn.Module):
    """Stochastic depth on a residual branch (timm style: per sample, rescaled by 1/keep), training only."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Multi-head attention with VAR's details: k has no bias (zero_k_bias buffer), optional l2-normalised q/k with
    a learned per-head temperature, and a KV cache used by scale-by-scale sampling."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)   # the official value, not 1/sqrt(d)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.caching = False
        self.cached_k = self.cached_v = None

    def kv_caching(self, enable: bool):
        """Turn the cache on (empty) or off (freed)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)   # each [B, H, L, head_dim]
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    """Transformer block modulated by the class condition (AdaLN): 6 vectors gamma1, gamma2, scale1, scale2, shift1,
    shift2 (that order) from either a per-block Linear (ada_lin) or a shared one plus a per-block offset (ada_gss)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_eps: float,
                 shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.C = embed_dim
        self.drop_path = DropPath(drop_path)
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x, cond_BD, attn_bias, n_d_emb=None):
        """x [B, L, C]; cond_BD: class embedding [B, D] (per-block AdaLN) or the shared [B, 1, 6, C] tensor;
        n_d_emb: optional [B, L, C] added between the attention and FFN residuals (the DD student's
        noise/data embedding)."""
        if self.shared_aln:
            mods = (self.ada_gss + cond_BD).unbind(2)
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_bias) * gamma1)
        if n_d_emb is not None:
            x = x + n_d_emb
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    """Final LayerNorm modulated by the raw class embedding: (scale, shift) from SiLU -> Linear(D, 2C)."""

    def __init__(self, embed_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class SharedAdaLin(nn.Linear):
    """The shared AdaLN Linear(D, 6C), output as [B, 1, 6, C]."""

    def forward(self, cond_BD):
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


def make_blocks(config: VARConfig) -> nn.ModuleList:
    rates = [r.item() for r in torch.linspace(0, config.drop_path_rate, config.depth, device="cpu")]
    return nn.ModuleList([
        AdaLNSelfAttn(config.embed_dim, config.num_heads, config.mlp_ratio, rates[i], config.norm_eps,
                      config.shared_aln, config.attn_l2_norm)
        for i in range(config.depth)])


def make_shared_ada_lin(config: VARConfig) -> nn.Module:
    if config.shared_aln:
        return nn.Sequential(nn.SiLU(), SharedAdaLin(config.embed_dim, 6 * config.embed_dim))
    return nn.Identity()


def per_scale_pos_embedding(patch_nums, C: int, std: float) -> torch.Tensor:
    """[1, L, C], each scale's block drawn separately (the official draw order)."""
    parts = [trunc_normal_(torch.empty(1, pn * pn, C), std) for pn in patch_nums]
    return torch.cat(parts, dim=1)


def init_var_weights(model: nn.Module, init_adaln: float, init_adaln_gamma: float, init_head: float,
                     init_std: float):
    """The official VAR.init_weights, for VAR and its DD student (anything with blocks/head_nm/head and C).

    Every Linear: weight ~ truncnormal(0, init_std), bias 0; every Embedding: truncnormal(0, init_std); then the head
    is scaled by init_head, head_nm's AdaLN by init_adaln, each block's output projections by 1/sqrt(2 depth), its
    AdaLN scale/shift rows by init_adaln and gamma rows by init_adaln_gamma. init_std < 0 means sqrt(1/(3C))."""
    C = model.C
    if init_std < 0:
        init_std = (1 / C / 3) ** 0.5
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight.data, init_std)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.Embedding):
            trunc_normal_(m.weight.data, init_std)
    if init_head >= 0:
        model.head.weight.data.mul_(init_head)
        model.head.bias.data.zero_()
    model.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
    model.head_nm.ada_lin[-1].bias.data.zero_()
    depth = len(model.blocks)
    for block in model.blocks:
        block.attn.proj.weight.data.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
        if block.shared_aln:
            block.ada_gss.data[:, :, 2:].mul_(init_adaln)
            block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
        else:
            block.ada_lin[-1].weight.data[2 * C:].mul_(init_adaln)
            block.ada_lin[-1].weight.data[:2 * C].mul_(init_adaln_gamma)
            block.ada_lin[-1].bias.data.zero_()


# ----------------------------------------------------------------------------------- VAR
DrawFn = Callable[[torch.Tensor, int], torch.Tensor]


class VAR(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        self.C = C = config.embed_dim
        self.V, self.Cvae, self.num_classes = config.vocab_size, config.latent_channels, config.num_classes
        self.patch_nums = config.patch_nums
        self.num_scales = len(self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.L = config.seq_len
        self.begin_ends = []   # [begin, end) of each scale in the sequence
        for pn in self.patch_nums:
            begin = self.begin_ends[-1][1] if self.begin_ends else 0
            self.begin_ends.append((begin, begin + pn * pn))
        std = math.sqrt(1 / C / 3)

        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)
        trunc_normal_(self.class_emb.weight.data, std)
        self.pos_start = nn.Parameter(trunc_normal_(torch.empty(1, self.first_l, C), std))
        self.pos_1LC = nn.Parameter(per_scale_pos_embedding(self.patch_nums, C, std))
        self.lvl_embed = nn.Embedding(self.num_scales, C)
        trunc_normal_(self.lvl_embed.weight.data, std)
        self.shared_ada_lin = make_shared_ada_lin(config)
        self.blocks = make_blocks(config)
        levels = scale_index_per_position(self.patch_nums)
        self.register_buffer("lvl_1L", levels[None].contiguous())
        self.register_buffer("attn_bias_for_masking", block_causal_bias(levels).contiguous())
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = nn.Linear(C, self.V)

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1):
        """Official initialisation (builder defaults); see `init_var_weights`."""
        init_var_weights(self, init_adaln, init_adaln_gamma, init_head, init_std)

    # --- teacher-forced
    def forward(self, label_B, x_BLCv_wo_first_l):
        """Teacher-forced logits [B, L, V]: position p predicts token p; the input is the area-downsampled running
        f_hat of scales 1.. (`VQVAE.idx_list_to_var_input`) [B, L - first_l, Cvae]. In train mode labels are replaced
        by the null class with probability cond_drop_rate (classifier-free guidance training)."""
        check_labels(label_B, self.num_classes, "VAR.forward")
        B = label_B.shape[0]
        expected = (B, self.L - self.first_l, self.Cvae)
        if tuple(x_BLCv_wo_first_l.shape) != expected:
            raise ValueError(f"VAR.forward: x_BLCv_wo_first_l must be {list(expected)}, got "
                             f"{list(x_BLCv_wo_first_l.shape)}")
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.config.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        sos = cond_BD[:, None] + self.pos_start
        x = torch.cat((sos.expand(B, self.first_l, -1), self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        cond = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x = block(x, cond, self.attn_bias_for_masking)
        return self.head(self.head_nm(x, cond_BD))

    def train_loss(self, label_B, x_BLCv_wo_first_l, target_idx_BL, label_smoothing: float = 0.0):
        """Cross-entropy over all L positions, each weighted 1/L, averaged over the batch (the official recipe).
        target_idx_BL = torch.cat(idx_list, dim=1)."""
        logits = self(label_B, x_BLCv_wo_first_l)
        return F.cross_entropy(logits.reshape(-1, self.V), target_idx_BL.reshape(-1), label_smoothing=label_smoothing)

    # --- sampling
    def _check_vae(self, vae):
        if tuple(vae.patch_nums) != self.patch_nums or vae.Cvae != self.Cvae or vae.V != self.V:
            raise ValueError(f"VAR.sample: VQVAE (patch_nums {tuple(vae.patch_nums)}, Cvae {vae.Cvae}, V {vae.V}) does "
                             f"not match the transformer (patch_nums {self.patch_nums}, Cvae {self.Cvae}, V {self.V})")
        if vae.quantize.embedding.weight.device != self.lvl_1L.device:
            raise ValueError(f"VAR.sample: the VQVAE is on {vae.quantize.embedding.weight.device} but the "
                             f"transformer on {self.lvl_1L.device}; move both to one device")

    @torch.no_grad()
    def sample(self, vae, label_B, cfg=1.5, top_k=0, top_p=0.0, generator: Optional[torch.Generator] = None,
               more_smooth=False, draw: Optional[DrawFn] = None, prefix_idx=None, end_scale: Optional[int] = None,
               temperature: float = 1.0, logits_hook: Optional[Callable[[int, torch.Tensor], None]] = None,
               decode: bool = True):
        """Scale-by-scale generation with a KV cache and classifier-free guidance (official autoregressive_infer_cfg).

        label_B: int64 [B] (num_classes = unconditional). Guidance at scale k: (1+t) cond - t uncond with
        t = cfg * k / (S-1), on a doubled batch (conditional rows, then null-class rows, fed the same tokens).
        The token distribution is `sampling_probs(guided, top_k, top_p, temperature)`; `draw(probs [B, n_k, V], k)`
        picks the indices [B, n_k] (default: torch.multinomial with `generator`, in the official call order, so a
        CPU generator seeded like the official g_seed reproduces its samples; the generator must live on the
        model's device). more_smooth: the official gumbel-softmax mixture of codes (idx is still drawn first).
        prefix_idx: given tokens of the first scales (list of [B, pn_k^2]), replayed through the cache instead of
        drawn. end_scale: stop after this many scales (partial generation).
        logits_hook(k, guided_logits [B, n_k, V]) sees each drawn scale's guided logits before filtering.
        decode=False skips the VQVAE decoder (callers that only want the tokens: the decoder costs as much as the
        whole transformer pass at VAR-d16 size on a CPU).
        Returns (images [B, 3, H, W] in [0, 1], or None when stopped early or decode=False; idx_list of the
        generated scales)."""
        check_labels(label_B, self.num_classes, "VAR.sample")
        self._check_vae(vae)
        device = self.lvl_1L.device
        label_B = label_B.to(device)
        B, S = label_B.shape[0], self.num_scales
        prefix_idx = list(prefix_idx or [])
        end_scale = S if end_scale is None else end_scale
        if not len(prefix_idx) <= end_scale <= S:
            raise ValueError(f"VAR.sample: need len(prefix_idx)={len(prefix_idx)} <= end_scale={end_scale} <= {S}")
        for k, idx in enumerate(prefix_idx):
            if tuple(idx.shape) != (B, self.patch_nums[k] ** 2):
                raise ValueError(f"VAR.sample: prefix_idx[{k}] must be [{B}, {self.patch_nums[k] ** 2}], got "
                                 f"{list(idx.shape)}")
        codebook = vae.quantize.embedding.weight

        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        cond = self.shared_ada_lin(cond_BD)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        tokens = cond_BD[:, None] + self.pos_start + lvl_pos[:, :self.first_l]    # [2B, first_l, C]
        f_hat = codebook.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_list = []
        for block in self.blocks:
            block.attn.kv_caching(True)
        try:
            for k in range(end_scale):
                pn = self.patch_nums[k]
                h = tokens
                for block in self.blocks:
                    h = block(h, cond, None)   # no mask: the cache holds exactly the earlier scales
                if k < len(prefix_idx):
                    idx = prefix_idx[k].to(device)
                    code_vectors = F.embedding(idx, codebook)
                else:
                    ratio = k / (S - 1)
                    logits = self.head(self.head_nm(h, cond_BD))
                    t = cfg * ratio
                    guided = (1 + t) * logits[:B] - t * logits[B:]
                    if logits_hook is not None:
                        logits_hook(k, guided)
                    filtered = filter_logits(guided / temperature, top_k, top_p)
                    probs = filtered.softmax(dim=-1)
                    if draw is None:
                        idx = torch.multinomial(probs.view(-1, self.V), num_samples=1, replacement=True,
                                                generator=generator).view(B, pn * pn)
                    else:
                        idx = draw(probs, k)
                    if more_smooth:   # official: tau anneals with the scale, logits sharpened by (1 + ratio)
                        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                        code_vectors = gumbel_softmax(filtered * (1 + ratio), tau, generator) @ codebook
                    else:
                        code_vectors = F.embedding(idx, codebook)
                idx_list.append(idx)
                h_BChw = code_vectors.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_map = vae.next_autoregressive_input(k, f_hat, h_BChw)
                if k + 1 < end_scale:
                    begin, end = self.begin_ends[k + 1]
                    tokens = self.word_embed(next_map.flatten(2).transpose(1, 2)) + lvl_pos[:, begin:end]
                    tokens = tokens.repeat(2, 1, 1)
        finally:
            for block in self.blocks:
                block.attn.kv_caching(False)
        img = (vae.fhat_to_img(f_hat) + 1) / 2 if end_scale == S and decode else None
        return img, idx_list
