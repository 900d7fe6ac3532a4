"""The sample stage: N images of one method of one setting (dd.methods), as uint8 shards with a manifest.

    dd sample --setting S --method M          ->  results/S/samples/M/

Output results/<setting>/samples/<method>/:
    shard-00000.safetensors ...  "images" uint8 (n, H, W, 3), "labels" int64 (n,)
    manifest.json                setting, method, num_samples, shard_size, image_size, seed, steps (network
                                 forward passes per image, the paper's #Step), source ("student", "released-dd",
                                 "teacher", "frequencies"), shards [{file, count, sha256}], complete; plus
                                 everything else that decides the bytes (the plan: batch size, device, torch,
                                 recipe, sha256 of every weight file read). No timings: reruns give identical bytes.

Where the weights come from. teacher and skip-n: the teacher stage's folder. dd-1step, dd-2step, pre-trained-n-m:
the DD student of `sample.student` (config.Sample): "released" = the released DD checkpoint the teacher stage links
(teacher.json role "dd", loaded strictly into VARDD / LlamaGenDD), "distilled" = results/<S>/student (the distill
stage). onestep: the pairs stage's token sequences (frequencies, no network); its tokens are decoded by the
teacher's tokenizer.

Labels and seeds. Balanced classes (N // classes each, the first N % classes classes one more), shuffled by a
generator seeded with sample.seed. Text-to-image settings: "labels" are caption rows of the evaluation prompts
(results/<S>/text_features/eval/), sample i conditioned on row i mod (number of evaluation prompts). Sample i's noise depends only on (seed, i) (dd.sampling.sample_noise); the
teacher's draws on (seed, first index of its batch), batches running inside each shard from the shard's start.

Pixels. The [-1, 1] images become uint8 as torchvision's save_image and LlamaGen's sampler do:
floor(clamp(127.5 x + 128, 0, 255)).

Kill and resume (as the pairs stage). Work happens in results/<S>/samples/<M>.partial/, which no workflow tool
declares; each shard is written under a temporary name, renamed, then recorded with its sha256 in the partial
manifest. A rerun with the same plan keeps every recorded shard that still hashes to its record and makes the rest;
a changed plan starts over. Only the finished folder is renamed to <M>/, so nothing half-made looks finished.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dd import hub, sampling
from dd.atomic import exclusive_lock, publish_dir, write_json
from dd.config import ConfigError, Params, Setting
from dd.errors import StageError
from dd.methods import Method, OneStepMethod, TeacherMethod, all_methods

MANIFEST = "manifest.json"
FORMAT = "dd-samples/1"
LABEL_RULE = ("labels = (arange(N) % num_classes)[randperm(N, generator=torch CPU Generator seeded with "
              "sample.seed)]")
CAPTION_RULE = "labels = caption rows of text_features/eval: arange(N) % number of evaluation prompts"
PIXEL_RULE = "uint8 = floor(clamp(127.5 * x + 128, 0, 255)) of images x in [-1, 1], (n, H, W, 3)"


def samples_dir(params: Params, setting: Setting, method: str) -> Path:
    return params.path.parent / "results" / setting.name / "samples" / method


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced class labels (int64, N), in an order shuffled by `seed` (LABEL_RULE)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(num_samples) % num_classes)[order]


def caption_rows(num_samples: int, count: int) -> torch.Tensor:
    """Text-to-image: the evaluation prompt row of every sample (CAPTION_RULE)."""
    return torch.arange(num_samples) % count


def sample_labels(setting: Setting, conditions, num_samples: int, seed: int) -> torch.Tensor:
    """The condition indices of the samples: balanced class labels, or caption rows."""
    if conditions is None or conditions.kind == "class":
        return balanced_labels(num_samples, setting.num_classes, seed)
    return caption_rows(num_samples, conditions.count)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) on the CPU (PIXEL_RULE)."""
    pixels = (images.float() * 127.5 + 128.0).clamp(0, 255).floor().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu()


def get_method(setting: Setting, name: str):
    methods = all_methods(setting)
    if name not in methods:
        raise ConfigError(f"setting '{setting.name}' has no sampling method '{name}'; its methods: "
                          f"{', '.join(methods)}")
    return methods[name]


