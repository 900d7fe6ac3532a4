"""DD sampling: few-step generation and teacher-involved ("pre-trained-n-m") generation, for both families.

Few-step (reference/dd-paper.md §1.6; official VAR/sample.py, LlamaGen/eval_fewstep.py):
    x = noise
    for t in t_list:                                   # (0,) = 1 step, (0, t2) = 2 steps
        x_t = perturb(x, t, noise)                     # keep x's prefix < t, the ORIGINAL noise elsewhere
        x = final_sequence(final_predict(x_t, t), split)   # argmax codes before split, continuous from split on
The second step restarts from X_{t2}: the first step's prefix plus the same initial noise (fresh noise would
leave the trajectory the student was trained on).

Teacher-involved (§1.7; combine_sample.py, eval_combine_sample.py), t_list = (0, t2) and teacher_start = n:
    1. n > 0: one DD step from pure noise, quantise to the nearest codes, keep the prefix < n;
    2. the teacher continues by its ordinary stochastic sampling (cfg / top-k / top-p of the setting) from
       n up to t2;
    3. codes of that prefix + the original noise after it, one more DD step at t = t2.
"pre-trained-n-m" (1-based, the paper's names) = teacher_start n - 1 and t2 = m - 1 (code units).

Units: t, t_list, split and teacher_start are the teacher's AR steps, as in the official code: scales for VAR
(t = 5 means the 55 tokens of scales 1x1..5x5 are given), tokens for LlamaGen. `StudentOps.prefix_len(t)`
converts to tokens. Sequences are (B, L, C) in the teacher's token layout: VAR scales concatenated coarse to fine
(codebook rows, not f_hat), LlamaGen raster order (l2-normalised codes).

The teacher side is the Teacher seam (dd.teacher: `sample_tokens` continues its sampling from a prefix,
`decode_embeddings` decodes a sequence); the student side is one small adapter per family, `StudentOps` (argument
order, timestep units). Everything else here is family-agnostic.

Seeding: the noise of sample i is drawn from a generator seeded by (seed, i), so the same index gets the same noise
whatever the batch size and whatever the method (Appendix F renders one noise with every method); the teacher's
draws use one generator per batch, seeded by (seed, first index of the batch).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from dd.models.dd_llamagen import LlamaGenDD
from dd.models.dd_var import VARDD
from dd.teacher import Captions, Teacher
# The named methods (table order) live in dd.methods, torch-free, so that config.py and the Snakefile can list them.
from dd.methods import (TABLE2, Method, OneStepMethod, TeacherMethod, all_methods, method_names,  # noqa: F401
                        methods_for, pretrained_name)


# --------------------------------------------------------------------------------------------------
# Student adapters: one API over VARDD and LlamaGenDD
# --------------------------------------------------------------------------------------------------
class StudentOps:
    """What sampling and distillation need from a DD student, in teacher units and token layout.

    `net` arguments take the module to run (a DistributedDataParallel wrapper during training); by default the
    bare student."""

    family: str

    def __init__(self, model):
        self.model = model

    @property
    def codebook(self) -> torch.Tensor:
        return self.model.codebook

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    @property
    def token_dim(self) -> int:
        return self.codebook.shape[1]

    @property
    def num_units(self) -> int:
        """AR steps of the teacher (VAR scales, LlamaGen tokens): t lies in [0, num_units)."""
        raise NotImplementedError

    def prefix_len(self, t: int) -> int:
        """Tokens given as data at timestep t (or kept discrete at split t)."""
        raise NotImplementedError

    def steps(self, t, batch: int) -> torch.Tensor:
        """t (int or [B]) -> the float timestep tensor [B] the official scripts pass."""
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        return t.expand(batch).contiguous() if t.ndim == 0 else t

    def forward(self, x_t, labels, t, net=None):
        raise NotImplementedError

    def final_predict(self, x_t, labels, t):
        raise NotImplementedError

    def final_sequence(self, conti, logits, split: int):
        return self.model.final_sequence(conti, logits, split)

    def perturb(self, x, t, noise):
        return self.model.perturb(x, t, noise)

    def nearest_code(self, x):
        return self.model.nearest_code(x)

    def given_mask(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions given as data at timestep t [B] (the prefix)."""
        counts = torch.tensor([self.prefix_len(u) for u in range(self.num_units + 1)], device=t.device)
        return torch.arange(self.seq_len, device=t.device)[None] < counts[t.long()][:, None]


