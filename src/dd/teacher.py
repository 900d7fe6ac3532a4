"""The Teacher seam: everything DD needs from a pre-trained image AR model, for VAR and LlamaGen.

flow.py, pairs.py and most of the distillation talk to a `Teacher` and nothing else
(../shared/DESIGN.md, "The seam that keeps DD family-agnostic"):

    codebook            (V, C) token embedding vectors (VAR 4096 x 32; LlamaGen 16384 x 8, l2-normalised)
    schedule            tokens per AR step: VAR pn^2 per scale, LlamaGen 1 per raster token
    sample_tokens       the teacher's own ancestral sampler with the setting's teacher_sampling; a `draw`
                        hook replaces the categorical draw (the flow map of DD, `flow_tokens`)
    next_probs          the distribution that sampler draws the next step from, given a prefix
    decode_tokens       token indices -> images;  decode_embeddings: continuous tokens -> images (DD)

Token sequences are flat (B, L) int64 in the teacher's AR order (VAR: the scales coarse to fine, each
row-major; LlamaGen: raster order). Continuous sequences are (B, L, C). Images are in [-1, 1].

The condition `cond` is the only thing that differs between class-conditional and text-to-image
teachers: (B,) int64 class labels, or `Captions` (left-padded caption features (B, T, D) + mask (B, T), as
dd.text_encoder makes them) for a LlamaGen t2i teacher. Both index and slice by rows alike.

A draw hook is `draw(probs (B, n, V), step) -> indices (B, n)`: `probs` is the sampling distribution
of the n tokens of AR step `step` (after CFG, top-k/top-p and temperature), the indices are what the
sampler feeds back. Both families' samplers call it with exactly the tensor they would draw from,
so the flow map sees the teacher's own distribution by construction; `next_probs` recovers that
tensor for any prefix through the same sampler (prefix replayed through the KV cache), which is what
the tests compare.

`load_teacher(setting, teacher_dir, device)` builds a Teacher from the teacher stage's folder:
official checkpoints (hub settings, strict load into our state_dict-compatible models) or the toy
teacher's safetensors + constructor kwargs (teacher.json written by dd.toy_teacher).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

from dd import hub
from dd.config import Setting, TeacherSampling
from dd.errors import StageError
from dd.flow import tokens_from_noise
from dd.models.build import build_models, setting_model_kwargs
from dd.models.llamagen import LlamaGenGPT, generate
from dd.models.llamagen_vq import VQModel
from dd.models.var import VAR
from dd.models.var_vqvae import VQVAE

DrawFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Captions:
    """The condition of a text-to-image teacher: caption features (B, T, D), left-padded (real tokens at the
    end), and their mask (B, T), nonzero at real tokens. Rows index and slice like a label tensor."""
    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.features.dim() != 3 or self.mask.shape != self.features.shape[:2]:
            raise ValueError(f"Captions: need features (B, T, D) and mask (B, T), got {tuple(self.features.shape)} "
                             f"and {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, rows) -> "Captions":
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Captions(self.features[rows], self.mask[rows])

    @property
    def shape(self) -> tuple:
        """(B,): the batch, as for labels."""
        return (len(self),)

    def to(self, device) -> "Captions":
        return Captions(self.features.to(device), self.mask.to(device))


class Teacher(abc.ABC):
    """A frozen tokenizer + AR model pair behind the family-agnostic seam (module docstring).

    Subclasses implement `_sample` (the family's sampler) and the two decoders; the step bookkeeping,
    `next_probs` and the flow map live here once.
    """

    family: str

    def __init__(self, tokenizer: torch.nn.Module, model: torch.nn.Module, sampling: TeacherSampling,
                 num_classes: int, schedule: list[int], codebook: torch.Tensor, files: Optional[dict] = None,
                 caption_shape: Optional[tuple[int, int]] = None):
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.model = model.eval().requires_grad_(False)
        self.sampling = sampling
        self.num_classes = num_classes
        self.schedule = list(schedule)
        self.step_starts = [0]
        for n in self.schedule:
            self.step_starts.append(self.step_starts[-1] + n)
        self.num_tokens = self.step_starts[-1]
        self.codebook = codebook.detach()
        self.vocab_size, self.token_dim = self.codebook.shape
        self.files = dict(files or {})  # role -> Path of the weights this teacher was loaded from
        # (T, D) of the Captions a text-to-image teacher takes; None: the condition is a class label
        self.caption_shape = caption_shape
        # Precision of the VQ decoder when images are made for sampling (sample.decoder_dtype): "bfloat16" runs it
        # under bf16 autocast. Training (autograd on) always decodes in float32.
        self.decoder_dtype = "float32"

    def decoder_precision(self):
        """The context every decode runs in: bf16 autocast when decoder_dtype is "bfloat16" and autograd is off
        (the decoder is most of a one-step image on the CPU, and bf16 convolutions are 3-4x faster there; the
        images move by about one uint8 level on average, whose FID cost benchmarks/RESULTS.md records)."""
        if self.decoder_dtype == "float32" or torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    def codebook_sha256(self) -> str:
        """Identity of the codebook (float32 bytes, row-major): pairs record it."""
        return hashlib.sha256(self.codebook.float().cpu().contiguous().numpy().tobytes()).hexdigest()

    def step_of(self, length: int, what: str = "prefix") -> int:
        """The number of whole AR steps in a token prefix of `length`; an error if it splits a step."""
        if length not in self.step_starts:
            raise ValueError(f"{what} of {length} tokens does not end at an AR step boundary of this "
                             f"{self.family} teacher; boundaries: {self.step_starts}")
        return self.step_starts.index(length)

    # ------------------------------------------------------------------------------ sampling
    def sample_tokens(self, cond, draw: Optional[DrawFn] = None,
                      generator: Optional[torch.Generator] = None, prefix: Optional[torch.Tensor] = None,
                      num_steps: Optional[int] = None) -> torch.Tensor:
        """Ancestral sampling with the setting's teacher_sampling: int64 tokens (B, L') on the device.

        draw: the hook of the module docstring (default: the sampler's own multinomial draw with
        `generator`, which must live on the teacher's device). prefix (B, l): given tokens of the
        first whole steps, replayed through the KV cache. num_steps: stop after this many AR steps
        (default all); L' = tokens of those steps, prefix included.
        """
        cond = self._check_condition(cond)
        prefix_steps = 0
        if prefix is not None:
            if prefix.dim() != 2 or prefix.shape[0] != len(cond):
                raise ValueError(f"sample_tokens: prefix must be (B={len(cond)}, l), got {tuple(prefix.shape)}")
            prefix = prefix.to(self.device, torch.long)
            prefix_steps = self.step_of(prefix.shape[1])
        num_steps = self.num_steps if num_steps is None else num_steps
        if not prefix_steps < num_steps <= self.num_steps:
            raise ValueError(f"sample_tokens: need prefix steps ({prefix_steps}) < num_steps ({num_steps}) <= "
                             f"{self.num_steps}")
        return self._sample(cond, draw, generator, prefix, prefix_steps, num_steps)

    def next_probs(self, prefix: torch.Tensor, cond) -> torch.Tensor:
        """The sampling distribution (B, n, V) of the AR step that follows `prefix` (B, l), l a step
        boundary (0 for the first step): exactly the tensor `sample_tokens` draws that step from."""
        seen = {}

        def capture(probs, step):
            seen["probs"] = probs
            return probs.argmax(dim=-1)

        step = self.step_of(prefix.shape[1])
        self.sample_tokens(cond, draw=capture, prefix=prefix if prefix.shape[1] else None, num_steps=step + 1)
        return seen["probs"]

    def flow_tokens(self, noise: torch.Tensor, cond, solver: Optional[dict] = None,
                    num_steps: Optional[int] = None) -> torch.Tensor:
        """DD's deterministic trajectory endpoint: run the sampler in AR order with every token's draw
        replaced by the flow-matching map of its own noise vector (dd.flow.tokens_from_noise).

        noise (B, L, C) on any device, cond (B rows: labels or Captions); solver: tokens_from_noise keyword arguments (the
        setting's flow.solver); num_steps: stop after this many AR steps (default all). Returns the
        token indices (B, L') int64 on the teacher's device.
        """
        if noise.dim() != 3 or tuple(noise.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"flow_tokens: noise must be (B, {self.num_tokens}, {self.token_dim}), "
                             f"got {tuple(noise.shape)}")
        noise = noise.to(self.device, torch.float32)
        solver = dict(solver or {})

        def flow_draw(probs, step):
            batch, n, vocab = probs.shape
            start = self.step_starts[step]
            eps = noise[:, start:start + n].reshape(batch * n, self.token_dim)
            index, _ = tokens_from_noise(eps, probs.reshape(batch * n, vocab), self.codebook, **solver)
            return index.view(batch, n)

        return self.sample_tokens(cond, draw=flow_draw, num_steps=num_steps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices (B, L) -> codebook vectors (B, L, C): DD's clean data layout."""
        return self.codebook[tokens]

    # ------------------------------------------------------------------------------ family parts
    @abc.abstractmethod
    def _sample(self, cond, draw, generator, prefix, prefix_steps, num_steps) -> torch.Tensor:
        """The family's sampler on checked inputs (see sample_tokens)."""

    @abc.abstractmethod
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices (B, L) -> images (B, 3, H, W) in [-1, 1]."""

    @abc.abstractmethod
    def decode_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous tokens (B, L, C) -> images (B, 3, H, W) in [-1, 1]; differentiable in x (the
        tokenizer's weights are frozen), as DD's perceptual loss needs."""

    @torch.no_grad()
    def decode_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices of the first whole AR steps (B, l) -> images (B, 3, H, W) in [-1, 1], the steps not
        run contributing nothing to the decoded latent (the skip-n baselines, dd.methods): VAR decodes the
        partial f_hat of its first scales, LlamaGen its latent grid with zero vectors at the missing positions."""
        self.step_of(tokens.shape[1], "decode_prefix: token prefix")
        if tokens.shape[1] == self.num_tokens:
            return self.decode_tokens(tokens)
        return self._decode_prefix(tokens)

    @abc.abstractmethod
    def _decode_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """decode_prefix on a checked proper prefix."""

    # ------------------------------------------------------------------------------ checks
    def _check_condition(self, cond):
        """Labels or Captions, whichever this teacher takes, on its device; one clear error otherwise."""
        if self.caption_shape is None:
            return self._check_labels(cond)
        if not isinstance(cond, Captions) or tuple(cond.features.shape[1:]) != self.caption_shape:
            shape = tuple(cond.features.shape) if isinstance(cond, Captions) else getattr(cond, "shape", cond)
            raise ValueError(f"this text-to-image teacher takes Captions with features (B, {self.caption_shape[0]}, "
                             f"{self.caption_shape[1]}) and mask (B, {self.caption_shape[0]}), got {shape!r}")
        return cond.to(self.device)

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class indices, got {getattr(labels, 'shape', labels)!r}")
        labels = labels.to(self.device, torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {int(labels.min())}.."
                             f"{int(labels.max())}")
        return labels

    def _check_sequence(self, x: torch.Tensor, what: str, trailing: tuple) -> None:
        if x.dim() != 2 + len(trailing) or x.shape[1] != self.num_tokens or tuple(x.shape[2:]) != trailing:
            shape = ", ".join(["B", str(self.num_tokens), *map(str, trailing)])
            raise ValueError(f"{what}: expected ({shape}), got {tuple(x.shape)}")


class VarTeacher(Teacher):
    """VAR (next-scale prediction) + its multi-scale residual VQVAE."""

    family = "var"

    def __init__(self, vae: VQVAE, model: VAR, sampling: TeacherSampling, files: Optional[dict] = None):
        if tuple(vae.patch_nums) != tuple(model.patch_nums) or vae.V != model.V or vae.Cvae != model.Cvae:
            raise ValueError(f"VarTeacher: VQVAE (patch_nums {vae.patch_nums}, V {vae.V}, Cvae {vae.Cvae}) does "
                             f"not match VAR (patch_nums {model.patch_nums}, V {model.V}, Cvae {model.Cvae})")
        super().__init__(vae, model, sampling, model.num_classes, [pn * pn for pn in model.patch_nums],
                         vae.quantize.embedding.weight, files)

    def _sample(self, labels, draw, generator, prefix, prefix_steps, num_steps):
        s = self.sampling
        prefix_idx = [] if prefix is None else list(prefix.split(self.schedule[:prefix_steps], dim=1))
        # Tokens only: decoding here would pay the VQVAE decoder again in decode_tokens (and, in the pairs stage,
        # for images nobody uses).
        _, idx_list = self.model.sample(self.tokenizer, labels, cfg=s.cfg, top_k=s.top_k, top_p=s.var_top_p(),
                                        temperature=s.temperature, generator=generator, draw=draw,
                                        prefix_idx=prefix_idx, end_scale=num_steps, decode=False)
        return torch.cat(idx_list, dim=1)

    @torch.no_grad()
    def decode_tokens(self, tokens):
        self._check_sequence(tokens, "VarTeacher.decode_tokens", ())
        h_list = [self.tokenizer.quantize.idx_to_h(k, idx) for k, idx in enumerate(tokens.split(self.schedule, dim=1))]
        return self._decode_fhat(self.tokenizer.embed_to_fhat(h_list, last_one=True))

    def _decode_fhat(self, f_hat):
        """f_hat (float32, the quantiser's sum of scales) -> images: the decoder alone in decoder_dtype."""
        with self.decoder_precision():
            return self.tokenizer.fhat_to_img(f_hat).float()

    def decode_embeddings(self, x):
        self._check_sequence(x, "VarTeacher.decode_embeddings", (self.token_dim,))
        return self._decode_fhat(self.tokenizer.tokens_to_fhat(x))

    def _decode_prefix(self, tokens):
        steps = self.step_of(tokens.shape[1])
        h_list = [self.tokenizer.quantize.idx_to_h(k, idx)
                  for k, idx in enumerate(tokens.split(self.schedule[:steps], dim=1))]
        return self._decode_fhat(self.tokenizer.embed_to_fhat(h_list, last_one=True))


class LlamaGenTeacher(Teacher):
    """LlamaGen GPT (raster order, one token per step) + its VQ tokenizer; class labels for a c2i GPT,
    Captions for a t2i GPT (the null caption of its CaptionEmbedder is the unconditional half of CFG)."""

    family = "llamagen"

    def __init__(self, vq: VQModel, model: LlamaGenGPT, sampling: TeacherSampling, files: Optional[dict] = None):
        c = model.config
        if vq.config.codebook_size != c.vocab_size:
            raise ValueError(f"LlamaGenTeacher: VQ codebook_size {vq.config.codebook_size} does not match the "
                             f"GPT's vocab_size {c.vocab_size}")
        # The codes the VQ decodes are the l2-normalised rows; the flow map works with the same vectors.
        caption_shape = (c.cls_token_num, c.caption_dim) if c.model_type == "t2i" else None
        super().__init__(vq, model, sampling, c.num_classes, [1] * c.block_size, vq.quantize.codebook(), files,
                         caption_shape)
        self.grid = c.grid_size

    def _sample(self, cond, draw, generator, prefix, prefix_steps, num_steps):
        s = self.sampling
        if prefix is not None and s.cfg_interval != -1:
            # generate() counts cfg_interval from the first new token (the official intermediate_generate
            # does the same), which differs from a full run's guidance once a prefix is given.
            raise ValueError(f"LlamaGenTeacher: a prefix with cfg_interval={s.cfg_interval} would change which "
                             f"tokens are guided; use cfg_interval -1 (every setting does) or sample without a prefix")
        hook = None if draw is None else (lambda probs, position: draw(probs[:, None], position)[:, 0])
        captions = isinstance(cond, Captions)
        return generate(self.model, cond.features if captions else cond, num_steps - prefix_steps, cfg_scale=s.cfg,
                        cfg_interval=s.cfg_interval, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        generator=generator, prefix=prefix, draw=hook, caption_mask=cond.mask if captions else None)

    def _grid(self, x):
        """(B, L, C) -> (B, C, h, w) in raster order."""
        return x.reshape(x.shape[0], self.grid, self.grid, self.token_dim).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode_tokens(self, tokens):
        self._check_sequence(tokens, "LlamaGenTeacher.decode_tokens", ())
        with self.decoder_precision():
            return self.tokenizer.decode(self._grid(self.codebook[tokens])).float().clamp(-1, 1)

    def decode_embeddings(self, x):
        self._check_sequence(x, "LlamaGenTeacher.decode_embeddings", (self.token_dim,))
        with self.decoder_precision():
            return self.tokenizer.decode(self._grid(x)).float().clamp(-1, 1)

    def _decode_prefix(self, tokens):
        x = self.codebook.new_zeros(tokens.shape[0], self.num_tokens, self.token_dim)
        x[:, :tokens.shape[1]] = self.codebook[tokens]
        with self.decoder_precision():
            return self.tokenizer.decode(self._grid(x)).float().clamp(-1, 1)


TEACHERS = {"var": VarTeacher, "llamagen": LlamaGenTeacher}


# --------------------------------------------------------------------------------------------------
# Building from the teacher stage's folder
# --------------------------------------------------------------------------------------------------
def _load_strict(module: torch.nn.Module, state: dict, path: Path, setting: Setting) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise StageError(f"{path}: does not fit the {type(module).__name__} that setting '{setting.name}' describes "
                         f"({' '.join(first[:3])[:600]}); check the setting's teacher block in params.yaml or "
                         f"re-run the teacher stage") from None


def _check_trained_matches_setting(info_path: Path, setting: Setting, expected: tuple[dict, dict], info: dict) -> None:
    """A trained teacher left in results/ by an older params.yaml must not pass for the current one: Snakemake
    re-runs a stage on a params change only for outputs it made itself (its metadata), so a folder made by
    `dd teacher` directly, or before an edit, would otherwise feed pairs and distillation silently."""
    for role, want in zip(("tokenizer", "model"), expected):
        have = info[role]["kwargs"]
        differ = sorted(key for key in set(want) | set(have) if want.get(key) != have.get(key))
        if differ:
            shown = "; ".join(f"{key}: {have.get(key)!r} in the folder, {want.get(key)!r} from params.yaml"
                              for key in differ[:3])
            raise StageError(f"{info_path}: the trained {role} was built from other settings than "
                             f"settings.{setting.name}.teacher ({shown}{'; ...' if len(differ) > 3 else ''}); re-run "
                             f"`dd teacher --setting {setting.name}` (snakemake --forcerun teacher, or dvc repro "
                             f"--force teacher@{setting.name})")


def load_teacher(setting: Setting, teacher_dir: Path | str, device: str | torch.device = "cpu") -> Teacher:
    """The Teacher of `setting` from results/<setting>/teacher/ (the teacher stage's output).

    Models are built from the setting's teacher block (which also fixes the number of classes). Hub settings:
    official files loaded strictly through dd.hub.load_checkpoint (their sha256 sidecars are checked there).
    Toy settings: the constructor kwargs recorded in teacher.json must equal the setting's, weights come from
    its safetensors files. Models are created on the meta device and take the loaded tensors directly (no
    random init of a 300M model just to overwrite it).
    """
    teacher_dir = Path(teacher_dir)
    info_path = teacher_dir / "teacher.json"
    if not info_path.is_file():
        raise StageError(f"{teacher_dir}: no teacher.json; run `dd teacher --setting {setting.name}` first")
    info = json.loads(info_path.read_text())
    if info.get("family") != setting.family:
        raise StageError(f"{info_path}: family {info.get('family')!r} is not the setting's {setting.family!r}; "
                         f"re-run `dd teacher --setting {setting.name}`")
    tokenizer_kwargs, model_kwargs = setting_model_kwargs(setting)
    if info.get("source") == "hub":
        files = {role: teacher_dir / info["files"][role]["file"] for role in ("tokenizer", "model")}

        def read(role):
            return hub.load_checkpoint(files[role], info["files"][role]["load_layout"])
    elif info.get("source") == "train":
        _check_trained_matches_setting(info_path, setting, (tokenizer_kwargs, model_kwargs), info)
        files = {"tokenizer": teacher_dir / info["files"]["tokenizer"], "model": teacher_dir / info["files"]["teacher"]}

        def read(role):
            if not files[role].is_file():
                raise StageError(f"{files[role]}: missing; re-run `dd teacher --setting {setting.name}`")
            return load_file(files[role])
    else:
        raise StageError(f"{info_path}: unknown source {info.get('source')!r} (expected 'hub' or 'train')")

    with torch.device("meta"):
        tokenizer, model = build_models(setting.family, tokenizer_kwargs, model_kwargs)
    _load_strict(tokenizer, read("tokenizer"), files["tokenizer"], setting)
    _load_strict(model, read("model"), files["model"], setting)
    return TEACHERS[setting.family](tokenizer.to(device), model.to(device), setting.teacher_sampling, files=files)

