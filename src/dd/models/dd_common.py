"""What the two Distilled-Decoding students (dd_var.VARDD, dd_llamagen.LlamaGenDD) share: the continuous-token head
and the nearest-codebook-entry lookup. The official VAR and LlamaGen DD code each carry a copy of both."""
import torch
import torch.nn as nn


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer, the continuous-token head: LayerNorm (no affine) of the hidden state, modulated by
    the raw class embedding c: x * (1 + scale) + shift with (shift, scale) = scale_shift_table + c (row 0 = shift,
    row 1 = scale); then Linear(dim, out_dim).

    scale_shift_table is drawn N(0, 1/dim) before the Linear is built: VAR's init keeps that draw (LlamaGen's
    re-draws every weight), so this order is what makes a seeded VARDD the same as before the two copies merged."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """h (B, L, dim) hidden states, c (B, 1, dim) class embedding -> (B, L, out_dim)."""
        shift, scale = (self.scale_shift_table[None] + c).chunk(2, dim=1)  # each (B, 1, dim)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) of every vector of x (..., C) -> (...), by one matmul
    (|x|^2 + |e|^2 - 2 x.e) instead of the official (V, ..., C) difference tensor."""
    flat = x.reshape(-1, x.shape[-1]).to(codebook.dtype)
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return distances.argmin(dim=1).view(x.shape[:-1])