class VarStudentOps(StudentOps):
    family = "var"

    @property
    def codebook(self) -> torch.Tensor:
        if self.model.codebook is None:
            raise RuntimeError("VARDD student has no codebook: call student.attach_codebook(vae.quantize.embedding"
                               ".weight) first")
        return self.model.codebook

    @property
    def seq_len(self) -> int:
        return self.model.L

    @property
    def num_units(self) -> int:
        return self.model.num_scales

    def prefix_len(self, t: int) -> int:
        return self.model.tokens_in_scales_before(int(t))

    def forward(self, x_t, labels, t, net=None):
        return (net or self.model)(labels, x_t, t)

    def final_predict(self, x_t, labels, t):
        return self.model.final_predict(labels, x_t, t)


class LlamaGenStudentOps(StudentOps):
    """Labels (c2i) or dd.teacher.Captions (t2i: features + mask) as the condition."""

    family = "llamagen"

    @property
    def seq_len(self) -> int:
        return self.model.config.block_size

    @property
    def num_units(self) -> int:
        return self.model.config.block_size

    def prefix_len(self, t: int) -> int:
        return int(t)

    def forward(self, x_t, labels, t, net=None):
        if isinstance(labels, Captions):
            return (net or self.model)(x_t, labels.features, t, labels.mask)
        return (net or self.model)(x_t, labels, t)

    def final_predict(self, x_t, labels, t):
        if isinstance(labels, Captions):
            return self.model.final_predict(x_t, labels.features, t, labels.mask)
        return self.model.final_predict(x_t, labels, t)


def student_ops(model) -> StudentOps:
    if isinstance(model, VARDD):
        return VarStudentOps(model)
    if isinstance(model, LlamaGenDD):
        return LlamaGenStudentOps(model)
    raise TypeError(f"student_ops: expected a VARDD or LlamaGenDD student, got {type(model).__name__}")


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def dd_steps(student: StudentOps, labels, x, noise, t_list, split: int) -> torch.Tensor:
    """Run DD steps from sequence x: for each t, keep x's prefix < t, re-insert the ORIGINAL noise after it,
    predict, and form the final sequence (codes before split, continuous from split on)."""
    for t in t_list:
        steps = student.steps(int(t), x.shape[0])
        x_t = student.perturb(x, steps, noise)
        x = student.final_sequence(*student.final_predict(x_t, labels, steps), split)
    return x


@torch.no_grad()
def dd_sample(student: StudentOps, labels, noise, t_list, split: int) -> torch.Tensor:
    """Few-step DD sampling from noise (B, L, C): len(t_list) forward passes. Returns the sequence (B, L, C)."""
    return dd_steps(student, labels, noise, noise, t_list, split)


