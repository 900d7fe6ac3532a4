"""Distilled-Decoding student for LlamaGen, key-for-key the official `DDTransformer` (LlamaGen-DD/*.pt).

The teacher's trunk (same blocks, RoPE, class embedding, logits head) reads a *continuous* sequence
x (B, block_size, C): each position holds either a codebook vector (data, positions i < t) or Gaussian
noise (i >= t). A learned noise/data embedding marks which is which. Two heads read the final hidden
state: the teacher-style logits (B, L, V) and continuous tokens (B, L, C) from a class-modulated
LayerNorm head. Output i comes from the position whose input is token i itself (the teacher predicts
token i one position earlier). Facts: shared/reference/llamagen-architecture.md section 10.

Text-to-image (model_type 't2i'): the official DDTransformer builds the layout (the teacher's
CaptionEmbedder in place of the class table; manifest llamagen-dd-xl-t2i-256.json) but its forward was
left "in progress" and no t2i student was released. Here the caption prefix takes the class token's place
exactly as in the t2i teacher (cls_token_num positions, zero RoPE rows, the caption mask hiding padded
caption positions), every caption position is marked "data", and the continuous-token head is modulated by
the mean of the embedded real caption tokens (GUESS: the official head takes one (B, 1, dim) class
embedding; the masked mean is the simplest (B, 1, dim) summary of a caption).
"""
from dataclasses import replace

import torch
import torch.nn as nn

from dd.models.dd_common import FinalLayer, nearest_code
from dd.models.llamagen import (GPTConfig, LlamaGenGPT, RMSNorm, TransformerBlock, condition_attention_mask,
                                condition_embedding, drop_path_rates, init_llamagen_weights,
                                precompute_freqs_cis_2d, rope_rows)


def student_config(teacher_config: GPTConfig) -> GPTConfig:
    """The official DD ModelArgs differ from the teacher's only in their defaults: no dropout anywhere
    and no class dropout (the student never sees the null class)."""
    return replace(teacher_config, token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0,
                   ffn_dropout_p=0.0, drop_path_rate=0.0, class_dropout_prob=0.0)


