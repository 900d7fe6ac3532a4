"""Caption features for the LlamaGen text-to-image teacher: flan-t5-xl encoder states in the official layout.

The official t2i pipeline (LlamaGen `language/t5.py` + `autoregressive/sample/sample_t2i.py`) tokenizes a
caption with the flan-t5-xl tokenizer to at most 120 tokens (padding to 120, truncation), runs the T5
encoder, and keeps the last hidden state (B, 120, 2048) with the tokenizer's attention mask. T5 pads on the
right; the GPT reads the caption LEFT-padded: `left_pad_captions` moves the real tokens to the end of the
window, zeroes the padding and flips the mask (shared/fixtures/llamagen-t2i/README.md).
"""
from __future__ import annotations

import torch


def left_pad_captions(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded features (B, T, D) with mask (B, T) (1 for the first n_b real tokens of row b) ->
    (left-padded features, left-padded mask): row b's real tokens at positions T - n_b .. T - 1, zeros and
    mask 0 before them. As the official sampler: rotate each row by its length, then multiply by the
    flipped mask."""
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"left_pad_captions: need features (B, T, D) and mask (B, T), got {tuple(features.shape)} "
                         f"and {tuple(mask.shape)}")
    length = features.shape[1]
    valid = (mask != 0).sum(dim=1)
    expected = torch.arange(length, device=mask.device)[None] < valid[:, None]
    if not torch.equal(mask != 0, expected):
        raise ValueError("left_pad_captions: the mask must be right-padded (ones, then zeros) in every row, "
                         "as the T5 tokenizer returns it")
    # row b, position p takes source position (p + n_b) mod T: the real tokens land at the end
    source = (torch.arange(length, device=features.device)[None] + valid[:, None].to(features.device)) % length
    rotated = features.gather(1, source[..., None].expand(-1, -1, features.shape[2]))
    left_mask = mask.flip(-1)
    return rotated * left_mask[..., None].to(features.dtype), left_mask