@torch.no_grad()
def teacher_involved_sample(student: StudentOps, teacher: Teacher, labels, noise, t_list, teacher_start: int,
                            split: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DD step -> the teacher's own sampling (teacher.sampling: cfg, top-k, top-p) of AR steps
    teacher_start..t2-1 -> DD step at t2. `generator` drives the teacher's draws (on the teacher's device)."""
    first, t2 = (int(t) for t in t_list)
    prefix = None
    if teacher_start > 0:
        x = dd_steps(student, labels, noise, noise, [first], split)
        prefix = student.nearest_code(x)[:, :student.prefix_len(teacher_start)]
    tokens = teacher.sample_tokens(labels, generator=generator, prefix=prefix, num_steps=t2)
    given = student.prefix_len(t2)
    x = torch.cat([student.codebook[tokens.to(student.device)].to(noise.dtype), noise[:, given:]], dim=1)
    return dd_steps(student, labels, x, noise, [t2], split)


def run_method(student: StudentOps, method: Method, labels, noise, teacher: Teacher | None = None,
               generator: torch.Generator | None = None):
    """One batch of one method -> the final sequence (B, L, C)."""
    if method.teacher_start is None:
        return dd_sample(student, labels, noise, method.t_list, method.split)
    if teacher is None:
        raise ValueError(f"sampling method {method.name!r} involves the teacher: pass teacher=")
    return teacher_involved_sample(student, teacher, labels, noise, method.t_list, method.teacher_start,
                                   method.split, generator)


# --------------------------------------------------------------------------------------------------
# Seeded, batched driver
# --------------------------------------------------------------------------------------------------
_SEED_STRIDE = 1_000_003  # a prime; (seed, index) -> one generator seed, distinct for index < stride


def sample_noise(student: StudentOps, indices, seed: int) -> torch.Tensor:
    """The initial noise (B, L, C) of samples `indices`; sample i depends only on (seed, i)."""
    shape = (student.seq_len, student.token_dim)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + int(i)))
             for i in indices]
    return torch.stack(noise).to(student.device)


def teacher_generator(device, seed: int, first_index: int) -> torch.Generator:
    """The teacher's generator for the batch starting at first_index (on the teacher's device)."""
    return torch.Generator(device=device).manual_seed((seed + 1) * _SEED_STRIDE * 7 + first_index)


@torch.no_grad()
def sample_batches(student: StudentOps, method: Method, labels: torch.Tensor, seed: int, batch_size: int,
                   teacher: Teacher | None = None, decode: bool = True,
                   first_index: int = 0, conditions=None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first index, images (B, 3, H, W) in [-1, 1]) — or the sequences (B, L, C) with decode=False —
    for all labels, batch by batch. Deterministic given (seed, labels, batch_size, first_index). `labels` are
    those of samples first_index, first_index + 1, ... (a slice of a larger run: the sample stage's shards);
    the yielded indices count from first_index. conditions: turns `labels` (then condition indices, e.g. caption
    rows) into the condition (dd.conditions); default: they are class labels."""
    if batch_size < 1:
        raise ValueError(f"sample_batches: batch_size must be >= 1, got {batch_size}")
    if decode and teacher is None:
        raise ValueError("sample_batches: decoding needs teacher= (its tokenizer decodes the sequences)")
    for offset in range(0, labels.shape[0], batch_size):
        batch_labels = labels[offset:offset + batch_size].to(student.device)
        start = first_index + offset
        if conditions is not None:
            batch_labels = conditions(batch_labels).to(student.device)
        noise = sample_noise(student, range(start, start + batch_labels.shape[0]), seed)
        generator = None
        if method.teacher_start is not None:
            generator = teacher_generator(student.device, seed, start)
        x = run_method(student, method, batch_labels, noise, teacher, generator)
        yield start, (teacher.decode_embeddings(x) if decode else x)


def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images (in [-1, 1]) the digit classifier assigns to their conditioning label (toy settings)."""
    from dd.data import classify

    size = classifier.config.image_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (classify(classifier, images.cpu()) == labels.cpu()).float().mean().item()


# --------------------------------------------------------------------------------------------------
# onestep*: per-position, per-class token frequencies (no network)
# --------------------------------------------------------------------------------------------------
class TokenFrequencies:
    """The onestep* baseline (dd.methods): each position of a class-c sample drawn independently from the
    frequencies of the tokens at that position among the class-c sequences of a data set (the pairs).

    Drawing a token from the empirical frequencies of position p = taking position p of a uniformly drawn class-c
    sequence, so the (classes, L, V) count table is never built (1000 x 680 x 4096 for VAR-d16): the sequences are
    kept sorted by class and each position draws its own row. Sample i depends only on (seed, i)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if tokens.dim() != 2 or labels.shape != tokens.shape[:1]:
            raise ValueError(f"TokenFrequencies: need tokens (N, L) and labels (N,), got {tuple(tokens.shape)} and "
                             f"{tuple(labels.shape)}")
        order = torch.sort(labels.long(), stable=True).indices
        self.tokens = tokens[order]
        self.counts = torch.bincount(labels.long(), minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.num_classes = num_classes

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def sample(self, labels: torch.Tensor, indices, seed: int) -> torch.Tensor:
        """Token indices (B, L) int64 for samples `indices` of classes `labels`."""
        labels = labels.cpu().long()
        empty = [int(c) for c in labels.unique() if self.counts[c] == 0]
        if empty:
            raise ValueError(f"onestep: no sequence of class(es) {empty[:5]} in the frequency data; make more pairs")
        positions = torch.arange(self.seq_len)
        rows = []
        for label, index in zip(labels.tolist(), indices):
            generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + int(index))
            pick = torch.randint(int(self.counts[label]), (self.seq_len,), generator=generator)
            rows.append(self.tokens[self.starts[label] + pick, positions])
        return torch.stack(rows).long()
