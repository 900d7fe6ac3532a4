"""The evaluate stage: FID / IS / precision / recall (+ latency, steps, parameters) of one method's samples, and the
per-setting summary table of every method.

    dd evaluate --setting S --method M    results/S/samples/M/  ->  results/S/metrics/M.json (+ MLflow evaluate/M)
    dd summary --setting S                prints the table of every method of S and logs it to MLflow

Paper rows (reference/dd-paper.md §2), as the official evaluation computes them:
  - FID: pytorch-fid's InceptionV3 (pool3, 2048-d, the FID weights; clean-fid's `legacy_pytorch` network), images
    fed as the official code does (uint8 -> [0, 1], bilinear resize to 299 with align_corners=False, then 2x - 1),
    mean/covariance against the released ImageNet statistic `statistic.pth` (hub artifact fid-stat-imagenet256);
    the Frechet distance is clean-fid's.
  - IS and precision/recall (k=3) as the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) computes
    them: IS from softmax(pool3 @ W) with the Inception's 1008-way fc weights W and no bias (ADM feeds pool_3 into
    softmax/logits/MatMul), in splits of 5000 in sample order; precision = share of samples inside the k=3
    nearest-neighbour balls of the reference batch, recall = share of the reference inside the samples' balls
    (Kynkaenniemi et al. 2019), reference = ADM's VIRTUAL_imagenet256_labeled.npz. Formulas through torch-fidelity
    (`isc_features_to_metric`, `calculate_precision_recall_part`).
    ADM's network is the TF graph of the same Inception: its input path is reproduced (TF1 bilinear resize to 299,
    (x - 128) / 128), its weights are pytorch-fid's port of them (the FID path keeps pytorch-fid's own resize).
    The same network and path embed the samples and the reference batch.

Text-to-image paper rows (Table 3): FID against the statistics of a folder of reference images (sample.fid_reference)
and IS as above, no precision/recall; and the CLIP score of each sample against its evaluation caption (dd.clip_score,
sample.clip_model; null: none).

Toy rows: the same formulas in the feature space of the toy judge (dd.judge; trained in the teacher stage, used by
no training step), reference = the 1000 held-out test digits; beside them the real-vs-real floor (the train
digits against the test digits, same judge, as many train digits as samples), class accuracy under the judge, and
same-class diversity (mean pairwise pixel L2 distance between the grey [-1, 1] samples of one class at the setting's
size, averaged over classes) with the real test digits' value. Real digits go through the samples' uint8 rounding
first, so both sides are quantised alike.

Latency: dd.latency.measure_latency (seconds per image, steady state, setting's batch size; its device).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dd import clip_score, hub, shim_torchvision
from dd.atomic import atomic_file, write_json
from dd.config import Params, Setting
from dd.errors import StageError

shim_torchvision()  # clean-fid and torch-fidelity, imported below where used, import torchvision

K_NEIGHBOURS = 3  # precision/recall neighbourhood (ADM evaluator, Kynkaenniemi et al.)
IS_SPLIT_SIZE = 5000  # ADM evaluator: Inception Score over consecutive splits of 5000 samples
PR_BATCH = 2000  # rows per distance block (memory only; the result does not depend on it)
INCEPTION_SIZE = 299
FID_STATISTIC = "fid-stat-imagenet256"
INCEPTION_WEIGHTS = "pytorch-fid-inception"
ADM_REFERENCE = "adm-ref-imagenet256"


# --------------------------------------------------------------------------------------------------
# Formulas (numbers in, numbers out; the libraries do the arithmetic)
# --------------------------------------------------------------------------------------------------
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64, as pytorch-fid / clean-fid compute them (np.cov, N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Frechet distance between two Gaussians (scipy sqrtm, eps-regularised when singular).

    clean-fid refuses a matrix square root with a large imaginary part, which happens when the covariances are
    far from full rank (fewer samples than feature dimensions, e.g. micro test runs); then the trace term is
    taken from the eigenvalues of sigma1 @ sigma2 instead (torch-fidelity's formula), with a warning."""
    from cleanfid import fid

    args = [np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    try:
        return float(fid.frechet_distance(*args))
    except ValueError as err:
        if "Imaginary component" not in str(err):
            raise
        mu1, sigma1, mu2, sigma2 = args
        print(f"[evaluate] warning: clean-fid's sqrtm failed ({err}); covariances are rank-deficient (too few "
              f"samples for {len(mu1)}-d features): FID from the eigenvalues of sigma1 @ sigma2", flush=True)
        trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
        diff = mu1 - mu2
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(features_1, features_2) -> float:
    """FID between two feature sets (clean-fid's fid_from_feats: np.mean / np.cov, then frechet_distance)."""
    return frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2))


