"""LlamaGen GPT (the teacher), key-for-key the official `Transformer`: class-conditional (c2i) and
text-to-image (t2i).

A Llama-style decoder over `[condition prefix] + image tokens in raster order`, with a 2D rotary position
embedding whose condition rows are all zeros. The condition prefix is one class token (c2i) or a caption of
`cls_token_num` (officially 120) projected text-encoder feature vectors (t2i, `CaptionEmbedder`); the
caption is left-padded and its padded positions are hidden from every query by a caption mask (see
`condition_attention_mask`). Facts: shared/reference/llamagen-architecture.md (sections 1-7) and
shared/fixtures/llamagen-t2i/README.md (t2i). Differences from the official code, all on purpose:
  * the KV cache is a per-call object (`new_kv_caches`) instead of buffers attached to the layers, so
    generation leaves no state behind and a later teacher-forced forward just works;
  * the cache holds n_kv_head heads, so grouped-query attention also works in cached generation;
  * `generate(prefix=...)` (the DD repo's `intermediate_generate`) works for any cfg_scale;
  * the t2i caption mask is an argument of each call, not written into a causal_mask held by the model;
  * the sampling distribution is a separate function (`sampling_probs`) and the draw is a hook, so the
    flow-matching map can replace torch.multinomial.
"""
import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The official `ModelArgs` (gpt.py), same field names and defaults."""
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None  # None = n_head (plain multi-head attention)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    caption_dim: int = 2048  # t2i: width of the text-encoder features (flan-t5-xl: 2048)
    class_dropout_prob: float = 0.1  # c2i: > 0 also adds the null-class row used by CFG; t2i: caption dropout
    model_type: str = "c2i"  # 'c2i' (class label) or 't2i' (caption features)

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens: (image_size / 16)^2
    max_batch_size: int = 32  # unused by the official code, kept for config compatibility
    max_seq_len: int = 2048  # unused by the official code, kept for config compatibility

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"GPTConfig.model_type={self.model_type!r}: use 'c2i' (class-conditional) or "
                             "'t2i' (text-to-image)")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError(f"GPTConfig.cls_token_num={self.cls_token_num}: a c2i model has exactly one "
                             "class token; set cls_token_num=1")
        if self.model_type == "t2i" and (self.cls_token_num < 1 or self.caption_dim < 1):
            raise ValueError(f"GPTConfig: a t2i model needs cls_token_num >= 1 caption positions (officially 120) "
                             f"and caption_dim >= 1, got {self.cls_token_num} and {self.caption_dim}")
        if self.dim % self.n_head:
            raise ValueError(f"GPTConfig: dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 4:
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} must be a multiple of 4 for the 2D RoPE "
                             "(a quarter of the rotation pairs per image axis)")
        if self.grid_size ** 2 != self.block_size:
            raise ValueError(f"GPTConfig.block_size={self.block_size} is not a square number of tokens "
                             "(e.g. 256 for a 16x16 grid)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: int(2/3 * 4 * dim), optionally scaled, rounded UP to a multiple of multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


# The official factory sizes (GPT_models); everything else stays at the GPTConfig defaults, which are the
# 256-px ImageNet c2i values (vocab 16384, 1000 classes, block 256). Use dataclasses.replace for 384 px
# (block_size=576) or text-to-image (model_type='t2i', cls_token_num=120; GPT-XL is the released t2i size).
GPT_CONFIGS = {
    "GPT-B": GPTConfig(n_layer=12, n_head=12, dim=768),
    "GPT-L": GPTConfig(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": GPTConfig(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": GPTConfig(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": GPTConfig(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": GPTConfig(n_layer=24, n_head=32, dim=3200),  # the released c2i_3B_384.pt
    "GPT-1B": GPTConfig(n_layer=22, n_head=32, dim=2048),
    "GPT-7B": GPTConfig(n_layer=32, n_head=32, dim=4096),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A named size with some fields overridden, e.g. gpt_config('GPT-B', block_size=576)."""
    if name not in GPT_CONFIGS:
        raise KeyError(f"unknown LlamaGen GPT size {name!r}; known: {sorted(GPT_CONFIGS)}")
    return replace(GPT_CONFIGS[name], **overrides)


# --------------------------------------------------------------------------------------------------
# 2D rotary position embedding

