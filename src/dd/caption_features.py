"""Cached caption features: a list of captions encoded once (dd.text_encoder) into safetensors shards, so the
t2i pairs, distillation and sampling read features and masks and never run the text encoder again.

Folder layout (`write_caption_features(encoder, captions, folder, ...)`):
    shard-00000.safetensors ...   features (n, T, D) in the requested dtype, left-padded as the t2i GPT reads
                                  them; mask (n, T) int8, 1 at real caption tokens
    manifest.json                 format, caption count, sha256 of the caption list, shard size, T, D, dtype,
                                  the caller's encoder identity, and per-shard sha256 (no timings)
    captions.json                 the captions in order (row i of the shards is caption i)

Kill and resume as the pairs stage: the work happens in <folder>.partial/; each finished shard is recorded
with its sha256 in the manifest-in-progress; a rerun with the same plan keeps every shard that still hashes
to its record and encodes the rest; the folder is renamed to <folder> only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dd import hub
from dd.atomic import publish_dir, write_json
from dd.errors import StageError

FORMAT = "dd-caption-features/1"
MANIFEST = "manifest.json"
CAPTIONS = "captions.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def captions_sha256(captions: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode()).hexdigest()


def _plan(encoder, captions, shard_size: int, dtype: str, encoder_id: dict) -> dict:
    return {"format": FORMAT, "count": len(captions), "captions_sha256": captions_sha256(captions),
            "shard_size": shard_size, "length": encoder.max_length, "feature_dim": encoder.feature_dim,
            "dtype": dtype, "encoder": encoder_id}


def _resume(work: Path, plan: dict) -> dict[int, dict]:
    """Shards of an earlier run with the same plan that still verify; a changed plan starts over."""
    for leftover in work.glob(".*.tmp-*"):
        leftover.unlink()
    manifest_path = work / MANIFEST
    if not manifest_path.exists():
        return {}
    recorded = json.loads(manifest_path.read_text())
    if {k: v for k, v in recorded.items() if k not in ("shards", "complete")} != plan:
        for path in work.iterdir():
            path.unlink()
        return {}
    return {entry["index"]: entry for entry in recorded["shards"]
            if (work / entry["file"]).is_file() and hub.sha256_of(work / entry["file"]) == entry["sha256"]}


def _write_manifest(work: Path, plan: dict, done: dict[int, dict], complete: bool) -> None:
    write_json(work / MANIFEST, {**plan, "complete": complete, "shards": [done[i] for i in sorted(done)]})


def write_caption_features(encoder, captions: list[str], folder: Path | str, shard_size: int = 1024,
                           batch_size: int = 32, dtype: str = "float32", encoder_id: dict | None = None) -> Path:
    """Encode `captions` with `encoder` (a dd.text_encoder.T5CaptionEncoder) into `folder` (layout above).

    encoder_id: what identifies the encoder's weights (e.g. the sha256 of its files); it is recorded, and a
    different one makes a rerun start over instead of mixing features of two encoders.
    """
    if dtype not in DTYPES:
        raise ValueError(f"write_caption_features: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"write_caption_features: shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError("write_caption_features: captions must be a non-empty list of strings")
    captions = list(captions)
    folder = Path(folder)
    work = folder.with_name(folder.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    plan = _plan(encoder, captions, shard_size, dtype, dict(encoder_id or {}))
    done = _resume(work, plan)
    num_shards = -(-len(captions) // shard_size)
    with tqdm(total=len(captions), desc=f"caption features -> {folder.name}", unit="caption") as progress:
        progress.update(sum(entry["count"] for entry in done.values()))
        for index in range(num_shards):
            if index in done:
                continue
            rows = captions[index * shard_size:(index + 1) * shard_size]
            features, masks = [], []
            for start in range(0, len(rows), batch_size):
                f, m = encoder.encode(rows[start:start + batch_size])
                features.append(f.to(DTYPES[dtype]).cpu())
                masks.append(m.to(torch.int8).cpu())
                progress.update(len(rows[start:start + batch_size]))
            final = work / shard_name(index)
            tmp = work / f".{final.name}.tmp-{os.getpid()}"
            save_file({"features": torch.cat(features).contiguous(), "mask": torch.cat(masks).contiguous()},
                      str(tmp), metadata={"dd-caption-features": json.dumps({"format": FORMAT, "shard": index})})
            sha = hub.sha256_of(tmp)
            os.replace(tmp, final)
            done[index] = {"index": index, "file": final.name, "count": len(rows), "sha256": sha}
            _write_manifest(work, plan, done, complete=False)
    write_json(work / CAPTIONS, captions)
    _write_manifest(work, plan, done, complete=True)
    publish_dir(work, folder)
    return folder


class CaptionFeatures:
    """Read side of the cache: `len`, `captions`, and `rows(indices) -> (features (n, T, D), mask (n, T))`.

    Lazy: a shard is memory-mapped (safetensors safe_open) and only the rows asked for are read, because the
    paper's 20k training prompts are ~20 GB of float32 flan-t5-xl features, more than a stage should hold in
    memory. Opening checks that the folder is complete and every shard file is there; a shard's sha256 is checked
    the first time one of its rows is read, so a stage that reads a few rows does not hash the whole folder."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise StageError(f"{self.folder}: no {MANIFEST}; encode the captions first (write_caption_features)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise StageError(f"{manifest_path}: not a complete {FORMAT} folder; encode the captions again")
        self.captions = json.loads((self.folder / CAPTIONS).read_text())
        if captions_sha256(self.captions) != self.manifest["captions_sha256"]:
            raise StageError(f"{self.folder / CAPTIONS}: does not match the manifest's captions_sha256; encode again")
        self._entries = sorted(self.manifest["shards"], key=lambda entry: entry["index"])
        size = self.manifest["shard_size"]
        for position, entry in enumerate(self._entries):
            expected = min(size, len(self.captions) - position * size)
            if entry["index"] != position or entry["count"] != expected:
                raise StageError(f"{manifest_path}: shard {position} should hold {expected} rows, the manifest "
                                 f"records {entry}; encode the captions again")
            if not (self.folder / entry["file"]).is_file():
                raise StageError(f"{self.folder / entry['file']}: missing; encode the captions again")
        if sum(entry["count"] for entry in self._entries) != len(self.captions):
            raise StageError(f"{self.folder}: the shards hold another number of rows than {len(self.captions)} captions")
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.captions)

    def _shard(self, index: int):
        """The memory-mapped shard `index`, verified against its sha256 the first time it is used."""
        if index not in self._open:
            entry = self._entries[index]
            path = self.folder / entry["file"]
            if not path.is_file() or hub.sha256_of(path) != entry["sha256"]:
                raise StageError(f"{path}: missing or does not match its sha256 in {MANIFEST}; encode the captions again")
            handle = safe_open(str(path), framework="pt")
            shape = handle.get_slice("mask").get_shape()
            if shape[0] != entry["count"] or shape[1] != self.manifest["length"]:
                raise StageError(f"{path}: mask of shape {shape}, the manifest says {entry['count']} rows of "
                                 f"{self.manifest['length']} tokens; encode the captions again")
            self._open[index] = handle
        return self._open[index]

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"caption rows must lie in [0, {len(self) - 1}]")
        size = self.manifest["shard_size"]
        features, masks = [], []
        for i in indices.tolist():
            shard, row = self._shard(i // size), i % size
            features.append(shard.get_slice("features")[row:row + 1])
            masks.append(shard.get_slice("mask")[row:row + 1])
        if not features:
            return (torch.empty(0, self.manifest["length"], self.manifest["feature_dim"], dtype=DTYPES[self.manifest["dtype"]]),
                    torch.empty(0, self.manifest["length"], dtype=torch.int8))
        return torch.cat(features), torch.cat(masks)
