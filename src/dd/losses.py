"""The distillation loss (reference/dd-paper.md §1.3-1.5) and its perceptual distances.

Per example, with x_t = perturb(codebook[tokens], t, noise) (data prefix < t + the pair's ORIGINAL noise) and
conti, logits = student(x_t, label, t):
    loss   = w_ce   * CE(logits, tokens)                        over positions >= t (the noise positions)
           + w_perc * d(decode(hybrid), decode(codebook[tokens])) hybrid = target codes before max(split, t),
                                                                   the continuous head from there on, as the
                                                                   sampler builds its output (§1.5 GUESS)
           + w_mse  * |conti - codebook[tokens]|^2              over positions >= t
Every term is a per-example mean (over its positions or pixels), then a mean over the batch, so the loss of a
global batch split over N processes is the mean of the per-process losses and DDP gradients equal those of
one process on the whole batch (with distill.perceptual_fraction < 1 the perceptual term averages over the first
share of each (micro-)batch only: a random subset, since batches are random draws of the pairs). d is LPIPS (the `lpips` package, VGG trunk) for paper rows and, for the toy
settings, random-weight conv features or the digit classifier's features, + pixel MSE (no download). Decoding goes
through the frozen tokenizer of the Teacher seam (gradients flow to the continuous head).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dd import sampling
from dd.errors import StageError
from dd.teacher import Teacher


class FeatureDistance(torch.nn.Module):
    """Toy stand-in for LPIPS: squared distance of the digit classifier's unit-normalised features (as LPIPS
    normalises its activations) + pixel MSE; per example (B,). Images in [-1, 1]."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, images, targets):
        size = self.classifier.config.image_size
        if images.shape[-1] != size:
            resize = dict(size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            images, targets = F.interpolate(images, **resize), F.interpolate(targets, **resize)
        features = F.normalize(self.classifier.features(images), dim=-1)
        target_features = F.normalize(self.classifier.features(targets), dim=-1)
        return (features - target_features).square().sum(-1) + (images - targets).square().flatten(1).mean(-1)


class RandomFeatureDistance(torch.nn.Module):
    """Toy stand-in for LPIPS that sees style: an untrained conv net with fixed, seeded weights (3 levels of
    3x3 conv + ReLU at full, 1/2 and 1/4 resolution), LPIPS-style channel-normalised activations, squared
    distance averaged over positions and summed over levels, + pixel MSE; per example (B,). Images in [-1, 1].
    Random features keep stroke, slant and thickness (a classifier's features are trained to ignore them, and
    a student trained against them collapses to class prototypes: issue 12)."""

    SEED = 20241226
    WIDTHS = (32, 64, 128)

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(self.SEED)
        layers, in_ch = [], 3
        for width in self.WIDTHS:
            conv = torch.nn.Conv2d(in_ch, width, 3, padding=1)
            with torch.no_grad():  # He-normal weights, zero bias: ReLU activations neither vanish nor explode
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (in_ch * 9)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            in_ch = width
        self.layers = torch.nn.ModuleList(layers).requires_grad_(False)

    def _features(self, x):
        out = []
        for level, conv in enumerate(self.layers):
            if level:
                x = F.avg_pool2d(x, 2)
            x = F.relu(conv(x))
            out.append(x / (x.square().sum(1, keepdim=True) + 1e-10).sqrt())
        return out

    def forward(self, images, targets):
        distance = (images - targets).square().flatten(1).mean(-1)
        for a, b in zip(self._features(images), self._features(targets)):
            distance = distance + (a - b).square().sum(1).flatten(1).mean(-1)
        return distance


class LpipsDistance(torch.nn.Module):
    """LPIPS (VGG trunk, v0.1) per example (B,). Built on first use: its trunk needs torchvision's ImageNet VGG16
    weights, which torch.hub downloads (or finds in its cache)."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        self.net = net
        self.lpips = None

    def _build(self, device):
        from dd import shim_torchvision

        shim_torchvision()  # before lpips imports torchvision
        import lpips

        try:
            model = lpips.LPIPS(net=self.net, verbose=False)
        except OSError as err:  # urllib's URLError is an OSError
            checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
            weights = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}.get(self.net, "<trunk>.pth")
            raise StageError(f"LPIPS ({self.net}) could not load torchvision's ImageNet trunk weights ({err}); "
                             f"offline, download https://download.pytorch.org/models/{weights} elsewhere and put "
                             f"it at {checkpoints / weights} (TORCH_HOME moves that folder)") from None
        self.lpips = model.to(device).eval().requires_grad_(False)

    def forward(self, images, targets):
        if self.lpips is None:
            self._build(images.device)
        return self.lpips(images, targets, normalize=False).flatten()


def perceptual_distance(kind: str, teacher_dir: Path | None = None) -> torch.nn.Module:
    """The perceptual term of the setting: "lpips", "random" (random-weight conv features, toy) or "feature"
    (needs the toy teacher's classifier)."""
    if kind == "lpips":
        return LpipsDistance("vgg")
    if kind == "random":
        return RandomFeatureDistance()
    if kind == "feature":
        from dd.data import load_classifier

        from dd.toy_teacher import FILES

        path = Path(teacher_dir or ".") / FILES["classifier"]
        if not path.is_file():
            raise StageError(f"{path}: the 'feature' perceptual loss needs the toy teacher's digit classifier; "
                             f"use perceptual: lpips for settings without one")
        return FeatureDistance(load_classifier(path))
    raise StageError(f"unknown perceptual loss {kind!r}; expected 'lpips', 'random' or 'feature'")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example mean of values (B, L) over mask (B, L) -> (B,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def distill_loss(student: sampling.StudentOps, teacher: Teacher, net, labels, noise, tokens, t, split: int,
                 weights: dict, perceptual: torch.nn.Module | None, perceptual_fraction: float = 1.0):
    """(total loss, {term: detached mean}) of one batch; see the module docstring. perceptual_fraction: the
    perceptual term is the mean over the first ceil(fraction * B) examples of the batch only (its rows are random
    draws of the pairs, so this is a random subset)."""
    data = teacher.embed(tokens).to(noise.dtype)
    steps = t.float()
    x_t = student.perturb(data, steps, noise)
    conti, logits = student.forward(x_t, labels, steps, net=net)
    predicted = ~student.given_mask(t)  # the noise positions, >= prefix_len(t)
    terms = {}
    if weights.get("ce", 0.0):
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        terms["ce"] = _masked_mean(ce, predicted).mean()
    if weights.get("mse", 0.0):
        terms["mse"] = _masked_mean((conti.float() - data).square().mean(-1), predicted).mean()
    if weights.get("perceptual", 0.0):
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        continuous = predicted & (positions >= student.prefix_len(split))
        hybrid = torch.where(continuous[..., None], conti.to(data.dtype), data)
        rows = math.ceil(perceptual_fraction * data.shape[0])
        with torch.no_grad():
            target_images = teacher.decode_embeddings(data[:rows])
        terms["perceptual"] = perceptual(teacher.decode_embeddings(hybrid[:rows]), target_images).float().mean()
    if not terms:
        raise StageError("distill: every loss weight is 0; set distill.loss_weights (ce, perceptual, mse)")
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}