def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 1):
    """RoPE table (cls_token_num + grid_size^2, head_dim/2, 2), last axis [cos, sin], float32.

    The first quarter of the rotation pairs turns with the row index, the second with the column index,
    both with frequencies base^(-2k / (head_dim/2)). The class-token rows are zeros (not the identity):
    the official model was trained that way, so the class token's q and k vanish.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles_1d = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    angles = torch.cat([angles_1d[:, None, :].expand(-1, grid_size, -1),  # row axis
                        angles_1d[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # column axis
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (B, S, heads, head_dim) by freqs_cis (S, head_dim/2, 2).

    Computed in float32 whatever the model dtype, as the official code does.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs_cis[None, :, None, :, 0], freqs_cis[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


def rope_rows(model: nn.Module, device) -> torch.Tensor:
    """model.freqs_cis on `device`. The table is rebuilt from model.config rather than copied, so a model
    created on the meta device and then materialised (to_empty + load_state_dict) works too."""
    if model.freqs_cis.device != torch.device(device):
        c = model.config
        model.freqs_cis = precompute_freqs_cis_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num).to(device)
    return model.freqs_cis


# --------------------------------------------------------------------------------------------------
# Blocks (shared with the DD student, dd_llamagen.py)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32, cast back, then scale (the official order; matters in bf16)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Keys/values of one layer for one generation call: (batch, n_kv_head, length, head_dim) each.

    Holding n_kv_head (not n_head) heads is what makes cached GQA work (the official cache has n_head
    heads and fails as soon as n_kv_head < n_head).
    """

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_head, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (batch, n_kv_head, S, head_dim) at positions start..start+S-1; return the whole
        buffers (unwritten positions are zeros the caller masks out)."""
        end = start + k.shape[2]
        if k.shape[0] != self.k.shape[0] or end > self.k.shape[2]:
            raise ValueError(f"KV cache of batch {self.k.shape[0]} and length {self.k.shape[2]} cannot take "
                             f"batch {k.shape[0]} at positions {start}..{end - 1}; allocate it with "
                             "new_kv_caches(batch, length) for this call")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dim, self.n_head, self.n_kv_head = config.dim, config.n_head, config.kv_heads
        self.head_dim = config.head_dim
        # one fused projection, output laid out [q (dim) | k (n_kv_head*head_dim) | v (same)]
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, freqs_cis, cache: Optional[KVCache] = None, start: int = 0, mask=None):
        """x (B, S, dim) holds sequence positions start..start+S-1. `mask` (S, keys) or (B, 1, S, keys), True
        where a query sees a key, says which positions (cached ones included) each query attends to;
        without one (no cache, start 0) attention is plainly causal."""
        B, S, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary_emb(q.view(B, S, self.n_head, self.head_dim), freqs_cis).transpose(1, 2)
        k = apply_rotary_emb(k.view(B, S, self.n_kv_head, self.head_dim), freqs_cis).transpose(1, 2)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(start, k, v)
        if self.n_kv_head != self.n_head:  # GQA: kv head j serves query heads j*r .. j*r+r-1
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, S, self.dim)))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: h = x + Attn(norm(x)); out = h + FFN(norm(h)), with optional drop-path."""

    def __init__(self, config: GPTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = drop_path

    def _drop_path(self, x):
        # stochastic depth per sample (training only), rescaled to keep the expectation
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        return x * x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep).div_(keep)

    def forward(self, x, freqs_cis, cache: Optional[KVCache] = None, start: int = 0, mask=None):
        h = x + self._drop_path(self.attention(self.attention_norm(x), freqs_cis, cache, start, mask))
        return h + self._drop_path(self.feed_forward(self.ffn_norm(h)))


