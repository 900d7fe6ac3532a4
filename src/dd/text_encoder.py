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


class T5CaptionEncoder:
    """A T5 encoder + its tokenizer -> caption features in the layout the t2i GPT reads.

    `encode(captions)` tokenizes each caption to exactly `max_length` tokens (EOS appended, longer captions
    truncated, shorter ones right-padded: the official T5Embedder's tokenizer call), runs the encoder with
    the attention mask and returns the last hidden state left-padded (`left_pad_captions`) as float32 with
    its mask. flan-t5-xl gives (B, 120, 2048); any T5 encoder config works (tests build a tiny one).
    """

    def __init__(self, encoder, tokenizer, max_length: int = 120):
        if max_length < 1:
            raise ValueError(f"T5CaptionEncoder: max_length must be >= 1, got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError("T5CaptionEncoder: the tokenizer has no pad token; T5 tokenizers pad with <pad>")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def feature_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @classmethod
    def from_folder(cls, folder, max_length: int = 120, device="cpu", dtype=torch.float32) -> "T5CaptionEncoder":
        """Load a T5 encoder and tokenizer from a local folder (dd.hub.fetch_folder('flan-t5-xl', ...)) with no
        network access; a seq2seq checkpoint is fine (only its encoder weights are read)."""
        from pathlib import Path

        from dd import shim_torchvision

        shim_torchvision()  # before transformers imports torchvision
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; fetch the text encoder with "
                                    f"dd.hub.fetch_folder('flan-t5-xl', <dest_dir>) or put its files there by hand")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
        return cls(encoder, tokenizer, max_length)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, max_length), right-padded, on the encoder's device."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("T5CaptionEncoder: captions must be a list of strings")
        batch = self.tokenizer(list(captions), max_length=self.max_length, padding="max_length", truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded float32 caption features (B, max_length, feature_dim) and their mask (B, max_length)."""
        ids, mask = self.tokenize(captions)
        features = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return left_pad_captions(features, mask)