# --------------------------------------------------------------------------------------------------
# Samplers: one object per method that turns (labels, first index) into images
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sampler:
    """What the stage and the latency harness need of a method: `images(labels, first_index)` -> (B, 3, H, W) in
    [-1, 1] for samples first_index, first_index + 1, ...; `steps` network forward passes per image; `source`
    where the weights (or frequencies) come from; `files` role -> file read (hashed into the plan)."""
    method: object
    steps: int
    source: str
    files: dict[str, Path]
    images: Callable[[torch.Tensor, int], torch.Tensor]
    device: torch.device
    num_params: int | None = None  # parameters of the network that samples (student or teacher); None: onestep
    conditions: object = None  # text-to-image: the evaluation captions (dd.conditions); None: class labels


def load_released_student(setting: Setting, teacher_dir: Path, teacher) -> tuple[torch.nn.Module, Path]:
    """The released DD checkpoint the teacher stage linked (teacher.json role "dd"), loaded strictly into the
    student architecture of this teacher (VARDD / LlamaGenDD), codebook attached, eval mode."""
    from dd.models.students import new_student
    from dd.teacher import _load_strict

    info = json.loads((teacher_dir / "teacher.json").read_text())
    entry = info.get("files", {}).get("dd")
    if entry is None:
        raise StageError(f"{teacher_dir / 'teacher.json'}: no released DD checkpoint (role 'dd'); re-run "
                         f"`dd teacher --setting {setting.name}` (it links {setting.teacher.dd_artifact}), or set "
                         f"settings.{setting.name}.sample.student: distilled to sample from results/"
                         f"{setting.name}/student")
    path = teacher_dir / entry["file"]
    state = hub.load_checkpoint(path, entry["load_layout"])
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG untouched
        student = new_student(teacher)
    _load_strict(student, state, path, setting)
    return student.to(teacher.device).eval(), path


def _student(params: Params, setting: Setting, teacher, random_weights: bool):
    """(student module, source, weights path or None)."""
    from dd.models.students import load_student, new_student
    from dd.teacher_stage import teacher_dir

    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return new_student(teacher).to(teacher.device).eval(), "random", None
    if setting.sample.student_source(setting.teacher.dd_artifact) == "released":
        student, path = load_released_student(setting, teacher_dir(params, setting), teacher)
        return student, "released-dd", path
    folder = params.stage_dir(setting, "student")
    if not (folder / "student.json").is_file():
        raise StageError(f"{folder}: no student.json; run `dd distill --setting {setting.name}` first "
                         f"(settings.{setting.name}.sample.student is 'distilled')")
    student = load_student(folder, teacher)
    weights = json.loads((folder / "student.json").read_text())["weights"]
    return student, "student", folder / weights


def _random_teacher(setting: Setting, device):
    """The setting's teacher architecture with seeded random weights (latency of settings not trained here)."""
    from dd.teacher import TEACHERS
    from dd.models.build import build_models, setting_model_kwargs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, model = build_models(setting.family, *setting_model_kwargs(setting))
    return TEACHERS[setting.family](tokenizer.to(device), model.to(device), setting.teacher_sampling)


def _frequencies(params: Params, setting: Setting, teacher, random_weights: bool):
    from dd.pairs import ShardedPairs, pairs_dir

    if random_weights:  # uniform tokens: the look-up costs the same
        generator = torch.Generator().manual_seed(0)
        count = 4 * teacher.num_classes
        tokens = torch.randint(teacher.vocab_size, (count, teacher.num_tokens), generator=generator)
        return sampling.TokenFrequencies(tokens, torch.arange(count) % teacher.num_classes, teacher.num_classes), None
    folder = pairs_dir(params, setting)
    pairs = ShardedPairs(folder, teacher)
    compact = np.int16 if teacher.vocab_size <= 2 ** 15 else np.int32  # 1.2M x 680 tokens stay ~1.6 GB
    tokens = torch.cat([torch.from_numpy(s["tokens"].astype(compact)) for s in pairs.shards])
    labels = torch.cat([torch.from_numpy(np.array(s["labels"])) for s in pairs.shards])
    return sampling.TokenFrequencies(tokens, labels, teacher.num_classes), folder / MANIFEST


