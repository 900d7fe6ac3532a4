"""The pairs stage: DD's training data, (noise sequence, token sequence, label) trajectories of the teacher.

Each pair is made by running the teacher in its AR order with every token's categorical draw replaced
by the deterministic flow-matching map of that token's own Gaussian noise vector
(`Teacher.flow_tokens`, reference/dd-paper.md sections 1.2-1.3). The noise sequence fixes the whole
trajectory X_1 .. X_{n+1}: X_k keeps the first tokens and the original noise after them, so storing
(noise, final tokens) is enough.

Output results/<setting>/pairs/:
    shard-00000.safetensors ...   noise (n, L, C) float32, tokens (n, L) int64, labels (n,) int64
    manifest.json                 setting, sizes, seeds, codebook and teacher-file hashes, flow solver,
                                  per-shard sha256 (no timings: reruns give identical bytes)

Determinism. Shard i's labels (uniform over the classes) and noise come from one CPU generator seeded
from (pairs.seed, i) alone (`shard_seed`), so any shard can be remade on its own, and the teacher runs
in batches of pairs.batch_size inside the shard in a fixed order. On one machine and device, a rerun
gives the same bytes.

Kill and resume. Work happens in results/<setting>/pairs.partial/, which persists across kills and which
no workflow tool declares (Snakemake deletes a job's declared outputs before running it, not their
siblings). A shard is written under a temporary name and renamed; then the manifest-in-progress
(pairs.partial/manifest.json, "complete": false) records its sha256. A rerun with the same plan (all of
the manifest but the shard list) keeps every recorded shard whose bytes still hash to the record, and
redoes the rest; a different plan (changed params, teacher, device) starts over. Only when every shard
is done is the manifest completed and the folder renamed to pairs/, so Snakemake and DVC never see a
finished-looking output early.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dd import hub
from dd.atomic import write_json
from dd.config import Params, Setting
from dd.errors import StageError
from dd.teacher import Teacher, load_teacher
from dd.teacher_stage import teacher_dir
from dd.tracking import stage_run

MANIFEST = "manifest.json"
FORMAT = "dd-pairs/1"


def pairs_dir(params: Params, setting: Setting) -> Path:
    return params.stage_dir(setting, "pairs")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed that depends on (seed, shard index) only (numpy SeedSequence mixing)."""
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def shard_inputs(teacher: Teacher, seed: int, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (count,) uniform over the classes, then noise (count, L, C), from shard `index`'s generator."""
    generator = torch.Generator().manual_seed(shard_seed(seed, index))
    labels = torch.randint(0, teacher.num_classes, (count,), generator=generator)
    noise = torch.randn(count, teacher.num_tokens, teacher.token_dim, generator=generator)
    return noise, labels


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_of(setting: Setting, teacher: Teacher, device: torch.device) -> dict:
    """Everything that decides the bytes of the shards (the manifest without its shard list)."""
    p = setting.pairs
    return {
        "format": FORMAT,
        "setting": setting.name,
        "family": setting.family,
        "num_pairs": p.num_pairs,
        "shard_size": p.shard_size,
        "num_shards": -(-p.num_pairs // p.shard_size),
        "batch_size": p.batch_size,
        "seed": p.seed,
        "seed_rule": "shard i: torch CPU generator seeded with dd.pairs.shard_seed(seed, i); "
                     "labels = randint(num_classes, (n,)), then noise = randn(n, L, C)",
        "layout": {"noise": ["n", teacher.num_tokens, teacher.token_dim, "float32"],
                   "tokens": ["n", teacher.num_tokens, "int64"], "labels": ["n", "int64"],
                   "schedule": teacher.schedule, "vocab_size": teacher.vocab_size,
                   "num_classes": teacher.num_classes},
        "teacher_sampling": dataclasses.asdict(setting.teacher_sampling),
        "flow": {"solver": dict(setting.flow.solver)},
        "codebook_sha256": teacher.codebook_sha256(),
        "teacher_files": {role: {"file": path.name, "sha256": hub.sha256_of(path)}
                          for role, path in sorted(teacher.files.items())},
        "device": device.type,
        "torch": torch.__version__,
    }


@contextlib.contextmanager
def _exclusive(folder: Path):
    """Hold an exclusive lock on `folder` so two runs never write the same partial folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{folder}: another `dd pairs` run is writing here; wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


def _resume(work: Path, plan: dict) -> dict[int, dict]:
    """The finished shards of an earlier run that still verify; clears the folder when the plan changed."""
    manifest_path = work / MANIFEST
    for leftover in work.glob(".*.tmp-*"):  # a write cut short by a kill
        leftover.unlink()
    if not manifest_path.exists():
        return {}
    recorded = json.loads(manifest_path.read_text())
    old_plan = {k: v for k, v in recorded.items() if k not in ("shards", "complete")}
    if old_plan != plan:
        changed = sorted(k for k in set(plan) | set(old_plan) if plan.get(k) != old_plan.get(k))
        print(f"[pairs] {work}: plan changed ({', '.join(changed)}); starting over", flush=True)
        for path in work.iterdir():
            path.unlink()
        return {}
    done = {}
    for entry in recorded["shards"]:
        path = work / entry["file"]
        if path.is_file() and hub.sha256_of(path) == entry["sha256"]:
            done[entry["index"]] = entry
        else:
            print(f"[pairs] {path.name}: missing or does not match its recorded sha256; redoing it", flush=True)
    return done


def _write_manifest(work: Path, plan: dict, done: dict[int, dict], complete: bool) -> dict:
    manifest = {**plan, "complete": complete, "shards": [done[i] for i in sorted(done)]}
    write_json(work / MANIFEST, manifest)
    return manifest


def _publish(work: Path, final: Path) -> None:
    """Rename the finished work folder to `final` (an older `final` is moved aside, then removed)."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, final)


@torch.no_grad()
def make_shard(teacher: Teacher, setting: Setting, index: int, count: int, progress=None) -> dict[str, torch.Tensor]:
    """Shard `index` with `count` pairs, as CPU tensors {noise, tokens, labels}."""
    noise, labels = shard_inputs(teacher, setting.pairs.seed, index, count)
    tokens = torch.empty(count, teacher.num_tokens, dtype=torch.long)
    for start in range(0, count, setting.pairs.batch_size):
        stop = min(count, start + setting.pairs.batch_size)
        tokens[start:stop] = teacher.flow_tokens(noise[start:stop], labels[start:stop], setting.flow.solver).cpu()
        if progress is not None:
            progress.update(stop - start)
    return {"noise": noise, "tokens": tokens, "labels": labels}


def _save_shard(work: Path, index: int, shard: dict, setting: Setting) -> dict:
    final = work / shard_name(index)
    tmp = work / f".{final.name}.tmp-{os.getpid()}"
    # One metadata entry: safetensors writes the metadata map in arbitrary order, which would change the bytes.
    about = json.dumps({"format": FORMAT, "setting": setting.name, "shard": index}, sort_keys=True)
    save_file(shard, str(tmp), metadata={"dd-pairs": about})
    sha = hub.sha256_of(tmp)
    os.replace(tmp, final)
    return {"index": index, "file": final.name, "count": int(shard["labels"].shape[0]), "sha256": sha}


def run_pairs_stage(params: Params, setting: Setting, device: str | None = None) -> Path:
    """Make (or finish) results/<setting>/pairs/; returns its path."""
    device = torch.device(device or default_device())
    final = pairs_dir(params, setting)
    work = final.with_name(final.name + ".partial")
    teacher = load_teacher(setting, teacher_dir(params, setting), device)
    plan = plan_of(setting, teacher, device)
    p = setting.pairs
    counts = [min(p.shard_size, p.num_pairs - i * p.shard_size) for i in range(plan["num_shards"])]

    with stage_run(params, setting, "pairs", {"pairs.device": device.type}) as mlflow:
        work.mkdir(parents=True, exist_ok=True)
        with _exclusive(work):
            done = _resume(work, plan)
            resumed = sum(counts[i] for i in done)
            if done:
                print(f"[pairs] {setting.name}: resuming, {len(done)} of {len(counts)} shards "
                      f"({resumed} pairs) already done", flush=True)
            started, made = time.perf_counter(), 0
            with tqdm(total=p.num_pairs, initial=resumed, desc=f"[pairs] {setting.name}", unit="pair",
                      smoothing=0.1) as bar:
                for index, count in enumerate(counts):
                    if index in done:
                        continue
                    shard_started = time.perf_counter()
                    shard = make_shard(teacher, setting, index, count, progress=bar)
                    done[index] = _save_shard(work, index, shard, setting)
                    _write_manifest(work, plan, done, complete=False)
                    made += count
                    seconds = time.perf_counter() - shard_started
                    mlflow.log_metrics({"pairs.shard_pairs_per_s": count / seconds, "pairs.done": resumed + made},
                                       step=index)
            seconds = time.perf_counter() - started
            _write_manifest(work, plan, done, complete=True)
        _publish(work, final)
        mlflow.log_metrics({"pairs.total": p.num_pairs, "pairs.made_this_run": made, "pairs.resumed": resumed,
                            "pairs.seconds": seconds, "pairs.pairs_per_s": made / seconds if made else 0.0})
        mlflow.log_artifact(str(final / MANIFEST))
    print(f"[pairs] {setting.name}: {p.num_pairs} pairs in {len(counts)} shards -> {final} "
          f"({made} made in {seconds:.1f}s" + (f", {made / seconds:.2f} pairs/s" if made else "") + ")", flush=True)
    return final
