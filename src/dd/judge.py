"""The toy judge: an independent digit network whose features define the toy's FID, precision and recall.

Why a second network: the digit classifier of dd.data (classifier.safetensors) is also the perceptual term
of the toy distillation, so the student is optimised against its features; judging the student with it
would reward exactly what was optimised (e.g. one prototypical digit per class). The judge is trained in
the teacher stage next to the teacher, but no training step of the pipeline ever reads it: only the
evaluate stage (dd.evaluate) does.

Independence from the classifier, on purpose:
  - architecture: a small ResNet (pre-activation residual blocks, BatchNorm, strided convs) with global
    average pooling, wider than the classifier; the classifier is a plain conv/max-pool stack with a
    flattened linear embedding;
  - seed: JUDGE_SEED, fixed and unrelated to the pipeline's seeds, so every teacher seed is judged by the
    same network (the judge depends only on the digits, the image size and the torch thread count);
  - training: its own augmentation (random shifts and a small random scale), label smoothing, SGD with
    Nesterov momentum.

features(images) is the global-average-pooled penultimate embedding (FEATURE_DIM wide, post-ReLU, like the
Inception pool3 features of the paper's FID); classify(images) the predicted labels.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dd import data

JUDGE_SEED = 20_241_217  # independent of every seed in params.yaml (the paper's arXiv date)
FILE = "judge.safetensors"


@dataclass
class JudgeConfig:
    image_size: int = 16
    widths: tuple = (16, 32, 64)  # one residual stage per width; stages 2.. halve the resolution
    num_classes: int = data.NUM_CLASSES

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


class ResidualBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv x 2); a strided 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x))
        out = self.conv1(h)
        out = self.conv2(F.relu(self.norm2(out)))
        # identity: the raw input; projection: the pre-activated input (He et al. 2016, pre-activation ResNet)
        return out + (x if isinstance(self.shortcut, nn.Identity) else self.shortcut(h))


class DigitJudge(nn.Module):
    """Small ResNet on (B, 3, S, S) images in [-1, 1]: stem conv -> residual stages -> BN-ReLU -> global
    average pool (features) -> linear (logits)."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config = config or JudgeConfig()
        self.stem = nn.Conv2d(3, config.widths[0], 3, padding=1, bias=False)
        blocks, in_channels = [], config.widths[0]
        for i, width in enumerate(config.widths):
            blocks.append(ResidualBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.stages = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(in_channels)
        self.head = nn.Linear(in_channels, config.num_classes)

    def _check(self, x: torch.Tensor) -> None:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"DigitJudge expects images of shape (B, 3, {size}, {size}) in [-1, 1], got "
                             f"{tuple(x.shape)}; this judge was trained at image_size {size}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, feature_dim) non-negative pooled embeddings."""
        self._check(x)
        h = F.relu(self.norm(self.stages(self.stem(x))))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def features(model: DigitJudge, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Judge embeddings (N, feature_dim) float32 of images (N, 3, S, S) in [-1, 1], eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.features(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.config.feature_dim)


@torch.no_grad()
def classify(model: DigitJudge, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) int64 of images (N, 3, S, S) in [-1, 1], eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (up to 1/16 of the side, at least 1 px) and random scale in [0.9, 1.1], background -1."""
    n, _, size, _ = images.shape
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    max_shift = max(1, size // 16)
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float() * (2.0 / size)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with 0; shift to [0, 2] so the padding is the -1 background
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def train_judge(image_size: int, epochs: int = 8, batch_size: int = 128, lr: float = 0.1,
                seed: int = JUDGE_SEED) -> tuple[DigitJudge, dict]:
    """Train a DigitJudge on the train digits (dd.data.load_mnist) at image_size; test on the test digits.

    Deterministic given the seed and the torch thread count; the global RNG state is left untouched.
    SGD + Nesterov, one-cycle schedule, label smoothing 0.1. Returns (model in eval mode, metrics).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_judge: epochs and batch_size must be >= 1, got {epochs} and {batch_size} "
                         f"(teacher.train.judge_epochs in params.yaml)")
    config = JudgeConfig(image_size=image_size)
    train_x, train_y = data.load_mnist("train", image_size)
    test_x, test_y = data.load_mnist("test", image_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitJudge(config)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(augment(train_x[batch], generator)), train_y[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    metrics = {"test_accuracy": (classify(model, test_x) == test_y).float().mean().item(),
               "train_accuracy": (classify(model, train_x) == train_y).float().mean().item(),
               "train_seconds": train_seconds, "num_threads": torch.get_num_threads(), "seed": seed,
               "epochs": epochs, "batch_size": batch_size, "lr": lr, "image_size": image_size,
               "parameters": sum(p.numel() for p in model.parameters())}
    return model, metrics


def describe(model: DigitJudge) -> str:
    """One line naming the judge (goes into every toy metrics file)."""
    c = model.config
    return (f"DigitJudge: pre-activation ResNet {list(c.widths)} + global average pool, {c.feature_dim}-d features, "
            f"{c.image_size}px, seed {JUDGE_SEED}; trained in the teacher stage, used by no training step")


def save_judge(model: DigitJudge, path: str | os.PathLike, metrics: dict | None = None) -> None:
    """Weights + config (+ training metrics) in one safetensors file, written atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"config": json.dumps(asdict(model.config)), "metrics": json.dumps(metrics or {})}
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_judge(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitJudge:
    """Inverse of save_judge: strict load, eval mode; one clear error when the file is missing or foreign."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no toy judge at {path}; it is trained by the teacher stage: rerun "
                                f"`dd teacher --setting <toy setting>` (a teacher folder from before the judge "
                                f"existed has none)")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path}: no 'config' metadata; it was not written by dd.judge.save_judge()")
    fields = json.loads(metadata["config"])
    try:
        model = DigitJudge(JudgeConfig(**{**fields, "widths": tuple(fields["widths"])}))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: its config {fields} is not a DigitJudge config ({err}); is it another "
                         f"network's file?") from None
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval()
