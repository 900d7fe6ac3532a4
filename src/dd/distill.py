"""The distill stage: train the DD student on the teacher's noise -> token trajectories (accelerate).

The student starts from the teacher (`init_from_teacher`; VAR with the new level row lvl_embed[1] re-drawn,
the released code's class_emb[1] typo corrected) and learns to jump from any trajectory point X_t, t in t_list,
to the endpoint (reference/dd-paper.md §1.3-1.5). Each step draws, per example, t uniform over t_list (GUESS §6
q5: uniform over the timestep set) and minimises dd.losses.distill_loss (CE + perceptual + MSE, per-example means,
so N processes' mean equals one process on the whole batch).

Where the other pieces live: pair shards are read by dd.pairs (ShardedPairs, TensorPairs), students are built and
loaded by dd.models.students, the loss terms are dd.losses, the toy settings' student gate is dd.toy_teacher.toy_gate.
This module holds the loop: data order, optimiser and schedule, EMA, checkpoints and resume, and the stage glue.

Training: AdamW (no weight decay on biases and other 1-D parameters), linear warm-up then linear decay to 1% of
lr (VAR's `lin0` schedule), gradient clipping, EMA with the warm-up min(decay, (1+s)/(10+s)), bf16 autocast on
CUDA. One process on CPU; N GPUs with `accelerate launch --multi_gpu --num_processes N -m dd distill ...`;
2 CPU processes over gloo for tests (ecosystem.md §6: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...).

Determinism and resume. The global batch of step s and its timesteps are a function of (seed, s) alone:
epochs are permutations seeded by (seed, epoch), batches are consecutive slices of them, and process r of N
takes the r-th 1/N of each global batch. Every checkpoint_every steps, results/<S>/student.partial/ gets an
atomically renamed checkpoint (model, EMA, optimizer, scheduler, step, every process's RNG state, the loss log);
a rerun resumes from the newest one that reads back whole (each records its files' sha256; a corrupt newest one
falls back to the previous) when it shares this run's recipe, student and pairs (the pairs manifest's sha256);
log_every, checkpoint_every and max_steps may change (raising max_steps continues the run). On CPU a resumed run
continues the uninterrupted run's loss curve exactly. The
final results/<S>/student/ (EMA weights, student.json, metrics.json, samples.png) is renamed into place last.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dd import losses, sampling
from dd.atomic import atomic_dir, write_json
from dd.config import Distill, Params, Setting
from dd.errors import StageError
from dd.hub import sha256_of
from dd.models.students import init_student, student_constructor
from dd.teacher import Teacher

STUDENT_FILE = "student.safetensors"
KEEP_CHECKPOINTS = 2
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optim.pt")  # hashed into state.json
LR_FLOOR = 0.01  # the schedule decays linearly to this fraction of lr at max_steps
GRID_SAMPLES = 32  # DD 1-step samples in the grids logged at checkpoints


# --------------------------------------------------------------------------------------------------
# Deterministic data order
# --------------------------------------------------------------------------------------------------
def _mix(*words: int) -> int:
    """A 63-bit generator seed from integers (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@lru_cache(maxsize=4)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(_mix(seed, 0, epoch)))