def precision_recall(sample_features, reference_features, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds (torch-fidelity; the ADM evaluator's definition and `<=` test)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    samples = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32)
    reference = torch.as_tensor(np.asarray(reference_features), dtype=torch.float32)
    for name, feats in (("samples", samples), ("reference", reference)):
        if feats.ndim != 2 or feats.shape[0] <= k:
            raise StageError(f"precision/recall: {name} features must be (N, D) with N > k={k}, got "
                             f"{tuple(feats.shape)}")
    precision, recall = calculate_precision_recall_part(samples, reference, neighborhood=k, batch_size=PR_BATCH)
    return float(precision), float(recall)


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: mean over consecutive splits of `split_size` samples (the last one shorter) of
    exp(E_x KL(p(y|x) || p(y))), p = softmax(logits); each split through torch-fidelity's formula."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = [isc_features_to_metric(chunk, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN]
              for chunk in logits.split(split_size)]
    return float(np.mean(scores))


def same_class_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the grey images of one class, averaged over the classes that have at
    least two images. images (N, C, H, W) in [-1, 1]; grey = the mean over channels (the digits are grey; one
    channel keeps the numbers comparable with the toy-fidelity issue's table, real digits 6.31 at 16 px)."""
    flat = images.double().mean(dim=1).flatten(1)
    per_class = [torch.pdist(flat[labels == c]).mean().item() for c in labels.unique().tolist()
                 if int((labels == c).sum()) >= 2]
    if not per_class:
        raise StageError("same-class diversity needs at least two images of one class")
    return float(np.mean(per_class))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) samples -> float (N, 3, H, W) in [-1, 1] (the inverse of the sample stage's rounding:
    byte u is the bin centre (u - 127.5) / 127.5)."""
    return (images.permute(0, 3, 1, 2).float() - 127.5) / 127.5


# --------------------------------------------------------------------------------------------------
# The paper's feature network: pytorch-fid's InceptionV3
# --------------------------------------------------------------------------------------------------
class FidInception(torch.nn.Module):
    """pytorch-fid's FID InceptionV3 (clean-fid `legacy_pytorch` builds the same modules): uint8 (N, H, W, 3)
    images -> (pool3 (N, 2048), unbiased logits (N, 1008) = pool3 @ fc.weight.T, the ADM evaluator's IS logits).

    state_dict: the pytorch-fid weights (hub artifact pytorch-fid-inception); None keeps random weights (tests)."""

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        from cleanfid import inception_pytorch as ip

        net = ip._inception_v3(num_classes=1008, aux_logits=False, pretrained=False)
        # the FID Inception's blocks differ from torchvision's (pytorch-fid's fid_inception_v3, without the download)
        net.Mixed_5b = ip.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = ip.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = ip.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = ip.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = ip.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = ip.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = ip.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = ip.FIDInceptionE_1(1280)
        net.Mixed_7c = ip.FIDInceptionE_2(2048)
        if state_dict is not None:
            net.load_state_dict(state_dict, strict=True)
        self.net = net.eval()
        self.trunk = torch.nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, adm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """adm=False: the official DD FID's input path (pytorch-fid / clean-fid legacy_pytorch: PyTorch bilinear
        resize, 2x/255 - 1). adm=True: the ADM evaluator's TF graph input path (TF1 bilinear resize, through
        torch-fidelity's port, then (x - 128) / 128 as the graph's Sub/Mul do)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FidInception expects uint8 images (N, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        if adm:
            from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

            x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False) - 128) / 128
        else:
            # clean-fid legacy_pytorch: resize the [0, 255] floats (= pytorch-fid's resize of ToTensor's [0, 1])
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = 2 * (x.clamp(0, 255) / 255) - 1
        pool3 = self.trunk(x).flatten(1)
        return pool3, pool3 @ self.net.fc.weight.T