def build_sampler(params: Params, setting: Setting, method_name: str, device: str | torch.device | None = None,
                  random_weights: bool = False) -> Sampler:
    """The Sampler of one method. random_weights: the setting's architectures with seeded random weights (no
    files read; for latency where nothing is trained or downloaded)."""
    from dd.teacher import load_teacher
    from dd.teacher_stage import teacher_dir

    from dd.conditions import conditions_for, random_captions

    method = get_method(setting, method_name)
    device = torch.device(device or default_device())
    teacher = _random_teacher(setting, device) if random_weights else \
        load_teacher(setting, teacher_dir(params, setting), device)
    teacher.decoder_dtype = setting.sample.decoder_dtype
    conditions = None
    if setting.text_to_image:
        conditions = random_captions(setting) if random_weights else conditions_for(params, setting, "eval")

    def condition(labels):
        return labels if conditions is None else conditions(labels)

    files = dict(teacher.files)
    seed = setting.sample.seed
    units = teacher.num_steps
    teacher_params = sum(p.numel() for p in teacher.model.parameters())

    if isinstance(method, TeacherMethod):
        num_steps = units - method.skip
        if num_steps < 1:
            raise ConfigError(f"settings.{setting.name}.sample.skip: {method.name} skips {method.skip} of the "
                              f"teacher's {units} AR steps; each value must lie in [1, {units - 1}]")

        def images(labels, first_index):
            generator = sampling.teacher_generator(teacher.device, seed, first_index)
            tokens = teacher.sample_tokens(condition(labels.to(teacher.device)), generator=generator,
                                           num_steps=num_steps)
            return teacher.decode_prefix(tokens)

        return Sampler(method, method.steps(units), "random" if random_weights else "teacher", files, images, device,
                       teacher_params, conditions)

    if isinstance(method, OneStepMethod):
        table, manifest = _frequencies(params, setting, teacher, random_weights)
        files = {"tokenizer": teacher.files["tokenizer"]} if "tokenizer" in teacher.files else {}
        if manifest is not None:
            files["pairs_manifest"] = manifest

        def images(labels, first_index):
            tokens = table.sample(labels, range(first_index, first_index + labels.shape[0]), seed)
            return teacher.decode_tokens(tokens.to(teacher.device))

        return Sampler(method, method.steps(units), "random" if random_weights else "frequencies", files, images,
                       device, None)

    assert isinstance(method, Method)
    student, source, weights = _student(params, setting, teacher, random_weights)
    ops = sampling.student_ops(student)
    if weights is not None:
        files["student"] = weights
    if not method.needs_teacher_model:
        files.pop("model", None)  # the DD rows never run the teacher's AR model (only its tokenizer decodes)

    def images(labels, first_index):
        return torch.cat([x for _, x in sampling.sample_batches(ops, method, labels, seed, labels.shape[0], teacher,
                                                                first_index=first_index, conditions=conditions)])

    return Sampler(method, method.steps(units), source, files, images, device,
                   sum(p.numel() for p in student.parameters()), conditions)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_manifest(folder: Path | str) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise StageError(f"{folder}: no {MANIFEST}; run `dd sample --setting <setting> --method {folder.name}` "
                         f"(an unfinished run leaves {folder.name}.partial/, which is not read)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err}); delete {folder} and re-run `dd sample`") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise StageError(f"{path}: not a complete {FORMAT} manifest (format {manifest.get('format')!r}, complete "
                         f"{manifest.get('complete')!r}); re-run `dd sample`")
    return manifest


