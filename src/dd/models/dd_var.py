"""The Distilled-Decoding student for VAR (official `DD_Model` of microsoft/distilled_decoding, re-implemented).

One forward pass maps a token sequence whose scales >= t are noise (scales < t are given, clean) to the whole
sequence: a continuous prediction [B, L, Cvae] and logits [B, L, V]. State_dict keys are the official ones
(reference/manifests/var-dd-d*.json). It reuses VAR's blocks (`dd.models.var`), with these changes:
* internal patch_nums get an extra leading 1: internal position 0 is the class (start) token, position p + 1
  carries teacher token p (L' = L + 1, S + 1 levels);
* attention mask: a position sees all strictly earlier levels and itself, not the other tokens of its scale;
* a noise/data embedding `n_d_embed` (1 = class token and given scales, 0 = noise scales), projected per block by
  `layerwise_n_d_embed[i]` and added between attention and FFN; the last projection precedes the output heads
  (official layerwise_n_d_embed=True, every release; with False the raw embedding is added at those places and
  the state_dict has no layerwise_n_d_embed.*; the official n_d_embed_enable=False crashes, so it has no twin);
* a PixArt-style final layer (`final_layer_conti`) for the continuous output; no class dropout, no CFG.
Facts: ../shared/reference/var-architecture.md §4.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dd.models.dd_common import FinalLayer, nearest_code
from dd.models.var import (VAR, AdaLNBeforeHead, VARConfig, check_labels, init_var_weights, make_blocks,
                           make_shared_ada_lin, per_scale_pos_embedding, scale_index_per_position, trunc_normal_)


def student_attention_bias(levels: torch.Tensor) -> torch.Tensor:
    """[1, 1, L', L'] additive mask: 0 where level(query) > level(key) or query == key, -inf elsewhere."""
    allowed = (levels[:, None] > levels[None, :]) | torch.eye(len(levels), dtype=torch.bool)
    return torch.where(allowed, 0.0, -math.inf).reshape(1, 1, len(levels), len(levels))


class VARDD(nn.Module):
    def __init__(self, config: VARConfig, layerwise_n_d_embed: bool = True):
        """`config` is the teacher's VARConfig (same width, depth, patch_nums); cond_drop_rate is not used.
        layerwise_n_d_embed: the official option of that name (True in every released checkpoint)."""
        super().__init__()
        self.config = config
        self.C = C = config.embed_dim
        self.V, self.Cvae, self.num_classes = config.vocab_size, config.latent_channels, config.num_classes
        self.teacher_patch_nums = config.patch_nums
        self.num_scales = len(self.teacher_patch_nums)                  # S: the teacher's scales, t in [0, S-1]
        self.patch_nums = (1,) + self.teacher_patch_nums               # internal levels
        self.L = config.seq_len                                        # teacher tokens; internal length L + 1
        self.first_l = 1
        self.scale_lengths = [pn * pn for pn in self.teacher_patch_nums]
        std = math.sqrt(1 / C / 3)

        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)
        trunc_normal_(self.class_emb.weight.data, std)
        self.pos_start = nn.Parameter(trunc_normal_(torch.empty(1, self.first_l, C), std))
        self.pos_1LC = nn.Parameter(per_scale_pos_embedding(self.patch_nums, C, std))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        trunc_normal_(self.lvl_embed.weight.data, std)
        self.shared_ada_lin = make_shared_ada_lin(config)
        self.blocks = make_blocks(config)
        levels = scale_index_per_position(self.patch_nums)
        self.register_buffer("lvl_1L", levels[None].contiguous())
        self.register_buffer("attn_bias_for_masking", student_attention_bias(levels).contiguous())
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.n_d_embed = nn.Embedding(2, C)
        self.layerwise_n_d_embed = (nn.ModuleList([nn.Linear(C, C) for _ in range(config.depth + 1)])
                                    if layerwise_n_d_embed else None)
        self.final_layer_conti = FinalLayer(C, self.Cvae)

        # not in the checkpoint: the teacher scale of each teacher position, and the VQVAE codebook (attach_codebook)
        self.register_buffer("teacher_scale_of_position", scale_index_per_position(self.teacher_patch_nums),
                             persistent=False)
        self.register_buffer("codebook", None, persistent=False)

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1):
        """Official initialisation (VAR's, inherited by DD_Model); `final_layer_conti.scale_shift_table` keeps its
        N(0, 1/C) draw."""
        init_var_weights(self, init_adaln, init_adaln_gamma, init_head, init_std)

    def attach_codebook(self, codebook: torch.Tensor):
        """The VQVAE codebook [V, Cvae] (vae.quantize.embedding.weight), needed by final_predict / final_sequence.
        Kept as a non-persistent buffer so .to(device) moves it; not saved with the student."""
        if tuple(codebook.shape) != (self.V, self.Cvae):
            raise ValueError(f"VARDD.attach_codebook: codebook must be [{self.V}, {self.Cvae}], "
                             f"got {list(codebook.shape)}")
        self.codebook = codebook.detach().to(self.lvl_1L.device)

    def _require_codebook(self, where: str) -> torch.Tensor:
        if self.codebook is None:
            raise RuntimeError(f"VARDD.{where} needs the VQVAE codebook: call "
                               f"student.attach_codebook(vae.quantize.embedding.weight) first")
        return self.codebook

    # --- sequence bookkeeping
    def tokens_in_scales_before(self, t):
        """Number of teacher tokens in scales < t (int -> int, tensor -> int64 tensor); t in [0, S]."""
        starts = [0]
        for n in self.scale_lengths:
            starts.append(starts[-1] + n)
        if isinstance(t, torch.Tensor):
            return torch.tensor(starts, device=t.device)[t.long()]
        return starts[int(t)]

    def _steps(self, t, B: int, where: str) -> torch.Tensor:
        """t (float or int tensor [B], truncated like the official) -> int64 [B] on the model's device."""
        t = torch.as_tensor(t, device=self.lvl_1L.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"VARDD.{where}: t must be a scalar or a [B={B}] tensor, got shape {list(t.shape)}")
        if bool((t < 0).any()) or bool((t >= self.num_scales).any()):
            raise ValueError(f"VARDD.{where}: t must lie in [0, {self.num_scales - 1}] (teacher scales), "
                             f"got {t.tolist()}")
        return t.long()

    def _check_sequence(self, x, where: str):
        if x.ndim != 3 or x.shape[1:] != (self.L, self.Cvae):
            raise ValueError(f"VARDD.{where}: token sequence must be [B, {self.L}, {self.Cvae}], got {list(x.shape)}")

    def noise_mask(self, t) -> torch.Tensor:
        """[B, L] bool: True on positions of teacher scales >= t (the ones that hold noise)."""
        return self.teacher_scale_of_position[None] >= t[:, None]

    # --- the network
    def forward(self, label_B, x, t):
        """label_B int64 [B]; x [B, L, Cvae] (teacher layout, scales >= t noisy); t [B] (or scalar).
        Returns (x_BLCv [B, L, Cvae] continuous prediction, x_BLV [B, L, V] logits)."""
        check_labels(label_B, self.num_classes, "VARDD.forward")
        B = label_B.shape[0]
        self._check_sequence(x, "forward")
        t = self._steps(t, B, "forward")
        cond_BD = self.class_emb(label_B)
        sos = (cond_BD[:, None] + self.pos_start).expand(B, self.first_l, -1)
        h = torch.cat((sos, self.word_embed(x.float())), dim=1) + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        # internal level <= t  <=>  the class token or a teacher scale < t: a "data" position (index 1)
        n_d = self.n_d_embed((self.lvl_1L <= t[:, None]).long())        # [B, L + 1, C]
        h = h + n_d
        cond = self.shared_ada_lin(cond_BD)
        for i, block in enumerate(self.blocks):
            h = block(h, cond, self.attn_bias_for_masking, n_d_emb=self._n_d_at(i, n_d))
        h = h + self._n_d_at(len(self.blocks), n_d)
        x_BLV = self.head(self.head_nm(h, cond_BD))[:, 1:]
        x_BLCv = self.final_layer_conti(h, cond_BD[:, None])[:, 1:]
        return x_BLCv, x_BLV

    def _n_d_at(self, place: int, n_d):
        """The noise/data embedding added at block `place` (place = depth: before the heads)."""
        return n_d if self.layerwise_n_d_embed is None else self.layerwise_n_d_embed[place](n_d)

    def perturb(self, x, t, noise=None, generator=None):
        """Keep scales < t of x, replace scales >= t by noise (a fresh N(0, I) draw when None)."""
        self._check_sequence(x, "perturb")
        t = self._steps(t, x.shape[0], "perturb")
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.where(self.noise_mask(t)[..., None], noise, x)

    def nearest_code(self, x):
        """Index of the nearest codebook vector (squared L2) of each token [B, L, Cvae] -> [B, L]."""
        return nearest_code(x, self._require_codebook("nearest_code"))

    def final_predict(self, label_B, x_t, t):
        """Forward, then put the given scales (< t) back: continuous = the input, logits = 0 at the input's nearest
        code and -inf elsewhere. Returns (continuous [B, L, Cvae], logits [B, L, V])."""
        conti, logits = self(label_B, x_t, t)
        t = self._steps(t, x_t.shape[0], "final_predict")
        given = ~self.noise_mask(t)[..., None]
        snapped = torch.full_like(logits, -math.inf).scatter(-1, self.nearest_code(x_t)[..., None], 0.0)
        return torch.where(given, x_t, conti), torch.where(given, snapped, logits)

    def final_sequence(self, conti, logits, split: int):
        """Scales < split become the codebook vectors of argmax(logits); scales >= split keep the continuous
        prediction (official get_final_sequence)."""
        if not 0 <= split <= self.num_scales:
            raise ValueError(f"VARDD.final_sequence: split must lie in [0, {self.num_scales}], got {split}")
        n = self.tokens_in_scales_before(split)
        greedy = F.embedding(logits[:, :n].argmax(dim=-1), self._require_codebook("final_sequence"))
        return torch.cat((greedy, conti[:, n:]), dim=1)

    # --- distillation start
    @torch.no_grad()
    def init_from_teacher(self, teacher: VAR, init_std: float = 0.02):
        """Start from the teacher (official init_with_teacher, with its intent restored).

        Copied: word_embed, class_emb, pos_start, every block, shared_ada_lin, head_nm, head; lvl_embed rows 0, 2..
        from teacher rows 0, 1..; pos_1LC positions 0, 2.. from teacher positions 0, 1.. Re-drawn from truncnormal
        (0, init_std), in this order on the global RNG: lvl_embed row 1, pos_1LC position 1, n_d_embed — the rows
        the teacher has no counterpart for. The official re-draws class_emb row 1 instead of lvl_embed row 1 (a
        typo: it corrupts the embedding of class 1 and leaves the new level row at its random init); here class_emb
        stays the teacher's. layerwise_n_d_embed and final_layer_conti keep their current values."""
        ours, theirs = self.config, teacher.config
        for field in ("depth", "embed_dim", "num_heads", "num_classes", "vocab_size", "latent_channels",
                      "patch_nums", "shared_aln", "attn_l2_norm", "mlp_ratio"):
            if getattr(ours, field) != getattr(theirs, field):
                raise ValueError(f"VARDD.init_from_teacher: teacher {field}={getattr(theirs, field)} differs from the "
                                 f"student's {getattr(ours, field)}")
        self.word_embed.load_state_dict(teacher.word_embed.state_dict())
        self.class_emb.load_state_dict(teacher.class_emb.state_dict())
        self.pos_start.copy_(teacher.pos_start)
        self.lvl_embed.weight[0] = teacher.lvl_embed.weight[0]
        self.lvl_embed.weight[2:] = teacher.lvl_embed.weight[1:]
        self.pos_1LC[:, 0] = teacher.pos_1LC[:, 0]
        self.pos_1LC[:, 2:] = teacher.pos_1LC[:, 1:]
        for name in ("blocks", "shared_ada_lin", "head_nm", "head"):
            getattr(self, name).load_state_dict(getattr(teacher, name).state_dict())
        trunc_normal_(self.lvl_embed.weight.data[1], init_std)
        trunc_normal_(self.pos_1LC.data[:, 1], init_std)
        trunc_normal_(self.n_d_embed.weight.data, init_std)