def inception_features(model: FidInception, shards, total: int, paths=("fid", "adm"), batch_size: int = 100,
                       desc: str = "inception") -> dict[str, np.ndarray]:
    """Features of uint8 images given as an iterable of (n, H, W, 3) tensors (shards: 50k images at 256 px never
    sit in memory at once), float64 numpy: "fid" pool3 of the official FID path; "adm_pool3" and "adm_logits" of
    the ADM evaluator's path (see FidInception.forward). Batched; progress bar in images."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    out = {"fid": [], "adm_pool3": [], "adm_logits": []}
    with tqdm(total=total, desc=f"[evaluate] {desc}", unit="img") as bar:
        for shard in shards:
            for chunk in shard.split(batch_size):
                chunk = chunk.to(device)
                if "fid" in paths:
                    out["fid"].append(model(chunk)[0].double().cpu())
                if "adm" in paths:
                    pool3, logits = model(chunk, adm=True)
                    out["adm_pool3"].append(pool3.double().cpu())
                    out["adm_logits"].append(logits.double().cpu())
                bar.update(len(chunk))
    return {key: torch.cat(parts).numpy() for key, parts in out.items() if parts}


def eval_dir(params: Params) -> Path:
    """checkpoints/eval/ (DD_CHECKPOINTS moves it): the evaluation's downloads, kept outside results/."""
    from dd.teacher_stage import checkpoints_dir

    return checkpoints_dir(params) / "eval"


def load_inception(params: Params, device) -> FidInception:
    path = hub.fetch(INCEPTION_WEIGHTS, eval_dir(params))
    state = hub.load_checkpoint(path, hub.EVAL_ARTIFACTS[INCEPTION_WEIGHTS].load_layout)
    return FidInception(state).to(device)


def adm_reference_features(params: Params, model: FidInception) -> np.ndarray:
    """pool3 features of the ADM reference batch, computed once and cached next to it (keyed by both files'
    sha256, written atomically)."""
    folder = eval_dir(params)
    npz = hub.fetch(ADM_REFERENCE, folder)
    weights = folder / hub.EVAL_ARTIFACTS[INCEPTION_WEIGHTS].basename
    key = f"{hub.sha256_of(npz)[:12]}-{hub.sha256_of(weights)[:12]}"
    cache = folder / f"{npz.stem}.adm-pool3-{key}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    batch = hub.load_checkpoint(npz, "npz")
    if "arr_0" not in batch or batch["arr_0"].dtype != torch.uint8 or batch["arr_0"].ndim != 4:
        raise StageError(f"{npz}: expected 'arr_0' uint8 images (N, H, W, 3) (the ADM reference batch); got keys "
                         f"{sorted(batch)}")
    pool3 = inception_features(model, [batch["arr_0"]], len(batch["arr_0"]), paths=("adm",),
                               desc="ADM reference batch")["adm_pool3"]
    with atomic_file(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, pool3)
    return pool3


