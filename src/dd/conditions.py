"""The condition of a setting, by index: what pairs, distillation and sampling store and what the teacher reads.

Every stage handles conditions as int64 indices (the `labels` tensors of the pair and sample shards): a class label
for a class-conditional setting, a caption row of the setting's cached caption features for a text-to-image one
(results/<S>/text_features/{train,eval}/, dd.prompts). A `Conditions` object turns a batch of indices into what the
Teacher seam and the students take (labels, or dd.teacher.Captions), so the pipeline has one code path and the
condition is the only thing that differs. Class conditions are the identity and record nothing, so the
class-conditional stages write the same bytes as before conditions existed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dd.config import Params, Setting
from dd.errors import StageError


class ClassConditions:
    """Class labels 0 .. count-1: the index is the condition."""

    kind = "class"

    def __init__(self, count: int):
        self.count = count

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def identity(self) -> None:
        return None

    def classes(self, index: torch.Tensor) -> torch.Tensor:
        return index


class CaptionConditions:
    """Rows of a cached caption-feature folder (dd.caption_features); `classes` are the toy captions' digits."""

    kind = "caption"

    def __init__(self, folder: Path | str, classes: list[int] | None = None):
        from dd.caption_features import CaptionFeatures

        self.features = CaptionFeatures(folder)
        self.count = len(self.features)
        self._classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if self._classes is not None and self._classes.shape[0] != self.count:
            raise StageError(f"{folder}: {self.count} captions but {self._classes.shape[0]} class labels in "
                             f"prompts.json; re-run `dd text-features`")

    def __call__(self, index: torch.Tensor):
        from dd.teacher import Captions

        features, mask = self.features.rows(index.cpu())
        return Captions(features.float(), mask).to(index.device)

    def identity(self) -> dict:
        """What pairs and samples record about their conditions: the feature folder's manifest content hash."""
        m = self.features.manifest
        return {"folder": self.features.folder.name, "count": self.count, "captions_sha256": m["captions_sha256"],
                "shards_sha256": [entry["sha256"] for entry in m["shards"]]}

    def classes(self, index: torch.Tensor) -> torch.Tensor:
        if self._classes is None:
            raise StageError(f"{self.features.folder}: these captions carry no class labels")
        return self._classes[index.cpu()]


class RandomCaptions:
    """Seeded random caption features, every position real: the latency of a text-to-image setting's architectures
    where no prompts were encoded (`dd bench` with random weights). Row i depends on i alone."""

    kind = "caption"

    def __init__(self, length: int, dim: int, count: int = 1024):
        self.length, self.dim, self.count = length, dim, count

    def __call__(self, index: torch.Tensor):
        from dd.teacher import Captions

        rows = [torch.randn(self.length, self.dim, generator=torch.Generator().manual_seed(int(i))) for i in index]
        return Captions(torch.stack(rows), torch.ones(len(rows), self.length, dtype=torch.long)).to(index.device)

    def identity(self) -> dict:
        return {"random": True, "count": self.count}


def random_captions(setting: Setting) -> RandomCaptions:
    model = setting.teacher.model
    return RandomCaptions(model.get("cls_token_num", 120), model.get("caption_dim", 2048))


def conditions_for(params: Params, setting: Setting, split: str):
    """The conditions of a setting: class labels, or the text-to-image setting's `split` ("train": the pairs'
    prompts, "eval": the sample stage's) caption features."""
    if not setting.text_to_image:
        return ClassConditions(setting.num_classes)
    from dd.prompts import read_prompts, text_features_dir

    if split not in ("train", "eval"):
        raise ValueError(f"conditions_for: split must be 'train' or 'eval', got {split!r}")
    folder = text_features_dir(params, setting)
    prompts = read_prompts(folder, setting)
    return CaptionConditions(folder / split, prompts[split].get("classes"))


def spread(count: int, n: int) -> torch.Tensor:
    """n condition indices spread over 0 .. count-1 (sample grids)."""
    if count >= n:
        return torch.linspace(0, count - 1, n).round().long()
    return torch.arange(n) % count