def global_batch(num_pairs: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Pair indices (batch_size,) of optimizer step `step`: consecutive slices of per-epoch permutations."""
    position, pieces, count = step * batch_size, [], 0
    while count < batch_size:
        epoch, offset = divmod(position, num_pairs)
        take = min(batch_size - count, num_pairs - offset)
        pieces.append(_epoch_order(num_pairs, seed, epoch)[offset:offset + take])
        position, count = position + take, count + take
    return torch.cat(pieces)


def global_timesteps(t_list, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Timesteps (batch_size,) of step `step`: uniform over t_list, per example."""
    generator = torch.Generator().manual_seed(_mix(seed, 1, step))
    choice = torch.randint(len(t_list), (batch_size,), generator=generator)
    return torch.tensor(list(t_list))[choice]


# --------------------------------------------------------------------------------------------------
# Optimisation pieces
# --------------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to 1 over warmup_steps, then linear decay to LR_FLOOR at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 1.0 - (1.0 - LR_FLOOR) * min(1.0, progress)


def make_optimizer(student: torch.nn.Module, cfg: Distill, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (10 + step)): early steps follow the
    model closely, so short runs are not dominated by the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    for shadow, param in zip(ema.parameters(), model.parameters()):
        shadow.lerp_(param.detach().float(), 1 - d)


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _checkpoint_dirs(work: Path) -> list[Path]:
    return sorted(work.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


# Keys of the recipe a run may change and still resume: how often it logs and checkpoints, and how long it runs
# (raising max_steps continues the run; the learning-rate schedule is stretched to the new end from there on).
RESUMABLE_KEYS = ("log_every", "checkpoint_every", "max_steps")


def _fingerprint(cfg: Distill, student: torch.nn.Module, teacher: Teacher, pairs_identity: str) -> str:
    """What a checkpoint must share with this run to be resumed: the recipe (but RESUMABLE_KEYS), the student,
    the teacher's codebook and the pairs' identity (their manifest's sha256 / content hash)."""
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS}
    if recipe.get("perceptual_fraction") == 1.0:  # added later: at its default, checkpoints of before still resume
        del recipe["perceptual_fraction"]
    blob = json.dumps({"distill": recipe, "student": student_constructor(student),
                       "codebook": teacher.codebook_sha256(), "pairs": pairs_identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:<current> are the same device; so are cpu and cpu:0."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index if a.index is not None else torch.cuda.current_device()) == \
        (b.index if b.index is not None else torch.cuda.current_device())


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(accelerator, work: Path, step: int, student, ema, optimizer, scheduler, log: dict) -> Path:
    """Write work/step-<step>/ atomically (every process adds its RNG state); keep the newest KEEP_CHECKPOINTS."""
    final = work / f"step-{step:08d}"
    tmp = work / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(accelerator.device), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(_state_tensors(student), str(tmp / "model.safetensors"))
        save_file(_state_tensors(ema), str(tmp / "ema.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        files = {name: sha256_of(tmp / name) for name in CHECKPOINT_FILES}
        write_json(tmp / "state.json", {**log, "step": step, "num_processes": accelerator.num_processes,
                                        "files": files})
        os.replace(tmp, final)
        for old in _checkpoint_dirs(work)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CorruptCheckpoint(Exception):
    """A checkpoint folder that cannot be read back whole (truncated, changed or half-deleted)."""


def read_checkpoint(folder: Path, process_index: int) -> dict:
    """Read every file of a checkpoint and check them against the sha256s its state.json records, before anything
    is restored: {"state", "model", "ema", "optim", "rng" (this process's, or None)}. Raises CorruptCheckpoint."""
    try:
        state = json.loads((folder / "state.json").read_text())
        for name in CHECKPOINT_FILES:
            if sha256_of(folder / name) != state["files"][name]:
                raise CorruptCheckpoint(f"{folder / name} does not match the sha256 in state.json")
        ckpt = {"state": state, "model": load_file(folder / "model.safetensors"),
                "ema": load_file(folder / "ema.safetensors"),
                "optim": torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)}
    except CorruptCheckpoint:
        raise
    except Exception as err:  # any failure to read it back means the checkpoint cannot be resumed
        raise CorruptCheckpoint(f"{type(err).__name__}: {err}") from None
    rng_path = folder / f"rng-{process_index}.pt"
    try:
        ckpt["rng"] = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    except Exception:  # the RNG state alone is not worth the checkpoint: dropout draws start afresh
        ckpt["rng"] = None
    return ckpt


def restore_checkpoint(accelerator, ckpt: dict, student, ema, optimizer, scheduler) -> dict:
    """Restore what read_checkpoint read; returns its state.json, with "rng_restored": whether this process's RNG
    state was in it (not when the number of processes changed)."""
    student.load_state_dict(ckpt["model"], strict=True)
    ema.load_state_dict(ckpt["ema"], strict=True)
    optimizer.load_state_dict(ckpt["optim"]["optimizer"])
    scheduler.load_state_dict(ckpt["optim"]["scheduler"])
    state = dict(ckpt["state"])
    state["rng_restored"] = ckpt["rng"] is not None and state["num_processes"] == accelerator.num_processes
    if state["rng_restored"]:
        _set_rng_state(ckpt["rng"], accelerator.device)
    elif accelerator.is_main_process:
        print(f"[distill] checkpoint of step {state['step']}: written by {state['num_processes']} process(es), "
              f"resumed by {accelerator.num_processes} (or without its RNG state): data order is kept, the dropout "
              f"RNG starts afresh", flush=True)
    return state


def choose_checkpoint(work: Path, fingerprint: str, max_steps: int, process_index: int):
    """(folder, ckpt, discard): the newest checkpoint of this run that reads back whole (None, None when there is
    none) and the folders to delete (unreadable ones newer than it; every one when none is resumable). A corrupt newest checkpoint
    falls back to the previous one; one of another recipe, student or pairs, or past max_steps, starts over."""
    checkpoints = _checkpoint_dirs(work)
    for i in range(len(checkpoints) - 1, -1, -1):
        folder = checkpoints[i]
        try:
            ckpt = read_checkpoint(folder, process_index)
        except CorruptCheckpoint as err:
            if process_index == 0:
                print(f"[distill] {folder}: unreadable ({err}); trying the previous checkpoint", flush=True)
            continue
        state = ckpt["state"]
        if state.get("fingerprint") != fingerprint:
            why = "of another recipe, student or pairs"
        elif state["step"] >= max_steps:
            why = f"at step {state['step']}, not before max_steps {max_steps}"
        else:
            return folder, ckpt, checkpoints[i + 1:]
        if process_index == 0:
            print(f"[distill] {work}: checkpoints {why}; starting over", flush=True)
        break
    return None, None, checkpoints


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    ema: torch.nn.Module  # the EMA student (float32, eval mode); on the main process
    history: list  # one record per logged step: step, loss, its terms, lr, grad_norm, examples_per_s
    resumed_from: int  # the step training resumed at (0 = fresh start)
    seconds: float  # wall time of this run (not counting earlier runs before a resume)
    num_processes: int


def _grid_labels(num_classes: int) -> torch.Tensor:
    return (torch.arange(GRID_SAMPLES) * max(1, num_classes // GRID_SAMPLES)) % num_classes


def grid_condition(conditions, teacher: Teacher):
    """The fixed conditions of the sample grids: spread class labels, or caption rows spread over the set."""
    if conditions is None or conditions.kind == "class":
        return _grid_labels(teacher.num_classes).to(teacher.device)
    from dd.conditions import spread

    return conditions(spread(conditions.count, GRID_SAMPLES)).to(teacher.device)


def log_sample_grid(tracker, ema, teacher: Teacher, cfg: Distill, step: int, conditions=None) -> None:
    """DD 1-step samples of the EMA student, fixed conditions and noise, to MLflow."""
    from dd.data import image_grid

    ops = sampling.student_ops(ema)
    labels = grid_condition(conditions, teacher)
    noise = sampling.sample_noise(ops, range(GRID_SAMPLES), cfg.seed)
    with torch.no_grad():
        images = teacher.decode_embeddings(sampling.dd_sample(ops, labels, noise, cfg.t_list[:1], cfg.split))
    tracker.log_image(image_grid(images, nrow=8), f"samples/dd1_step{step:08d}.png")


def train_student(teacher: Teacher, pairs, cfg: Distill, work: Path | str, *, perceptual=None, cpu: bool = False,
                  micro_batch: int | None = None, tracker=None, callback: Callable[[int, dict], None] | None = None,
                  ema_callback: Callable[[int, torch.nn.Module], None] | None = None,
                  progress: bool = True, conditions=None) -> TrainResult:
    """Distil `teacher` into a fresh student on `pairs` (TensorPairs / ShardedPairs) by the recipe `cfg`.

    work: the checkpoint folder (results/<S>/student.partial); an existing checkpoint with the same recipe, student
    and data is resumed, a different one is discarded. perceptual: the distance module of the perceptual term
    (needed when its weight is > 0). cpu: force the CPU even where CUDA is available. micro_batch: split each
    process's share of the global batch into micro-batches of this size and accumulate their gradients (memory: the
    perceptual term decodes images with gradients); the update is that of the whole batch (up to float rounding
    and the drop-path draws, which are made per micro-batch). tracker: an mlflow-like
    object (log_metrics(dict, step=), log_image(image, name)); only the main process uses it. callback(step, record)
    runs after every optimizer step on every process (tests use it to simulate a crash); ema_callback(step, ema)
    after every optimizer step on the main process only, with the EMA student (dd.ablation judges it at chosen
    steps: the training-length axis). conditions: what turns the pairs' condition indices into the teacher's
    condition (dd.conditions; default: they are class labels). The global torch RNG
    (drop-path) is seeded from (cfg.seed, process) on a fresh start and restored from the checkpoint on resume.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    work = Path(work)
    weights = {k: float(v) for k, v in cfg.loss_weights.items()}
    if weights.get("perceptual", 0.0) and perceptual is None:
        raise StageError("distill: loss_weights.perceptual > 0 needs a perceptual distance (perceptual=)")
    use_cpu = cpu or not torch.cuda.is_available()
    # A head whose loss term is off gets no gradient; DDP must be told, or it waits for it forever.
    unused = not weights.get("ce", 0.0) or not (weights.get("perceptual", 0.0) or weights.get("mse", 0.0))
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else "bf16",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if cfg.batch_size % world:
        raise StageError(f"distill.batch_size {cfg.batch_size} is not divisible by the {world} processes; "
                         f"change the batch size or --num_processes")
    if not _same_device(teacher.device, device):
        raise StageError(f"distill: the teacher is on {teacher.device}, the accelerator on {device}; load the "
                         f"teacher with device=accelerator.device")
    local = cfg.batch_size // world
    micro = micro_batch or local
    if micro < 1 or local % micro:
        raise StageError(f"distill: --micro-batch {micro_batch} must divide the per-process batch {local} "
                         f"(distill.batch_size {cfg.batch_size} / {world} processes)")
    if perceptual is not None:
        perceptual = perceptual.to(device)

    student = init_student(teacher, cfg.seed).train()
    ops = sampling.student_ops(student)
    if max(cfg.t_list) >= ops.num_units or not 0 <= cfg.split <= ops.num_units:
        raise StageError(f"distill: t_list {cfg.t_list} must lie in [0, {ops.num_units}) and split {cfg.split} in "
                         f"[0, {ops.num_units}]: the teacher's AR steps ({teacher.family}: "
                         f"{'scales' if teacher.family == 'var' else 'tokens'}); fix distill in params.yaml")
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = make_optimizer(student, cfg, fused=not use_cpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    fingerprint = _fingerprint(cfg, student, teacher, pairs.identity)

    step, history, window, rng_restored = 0, [], [], False
    if main:
        work.mkdir(parents=True, exist_ok=True)
        for leftover in work.glob(".step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    folder, ckpt, discard = choose_checkpoint(work, fingerprint, cfg.max_steps, rank)
    accelerator.wait_for_everyone()
    if main:
        for old in discard:
            shutil.rmtree(old, ignore_errors=True)
    if ckpt is not None:
        state = restore_checkpoint(accelerator, ckpt, student, ema, optimizer, scheduler)
        step, history, window = state["step"], state["history"], state["window"]
        rng_restored = state["rng_restored"]
        if main:
            print(f"[distill] resuming from {folder} (step {step} of {cfg.max_steps})", flush=True)
        del ckpt
    accelerator.wait_for_everyone()
    resumed_from = step
    if not rng_restored:  # the drop-path / dropout draws of this process: a function of (seed, process, step)
        torch.manual_seed(_mix(cfg.seed, 2, rank, step))

    net, optimizer = accelerator.prepare(student, optimizer)
    started = time.perf_counter()
    interval_started, interval_examples = time.perf_counter(), 0
    bar = tqdm(total=cfg.max_steps, initial=step, desc="[distill]", unit="step", disable=not (main and progress),
               smoothing=0.1)
    while step < cfg.max_steps:
        indices = global_batch(len(pairs), cfg.batch_size, cfg.seed, step)[rank * local:(rank + 1) * local]
        t = global_timesteps(cfg.t_list, cfg.batch_size, cfg.seed, step)[rank * local:(rank + 1) * local]
        batch = [x.to(device) for x in (*pairs.get(indices), t)]
        if conditions is not None:  # caption rows -> Captions (features + mask), sliced like the tensors below
            batch[0] = conditions(batch[0]).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss, terms = 0.0, {}
        for start in range(0, local, micro):  # gradient accumulation; DDP syncs on the last micro-batch only
            chunk = [x[start:start + micro] for x in batch]
            last = start + micro == local
            with contextlib.nullcontext() if last else accelerator.no_sync(net):
                with accelerator.autocast():
                    chunk_loss, chunk_terms = losses.distill_loss(ops, teacher, net, *chunk, cfg.split, weights, perceptual,
                                                                    cfg.perceptual_fraction)
                accelerator.backward(chunk_loss * (micro / local))
            loss = loss + chunk_loss.detach() * (micro / local)
            for name, value in chunk_terms.items():
                terms[name] = terms.get(name, 0.0) + value * (micro / local)
        grad_norm = accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]  # the rate of this step
        optimizer.step()
        scheduler.step()
        ema_update(ema, student, cfg.ema_decay, step)
        step += 1
        interval_examples += cfg.batch_size

        numbers = torch.stack([loss.float(), grad_norm.float(), *terms.values()])
        numbers = accelerator.reduce(numbers, reduction="mean").tolist()
        window.append(numbers)
        record = None
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = np.mean(window, axis=0).tolist()
            elapsed = time.perf_counter() - interval_started
            record = {"step": step, "loss": mean[0], "grad_norm": mean[1],
                      **{f"loss.{name}": value for name, value in zip(terms, mean[2:])},
                      "lr": lr}
            history.append(record)
            window = []
            if main and tracker is not None:
                tracker.log_metrics({**record, "examples_per_s": interval_examples / elapsed}, step=step)
            interval_started, interval_examples = time.perf_counter(), 0
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            epoch, offset = divmod(step * cfg.batch_size, len(pairs))  # informative: step fixes the data order
            save_checkpoint(accelerator, work, step, student, ema, optimizer, scheduler,
                            {"fingerprint": fingerprint, "history": history, "window": window,
                             "data_position": {"examples_seen": step * cfg.batch_size, "epoch": epoch,
                                               "offset_in_epoch": offset}})
            if main and tracker is not None:
                log_sample_grid(tracker, ema, teacher, cfg, step, conditions)
        if ema_callback is not None and main:
            ema_callback(step, ema)
        if callback is not None:
            callback(step, record or {})
    bar.close()
    accelerator.wait_for_everyone()
    return TrainResult(ema=ema, history=history, resumed_from=resumed_from, seconds=time.perf_counter() - started,
                       num_processes=world)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def run_distill_stage(params: Params, setting: Setting, device: str | None = None,
                      micro_batch: int | None = None) -> Path:
    """Make results/<setting>/student/ from the teacher and its pairs; returns its path. device: "cpu", "cuda" or
    None (cuda where available); micro_batch: see train_student (a memory setting, not part of the recipe)."""
    from accelerate import PartialState

    from dd.data import image_grid, load_classifier
    from dd.conditions import conditions_for
    from dd.pairs import ShardedPairs, pairs_dir
    from dd.teacher import load_teacher
    from dd.teacher_stage import teacher_dir
    from dd.toy_teacher import FILES as TOY_FILES, TOY_DD1_GATE, toy_gate
    from dd.tracking import stage_run

    cfg = setting.distill
    if device not in (None, "cpu", "cuda"):
        raise StageError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda: no CUDA device is visible to torch")
    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    final, t_dir = params.stage_dir(setting, "student"), teacher_dir(params, setting)
    work = final.with_name(final.name + ".partial")
    teacher = load_teacher(setting, t_dir, state.device)
    pairs = ShardedPairs(pairs_dir(params, setting), teacher)
    conditions = conditions_for(params, setting, "train")
    if conditions.kind == "class":
        conditions = None  # the indices are the labels
    perceptual = losses.perceptual_distance(cfg.perceptual, t_dir) if cfg.loss_weights.get("perceptual", 0.0) else None

    def train(tracker):
        return train_student(teacher, pairs, cfg, work, perceptual=perceptual, cpu=cpu, micro_batch=micro_batch,
                             tracker=tracker, conditions=conditions)

    if not state.is_main_process:
        train(None)
        return final
    extra = {"distill.num_processes": state.num_processes, "distill.device": state.device.type}
    with stage_run(params, setting, "distill", extra) as mlflow:
        result = train(mlflow)
        metrics = {"steps": cfg.max_steps, "resumed_from": result.resumed_from, "seconds": result.seconds,
                   "num_processes": result.num_processes, "num_pairs": len(pairs),
                   "final_loss": result.history[-1]["loss"]}
        classifier_path = t_dir / TOY_FILES["classifier"]
        if classifier_path.is_file():
            classifier = load_classifier(classifier_path, device=state.device)
            metrics.update(toy_gate(result.ema, teacher, setting, classifier,
                                    conditions_for(params, setting, "eval") if setting.text_to_image else None))
            teacher_info = json.loads((t_dir / "teacher.json").read_text())
            teacher_rate = teacher_info.get("metrics", {}).get("sample_accuracy")
            if teacher_rate is not None:
                metrics["teacher.class_accuracy"] = teacher_rate
            rates = ", ".join(f"{k.split('.')[0]} {v:.3f}" for k, v in metrics.items() if k.endswith("class_accuracy"))
            one_step = metrics.get("dd-1step.class_accuracy")
            verdict = "" if one_step is None else \
                f"; toy gate dd-1step >= {TOY_DD1_GATE}: {'PASS' if one_step >= TOY_DD1_GATE else 'FAIL'}"
            print(f"[distill] {setting.name}: samples classified as their conditioning class: {rates} "
                  f"({cfg.max_steps} steps, {result.seconds:.0f}s){verdict}", flush=True)
        mlflow.log_metrics(metrics)
        with atomic_dir(final) as out:
            save_file(_state_tensors(result.ema), str(out / STUDENT_FILE))
            ops = sampling.student_ops(result.ema)
            labels = grid_condition(conditions, teacher)
            noise = sampling.sample_noise(ops, range(GRID_SAMPLES), cfg.seed)
            images = teacher.decode_embeddings(sampling.dd_sample(ops, labels, noise, cfg.t_list[:1], cfg.split))
            image_grid(images, nrow=8).save(out / "samples.png")
            write_json(out / "metrics.json", {**metrics, "history": result.history})
            write_json(out / "student.json", {
                "setting": setting.name, "family": setting.family, "model": student_constructor(result.ema),
                "weights": STUDENT_FILE, "ema_decay": cfg.ema_decay, "t_list": cfg.t_list, "split": cfg.split,
                "codebook_sha256": teacher.codebook_sha256(), "distill": dataclasses.asdict(cfg),
                "pairs_manifest_sha256": hashlib.sha256((pairs_dir(params, setting) / "manifest.json")
                                                        .read_bytes()).hexdigest()})
        mlflow.log_artifact(str(final / "samples.png"))
        mlflow.log_artifact(str(final / "metrics.json"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"[distill] {setting.name}: student -> {final} ({cfg.max_steps} steps, final loss "
          f"{metrics['final_loss']:.4f}, {result.seconds:.0f}s on {result.num_processes} process(es))", flush=True)
    return final
