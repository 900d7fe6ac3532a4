"""Captions for the toy text-to-image setting: digit name plus attributes measured from the image, so the
caption carries information a class label does not (issue 15, toy-t2i), and a text encoder built with no
download.

Attributes (analytic, from the ink of a (3, H, W) image in [-1, 1]; no trained network, so they can also
judge generated digits):
    thickness  ink mass per row of the digit's height       thin / regular / thick
    width      ink-weighted spread of the columns (std of x) narrow / medium / wide
    slant      shear of the ink: -cov(x, y) / var(y)        slanted left / upright / slanted right
Each is cut into three bins at the terciles of a reference set (`AttributeBins.fit`, e.g. the toy training
digits), so every word is about equally frequent there.

`toy_caption_encoder` is a T5CaptionEncoder over a word-level tokenizer of the caption vocabulary and a tiny
T5 encoder with seeded random weights: deterministic, offline, same output layout as flan-t5-xl.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dd.text_encoder import T5CaptionEncoder

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = {"thickness": ("thin", "regular", "thick"), "width": ("narrow", "medium", "wide"),
         "slant": ("slanted left", "upright", "slanted right")}
INK = 0.5  # a pixel is ink when its brightness in [0, 1] exceeds this


def measure_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (B,) float32: thickness, width, slant (module docstring). images (B, C, H, W) in [-1, 1].

    MNIST digits are all scaled to about the same height, so the height says little; the width varies."""
    if images.dim() != 4:
        raise ValueError(f"measure_attributes: images must be (B, C, H, W), got {tuple(images.shape)}")
    ink = ((images.float().mean(dim=1) + 1) / 2).clamp(0, 1)  # (B, H, W), 1 = white stroke
    height, width = ink.shape[1:]
    rows_inked = (ink > INK).any(dim=2).float()  # (B, H)
    row_index = torch.arange(height, dtype=torch.float32)
    has_ink = rows_inked.sum(1) > 0
    top = torch.where(rows_inked > 0, row_index, float(height)).amin(1)
    bottom = torch.where(rows_inked > 0, row_index, -1.0).amax(1)
    digit_height = torch.where(has_ink, bottom - top + 1, torch.zeros_like(top))
    mass = ink.sum(dim=(1, 2))
    thickness = mass / digit_height.clamp(min=1) / width
    y = row_index[None, :, None].expand_as(ink)
    x = torch.arange(width, dtype=torch.float32)[None, None, :].expand_as(ink)
    total = mass.clamp(min=1e-6)
    mean_y = (ink * y).sum((1, 2)) / total
    mean_x = (ink * x).sum((1, 2)) / total
    var_y = (ink * (y - mean_y[:, None, None]) ** 2).sum((1, 2)) / total
    spread_x = ((ink * (x - mean_x[:, None, None]) ** 2).sum((1, 2)) / total).sqrt() / width
    cov_xy = (ink * (x - mean_x[:, None, None]) * (y - mean_y[:, None, None])).sum((1, 2)) / total
    slant = -cov_xy / var_y.clamp(min=1e-6)  # rows grow downwards: a right slant has x falling as y grows
    return {"thickness": thickness, "width": spread_x, "slant": slant}


@dataclass(frozen=True)
class AttributeBins:
    """The two tercile cut points of each attribute; `words` turns measurements into caption words."""
    thickness: tuple[float, float]
    width: tuple[float, float]
    slant: tuple[float, float]

    @classmethod
    def fit(cls, images: torch.Tensor) -> "AttributeBins":
        measured = measure_attributes(images)
        cuts = {name: tuple(torch.quantile(values, torch.tensor([1 / 3, 2 / 3])).tolist())
                for name, values in measured.items()}
        return cls(**cuts)

    def to_dict(self) -> dict:
        return {name: list(cut) for name, cut in asdict(self).items()}

    def bins(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bin index 0, 1, 2 of each attribute (B,) int64."""
        measured = measure_attributes(images)
        return {name: torch.bucketize(measured[name], torch.tensor(getattr(self, name)), right=True)
                for name in WORDS}

    def captions(self, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """'a thick narrow digit seven slanted right' for each image and its class label."""
        if labels.shape != images.shape[:1]:
            raise ValueError(f"captions: labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        bins = self.bins(images)
        return [f"a {WORDS['thickness'][int(bins['thickness'][i])]} {WORDS['width'][int(bins['width'][i])]} digit "
                f"{DIGIT_NAMES[int(label)]} {WORDS['slant'][int(bins['slant'][i])]}"
                for i, label in enumerate(labels.tolist())]


def caption_vocabulary() -> list[str]:
    """Every word a toy caption can contain, after the special tokens <pad> (id 0), </s>, <unk>."""
    words = {"a", "digit", *DIGIT_NAMES}
    for choices in WORDS.values():
        for phrase in choices:
            words.update(phrase.split())
    return ["<pad>", "</s>", "<unk>", *sorted(words)]


def toy_caption_encoder(max_length: int = 16, d_model: int = 32, num_layers: int = 2, seed: int = 0
                        ) -> T5CaptionEncoder:
    """A T5CaptionEncoder for toy captions, built offline: word-level tokenizer (+ </s>) and a tiny T5 encoder
    with random weights drawn from `seed` (the same encoder in every process)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from dd import shim_torchvision

    shim_torchvision()  # before transformers imports torchvision
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocabulary = caption_vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(vocabulary), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    return T5CaptionEncoder(encoder, tokenizer, max_length=max_length)