def iter_sample_shards(folder: Path | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images uint8 (n, H, W, 3), labels int64 (n,)) shard by shard, each verified against the manifest (sha256,
    dtypes, shapes, count): a large sample set never has to fit in memory at once."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    size = manifest["image_size"]
    total = 0
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise StageError(f"{path}: missing (listed in {folder / MANIFEST}); re-run `dd sample`")
        if hub.sha256_of(path) != entry["sha256"]:
            raise StageError(f"{path}: sha256 does not match {folder / MANIFEST}; the file changed after it was "
                             f"written: delete {folder} and re-run `dd sample`")
        try:
            shard = load_file(path)
        except (SafetensorError, OSError) as err:
            raise StageError(f"{path}: unreadable safetensors file ({err}); re-run `dd sample`") from None
        images, labels = shard.get("images"), shard.get("labels")
        n = entry["count"]
        if images is None or images.dtype != torch.uint8 or tuple(images.shape) != (n, size, size, 3):
            raise StageError(f"{path}: 'images' must be uint8 ({n}, {size}, {size}, 3), got "
                             f"{None if images is None else (images.dtype, tuple(images.shape))}")
        if labels is None or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
            raise StageError(f"{path}: 'labels' must be int64 ({n},), got "
                             f"{None if labels is None else (labels.dtype, tuple(labels.shape))}")
        total += n
        yield images, labels
    if total != manifest["num_samples"]:
        raise StageError(f"{folder / MANIFEST}: shards hold {total} images, num_samples says "
                         f"{manifest['num_samples']}; re-run `dd sample`")


