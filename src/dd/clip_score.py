"""CLIP score of text-to-image samples: how well each image matches its caption, beside Table 3's FID-5k.

Definition (torchmetrics' CLIPScore; Hessel et al. 2021 with the weight 100 the text-to-image literature reports):
    CLIP score = mean over the samples of 100 * max(cos(E_I(image), E_T(caption)), 0)
E_I / E_T: the projected image / text embeddings of CLIP, by default openai/clip-vit-large-patch14 (the default
model of torchmetrics' CLIPScore). torchmetrics clamps the mean at 0 rather than each sample; the two agree whenever
every cosine is >= 0, as it is for image-caption pairs under a trained CLIP (cosines ~0.1-0.4). Random test models
give negative cosines too, so the tests hold us to the per-sample formula as written.

Inputs are prepared as transformers' CLIPProcessor does for torchmetrics: the image processor of the model folder
(preprocessor_config.json: shorter side to 224 bicubic, centre crop, CLIP's mean / std), with the PIL backend, the
original CLIP preprocessing; the caption through CLIP's BPE tokenizer. CLIP reads at most 77 tokens (start and end
token included): a longer caption is TRUNCATED to its first 75 tokens plus the end token, because CLIP's text
embedding is read at the end token (torchmetrics instead cuts the ids after tokenizing, which drops that token).
How many captions were truncated is recorded beside the score (clip_truncated); COCO captions are far shorter.

The model is the hub folder artifact `sample.clip_model` (dd.hub.FOLDERS), fetched by the evaluate stage into
checkpoints/eval/<name>/ and read with local_files_only=True. The evaluate stage checks it before any work
(`prepare`): offline with the folder incomplete, it stops with one error naming the missing files, the folder,
and the command that fetches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dd.config import Params, Setting
from dd.errors import StageError

BATCH_SIZE = 50  # images per CLIP forward (memory only; the score does not depend on it)


class ClipScorer:
    """A CLIPModel with its tokenizer and image processor: cosines of (uint8 image, caption) pairs."""

    def __init__(self, model, tokenizer, image_processor):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = model.config.text_config.max_position_embeddings  # 77 for every OpenAI CLIP

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32) -> "ClipScorer":
        """Read a CLIP model folder (dd.hub.fetch_folder('clip-vit-large-patch14', ...)) with no network access."""
        from dd import shim_torchvision

        shim_torchvision()  # before transformers imports torchvision
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; fetch the CLIP model with "
                                    f"dd.hub.fetch_folder('clip-vit-large-patch14', <dest_dir>) or put its files there "
                                    f"by hand")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # the PIL backend: the original CLIP preprocessing (transformers 5 would pick torchvision's resize otherwise)
        images = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
        return cls(model, tokenizer, images)

    def tokenize(self, captions: list[str]) -> tuple[dict, int]:
        """(input_ids / attention_mask padded to the longest caption and truncated to the window, on the model's
        device; how many captions were longer than the window)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("ClipScorer: captions must be a list of strings")
        lengths = [len(ids) for ids in self.tokenizer(list(captions), verbose=False)["input_ids"]]
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return ({k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")},
                sum(n > self.max_length for n in lengths))

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, int]:
        """(cos(E_I, E_T) per pair, float64 (n,) on the CPU; captions truncated) of uint8 images (n, H, W, 3).

        The embeddings as CLIPModel.forward makes them (pooled output through the projection); called directly
        because get_image_features / get_text_features return a tensor in transformers 4 and an output object in 5."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ClipScorer expects uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(captions):
            raise ValueError(f"ClipScorer: {len(images)} images but {len(captions)} captions")
        m = self.model
        pixels = self.image_processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(m.parameters()).dtype)
        image = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        text_inputs, truncated = self.tokenize(captions)
        text = m.text_projection(m.text_model(**text_inputs).pooler_output)
        return F.cosine_similarity(image.double(), text.double(), dim=-1).cpu(), truncated


def clip_score(scorer: ClipScorer, pairs, total: int, batch_size: int = BATCH_SIZE, desc: str = "CLIP score") -> dict:
    """{"clip_score": mean of 100 * max(cos, 0), "clip_truncated": captions cut to the window} of (uint8 images
    (n, H, W, 3), their n captions) given shard by shard; batched, progress bar in images."""
    from tqdm import tqdm

    scores, truncated = [], 0
    with tqdm(total=total, desc=f"[evaluate] {desc}", unit="img") as bar:
        for images, captions in pairs:
            for start in range(0, len(images), batch_size):
                cos, cut = scorer.cosines(images[start:start + batch_size], captions[start:start + batch_size])
                scores.append(100 * cos.clamp(min=0))
                truncated += cut
                bar.update(len(cos))
    if not scores:
        raise StageError("CLIP score: no images")
    return {"clip_score": torch.cat(scores).mean().item(), "clip_truncated": truncated}


# --------------------------------------------------------------------------------------------------
# The evaluate stage's side (paper text-to-image rows)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipInputs:
    name: str  # the hub folder artifact (sample.clip_model)
    folder: Path  # its fetched folder
    captions: list[str]  # the evaluation prompts; sample i was drawn from captions[label i]


def fetch_command(name: str, dest_dir: Path) -> str:
    return f"python -c \"from dd import hub; hub.fetch_folder('{name}', '{dest_dir}')\""


def prepare(params: Params, setting: Setting, manifest: dict) -> ClipInputs | None:
    """Everything the CLIP score needs, checked before the evaluate stage does any work: None when the setting has
    no clip_model; else the model folder (fetched now: online it downloads, offline a missing file stops here with
    one error) and the evaluation captions, checked to be the ones the samples were drawn from."""
    from dd import hub
    from dd.caption_features import captions_sha256
    from dd.evaluate import eval_dir
    from dd.prompts import read_prompts, text_features_dir

    name = setting.sample.clip_model
    if name is None:
        return None
    captions = read_prompts(text_features_dir(params, setting), setting)["eval"]["captions"]
    drawn = (manifest.get("conditions") or {}).get("captions_sha256")
    if drawn != captions_sha256(captions):
        raise StageError(f"setting '{setting.name}': the samples of method '{manifest.get('method')}' were drawn from "
                         f"other evaluation prompts (captions_sha256 {drawn}) than results/{setting.name}/"
                         f"text_features holds now; re-run `dd sample --setting {setting.name} --method "
                         f"{manifest.get('method')}`")
    dest = eval_dir(params)
    try:
        folder = hub.fetch_folder(name, dest)
    except hub.HubError as err:
        folder = dest / name
        missing = [hub.ARTIFACTS[m].filename for m in hub.FOLDERS[name]
                   if not (folder / hub.ARTIFACTS[m].filename).exists()]
        repo = hub.ARTIFACTS[hub.FOLDERS[name][0]].repo_id
        raise StageError(f"CLIP score (settings.{setting.name}.sample.clip_model: {name}): the model folder {folder} "
                         f"is not usable{': missing ' + ', '.join(missing) if missing else ''}. Fetch it with "
                         f"`{fetch_command(name, dest)}` (online), or put the files of https://huggingface.co/{repo} "
                         f"there by hand; or set sample.clip_model: null for no CLIP score. ({err})") from None
    return ClipInputs(name, folder, captions)


def clip_metrics(inputs: ClipInputs, shards, total: int, device) -> dict:
    """clip_score / clip_truncated / clip_model of uint8 samples given as (images, caption rows) shards."""
    from dd import hub

    def pairs():
        for images, rows in shards:
            if len(rows) and (rows.min() < 0 or rows.max() >= len(inputs.captions)):
                raise StageError(f"CLIP score: caption rows {rows.min().item()}..{rows.max().item()} outside the "
                                 f"{len(inputs.captions)} evaluation prompts; re-run `dd sample`")
            yield images, [inputs.captions[i] for i in rows.tolist()]

    scorer = ClipScorer.from_folder(inputs.folder, device=device)
    repo = hub.ARTIFACTS[hub.FOLDERS[inputs.name][0]].repo_id
    return {**clip_score(scorer, pairs(), total), "clip_model": f"{inputs.name} ({repo})"}