class ClassEmbedding(nn.Module):
    """Class label -> one conditioning token (B, 1, dim). Row `num_classes`, when present, is the null
    class used for classifier-free guidance; in train mode labels become null with `dropout_prob`."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float, null_row: bool):
        super().__init__()
        if dropout_prob > 0 and not null_row:
            raise ValueError("class dropout needs the null-class row")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(null_row), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    """Two bias-free Linear layers with a tanh-GELU between them (the official `MLP`, keys fc1/fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features (B, token_num, caption_dim) -> the condition prefix (B, token_num, dim).

    `uncond_embedding` (token_num, caption_dim) is the null caption of classifier-free guidance; it is a
    buffer saved in the state_dict (the official checkpoints carry it). In train mode a whole caption is
    replaced by it with probability `dropout_prob`.
    """

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)

    def null_caption(self, batch: int) -> torch.Tensor:
        """The null caption for `batch` rows (B, token_num, caption_dim)."""
        return self.uncond_embedding.expand(batch, -1, -1)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(dropped[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


def condition_embedding(config: GPTConfig, dropout_prob: float, null_row: bool) -> nn.Module:
    """The official `cls_embedding` of a config: a class table (c2i) or a CaptionEmbedder (t2i)."""
    if config.model_type == "t2i":
        return CaptionEmbedder(config.caption_dim, config.dim, dropout_prob, config.cls_token_num)
    return ClassEmbedding(config.num_classes, config.dim, dropout_prob, null_row=null_row)


def condition_attention_mask(caption_mask: Optional[torch.Tensor], queries: torch.Tensor, keys: int):
    """Which key positions 0..keys-1 each query position (S,) sees: (S, keys), or (B, 1, S, keys) when a
    caption mask (B, T), nonzero at real caption tokens, is given.

    Causal; with a caption mask the padded caption positions are hidden from every query, except that each
    position still sees itself (as the official generate and t2i training data do), so no row is empty.
    """
    positions = torch.arange(keys, device=queries.device)
    mask = positions[None] <= queries[:, None]
    if caption_mask is None:
        return mask
    batch, num_caption = caption_mask.shape
    visible = torch.cat([caption_mask.to(queries.device) != 0,
                         torch.ones(batch, keys - num_caption, dtype=torch.bool, device=queries.device)], dim=1)
    return ((mask[None] & visible[:, None]) | (positions[None] == queries[:, None])[None])[:, None]


def drop_path_rates(config: GPTConfig) -> list:
    """Stochastic-depth rate per layer, linear from 0 to drop_path_rate (plain Python: works on meta)."""
    return [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]


def init_llamagen_weights(model: nn.Module, std: float):
    """Official init: every Linear/Embedding weight ~ N(0, std^2), Linear biases 0, the logits head 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    nn.init.zeros_(model.output.weight)


# --------------------------------------------------------------------------------------------------
# The teacher

class LlamaGenGPT(nn.Module):
    """LlamaGen GPT; state_dict keys and shapes equal the official checkpoints (c2i_*.pt, t2i_*.pt).

    The condition `cond` is (B,) class labels (c2i) or (B, cls_token_num, caption_dim) caption features
    (t2i, left-padded: real tokens at the end) with an optional `caption_mask` (B, cls_token_num), nonzero
    at the real tokens. Sequence positions 0..cls_token_num-1 hold the condition, image token n sits at
    position cls_token_num + n.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = condition_embedding(config, config.class_dropout_prob,
                                                 null_row=config.class_dropout_prob > 0)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config, p) for p in drop_path_rates(config))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # A plain float32 attribute, not a buffer: it stays out of the state_dict (official checkpoints
        # have no such key) and is not cast when the model goes to bf16 (the rotation runs in float32).
        self.freqs_cis = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base,
                                                 config.cls_token_num)
        self.init_weights()

    def init_weights(self):
        init_llamagen_weights(self, self.config.initializer_range)

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def null_class(self) -> bool:
        """Whether the model has an unconditional input for classifier-free guidance (t2i: always)."""
        if self.config.model_type == "t2i":
            return True
        return self.cls_embedding.embedding_table.num_embeddings > self.config.num_classes

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional input shaped like cond: the null class id (c2i) or the null caption (t2i)."""
        if self.config.model_type == "t2i":
            return self.cls_embedding.null_caption(cond.shape[0]).to(cond.dtype)
        return torch.full_like(cond, self.config.num_classes)

    def check_condition(self, cond: torch.Tensor, caption_mask: Optional[torch.Tensor] = None, batch=None):
        """cond on the model's device in the dtype its embedder reads; a clear error for a wrong shape."""
        c = self.config
        batch = cond.shape[0] if batch is None else batch
        if c.model_type == "c2i":
            if cond.dim() != 1 or cond.shape[0] != batch:
                raise ValueError(f"this c2i model takes cond = (B={batch},) class labels, got shape {tuple(cond.shape)}")
            if caption_mask is not None:
                raise ValueError("caption_mask is for t2i models; a c2i model has no caption")
            return cond.to(self.device, torch.long)
        if cond.dim() != 3 or cond.shape != (batch, c.cls_token_num, c.caption_dim):
            raise ValueError(f"this t2i model takes cond = caption features (B={batch}, {c.cls_token_num}, "
                             f"{c.caption_dim}), left-padded; got shape {tuple(cond.shape)}")
        if caption_mask is not None and caption_mask.shape != cond.shape[:2]:
            raise ValueError(f"caption_mask must be (B, {c.cls_token_num}) like the caption, got "
                             f"{tuple(caption_mask.shape)}")
        return cond.to(self.device, self.cls_embedding.cap_proj.fc1.weight.dtype)

    def _logits(self, idx, cond, caches=None, start: int = 0, caption_mask=None) -> torch.Tensor:
        """Embed [condition prefix (if cond)] + tokens idx (if given) at positions start.., run the trunk."""
        parts = []
        if cond is not None:
            parts.append(self.cls_embedding(cond))
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        h = self.tok_dropout(torch.cat(parts, dim=1))
        if start + h.shape[1] > self.freqs_cis.shape[0]:
            raise ValueError(f"sequence positions {start}..{start + h.shape[1] - 1} exceed the model's "
                             f"cls_token_num + block_size = {self.freqs_cis.shape[0]} positions")
        freqs_cis = rope_rows(self, h.device)[start:start + h.shape[1]]
        mask = None
        if caches is not None or caption_mask is not None:
            # With a cache, attend over the whole fixed-length cache with a mask, as the official code does,
            # so every step has the same shapes. Measured on an H200 (GPT-B, bf16, batch 8, CFG, 256
            # tokens): 2.8 s this way, 18 s when the key length grew by one each step.
            keys = h.shape[1] if caches is None else caches[0].k.shape[2]
            queries = torch.arange(start, start + h.shape[1], device=h.device)
            mask = condition_attention_mask(caption_mask, queries, keys)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, None if caches is None else caches[i], start, mask)
        return self.output(self.norm(h)).float()

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, caption_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Teacher forcing: idx (B, T) image tokens (T <= block_size), cond (B,) labels or (B, cls_token_num,
        caption_dim) caption features, caption_mask (t2i, optional) (B, cls_token_num).

        Returns float32 logits (B, 1 + T, vocab) from the last condition position on; position p predicts
        image token p (the last condition position predicts token 0). Condition dropout and the dropouts
        apply in train mode only, as officially.
        """
        if idx.dim() != 2:
            raise ValueError(f"LlamaGenGPT.forward expects idx (B, T) image tokens, got {tuple(idx.shape)}")
        cond = self.check_condition(cond, caption_mask, batch=idx.shape[0])
        logits = self._logits(idx, cond, caption_mask=caption_mask)
        return logits[:, self.config.cls_token_num - 1:]

    def train_loss(self, idx: torch.Tensor, cond: torch.Tensor, caption_mask: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Official training loss: feed [condition] + idx[:, :-1], mean cross-entropy against all of idx."""
        logits = self(idx[:, :-1], cond, caption_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))

    def new_kv_caches(self, batch: int, length: int) -> list:
        """Fresh per-layer caches for `length` sequence positions (condition prefix included)."""
        dtype, device = self.tok_embeddings.weight.dtype, self.device
        return [KVCache(batch, self.config.kv_heads, length, self.config.head_dim, dtype, device)
                for _ in self.layers]

    def next_logits(self, caches: list, start: int, idx: Optional[torch.Tensor] = None,
                    cond: Optional[torch.Tensor] = None, caption_mask: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
        """Cached step: feed [condition prefix] + tokens at sequence positions start.. (the condition holds
        positions 0..cls_token_num-1, image token n is position cls_token_num + n), write them into
        `caches`, and return the float32 logits (B, vocab) of the last fed position, i.e. the distribution
        of the next image token. A t2i caption_mask must be passed with every step of one cache."""
        if cond is not None and start != 0:
            raise ValueError("the condition starts at position 0: pass cond only with start=0")
        return self._logits(idx, cond, caches, start, caption_mask)[:, -1]


# --------------------------------------------------------------------------------------------------
# Sampling

def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution LlamaGen's sampler draws from, for logits (..., V) (already CFG-combined).

    logits / max(temperature, 1e-5); top-k keeps every logit >= the k-th largest (ties survive);
    top-p keeps the smallest prefix of the sorted distribution whose mass reaches top_p (the token that
    crosses top_p is kept, as is always the first); softmax.
    """
    if top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"sampling_probs: need top_k >= 0 (0 = off) and 0 <= top_p <= 1, got top_k={top_k}, "
                         f"top_p={top_p}")
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_through = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass of the tokens strictly before it already exceeds top_p
        drop_sorted = torch.zeros_like(mass_through, dtype=torch.bool)
        drop_sorted[..., 1:] = mass_through[..., :-1] > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def _multinomial_draw(generator):
    def draw(probs, step):
        return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
    return draw


@torch.no_grad()
def generate(model: LlamaGenGPT, cond: torch.Tensor, max_new_tokens: int, cfg_scale: float = 1.0,
             cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, prefix: Optional[torch.Tensor] = None,
             draw: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
             return_logits: bool = False, caption_mask: Optional[torch.Tensor] = None):
    """KV-cached sampling of `max_new_tokens` image tokens for cond: (B,) labels (c2i) or (B, cls_token_num,
    caption_dim) left-padded caption features (t2i). Returns int64 tokens (B, t_start + max_new_tokens) on
    the model's device, where t_start = prefix length (0 without one); with return_logits=True also the
    float32 CFG-combined logits of every new token (B, max_new, V).

    caption_mask (t2i, the official emb_masks) (B, cls_token_num), nonzero at real caption tokens: padded
    caption positions are hidden from every query (both CFG halves), see condition_attention_mask.
    CFG (cfg_scale > 1): the batch runs as [cond; null condition] (the null class, or the null caption
    `uncond_embedding`), logits = uncond + (cond - uncond) * scale.
    The first new token always uses CFG; the i-th decode step after it (i from 0) uses the conditional
    logits alone when cfg_interval > -1 and i > cfg_interval (the null half is still computed).
    `prefix` (B, t_start) continues given tokens like the DD repo's intermediate_generate (condition
    and prefix are prefilled in one causal pass); unlike it, this also works with cfg_scale <= 1.
    `draw(probs (B, V), position) -> (B,)` replaces the torch.multinomial draw (with `generator`, which
    must live on the model's device); `position` is the image-token index being drawn (0-based).
    Runs in eval mode and restores the previous mode; the caches live only inside this call.
    """
    device = model.device
    if cond.dim() not in (1, 3):
        raise ValueError(f"generate: cond must be (B,) class labels or (B, T, caption_dim) caption features, "
                         f"got shape {tuple(cond.shape)}")
    cond = model.check_condition(cond, caption_mask)
    batch = cond.shape[0]
    if prefix is None:
        prefix = torch.zeros(batch, 0, dtype=torch.long, device=device)
    prefix = prefix.to(device=device, dtype=torch.long)
    t_start = prefix.shape[1]
    if prefix.dim() != 2 or prefix.shape[0] != batch:
        raise ValueError(f"generate: prefix must be (B={batch}, t_start), got {tuple(prefix.shape)}")
    if max_new_tokens < 1 or t_start + max_new_tokens > model.config.block_size:
        raise ValueError(f"generate: need 1 <= max_new_tokens and prefix length + max_new_tokens <= "
                         f"block_size={model.config.block_size}; got {t_start} + {max_new_tokens}")
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        if not model.null_class:
            raise ValueError("generate: cfg_scale > 1 needs the null-class row, but this model was built "
                             "with class_dropout_prob=0; use cfg_scale=1")
        cond = torch.cat([cond, model.null_condition(cond)])
        prefix = torch.cat([prefix, prefix])
        if caption_mask is not None:
            caption_mask = torch.cat([caption_mask, caption_mask])
    num_cond = model.config.cls_token_num
    draw = draw or _multinomial_draw(generator)

    was_training = model.training
    model.eval()
    try:
        # the last sampled token is never fed back: positions 0 .. num_cond + t_start + max_new_tokens - 2
        caches = model.new_kv_caches(cond.shape[0], num_cond + t_start + max_new_tokens - 1)
        logits = model.next_logits(caches, 0, idx=prefix, cond=cond, caption_mask=caption_mask)
        new_tokens, step_logits = [], []
        for i in range(max_new_tokens):
            if i > 0:
                fed = new_tokens[-1][:, None]  # image token t_start + i - 1
                logits = model.next_logits(caches, num_cond + t_start + i - 1,
                                           idx=torch.cat([fed, fed]) if use_cfg else fed, caption_mask=caption_mask)
            if use_cfg:
                cond_logits, uncond_logits = logits.chunk(2)
                guided = i == 0 or cfg_interval <= -1 or i - 1 <= cfg_interval
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale if guided else cond_logits
            token = draw(sampling_probs(logits, temperature, top_k, top_p), t_start + i)
            if token.shape != (batch,):
                raise ValueError(f"generate: draw() must return ({batch},) token indices, got {tuple(token.shape)}")
            new_tokens.append(token.long())
            step_logits.append(logits)
    finally:
        model.train(was_training)
    tokens = torch.cat([prefix[:batch], torch.stack(new_tokens, dim=1)], dim=1)
    return (tokens, torch.stack(step_logits, dim=1)) if return_logits else tokens