def read_samples(folder: Path | str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images uint8 (N, H, W, 3) and labels int64 (N,) of a finished samples folder, verified (see
    iter_sample_shards); one clear StageError naming the file when anything is wrong."""
    images, labels = zip(*iter_sample_shards(folder))
    return torch.cat(images), torch.cat(labels)


# --------------------------------------------------------------------------------------------------
# Writing (resumable)
# --------------------------------------------------------------------------------------------------
def plan_of(setting: Setting, sampler: Sampler, device: torch.device) -> dict:
    """Everything that decides the bytes of the shards: the manifest without its shard list."""
    s = setting.sample
    method = sampler.method
    plan = {
        "format": FORMAT,
        "setting": setting.name,
        "method": method.name,
        "kind": method.kind,
        "recipe": dataclasses.asdict(method),
        "num_samples": s.num_samples,
        "shard_size": s.shard_size,
        "num_shards": -(-s.num_samples // s.shard_size),
        "batch_size": s.batch_size,
        "image_size": setting.image_size,
        "num_classes": setting.num_classes,
        "seed": s.seed,
        "label_rule": LABEL_RULE,
        "pixel_rule": PIXEL_RULE,
        "steps": sampler.steps,
        "source": sampler.source,
        "teacher_sampling": dataclasses.asdict(setting.teacher_sampling),
        "weights": {role: {"file": path.name, "sha256": hub.sha256_of(path)}
                    for role, path in sorted(sampler.files.items())},
        "device": device.type,
        "torch": torch.__version__,
    }
    if s.decoder_dtype != "float32":  # recorded when not the default (float32 plans keep their bytes)
        plan["decoder_dtype"] = s.decoder_dtype
    if sampler.conditions is not None:  # text-to-image (class-conditional plans keep their bytes)
        plan["label_rule"] = CAPTION_RULE
        plan["conditions"] = sampler.conditions.identity()
    return plan


def _resume(work: Path, plan: dict) -> dict[int, dict]:
    """The verified shards of an earlier run with the same plan; clears the folder when the plan changed."""
    for leftover in work.glob(".*.tmp-*"):  # a write cut short by a kill
        leftover.unlink()
    path = work / MANIFEST
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text())
    old_plan = {k: v for k, v in recorded.items() if k not in ("shards", "complete")}
    if old_plan != plan:
        changed = sorted(k for k in set(plan) | set(old_plan) if plan.get(k) != old_plan.get(k))
        print(f"[sample] {work}: plan changed ({', '.join(changed)}); starting over", flush=True)
        for leftover in work.iterdir():
            leftover.unlink()
        return {}
    done = {}
    for entry in recorded["shards"]:
        shard = work / entry["file"]
        if shard.is_file() and hub.sha256_of(shard) == entry["sha256"]:
            done[entry["index"]] = entry
        else:
            print(f"[sample] {shard.name}: missing or does not match its recorded sha256; redoing it", flush=True)
    return done


def _write_manifest(work: Path, plan: dict, done: dict[int, dict], complete: bool) -> None:
    write_json(work / MANIFEST, {**plan, "complete": complete, "shards": [done[i] for i in sorted(done)]})


def _save_shard(work: Path, index: int, images: torch.Tensor, labels: torch.Tensor, plan: dict) -> dict:
    final = work / shard_name(index)
    tmp = work / f".{final.name}.tmp-{os.getpid()}"
    # one metadata entry: safetensors writes a metadata map in arbitrary order, which would change the bytes
    about = json.dumps({"format": FORMAT, "setting": plan["setting"], "method": plan["method"], "shard": index},
                       sort_keys=True)
    save_file({"images": images, "labels": labels}, str(tmp), metadata={"dd-samples": about})
    sha = hub.sha256_of(tmp)
    os.replace(tmp, final)
    return {"index": index, "file": final.name, "count": int(labels.shape[0]), "sha256": sha}




@torch.no_grad()
def make_shard(sampler: Sampler, setting: Setting, labels: torch.Tensor, index: int, progress=None):
    """Shard `index`: (images uint8 (n, H, W, 3), labels int64 (n,)), batches from the shard's first sample."""
    s = setting.sample
    first = index * s.shard_size
    shard_labels = labels[first:first + s.shard_size]
    chunks = []
    for offset in range(0, shard_labels.shape[0], s.batch_size):
        batch = shard_labels[offset:offset + s.batch_size]
        images = sampler.images(batch.to(sampler.device), first + offset)
        if tuple(images.shape[1:]) != (3, setting.image_size, setting.image_size):
            raise StageError(f"{sampler.method.name}: the decoder made images of shape {tuple(images.shape[1:])}, "
                             f"settings.{setting.name}.image_size says (3, {setting.image_size}, "
                             f"{setting.image_size})")
        chunks.append(to_uint8(images))
        if progress is not None:
            progress.update(batch.shape[0])
    return torch.cat(chunks), shard_labels.clone()


def run_sample_stage(params: Params, setting: Setting, method_name: str, device: str | None = None) -> Path:
    """Make (or finish) results/<setting>/samples/<method>/; returns its path."""
    from dd.tracking import stage_run

    get_method(setting, method_name)  # a bad name is bad input, before anything loads
    device = torch.device(device or default_device())
    sampler = build_sampler(params, setting, method_name, device)
    plan = plan_of(setting, sampler, device)
    s = setting.sample
    labels = sample_labels(setting, sampler.conditions, s.num_samples, s.seed)
    counts = [min(s.shard_size, s.num_samples - i * s.shard_size) for i in range(plan["num_shards"])]
    final = samples_dir(params, setting, method_name)
    work = final.with_name(final.name + ".partial")
    extra = {"sample.method": method_name, "sample.source": sampler.source, "sample.steps": sampler.steps,
             "sample.device": device.type}

    with stage_run(params, setting, f"sample/{method_name}", extra) as mlflow:
        work.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(work, "dd sample"):
            done = _resume(work, plan)
            resumed = sum(counts[i] for i in done)
            if done:
                print(f"[sample] {setting.name}/{method_name}: resuming, {len(done)} of {len(counts)} shards "
                      f"({resumed} images) already done", flush=True)
            started, made = time.perf_counter(), 0
            with tqdm(total=s.num_samples, initial=resumed, desc=f"[sample] {setting.name}/{method_name}",
                      unit="img", smoothing=0.1) as bar:
                for index, count in enumerate(counts):
                    if index in done:
                        continue
                    shard_started = time.perf_counter()
                    images, shard_labels = make_shard(sampler, setting, labels, index, progress=bar)
                    done[index] = _save_shard(work, index, images, shard_labels, plan)
                    _write_manifest(work, plan, done, complete=False)
                    made += count
                    mlflow.log_metrics({"sample.shard_images_per_s": count / (time.perf_counter() - shard_started),
                                        "sample.done": resumed + made}, step=index)
            seconds = time.perf_counter() - started
            _write_manifest(work, plan, done, complete=True)
        publish_dir(work, final)
        mlflow.log_metrics({"sample.total": s.num_samples, "sample.made_this_run": made, "sample.resumed": resumed,
                            "sample.seconds": seconds, "sample.images_per_s": made / seconds if made else 0.0,
                            "sample.steps": sampler.steps})
        mlflow.log_artifact(str(final / MANIFEST))
    rate = f", {made / seconds:.1f} images/s" if made else ""
    print(f"[sample] {setting.name}/{method_name}: {s.num_samples} images ({sampler.source}, {sampler.steps} "
          f"steps/image) in {len(counts)} shards -> {final} ({made} made in {seconds:.1f}s{rate})", flush=True)
    return final