def paper_metrics(params: Params, shards, total: int, device) -> dict:
    """FID (released statistic), IS and precision/recall (ADM reference batch) of uint8 images (N, H, W, 3) given
    shard by shard."""
    model = load_inception(params, device)
    stat = hub.load_artifact(FID_STATISTIC, eval_dir(params))
    features = inception_features(model, shards, total, desc="samples")
    mu, sigma = feature_statistics(features["fid"])
    reference = adm_reference_features(params, model)
    precision, recall = precision_recall(features["adm_pool3"], reference)
    if stat["m"].numel() != mu.size:
        raise StageError(f"{eval_dir(params) / hub.ARTIFACTS[FID_STATISTIC].basename}: a {stat['m'].numel()}-d "
                         f"statistic for {mu.size}-d Inception pool3 features; it is not the released statistic.pth")
    return {"fid": frechet_distance(mu, sigma, stat["m"].double().numpy(), stat["s"].double().numpy()),
            "is": inception_score(features["adm_logits"]), "precision": precision, "recall": recall,
            "feature_network": "pytorch-fid InceptionV3 pool3 (2048-d); IS/P/R through the ADM input path",
            "fid_reference": "statistic.pth (microsoft/distilled_decoding)",
            "pr_reference": "ADM VIRTUAL_imagenet256_labeled.npz"}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise StageError(f"{folder}: no reference images (.png/.jpg/.jpeg/.webp/.bmp) for the text-to-image FID; put "
                         f"them there (e.g. the COCO 2014 val images of the evaluation prompts, "
                         f"http://images.cocodataset.org/zips/val2014.zip) or point sample.fid_reference at yours")
    return files


def load_reference_images(files: list[Path], size: int, batch_size: int = 100):
    """uint8 (n, size, size, 3) batches: each image RGB, its shorter side resized to `size` (bicubic) and
    center-cropped (GUESS: the usual ADM / LlamaGen preprocessing of reference images)."""
    from PIL import Image

    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = size / min(image.size)
                image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                     Image.BICUBIC)
                left, top = (image.width - size) // 2, (image.height - size) // 2
                batch.append(torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size))).copy()))
        yield torch.stack(batch)


def reference_statistics(params: Params, model: "FidInception", folder: Path, files: list[Path],
                         size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference folder's FID features (clean-fid's custom statistics, made with our Inception
    path), cached in checkpoints/eval/ under the sha256 of the folder's file names and bytes. files: the folder's
    images (fid_reference_folder)."""
    import hashlib

    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hub.sha256_of(path).encode())
    cache = eval_dir(params) / f"fid-reference-{digest.hexdigest()[:16]}-{size}.npz"
    if cache.is_file():
        stats = np.load(cache, allow_pickle=False)
        return stats["mu"], stats["sigma"]
    features = inception_features(model, load_reference_images(files, size), len(files), paths=("fid",),
                                  desc=f"reference images {folder.name}")["fid"]
    mu, sigma = feature_statistics(features)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, mu=mu, sigma=sigma, count=len(files))
    return mu, sigma


def fid_reference_folder(params: Params, setting: Setting) -> tuple[Path, list[Path]]:
    """The text-to-image FID's folder of reference images (sample.fid_reference, relative to params.yaml) and its
    image files; a missing setting, folder or image is refused here, before any work."""
    if not setting.sample.fid_reference:
        raise StageError(f"settings.{setting.name}.sample.fid_reference: set the folder of reference images the "
                         f"text-to-image FID compares with")
    folder = Path(setting.sample.fid_reference)
    folder = folder if folder.is_absolute() else params.path.parent / folder
    return folder, reference_image_files(folder)


def text_to_image_metrics(params: Params, setting: Setting, shards, total: int, device, model=None,
                          reference: tuple[Path, list[Path]] | None = None) -> dict:
    """Table 3 (paper t2i rows): FID of the samples against the reference folder's statistics, and IS.
    reference: fid_reference_folder's result when the caller has it already (the folder is listed once)."""
    folder, files = reference or fid_reference_folder(params, setting)
    model = model or load_inception(params, device)
    features = inception_features(model, shards, total, desc="samples")
    mu, sigma = feature_statistics(features["fid"])
    ref_mu, ref_sigma = reference_statistics(params, model, folder, files, setting.image_size)
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "is": inception_score(features["adm_logits"]),
            "precision": None, "recall": None,
            "feature_network": "pytorch-fid InceptionV3 pool3 (2048-d); IS through the ADM input path",
            "fid_reference": f"{folder} ({len(files)} images, custom statistics)"}


