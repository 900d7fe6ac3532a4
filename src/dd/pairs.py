"""The pairs stage: DD's training data, (noise sequence, token sequence, condition) trajectories of the teacher.

Each pair is made by running the teacher in its AR order with every token's categorical draw replaced
by the deterministic flow-matching map of that token's own Gaussian noise vector
(`Teacher.flow_tokens`, reference/dd-paper.md sections 1.2-1.3). The noise sequence fixes the whole
trajectory X_1 .. X_{n+1}: X_k keeps the first tokens and the original noise after them, so storing
(noise, final tokens) is enough.

Output results/<setting>/pairs/:
    shard-00000.safetensors ...   noise (n, L, C) float32, tokens (n, L) int64, labels (n,) int64: the condition
                                  index (dd.conditions): the class label, or (text-to-image) the row of the
                                  training caption features results/<S>/text_features/train/
    manifest.json                 setting, sizes, seeds, codebook and teacher-file hashes, flow solver,
                                  per-shard sha256 (no timings: reruns give identical bytes)

Determinism. Shard i's labels (uniform over the classes, or over the training captions) and noise come from one CPU generator seeded
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

Reading. `ShardedPairs` reads a finished pairs/ folder lazily (memory-mapped shards, each verified against the
manifest first); `TensorPairs` holds pairs in memory. Both give distillation `len()`, `get(indices)` and
`identity` (what a checkpoint must have trained on to be resumed).
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from dd.atomic import exclusive_lock, publish_dir, write_json
from dd.conditions import ClassConditions, conditions_for
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


def shard_inputs(teacher: Teacher, seed: int, index: int, count: int,
                 num_conditions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (count,) uniform over the conditions (default: the teacher's classes), then noise (count, L, C),
    from shard `index`'s generator."""
    generator = torch.Generator().manual_seed(shard_seed(seed, index))
    labels = torch.randint(0, teacher.num_classes if num_conditions is None else num_conditions, (count,),
                           generator=generator)
    noise = torch.randn(count, teacher.num_tokens, teacher.token_dim, generator=generator)
    return noise, labels


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_of(setting: Setting, teacher: Teacher, device: torch.device, conditions=None) -> dict:
    """Everything that decides the bytes of the shards (the manifest without its shard list). Caption conditions
    add their identity (class conditions add nothing: class-conditional manifests keep their bytes)."""
    p = setting.pairs
    identity = None if conditions is None else conditions.identity()
    plan = {
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
    if identity is not None:
        plan["conditions"] = identity
        plan["seed_rule"] = plan["seed_rule"].replace("randint(num_classes", "randint(conditions.count")
    return plan


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




@torch.no_grad()
def make_shard(teacher: Teacher, setting: Setting, index: int, count: int, progress=None,
               conditions=None) -> dict[str, torch.Tensor]:
    """Shard `index` with `count` pairs, as CPU tensors {noise, tokens, labels}; conditions: dd.conditions
    (default: the teacher's class labels)."""
    conditions = conditions or ClassConditions(teacher.num_classes)
    noise, labels = shard_inputs(teacher, setting.pairs.seed, index, count, conditions.count)
    tokens = torch.empty(count, teacher.num_tokens, dtype=torch.long)
    for start in range(0, count, setting.pairs.batch_size):
        stop = min(count, start + setting.pairs.batch_size)
        cond = conditions(labels[start:stop])
        tokens[start:stop] = teacher.flow_tokens(noise[start:stop], cond, setting.flow.solver).cpu()
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


def parts_dir(params: Params, setting: Setting) -> Path:
    """results/<setting>/pairs.parts/: the shard ranges made by separate jobs (`dd pairs --shards a:b`)."""
    return pairs_dir(params, setting).with_name("pairs.parts")


def part_name(start: int, stop: int) -> str:
    return f"shards-{start:05d}-{stop:05d}"


def parse_shards(text: str) -> tuple[int, int]:
    """'a:b' -> (a, b): shards a .. b-1."""
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise StageError(f"--shards {text!r}: expected START:STOP (shard indices, STOP exclusive), e.g. 0:10") from None
    return start, stop


def run_pairs_stage(params: Params, setting: Setting, device: str | None = None,
                    shards: tuple[int, int] | None = None) -> Path:
    """Make (or finish) results/<setting>/pairs/; returns its path. With shards=(a, b), make only shards a .. b-1
    into results/<setting>/pairs.parts/shards-a-b/ (an independent job: N jobs or N GPUs split one pair set;
    `merge_pairs` joins the parts into pairs/, byte-identical to a single run on the same device)."""
    device = torch.device(device or default_device())
    teacher = load_teacher(setting, teacher_dir(params, setting), device)
    conditions = conditions_for(params, setting, "train")
    plan = plan_of(setting, teacher, device, conditions)
    p = setting.pairs
    counts = [min(p.shard_size, p.num_pairs - i * p.shard_size) for i in range(plan["num_shards"])]
    if shards is None:
        final, indices, run_plan, label = pairs_dir(params, setting), range(len(counts)), plan, "pairs"
    else:
        start, stop = shards
        if not 0 <= start < stop <= len(counts):
            raise StageError(f"--shards {start}:{stop}: {setting.name} has shards 0:{len(counts)} "
                             f"({p.num_pairs} pairs of {p.shard_size}); give START < STOP within them")
        final = parts_dir(params, setting) / part_name(start, stop)
        indices, run_plan, label = range(start, stop), {**plan, "shard_range": [start, stop]}, f"pairs {start}:{stop}"
    work = final.with_name(final.name + ".partial")
    total = sum(counts[i] for i in indices)

    with stage_run(params, setting, "pairs", {"pairs.device": device.type, "pairs.shards": label}) as mlflow:
        work.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(work, "dd pairs"):
            done = _resume(work, run_plan)
            resumed = sum(counts[i] for i in done)
            if done:
                print(f"[pairs] {setting.name}: resuming, {len(done)} of {len(indices)} shards "
                      f"({resumed} pairs) already done", flush=True)
            started, made = time.perf_counter(), 0
            with tqdm(total=total, initial=resumed, desc=f"[{label}] {setting.name}", unit="pair",
                      smoothing=0.1) as bar:
                for index in indices:
                    if index in done:
                        continue
                    count = counts[index]
                    shard_started = time.perf_counter()
                    shard = make_shard(teacher, setting, index, count, progress=bar, conditions=conditions)
                    done[index] = _save_shard(work, index, shard, setting)
                    _write_manifest(work, run_plan, done, complete=False)
                    made += count
                    seconds = time.perf_counter() - shard_started
                    mlflow.log_metrics({"pairs.shard_pairs_per_s": count / seconds, "pairs.done": resumed + made},
                                       step=index)
            seconds = time.perf_counter() - started
            _write_manifest(work, run_plan, done, complete=True)
        publish_dir(work, final)
        mlflow.log_metrics({"pairs.total": total, "pairs.made_this_run": made, "pairs.resumed": resumed,
                            "pairs.seconds": seconds, "pairs.pairs_per_s": made / seconds if made else 0.0})
        mlflow.log_artifact(str(final / MANIFEST))
    if shards is not None:
        print(f"[pairs] {setting.name}: shards {shards[0]}:{shards[1]} ({total} pairs) -> {final}; join the parts "
              f"with `python -m dd pairs --setting {setting.name} --merge`", flush=True)
        return final
    print(f"[pairs] {setting.name}: {p.num_pairs} pairs in {len(counts)} shards -> {final} "
          f"({made} made in {seconds:.1f}s" + (f", {made / seconds:.2f} pairs/s" if made else "") + ")", flush=True)
    return final


def merge_pairs(params: Params, setting: Setting) -> Path:
    """Join the finished parts of pairs.parts/ into pairs/ (the manifest a single run would have written). Refuses
    parts made with another plan (params, teacher, device, torch) than each other or the current params, overlaps
    and gaps (naming the missing shards), and shards whose bytes do not match their part's record."""
    from dd.atomic import atomic_dir

    folder = parts_dir(params, setting)
    parts = sorted(d for d in folder.glob("shards-*") if d.is_dir() and not d.name.endswith(".partial")) \
        if folder.is_dir() else []
    if not parts:
        raise StageError(f"{folder}: no finished parts to merge; make them with `python -m dd pairs --setting "
                         f"{setting.name} --shards START:STOP`")
    manifests = []
    for part in parts:
        try:
            manifest = json.loads((part / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{part / MANIFEST}: unreadable ({err}); remake that part") from err
        if not manifest.get("complete") or "shard_range" not in manifest:
            raise StageError(f"{part / MANIFEST}: not a finished shard-range part; remake that part")
        manifests.append(manifest)
    plan = {k: v for k, v in manifests[0].items() if k not in ("shards", "complete", "shard_range")}
    p = setting.pairs
    wanted = {"setting": setting.name, "num_pairs": p.num_pairs, "shard_size": p.shard_size, "batch_size": p.batch_size,
              "seed": p.seed, "teacher_sampling": dataclasses.asdict(setting.teacher_sampling),
              "flow": {"solver": dict(setting.flow.solver)}}
    stale = sorted(k for k, v in wanted.items() if plan.get(k) != v)
    if stale:
        raise StageError(f"{parts[0]}: made with other params ({', '.join(stale)}) than params.yaml; delete {folder} "
                         f"and remake the parts")
    owner = {}
    for part, manifest in zip(parts, manifests):
        other = {k: v for k, v in manifest.items() if k not in ("shards", "complete", "shard_range")}
        if other != plan:
            changed = sorted(k for k in set(plan) | set(other) if plan.get(k) != other.get(k))
            raise StageError(f"{part}: made with another plan than {parts[0]} ({', '.join(changed)}); every part "
                             f"must come from the same teacher, device and torch; remake it")
        for entry in manifest["shards"]:
            if entry["index"] in owner:
                raise StageError(f"{part}: shard {entry['index']} is also in {owner[entry['index']][0]}; "
                                 f"remove one of the overlapping parts")
            owner[entry["index"]] = (part, entry)
    missing = [i for i in range(plan["num_shards"]) if i not in owner]
    if missing:
        raise StageError(f"{folder}: shards {_ranges(missing)} of 0:{plan['num_shards']} are not made yet; run "
                         f"`python -m dd pairs --setting {setting.name} --shards START:STOP` for them")
    final = pairs_dir(params, setting)
    with stage_run(params, setting, "pairs", {"pairs.merged_parts": len(parts)}) as mlflow:
        with atomic_dir(final) as out:
            for index in sorted(owner):
                part, entry = owner[index]
                if hub.sha256_of(part / entry["file"]) != entry["sha256"]:
                    raise StageError(f"{part / entry['file']}: bytes do not match its part's manifest; remake "
                                     f"{part.name}")
                os.link(part / entry["file"], out / entry["file"])
            _write_manifest(out, plan, {i: owner[i][1] for i in owner}, complete=True)
        mlflow.log_metrics({"pairs.total": p.num_pairs, "pairs.parts": len(parts)})
        mlflow.log_artifact(str(final / MANIFEST))
    shutil.rmtree(folder)
    print(f"[pairs] {setting.name}: merged {len(parts)} parts ({p.num_pairs} pairs, {plan['num_shards']} shards) "
          f"-> {final}", flush=True)
    return final


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6' (START:STOP, STOP exclusive)."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            out.append(f"{start}:{prev + 1}")
            start = cur
    return ", ".join(out)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
class TensorPairs:
    """Noise-data pairs in memory: labels (N,) int64, noise (N, L, C) float32, tokens (N, L) int64."""

    def __init__(self, labels: torch.Tensor, noise: torch.Tensor, tokens: torch.Tensor):
        if not (labels.shape[0] == noise.shape[0] == tokens.shape[0]) or tokens.shape != noise.shape[:2]:
            raise ValueError(f"TensorPairs: labels {tuple(labels.shape)}, noise {tuple(noise.shape)} and tokens "
                             f"{tuple(tokens.shape)} must be (N,), (N, L, C) and (N, L)")
        self.labels, self.noise, self.tokens = labels.long(), noise.float(), tokens.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def identity(self) -> str:
        """sha256 of the pairs' content: what a checkpoint must have been trained on to be resumed."""
        digest = hashlib.sha256()
        for tensor in (self.labels, self.noise, self.tokens):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def get(self, indices: torch.Tensor):
        return self.labels[indices], self.noise[indices], self.tokens[indices]


def _memmap_safetensors(path: Path) -> dict[str, np.memmap]:
    """Read-only numpy views of every tensor of a safetensors file (only the rows indexed are read)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    views = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in dtypes:
            raise StageError(f"{path}: tensor '{name}' has dtype {entry['dtype']}; pairs hold F32 noise and I64 "
                             f"tokens/labels; re-run `dd pairs`")
        begin, _ = entry["data_offsets"]
        views[name] = np.memmap(path, dtype=dtypes[entry["dtype"]], mode="r", offset=8 + header_len + begin,
                                shape=tuple(entry["shape"]))
    return views


class ShardedPairs:
    """The pairs stage's output (results/<S>/pairs/: manifest.json + safetensors shards), read lazily: a batch
    reads only its rows from the memory-mapped shards, so the data set may exceed memory.

    Every shard is checked against the manifest before training (present, its sha256 (verify=False skips the
    hash), readable with the manifest's row count): a bad shard is one StageError naming the file. `identity` is
    the sha256 of manifest.json, which lists every shard's sha256, so it names the pairs' content."""

    def __init__(self, folder: Path | str, teacher: Teacher | None = None, verify: bool = True):
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise StageError(f"{folder}: no manifest.json; run `dd pairs --setting <setting>` first")
        manifest_bytes = manifest_path.read_bytes()
        self.identity = hashlib.sha256(manifest_bytes).hexdigest()
        self.manifest = json.loads(manifest_bytes)
        if not self.manifest.get("complete"):
            raise StageError(f"{manifest_path}: the pairs are not complete; finish them with `dd pairs`")
        if teacher is not None and self.manifest.get("codebook_sha256") != teacher.codebook_sha256():
            raise StageError(f"{manifest_path}: the pairs were made with another codebook than this teacher's; "
                             f"re-run `dd pairs --setting {self.manifest.get('setting')}`")
        setting = self.manifest.get("setting")
        redo = (f"rename {folder.name}/ to {folder.name}.partial/ and re-run `dd pairs --setting {setting}`: it "
                f"redoes only the shards that fail their sha256")
        self.shards = []
        for entry in tqdm(self.manifest["shards"], desc="verifying pair shards", unit="shard",
                          disable=len(self.manifest["shards"]) < 20):
            path = folder / entry["file"]
            if not path.is_file():
                raise StageError(f"{path}: pair shard missing; {redo}")
            if verify and hub.sha256_of(path) != entry.get("sha256"):
                raise StageError(f"{path}: pair shard does not match the sha256 in {manifest_path.name} "
                                 f"(truncated or changed); {redo}")
            try:
                shard = _memmap_safetensors(path)
                rows = {name: shard[name].shape[0] for name in ("labels", "noise", "tokens")}
            except (ValueError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
                raise StageError(f"{path}: not a readable pair shard ({type(err).__name__}: {err}); {redo}") from None
            if set(rows.values()) != {entry.get("count", rows["labels"])}:
                raise StageError(f"{path}: rows {rows} do not match the manifest's count {entry.get('count')}; {redo}")
            self.shards.append(shard)
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["labels"].shape[0])

    def __len__(self) -> int:
        return self.starts[-1]

    def get(self, indices: torch.Tensor):
        index = indices.numpy()
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        out = []
        for name in ("labels", "noise", "tokens"):
            first = self.shards[0][name]
            rows = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
            for shard in np.unique(shard_of):
                here = shard_of == shard
                rows[here] = self.shards[shard][name][index[here] - self.starts[shard]]
            out.append(torch.from_numpy(rows))
        return tuple(out)