class LlamaGenDD(nn.Module):
    """DD student. `codebook` (V, C) = the l2-normalised VQ codebook; it is a non-persistent buffer:
    not in the state_dict (as officially), but it follows .to()/.cuda() with the module."""

    def __init__(self, config: GPTConfig, codebook: torch.Tensor):
        super().__init__()
        if codebook.dim() != 2 or codebook.shape[0] != config.vocab_size:
            raise ValueError(f"LlamaGenDD: codebook must be (vocab_size={config.vocab_size}, C), got "
                             f"{tuple(codebook.shape)}; pass VQModel.codebook_l2()")
        self.config = config
        codebook_dim = codebook.shape[1]
        # the official class table always has the null row, whatever class_dropout_prob says; a t2i
        # student has the teacher's CaptionEmbedder (null caption included) instead
        self.cls_embedding = condition_embedding(config, 0.0, null_row=True)
        self.tok_embeddings = nn.Linear(codebook_dim, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config, p) for p in drop_path_rates(config))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.final_layer_conti = FinalLayer(config.dim, codebook_dim)
        self.n_d_embed = nn.Embedding(2, config.dim)  # row 0 = noise position, row 1 = data position
        self.register_buffer("codebook", codebook.detach().clone(), persistent=False)
        # plain float32 attribute as in the teacher (not in the state_dict, not cast to bf16)
        self.freqs_cis = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base,
                                                 config.cls_token_num)
        self.init_weights()

    def init_weights(self):
        """Official DD init: the teacher's (N(0, 0.02) Linear/Embedding, zero biases, zero logits head)
        plus scale_shift_table ~ N(0, 1) / sqrt(dim)."""
        init_llamagen_weights(self, self.config.initializer_range)
        nn.init.normal_(self.final_layer_conti.scale_shift_table, std=self.config.dim ** -0.5)

    @torch.no_grad()
    def init_from_teacher(self, teacher: LlamaGenGPT):
        """Copy the class table (t2i: the caption embedder and null caption), every transformer layer, the
        final norm and the logits head from the teacher (the official init_with_teacher); tok_embeddings,
        n_d_embed and final_layer_conti keep their DD init."""
        if teacher.config.model_type != self.config.model_type:
            raise ValueError(f"init_from_teacher: a {teacher.config.model_type} teacher cannot initialise a "
                             f"{self.config.model_type} student")
        if self.config.model_type == "t2i":
            self.cls_embedding.load_state_dict(teacher.cls_embedding.state_dict())  # raises on a size mismatch
        else:
            teacher_table = teacher.cls_embedding.embedding_table.weight
            if teacher_table.shape != self.cls_embedding.embedding_table.weight.shape:
                raise ValueError(f"init_from_teacher: teacher class table {tuple(teacher_table.shape)} != student "
                                 f"{tuple(self.cls_embedding.embedding_table.weight.shape)}; the teacher needs "
                                 "class_dropout_prob > 0 (null-class row) and the same num_classes and dim")
        teacher_rope = (teacher.config.block_size, teacher.config.rope_base, teacher.config.cls_token_num)
        if teacher_rope != (self.config.block_size, self.config.rope_base, self.config.cls_token_num):
            raise ValueError("init_from_teacher: teacher and student differ in block_size, rope_base or "
                             "cls_token_num, so their RoPE tables (the official code copies the teacher's) would differ")
        if self.config.model_type == "c2i":
            self.cls_embedding.embedding_table.weight.copy_(teacher_table)
        self.layers.load_state_dict(teacher.layers.state_dict())  # raises on any layer-shape mismatch
        self.norm.weight.copy_(teacher.norm.weight)
        self.output.weight.copy_(teacher.output.weight)

    def _timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.codebook.device)
        if t.shape != (batch,):
            raise ValueError(f"LlamaGenDD: t must be (B={batch},) timesteps (number of data positions), "
                             f"got shape {tuple(t.shape)}")
        return t

    def _check_condition(self, cond: torch.Tensor, caption_mask, batch: int) -> None:
        c = self.config
        if c.model_type == "c2i":
            if cond.shape != (batch,) or caption_mask is not None:
                raise ValueError(f"LlamaGenDD: this c2i student takes cond = (B={batch},) class labels and no "
                                 f"caption_mask, got cond of shape {tuple(cond.shape)}")
        elif cond.shape != (batch, c.cls_token_num, c.caption_dim) or (
                caption_mask is not None and caption_mask.shape != (batch, c.cls_token_num)):
            raise ValueError(f"LlamaGenDD: this t2i student takes cond = caption features (B={batch}, "
                             f"{c.cls_token_num}, {c.caption_dim}) and caption_mask (B, {c.cls_token_num}), got "
                             f"{tuple(cond.shape)} and {None if caption_mask is None else tuple(caption_mask.shape)}")

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, caption_mask=None):
        """x (B, block_size, C), cond (B,) labels or (B, T, caption_dim) left-padded caption features (with
        caption_mask (B, T)), t (B,) -> (tokens (B, L, C), logits (B, L, V)), float32."""
        B, L, C = x.shape
        if L != self.config.block_size or C != self.codebook.shape[1]:
            raise ValueError(f"LlamaGenDD.forward: x must be (B, {self.config.block_size}, {self.codebook.shape[1]}), "
                             f"got {tuple(x.shape)}")
        self._check_condition(cond, caption_mask, B)
        t = self._timestep(t, B)
        num_cond = self.config.cls_token_num
        c = self.cls_embedding(cond)
        h = torch.cat([c, self.tok_embeddings(x)], dim=1)
        # the condition positions are "data"; image token i (sequence position num_cond + i) is iff i < t
        is_data = torch.arange(L + num_cond, device=x.device)[None] <= t[:, None] + (num_cond - 1)
        h = self.tok_dropout(h + self.n_d_embed(is_data.long()))
        freqs_cis = rope_rows(self, h.device)[:L + num_cond]
        mask = None
        if caption_mask is not None:
            mask = condition_attention_mask(caption_mask, torch.arange(L + num_cond, device=x.device), L + num_cond)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask=mask)
        logits = self.output(self.norm(h)).float()[:, num_cond:]
        # the head reads the pre-norm residual stream, modulated by one (B, 1, dim) condition vector
        tokens = self.final_layer_conti(h, self._head_condition(c, caption_mask)).float()[:, num_cond:]
        return tokens, logits

    def _head_condition(self, c: torch.Tensor, caption_mask) -> torch.Tensor:
        """The class embedding (c2i), or the mean of the embedded real caption tokens (t2i, module docstring)."""
        if self.config.model_type == "c2i":
            return c
        if caption_mask is None:
            return c.mean(dim=1, keepdim=True)
        weights = (caption_mask != 0).to(c.dtype)[..., None]
        return (c * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)

    def perturb(self, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t: positions i < t from data (B, L, C), the rest from noise."""
        t = self._timestep(t, data.shape[0])
        keep_data = torch.arange(data.shape[1], device=data.device)[None] < t[:, None]
        return torch.where(keep_data[..., None], data, noise)

    def nearest_code(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2) for every vector of x (..., C)."""
        return nearest_code(x, self.codebook)

    def final_predict(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, caption_mask=None):
        """Model outputs where i >= t; where i < t the input is kept: tokens = x_t and logits = one-hot
        in log space (0 at the nearest code of x_t, -inf elsewhere)."""
        tokens, logits = self(x_t, cond, t, caption_mask)
        t = self._timestep(t, x_t.shape[0])
        is_data = torch.arange(x_t.shape[1], device=x_t.device)[None] < t[:, None]
        one_hot_log = torch.full_like(logits, float("-inf")).scatter_(-1, self.nearest_code(x_t)[..., None], 0.0)
        tokens = torch.where(is_data[..., None], x_t.to(tokens.dtype), tokens)
        logits = torch.where(is_data[..., None], one_hot_log, logits)
        return tokens, logits

    def final_sequence(self, tokens: torch.Tensor, logits: torch.Tensor, split: int) -> torch.Tensor:
        """Positions < split take the greedy code codebook[argmax logits], the rest the continuous tokens."""
        greedy = self.codebook[logits.argmax(dim=-1)].to(tokens.dtype)
        return torch.cat([greedy[:, :split], tokens[:, split:]], dim=1)