# --------------------------------------------------------------------------------------------------
# Toy rows: the judge
# --------------------------------------------------------------------------------------------------
def _quantised_digits(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dd import data
    from dd.sample_stage import to_uint8

    images, labels = data.load_mnist(split, image_size)
    return uint8_to_unit(to_uint8(images)), labels


def toy_reference(params: Params, setting: Setting, n_samples: int) -> dict:
    """The judge and everything the real digits give: test features, the real-vs-real floor, real diversity.

    The floor compares as many train digits as there are samples (balanced: the first n/10 of each class, at most
    all 4000) with the test digits, so it carries the same small-sample bias as the samples' FID."""
    from dd import judge
    from dd.teacher_stage import teacher_dir

    path = teacher_dir(params, setting) / judge.FILE
    try:
        model = judge.load_judge(path)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    if model.config.image_size != setting.image_size:
        raise StageError(f"{path}: judge trained at {model.config.image_size}px but setting '{setting.name}' has "
                         f"image_size {setting.image_size}; rerun `dd teacher --setting {setting.name}`")
    train_x, train_y = _quantised_digits("train", setting.image_size)
    per_class = min(len(train_y) // setting.num_classes, -(-n_samples // setting.num_classes))
    rank_in_class = torch.arange(len(train_y)) - torch.searchsorted(train_y, train_y)  # train_y is sorted by class
    train_x = train_x[rank_in_class < per_class]
    test_x, test_y = _quantised_digits("test", setting.image_size)
    test_features = judge.features(model, test_x).numpy()
    train_features = judge.features(model, train_x).numpy()
    floor_precision, floor_recall = precision_recall(train_features, test_features)
    return {"judge": model, "test_features": test_features,
            "fid_floor": fid_from_features(train_features, test_features),
            "precision_floor": floor_precision, "recall_floor": floor_recall,
            "class_accuracy_real": (judge.classify(model, test_x) == test_y).float().mean().item(),
            "diversity_real": same_class_diversity(test_x, test_y),
            "judge_description": judge.describe(model)}


def toy_metrics(reference: dict, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Judge metrics of uint8 samples (N, H, W, 3) with their class labels (N,)."""
    from dd import judge

    x = uint8_to_unit(images)
    features = judge.features(reference["judge"], x).numpy()
    precision, recall = precision_recall(features, reference["test_features"])
    return {"fid": fid_from_features(features, reference["test_features"]), "is": None,
            "precision": precision, "recall": recall,
            "class_accuracy": (judge.classify(reference["judge"], x) == labels).float().mean().item(),
            "diversity": same_class_diversity(x, labels),
            **{k: reference[k] for k in ("fid_floor", "precision_floor", "recall_floor", "class_accuracy_real",
                                         "diversity_real")},
            "judge": reference["judge_description"], "feature_network": "toy judge (dd.judge)",
            "fid_reference": "1000 held-out test digits"}


def toy_caption_metrics(params: Params, setting: Setting, images: torch.Tensor, rows: torch.Tensor
                        ) -> tuple[torch.Tensor, dict]:
    """toy-t2i: (each sample's class = its evaluation caption's digit, and the share of samples whose thickness /
    width / slant, measured from the pixels (dd.toy_captions, no network), fall in their caption's bin)."""
    from dd.prompts import read_prompts, text_features_dir
    from dd.toy_captions import AttributeBins
    from dd.toy_teacher import caption_agreement

    prompts = read_prompts(text_features_dir(params, setting), setting)["eval"]
    if "classes" not in prompts:
        raise StageError(f"setting '{setting.name}': its evaluation prompts carry no digit classes (prompts.source "
                         f"toy-digits has them); the toy judge needs them")
    bins = AttributeBins(**{k: tuple(v) for k, v in read_prompts(text_features_dir(params, setting),
                                                                   setting)["attribute_bins"].items()})
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    agreement = caption_agreement(pixels, rows, {"bins": bins, "eval_attributes": {
        k: torch.tensor(v) for k, v in prompts["attributes"].items()}})
    return torch.tensor(prompts["classes"])[rows], agreement


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def metrics_path(params: Params, setting: Setting, method: str) -> Path:
    return params.path.parent / "results" / setting.name / "metrics" / f"{method}.json"


def method_samples(params: Params, setting: Setting, method: str) -> tuple[Path, dict]:
    """(folder, manifest) of a method's finished samples, checked against the setting; one clear error otherwise.
    Read the images with dd.sample_stage.read_samples / iter_sample_shards (both verify every shard's sha256)."""
    from dd.sample_stage import read_manifest, samples_dir

    folder = samples_dir(params, setting, method)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" ({partial} is an unfinished run; rerun it to finish)" if partial.exists() else ""
        raise StageError(f"{folder}: no samples of method '{method}'{hint}; run "
                         f"`dd sample --setting {setting.name} --method {method}` first")
    manifest = read_manifest(folder)
    if manifest.get("setting") != setting.name or manifest.get("method") != method:
        raise StageError(f"{folder}/manifest.json: holds setting {manifest.get('setting')!r} method "
                         f"{manifest.get('method')!r}, expected {setting.name!r} {method!r}; re-run `dd sample`")
    if manifest.get("image_size") != setting.image_size:
        raise StageError(f"{folder}/manifest.json: images are {manifest.get('image_size')}px, setting "
                         f"'{setting.name}' has image_size {setting.image_size}; re-run `dd sample`")
    return folder, manifest


def run_evaluate_stage(params: Params, setting: Setting, method: str, device: str | None = None,
                       latency: bool = True) -> Path:
    """Evaluate one method's samples into results/<S>/metrics/<method>.json (atomic) and MLflow evaluate/<method>.

    latency=False writes latency_s as null (for quick re-evaluation); the stage always measures it."""
    from dd.methods import all_methods
    from dd.tracking import stage_run

    if method not in all_methods(setting):
        raise StageError(f"setting '{setting.name}' has no method '{method}'; its methods: "
                         f"{', '.join(all_methods(setting))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = metrics_path(params, setting, method)
    started = time.perf_counter()
    from dd.sample_stage import iter_sample_shards, read_samples

    folder, manifest = method_samples(params, setting, method)  # a missing input fails before MLflow opens a run
    n_samples = int(manifest["num_samples"])
    clip = reference = None
    if setting.paper_row and setting.text_to_image:  # the reference images, CLIP model and captions: before any work
        reference = fid_reference_folder(params, setting)
        clip = clip_score.prepare(params, setting, manifest)
    with stage_run(params, setting, f"evaluate/{method}", {"evaluate.method": method}) as mlflow:
        print(f"[evaluate] {setting.name}/{method}: {n_samples} samples, {manifest.get('steps')} steps", flush=True)
        if setting.paper_row:
            shards = (images for images, _ in iter_sample_shards(folder))
            values = (text_to_image_metrics(params, setting, shards, n_samples, device, reference=reference)
                      if setting.text_to_image
                      else paper_metrics(params, shards, n_samples, device))
            if setting.text_to_image:  # a second pass over the shards: one shard in memory at a time, as above
                values.update(clip_score.clip_metrics(clip, iter_sample_shards(folder), n_samples, device) if clip
                              else {"clip_score": None, "clip_model": None})
        else:
            images, labels = read_samples(folder)
            agreement = {}
            if setting.text_to_image:  # the labels are caption rows; judge the caption's digit and attributes
                labels, agreement = toy_caption_metrics(params, setting, images, labels)
            values = {**toy_metrics(toy_reference(params, setting, n_samples), images, labels), **agreement}
        eval_seconds = time.perf_counter() - started
        timing = None
        if latency:
            from dd.latency import measure_latency

            timing = measure_latency(params, setting, method, device=device)
        record = {
            "setting": setting.name, "method": method, "n_samples": n_samples,
            "steps": manifest.get("steps"), "source": manifest.get("source"),
            **values,
            "latency_s": timing["latency_s"] if timing else None,
            "latency_min_s": timing["latency_min_s"] if timing else None,
            "latency_batch_size": timing["batch_size"] if timing else None,
            "params": timing["params"] if timing else None,
            "device": timing["device"] if timing else device.type,
            "eval_device": device.type, "eval_seconds": eval_seconds,
            "torch_version": torch.__version__, "num_threads": torch.get_num_threads(),
        }
        write_json(out, record)
        mlflow.log_metrics({k: float(v) for k, v in record.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        mlflow.log_artifact(str(out))
    print(f"[evaluate] {setting.name}/{method}: " + ", ".join(
        f"{k} {record[k]:.4g}" for k in ("fid", "is", "precision", "recall", "clip_score", "class_accuracy",
                                          "caption_agreement", "diversity", "fid_floor", "latency_s")
        if isinstance(record.get(k), float)), flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(params: Params, setting: Setting) -> list[dict]:
    """One dict per method of the setting (table order); 'status' is 'not run' where no metrics file exists."""
    import json

    from dd.methods import all_methods

    rows = []
    for method in all_methods(setting):
        path = metrics_path(params, setting, method)
        if not path.is_file():
            rows.append({"method": method, "status": "not run"})
            continue
        try:
            rows.append({**json.loads(path.read_text()), "method": method, "status": "ok"})
        except json.JSONDecodeError as err:
            raise StageError(f"{path}: not valid JSON ({err}); delete it and re-run `dd evaluate`") from None
    teacher = next((r for r in rows if r["method"] == "teacher" and r["status"] == "ok"), None)
    for row in rows:
        fid, lat = row.get("fid"), row.get("latency_s")
        row["fid_vs_teacher"] = fid / teacher["fid"] if teacher and fid is not None and teacher.get("fid") else None
        row["speedup"] = (teacher["latency_s"] / lat if teacher and lat and teacher.get("latency_s") else None)
    return rows


def summary_table(setting: Setting, rows: list[dict]) -> str:
    """A markdown table of summary_rows (toy: class accuracy and diversity; paper: IS), with the real floor."""
    toy = not setting.paper_row
    clip = setting.paper_row and setting.text_to_image  # Table 3's CLIP score (dd.clip_score)
    head = ["method", "steps", "FID", "FID/teacher", "class acc" if toy else "IS", "precision", "recall"]
    head += ["diversity"] if toy else []
    head += ["CLIP score"] if clip else []
    head += ["params", "latency s/img", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append("| " + " | ".join([r["method"]] + ["not run"] + [""] * (len(head) - 2)) + " |")
            continue
        cells = [r["method"], _fmt(r.get("steps"), "d"), _fmt(r.get("fid"), ".3g"),
                 _fmt(r.get("fid_vs_teacher"), ".2f"),
                 _fmt(r.get("class_accuracy") if toy else r.get("is"), ".3f" if toy else ".1f"),
                 _fmt(r.get("precision"), ".3f"), _fmt(r.get("recall"), ".3f")]
        cells += [_fmt(r.get("diversity"), ".2f")] if toy else []
        cells += [_fmt(r.get("clip_score"), ".2f")] if clip else []
        cells += [_fmt(r.get("params"), ",d"), _fmt(r.get("latency_s"), ".4g"), _fmt(r.get("speedup"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    real = next((r for r in rows if r["status"] == "ok" and r.get("fid_floor") is not None), None)
    if toy and real:
        cells = ["real: train vs test digits", "-", _fmt(real["fid_floor"], ".3g"), "-",
                 _fmt(real.get("class_accuracy_real"), ".3f"), _fmt(real.get("precision_floor"), ".3f"),
                 _fmt(real.get("recall_floor"), ".3f"), _fmt(real.get("diversity_real"), ".2f"), "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_summary(params: Params, setting: Setting) -> str:
    """Print the setting's table of every method and log it (markdown + csv) to MLflow `summary`."""
    import pandas as pd

    from dd.tracking import stage_run

    rows = summary_rows(params, setting)
    table = summary_table(setting, rows)
    title = f"{setting.name}: every method ({'judge' if not setting.paper_row else 'Inception'} features)"
    print(f"{title}\n{table}", flush=True)
    with stage_run(params, setting, "summary") as mlflow:
        mlflow.log_text(f"# {title}\n\n{table}\n", "summary.md")
        mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "summary.csv")
        mlflow.log_metrics({"methods_evaluated": sum(r["status"] == "ok" for r in rows),
                            "methods_total": len(rows)})
    return table
