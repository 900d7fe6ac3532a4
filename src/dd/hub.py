"""Registry of the official checkpoints (VQ tokenizers, AR teachers, released DD students, the FID
statistic, the text encoder of the t2i teacher), their download through huggingface_hub, and a safe loader.

    path = fetch("var-d16", Path("results/var-d16/teacher"))      # downloads, verifies, links
    state_dict = load_checkpoint(path, ARTIFACTS["var-d16"].load_layout)

Manual download (offline machines, firewalls, gated repos). `fetch(name, dest_dir)` looks first for
`dest_dir/<basename of the file>`: put the file there by hand (download it from the artifact's `url`,
printed in every error, e.g. with a browser or `curl -L -o dest_dir/var_d16.pth <url>`) and the next
`fetch` verifies and uses it without any network access. Copying a Hugging Face cache from another
machine (`$HF_HOME/hub/models--<org>--<name>/`) works too; set HF_HUB_OFFLINE=1 to forbid network use.

Integrity. Where the registry knows a file's size or sha256 they are checked; a user pins a sha256 in
params.yaml (`teacher.sha256: {tokenizer: ..., model: ..., dd: ...}`, checked the same way by `dd fetch`).
Where neither does (none of the official files could be inspected from the machine this was written on,
so every entry has size=None, sha256=None), `fetch` trusts the file on first use: it records the sha256
it saw in a sidecar `<file>.sha256` (`sha256sum -c` format) and every later `fetch` / `load_checkpoint`
re-checks the file against it, so a file that changes or is truncated after download is caught (a file
that was wrong at first download is not). A mismatch is never silently
repaired: the error names the file and says to delete it (and its sidecar) and fetch again.

Loading uses torch.load(weights_only=True): tensors, plain containers and a short allowlist of
data-only classes (argparse.Namespace, numpy arrays) -- never arbitrary pickled code.

Folders. A model that `transformers` reads from a folder of several files (the flan-t5-xl text encoder, the
CLIP model of the CLIP score)
is one artifact per file (each verified and hand-placeable as above, layout 'hf_folder') plus an entry in
FOLDERS; `fetch_folder(name, dest_dir)` fetches every file into dest_dir/<name>/ and returns that folder,
which `from_pretrained(..., local_files_only=True)` then reads.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2  # the HTTP client huggingface_hub 2.x downloads with; its errors can escape mid-download
import numpy as np
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from dd.errors import StageError

log = logging.getLogger(__name__)

KINDS = ("vq", "teacher", "dd", "fid_stat", "text_encoder", "eval_net", "ref_batch")

# How the weights sit inside each file (reference/{var,llamagen}-architecture.md, dd-paper.md §5.2):
#   plain        the file is the state_dict itself (VAR teachers and VQVAE, LlamaGen FSDP checkpoints);
#                a file wrapped as below is tolerated
#   model        ckpt['model'] (LlamaGen DDP checkpoints and VQ); 'module' (deepspeed) and 'state_dict'
#                are accepted in that order, like LlamaGen's GPT loader
#   dd_var       ckpt['trainer']['ema_parameters'] (EMA, the official default) or
#                ckpt['trainer']['var_wo_ddp'] (raw weights)
#   dd_llamagen  ckpt['ema'] (EMA, the official README passes --ema) or ckpt['model'] (raw weights)
#   fid_stat     {'m': mean (D,), 's': covariance (D, D)} as tensors or numpy arrays
#   hf_folder    one file of a Hugging Face model folder (FOLDERS), read by transformers, not load_checkpoint
#   npz          a numpy .npz archive (the ADM reference batch), read with np.load(allow_pickle=False)
LAYOUTS = ("plain", "model", "dd_var", "dd_llamagen", "fid_stat", "hf_folder", "npz")
_TEACHER_KEYS = ("model", "module", "state_dict")

# Data-only classes that released training dicts may contain besides tensors: LlamaGen's training
# scripts save `args` as an argparse.Namespace, and an FID statistic is typically a pair of numpy
# arrays (or numpy scalars). None of these run code when unpickled; anything else is refused by
# weights_only=True. Files written under numpy 1.x name the array helpers numpy.core.*, numpy 2.x
# numpy._core.*, so both spellings are listed.
_SAFE_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    # a dtype is rebuilt through its class (numpy.dtypes.Float64DType, ...): bool, ints, floats only
    *{type(np.dtype(code)) for code in "?bBhHiIlLqQefd"},
]


class HubError(StageError):
    """An artifact could not be obtained or does not verify; the message says what, where, how to fix."""


@dataclass(frozen=True, kw_only=True)
class Artifact:
    name: str  # registry key, used by params.yaml
    repo_id: str  # Hugging Face model repo
    filename: str  # path inside the repo
    kind: str  # one of KINDS
    load_layout: str  # one of LAYOUTS
    description: str
    size: int | None = None  # bytes, when known
    sha256: str | None = None  # lowercase hex, when known
    download_url: str | None = None  # a file hosted outside the Hugging Face Hub (plain HTTPS download)
    pinned_by: str | None = None  # where sha256 came from when not from this registry (a params.yaml key)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"artifact {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.load_layout not in LAYOUTS:
            raise ValueError(f"artifact {self.name!r}: load_layout must be one of {LAYOUTS}, got {self.load_layout!r}")
        if self.sha256 is not None and (len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef")):
            raise ValueError(f"artifact {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def url(self) -> str:
        return self.download_url or f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"

    @property
    def basename(self) -> str:
        """The file name in dest_dir (the repo path's last component)."""
        return PurePosixPath(self.filename).name


def _registry(*artifacts: Artifact) -> dict[str, Artifact]:
    return {a.name: a for a in artifacts}


def _folder_artifacts(folder: str, repo_id: str, filenames: tuple[str, ...], description: str,
                      kind: str = "text_encoder") -> list[Artifact]:
    """One artifact '<folder>:<file>' per file of a Hugging Face model folder (see FOLDERS)."""
    return [Artifact(name=f"{folder}:{filename}", repo_id=repo_id, filename=filename, kind=kind,
                     load_layout="hf_folder", description=f"{description} File {filename} of folder {folder}.")
            for filename in filenames]


_LLAMAGEN = "FoundationVision/LlamaGen"
_LLAMAGEN_T2I = "peizesun/llamagen_t2i"
_VAR = "FoundationVision/var"
_DD = "microsoft/distilled_decoding"

ARTIFACTS: dict[str, Artifact] = _registry(
    Artifact(name="llamagen-vq-16", repo_id=_LLAMAGEN, filename="vq_ds16_c2i.pt", kind="vq", load_layout="model",
             description="LlamaGen VQ-16 tokenizer (ImageNet, codebook 16384x8); the VQ of every c2i LlamaGen "
                         "teacher and DD student. ckpt['model'] holds exactly manifest llamagen-vq-16.json."),
    Artifact(name="llamagen-gpt-b", repo_id=_LLAMAGEN, filename="c2i_B_256.pt", kind="teacher", load_layout="model",
             description="LlamaGen-B class-conditional teacher, 111M, 16x16 tokens (DDP checkpoint, ckpt['model'])."),
    Artifact(name="llamagen-gpt-l", repo_id=_LLAMAGEN, filename="c2i_L_256.pt", kind="teacher", load_layout="model",
             description="LlamaGen-L class-conditional teacher, 343M, 16x16 tokens (DDP checkpoint, ckpt['model'])."),
    Artifact(name="llamagen-gpt-xl-t2i", repo_id=_LLAMAGEN_T2I, filename="t2i_XL_stage1_256.pt", kind="teacher",
             load_layout="model",
             description="LlamaGen-XL text-to-image teacher, 775M, 16x16 tokens, LAION-COCO stage 1. Hosted under "
                         "peizesun/llamagen_t2i, not FoundationVision/LlamaGen (link in the LlamaGen README at "
                         "ce98ec4). Its loader reads 'model'/'module'/'state_dict'; which key this file uses is "
                         "unverified. That DD's Table 3 teacher is this file is a GUESS (dd-paper.md)."),
    Artifact(name="llamagen-vq-16-t2i", repo_id=_LLAMAGEN_T2I, filename="vq_ds16_t2i.pt", kind="vq",
             load_layout="model",
             description="LlamaGen VQ-16 tokenizer trained for text-to-image (LAION-COCO + internal data); the "
                         "tokenizer the official t2i sampler pairs with t2i_XL_stage1_256.pt. Same architecture as "
                         "llamagen-vq-16; ckpt['model'] (as the t2i sampler reads it)."),
    Artifact(name="var-vqvae", repo_id=_VAR, filename="vae_ch160v4096z32.pth", kind="vq", load_layout="plain",
             description="VAR multi-scale VQVAE (ch160, V=4096, Cvae=32), shared by all VAR teachers and DD "
                         "students; plain state_dict (manifest var-vqvae-ch160v4096z32.json)."),
    Artifact(name="var-d16", repo_id=_VAR, filename="var_d16.pth", kind="teacher", load_layout="plain",
             description="VAR-d16 teacher, 310M; plain state_dict (manifest var-d16.json)."),
    Artifact(name="var-d20", repo_id=_VAR, filename="var_d20.pth", kind="teacher", load_layout="plain",
             description="VAR-d20 teacher, 600M; plain state_dict (manifest var-d20.json)."),
    Artifact(name="var-d24", repo_id=_VAR, filename="var_d24.pth", kind="teacher", load_layout="plain",
             description="VAR-d24 teacher, 1.0B; plain state_dict (manifest var-d24.json)."),
    Artifact(name="dd-var-d16", repo_id=_DD, filename="VAR-DD/var-d16.pth", kind="dd", load_layout="dd_var",
             description="Released VAR-DD-d16 student (FID 9.94 1-step / 7.82 2-step); training dict, weights in "
                         "ckpt['trainer']['ema_parameters'] (manifest var-dd-d16.json)."),
    Artifact(name="dd-var-d20", repo_id=_DD, filename="VAR-DD/var-d20.pth", kind="dd", load_layout="dd_var",
             description="Released VAR-DD-d20 student (FID 9.55 / 7.33); ckpt['trainer']['ema_parameters']."),
    Artifact(name="dd-var-d24", repo_id=_DD, filename="VAR-DD/var-d24.pth", kind="dd", load_layout="dd_var",
             description="Released VAR-DD-d24 student (FID 8.92 / 6.95); ckpt['trainer']['ema_parameters']."),
    Artifact(name="dd-llamagen-b", repo_id=_DD, filename="LlamaGen-DD/llamagen-B.pt", kind="dd",
             load_layout="dd_llamagen",
             description="Released LlamaGen-DD-B student (FID 15.50 / 11.17); training dict, weights in "
                         "ckpt['ema'] (manifest llamagen-dd-b-256.json)."),
    Artifact(name="dd-llamagen-l", repo_id=_DD, filename="LlamaGen-DD/llamagen-L.pt", kind="dd",
             load_layout="dd_llamagen",
             description="Released LlamaGen-DD-L student (FID 11.35 / 7.58); ckpt['ema'] "
                         "(manifest llamagen-dd-l-256.json)."),
    Artifact(name="fid-stat-imagenet256", repo_id=_DD, filename="ImageNet-256_FID_Statistic/statistic.pth",
             kind="fid_stat", load_layout="fid_stat",
             description="ImageNet 256x256 FID reference statistic used by the DD evaluation ({'m': mu, 's': "
                         "sigma} of pytorch-fid Inception pool3 features); which images it was computed on is "
                         "unknown (GUESS: ImageNet train)."),
    *_folder_artifacts(
        "flan-t5-xl", "google/flan-t5-xl",
        ("config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
         "pytorch_model-00002-of-00002.bin", "spiece.model", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"),
        description="flan-t5-xl (encoder 2048-d; the whole seq2seq checkpoint, of which the T5 encoder is read), "
                    "the text encoder of the LlamaGen t2i teacher: caption features (120 tokens x 2048) for "
                    "t2i_XL_stage1_256.pt (LlamaGen language/t5.py, model 'flan-t5-xl')."),
    # Like flan-t5-xl, no size / sha256 could be read from here: trust on first use through the sidecars.
    # vocab.json + merges.txt beside tokenizer.json: the BPE files a transformers without tokenizers support reads.
    *_folder_artifacts(
        "clip-vit-large-patch14", "openai/clip-vit-large-patch14",
        ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.json", "merges.txt", "model.safetensors"),
        description="OpenAI CLIP ViT-L/14 (224 px, 77-token text window; the default model of torchmetrics' "
                    "CLIPScore): the CLIP score of the text-to-image rows (dd.clip_score), read by the evaluate "
                    "stage from checkpoints/eval/clip-vit-large-patch14/.",
        kind="eval_net"),
)

# name -> the artifacts (one per file) that make up a folder transformers reads with from_pretrained
FOLDERS: dict[str, tuple[str, ...]] = {
    folder: tuple(name for name, art in ARTIFACTS.items() if name.startswith(folder + ":"))
    for folder in ("flan-t5-xl", "clip-vit-large-patch14")
}


# The evaluation's networks and reference data, hosted outside the Hub (dd.evaluate fetches them into
# checkpoints/eval/). Kept apart from ARTIFACTS, whose entries are all Hugging Face checkpoints.
EVAL_ARTIFACTS: dict[str, Artifact] = _registry(
    Artifact(name="pytorch-fid-inception", repo_id="mseitzer/pytorch-fid",
             filename="pt_inception-2015-12-05-6726825d.pth",
             kind="eval_net", load_layout="plain",
             download_url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                          "pt_inception-2015-12-05-6726825d.pth",
             description="pytorch-fid's InceptionV3 FID weights (the TF 2015-12-05 Inception ported; 1008-way fc "
                         "included): the feature network of the official DD FID (pool3, 2048-d) and, through its fc "
                         "weights, of the Inception Score. clean-fid's legacy_pytorch mode downloads the same file."),
    Artifact(name="adm-ref-imagenet256", repo_id="openai/guided-diffusion", filename="VIRTUAL_imagenet256_labeled.npz",
             kind="ref_batch", load_layout="npz",
             download_url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                          "VIRTUAL_imagenet256_labeled.npz",
             description="The ADM evaluator's ImageNet 256x256 reference batch (arr_0: 10,000 uint8 images): the "
                         "reference set of precision/recall (k=3) in the ADM evaluator (openai/guided-diffusion "
                         "evaluations/)."),
)


# ---------------------------------------------------------------------------------------- fetch

def fetch(name: str | Artifact, dest_dir: Path | str, cache_dir: Path | str | None = None,
          token: str | None = None) -> Path:
    """Return dest_dir/<basename>, a verified copy of (or link to) the artifact.

    A file already there (hand-placed, or from an earlier fetch) is verified and used with no network
    access. Otherwise the file comes from huggingface_hub's cache (`cache_dir`, default: HF_HUB_CACHE /
    HF_HOME), downloading (with resume) when it is missing; HF_HUB_OFFLINE=1 forbids the download.
    The file is then linked (symlink, or a copy where symlinks are not supported) into dest_dir under a
    temporary name and renamed, so dest_dir never holds a half-made link or copy.
    """
    art = _resolve(name)
    dest_dir = Path(dest_dir).absolute()
    dest = dest_dir / art.basename
    if dest.exists():
        _verify(dest, art)
        log.info("%s: using %s", art.name, dest)
        return dest

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour it also when set later.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or hf_constants.is_offline_mode()
    if art.download_url:
        return _download_url(art, dest, offline)
    try:
        cached = Path(hf_hub_download(
            art.repo_id, art.filename,
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
            local_files_only=offline,
            # Read at call time; huggingface_hub itself reads HF_ENDPOINT once, at import.
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        ))
    except (HfHubHTTPError, EntryNotFoundError, OSError, httpx2.HTTPError) as err:
        raise HubError(_unavailable_message(art, dest, err, offline, cache_dir)) from err

    sha = _verify(cached, art, record=False)
    dest_dir.mkdir(parents=True, exist_ok=True)
    _link_atomically(cached.absolute(), dest)
    _write_sidecar(dest, sha)
    log.info("%s: %s -> %s", art.name, dest, cached)
    return dest


def fetch_folder(name: str, dest_dir: Path | str, cache_dir: Path | str | None = None,
                 token: str | None = None) -> Path:
    """Fetch every file of the folder artifact `name` (FOLDERS) into dest_dir/<name>/ and return that folder.

    Each file goes through `fetch` (hand-placed files are verified and used, the Hugging Face cache is used,
    offline or unreachable -> an error naming the file, its URL and where to put it).
    """
    if name not in FOLDERS:
        raise HubError(f"unknown folder artifact {name!r}; known: {', '.join(sorted(FOLDERS))}")
    folder = Path(dest_dir).absolute() / name
    for member in FOLDERS[name]:
        fetch(member, folder, cache_dir=cache_dir, token=token)
    return folder


def _download_url(art: Artifact, dest: Path, offline: bool) -> Path:
    """A file hosted outside the Hub: plain HTTPS download under a temporary name, renamed when complete."""
    if offline:
        raise HubError(_unavailable_message(art, dest, OSError("offline"), True, None))
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(art.url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, dest)
    except OSError as err:  # urllib.error.URLError and socket timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise HubError(_unavailable_message(art, dest, err, False, None)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _verify(dest, art)
    log.info("%s: downloaded %s", art.name, dest)
    return dest


def _resolve(name: str | Artifact) -> Artifact:
    if isinstance(name, Artifact):
        return name
    registry = {**ARTIFACTS, **EVAL_ARTIFACTS}
    if name not in registry:
        raise HubError(f"unknown artifact {name!r}; known artifacts: {', '.join(sorted(registry))}")
    return registry[name]


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _unavailable_message(art: Artifact, dest: Path, err: Exception, offline: bool, cache_dir) -> str:
    if offline:
        reason = ("HF_HUB_OFFLINE=1 is set" if art.download_url else
                  "HF_HUB_OFFLINE=1 is set and the file is not in the Hugging Face cache")
    elif isinstance(err, GatedRepoError):
        reason = (f"the repository {art.repo_id} is gated: accept its terms on https://huggingface.co/"
                  f"{art.repo_id} and pass token= (or set HF_TOKEN)")
    elif isinstance(err, RepositoryNotFoundError):
        reason = f"the repository {art.repo_id} was not found (private, renamed, or a token is needed)"
    elif isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        reason = f"the file {art.filename} was not found in {art.repo_id} (HTTP 404)"
    elif isinstance(err, LocalEntryNotFoundError):
        reason = "the Hub could not be reached and the file is not in the Hugging Face cache"
    elif isinstance(err, HfHubHTTPError) and err.response is not None:
        reason = f"the Hub answered HTTP {err.response.status_code}"
    else:
        reason = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    cache = f" (cache_dir {cache_dir})" if cache_dir is not None else ""
    return (f"cannot fetch artifact '{art.name}' from {art.url}: {reason}{cache}. "
            f"Download that URL by hand and put the file at {dest} ; the next run verifies and uses it.")


def _link_atomically(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(src, tmp)
        except OSError:  # filesystems without symlinks (some network / FUSE mounts): copy instead
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------- verification

def sidecar_path(path: Path | str) -> Path:
    """Where the sha256 recorded for `path` lives: <path>.sha256 next to it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_sidecar(path: Path) -> str | None:
    side = sidecar_path(path)
    if not side.exists():
        return None
    text = side.read_text().split()
    if not text or len(text[0]) != 64:
        raise HubError(f"{side}: not a sha256 sidecar (expected '<64 hex digits>  {path.name}'); delete it "
                       f"and fetch again to re-record the checksum")
    return text[0].lower()


def _write_sidecar(path: Path, sha: str) -> None:
    side = sidecar_path(path)
    if _read_sidecar(path) == sha:
        return
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{sha}  {path.name}\n")
    os.replace(tmp, side)


def _mismatch(path: Path, what: str, expected, actual, source: str) -> HubError:
    # A link into the Hugging Face cache: the bad bytes are in the cache, which must go too.
    real = Path(os.path.realpath(path)) if path.is_symlink() else None
    where = f"{path}" + (f" (a link to {real})" if real else "")
    also = f" and {real}" if real else ""
    return HubError(f"{where}: {what} mismatch: expected {expected} ({source}), got {actual}. The file is "
                    f"corrupt or not the right one: delete {path}{also} and its sidecar "
                    f"{sidecar_path(path).name}, then fetch again.")


def _verify(path: Path, art: Artifact, record: bool = True) -> str:
    """Check size and sha256 against the registry, else against the sidecar; return the sha256.

    With record=True the sha256 is written to the sidecar (trust on first use of a hand-placed file).
    """
    size = path.stat().st_size
    if art.size is not None and size != art.size:
        raise _mismatch(path, "size", f"{art.size} bytes", f"{size} bytes", f"registry entry '{art.name}'")
    sha = sha256_of(path)
    if art.sha256 is not None:
        if sha != art.sha256:
            raise _mismatch(path, "sha256", art.sha256, sha, art.pinned_by or f"registry entry '{art.name}'")
    elif (recorded := _read_sidecar(path)) is not None and sha != recorded:
        raise _mismatch(path, "sha256", recorded, sha, f"recorded in {sidecar_path(path).name} when first fetched")
    if record:
        _write_sidecar(path, sha)
    return sha


# ------------------------------------------------------------------------------------ loading

def load_checkpoint(path: Path | str, layout: str, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint on the CPU with weights_only=True and return its flat {name: tensor} dict.

    `layout` is one of LAYOUTS (an artifact's `load_layout`). `ema` picks the EMA (True, the default)
    or raw (False) weights of a DD training dict; it is an error for other layouts. If a sidecar
    <path>.sha256 exists the file is checked against it first.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "hf_folder":
        raise ValueError(f"{path}: layout 'hf_folder' is one file of a transformers model folder; fetch the whole "
                         f"folder with dd.hub.fetch_folder and read it with dd.text_encoder.T5CaptionEncoder.from_folder "
                         f"(flan-t5-xl) or dd.clip_score.ClipScorer.from_folder (CLIP)")
    if ema is not None and layout not in ("dd_var", "dd_llamagen"):
        raise ValueError(f"ema= selects EMA or raw weights of a DD training dict; layout {layout!r} has none")
    if not path.exists():
        raise HubError(f"{path}: no such checkpoint; fetch it (dd.hub.fetch) or put the file there by hand")
    recorded = _read_sidecar(path)
    if recorded is not None and (actual := sha256_of(path)) != recorded:
        raise _mismatch(path, "sha256", recorded, actual, f"recorded in {sidecar_path(path).name}")

    if layout == "npz":
        return _npz(path)
    ckpt = _torch_load(path)
    use_ema = ema is None or ema
    if layout == "fid_stat":
        return _fid_stat(path, ckpt)
    if layout in ("plain", "model"):
        state = _teacher_state(path, ckpt, layout)
    elif layout == "dd_var":
        trainer = _child(path, ckpt, ["trainer"])
        state = _child(path, trainer, ["trainer", "ema_parameters" if use_ema else "var_wo_ddp"])
    else:  # dd_llamagen
        state = _child(path, ckpt, ["ema" if use_ema else "model"])
    return _as_state_dict(path, state, layout)


def _torch_load(path: Path):
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = _refused_globals(path, err)
            if refused:
                raise HubError(f"{path}: refused to load: the file pickles Python objects beyond tensors and plain "
                               f"data ({', '.join(refused)}); checkpoints are loaded with weights_only=True because "
                               f"unpickling such objects can run arbitrary code. Re-save only the tensors "
                               f"(torch.save(state_dict)) from a trusted copy.") from err
            raise HubError(_unreadable(path, err)) from err
        except (RuntimeError, EOFError, ValueError, OSError) as err:
            raise HubError(_unreadable(path, err)) from err


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """The Python globals that made weights_only refuse the file; [] when the file is just unreadable."""
    try:  # zip checkpoints (torch >= 1.6) can be listed without unpickling anything
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy or broken files: fall back to what the unpickler's message names
        return [a or b for a, b in re.findall(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(err))]


def _unreadable(path: Path, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first}); it is truncated or not "
            f"the right file: delete it (and {sidecar_path(path).name} if present) and fetch again")


def _keys(obj) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")


def _child(path: Path, obj, keys: list[str]):
    """obj[keys[-1]], where obj is ckpt[keys[0]]...[keys[-2]]; a clear error lists what is there."""
    where = "ckpt" + "".join(f"[{k!r}]" for k in keys[:-1])
    if not isinstance(obj, dict):
        raise HubError(f"{path}: expected {where} to be a dict holding {keys[-1]!r}, got {type(obj).__name__}")
    if keys[-1] not in obj:
        raise HubError(f"{path}: {where} has no key {keys[-1]!r}; its keys are: {_keys(obj)}")
    return obj[keys[-1]]


def _is_flat_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _teacher_state(path: Path, ckpt, layout: str):
    """Find the weights like the official loaders: the whole file, or ckpt['model'/'module'/'state_dict']."""
    if not isinstance(ckpt, dict):
        raise HubError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
    if layout == "plain" and _is_flat_state_dict(ckpt):
        return ckpt
    for key in _TEACHER_KEYS:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if _is_flat_state_dict(ckpt):  # layout 'model' saved without the wrapper (FSDP-style)
        return ckpt
    raise HubError(f"{path}: found no weights: neither a flat {{name: tensor}} dict nor one of "
                   f"{list(_TEACHER_KEYS)}; its keys are: {_keys(ckpt)}")


def _as_state_dict(path: Path, state, layout: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise HubError(f"{path}: the weights for layout {layout!r} are not a non-empty dict "
                       f"(got {type(state).__name__})")
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise HubError(f"{path}: layout {layout!r}: entries are not tensors: {', '.join(bad[:8])}"
                       f"{' ...' if len(bad) > 8 else ''}")
    return dict(state)


def _fid_stat(path: Path, ckpt) -> dict[str, torch.Tensor]:
    if not isinstance(ckpt, dict) or not {"m", "s"} <= set(ckpt):
        got = _keys(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise HubError(f"{path}: an FID statistic must be a dict with keys 'm' (mean) and 's' (covariance); "
                       f"got {got}")
    m, s = (torch.as_tensor(ckpt[k]) for k in ("m", "s"))
    if m.dim() != 1 or s.shape != (m.numel(), m.numel()):
        raise HubError(f"{path}: FID statistic shapes do not fit: 'm' {tuple(m.shape)} should be (D,) and "
                       f"'s' {tuple(s.shape)} should be (D, D)")
    return {"m": m, "s": s}


def _npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise HubError(_unreadable(path, err).replace("torch checkpoint", "numpy .npz archive")) from err


def load_artifact(name: str | Artifact, dest_dir: Path | str, ema: bool | None = None,
                  cache_dir: Path | str | None = None, token: str | None = None) -> dict[str, torch.Tensor]:
    """fetch() then load_checkpoint() with the artifact's own layout."""
    art = _resolve(name)
    return load_checkpoint(fetch(art, dest_dir, cache_dir=cache_dir, token=token), art.load_layout, ema=ema)
