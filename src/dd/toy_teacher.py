"""Toy teacher stage: train a small tokenizer + AR teacher of the real VAR / LlamaGen architectures on the
MNIST digits of dd.data, on a laptop CPU in a few minutes, and check that they are good enough to distil.

Steps (all inside one MLflow run and one atomic output folder):
  1. digit classifier (dd.data.train_classifier): the judge of every gate below;
  2. tokenizer (LlamaGen VQModel or VAR VQVAE) trained on the train split with its own VQ losses plus a
     pixel reconstruction loss, with dead-code restarts (a random-init codebook otherwise leaves most of
     its codes unused on such a small data set);
  3. tokenize the train split once (optionally with randomly shifted copies: teacher_token_copies) and
     train the AR teacher (LlamaGenGPT / VAR) with class dropout, as needed for CFG;
  4. gates: classifier test accuracy; classifier accuracy on tokenizer reconstructions of the test split;
     the fraction of teacher samples (the setting's teacher_sampling, uniform labels, fixed seed) that the
     classifier assigns to their conditioning class; and two distribution gates on the same samples, so that a
     teacher that buys class accuracy with diversity (high cfg) fails: their same-class pixel diversity
     relative to the test digits', and their Frechet distance to the test digits in the classifier's features
     relative to the train-vs-test floor.

The folder gets tokenizer.safetensors, teacher.safetensors, classifier.safetensors, judge.safetensors (the
evaluate stage's independent toy judge, dd.judge; nothing here or later trains on it), teacher.json (the
exact constructor kwargs to rebuild both models: see `dd.models.build.build_models`), metrics.json,
reconstructions.png and samples.png. With gates.enforce a failed gate raises StageError and no folder
is created.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from dd import data, judge
from dd.atomic import atomic_dir, write_json
from dd.config import Params, Setting
from dd.errors import StageError
from dd.models.build import build_models, teacher_kwargs, tokenizer_kwargs
from dd.models.llamagen import LlamaGenGPT, generate
from dd.models.llamagen_vq import VQModel
from dd.models.var import VAR
from dd.models.var_vqvae import VQVAE
from dd.teacher import Captions
from dd.tracking import stage_run

if TYPE_CHECKING:
    from dd.teacher import Teacher

FILES = {"tokenizer": "tokenizer.safetensors", "teacher": "teacher.safetensors",
         "classifier": "classifier.safetensors", "samples": "samples.png",
         "reconstructions": "reconstructions.png", "metrics": "metrics.json", "judge": judge.FILE}
AUGMENT_SHIFT = 2  # px; tokenizer training, shifted token copies; the classifier uses the same shifts
RESTART_EVERY = 20  # tokenizer steps between dead-code restarts
WARMUP_FRACTION = 0.05  # of the optimiser steps: linear warm-up, then cosine decay to zero
SAMPLE_BATCH = 250  # teacher samples drawn per call when measuring the gate


def _save_module(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


# --------------------------------------------------------------------------------------------------
# Family adapters: the few operations where LlamaGen and VAR differ
# --------------------------------------------------------------------------------------------------
class LlamaGenToy:
    """VQModel (8-dim l2-normalised codes on a raster grid) + LlamaGen GPT."""

    def __init__(self, tokenizer: VQModel, teacher: LlamaGenGPT):
        self.tokenizer, self.teacher = tokenizer, teacher
        self.vocab_size = tokenizer.config.codebook_size

    def tokenizer_step(self, images):
        """(loss, latent vectors (N, C) that were quantised, their code indices (N,))."""
        vq = self.tokenizer
        z = vq.quant_conv(vq.encoder(images))
        quant, indices, codebook_loss, commit_loss = vq.quantize(z)
        reconstruction = vq.decode(quant)
        loss = F.mse_loss(reconstruction, images) + codebook_loss + commit_loss
        return loss, z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).detach(), indices

    def restart_codes(self, dead: torch.Tensor, latents: torch.Tensor, generator) -> None:
        # the codebook is used l2-normalised, so a latent vector's direction is a ready-made code
        pick = torch.randint(0, latents.shape[0], (int(dead.sum()),), generator=generator)
        with torch.no_grad():
            self.tokenizer.quantize.embedding.weight[dead] = F.normalize(latents[pick], dim=-1)

    @torch.no_grad()
    def encode(self, images) -> dict:
        _, indices = self.tokenizer.encode(images)
        return {"tokens": indices.view(images.shape[0], -1)}

    @torch.no_grad()
    def reconstruct(self, images):
        return self.tokenizer.decode(self.tokenizer.encode(images)[0]).clamp(-1, 1)

    def teacher_loss(self, batch: dict, labels):
        """labels: class labels, or (toy-t2i) dd.teacher.Captions (caption dropout inside the model's train mode)."""
        if isinstance(labels, Captions):
            return self.teacher.train_loss(batch["tokens"], labels.features, labels.mask)
        return self.teacher.train_loss(batch["tokens"], labels)

    @torch.no_grad()
    def sample(self, labels, sampling, generator):
        c = self.teacher.config
        captions = isinstance(labels, Captions)
        tokens = generate(self.teacher, labels.features if captions else labels, c.block_size, cfg_scale=sampling.cfg,
                          cfg_interval=sampling.cfg_interval, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, generator=generator,
                          caption_mask=labels.mask if captions else None)
        shape = (len(labels), self.tokenizer.config.codebook_embed_dim, c.grid_size, c.grid_size)
        return self.tokenizer.decode_code(tokens, shape).clamp(-1, 1)


class VarToy:
    """Multi-scale residual VQVAE + VAR (next-scale prediction)."""

    def __init__(self, tokenizer: VQVAE, teacher: VAR):
        self.tokenizer, self.teacher = tokenizer, teacher
        self.vocab_size = tokenizer.V

    def tokenizer_step(self, images):
        vae = self.tokenizer
        f = vae.img_to_f(images)
        f_hat, vq_loss = vae.quantize(f)
        loss = F.mse_loss(vae.decoder(vae.post_quant_conv(f_hat)), images) + vq_loss
        with torch.no_grad():
            indices = torch.cat([idx.flatten() for idx in vae.quantize.f_to_idx_list(f.detach())])
        return loss, f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).detach(), indices

    def restart_codes(self, dead: torch.Tensor, latents: torch.Tensor, generator) -> None:
        # A dead code restarts as a random latent vector scaled to a random live code's norm: coarse
        # scales quantise the whole latent, fine scales small residuals, and live codes span both.
        live = self.tokenizer.quantize.embedding.weight[~dead]
        n = int(dead.sum())
        pick = torch.randint(0, latents.shape[0], (n,), generator=generator)
        norms = live.norm(dim=-1)[torch.randint(0, live.shape[0], (n,), generator=generator)]
        with torch.no_grad():
            self.tokenizer.quantize.embedding.weight[dead] = F.normalize(latents[pick], dim=-1) * norms[:, None]

    @torch.no_grad()
    def encode(self, images) -> dict:
        idx_list = self.tokenizer.img_to_idx_list(images)
        return {"inputs": self.tokenizer.idx_list_to_var_input(idx_list), "targets": torch.cat(idx_list, dim=1)}

    @torch.no_grad()
    def reconstruct(self, images):
        return self.tokenizer.img_to_reconstructed_img(images)

    def teacher_loss(self, batch: dict, labels):
        return self.teacher.train_loss(labels, batch["inputs"], batch["targets"])

    @torch.no_grad()
    def sample(self, labels, sampling, generator):
        images, _ = self.teacher.sample(self.tokenizer, labels, cfg=sampling.cfg, top_k=sampling.top_k,
                                        top_p=sampling.var_top_p(), temperature=sampling.temperature,
                                        generator=generator)
        return images * 2 - 1  # VAR returns [0, 1]


def make_toy(family: str, tokenizer, teacher):
    if family == "var":
        teacher.init_weights()  # the official builder's initialisation (VAR.__init__ leaves it to the caller)
    return (LlamaGenToy if family == "llamagen" else VarToy)(tokenizer, teacher)


# --------------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine decay to zero."""
    warmup = max(1, round(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_tokenizer(toy, images, epochs: int, lr: float, batch_size: int, generator, log, label: str) -> dict:
    """Pixel MSE + VQ losses, Adam, warm-up + cosine; every RESTART_EVERY steps the codes no batch hit
    since the last restart are moved onto random latent vectors of the current batch."""
    model = toy.tokenizer.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(images) // batch_size)
    total = epochs * steps_per_epoch
    hits = torch.zeros(toy.vocab_size, dtype=torch.long)
    restarted, step = 0, 0
    with tqdm(total=total, desc=f"[teacher] {label} tokenizer", unit="step") as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            losses = []
            for batch in order.split(batch_size):
                x = data.random_shift(images[batch], AUGMENT_SHIFT, generator)
                _set_lr(optimizer, lr_at(step, total, lr))
                loss, latents, indices = toy.tokenizer_step(x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                hits += indices.bincount(minlength=toy.vocab_size)
                step += 1
                # no restarts in the last epoch: the codebook must settle before the data is tokenized
                if step % RESTART_EVERY == 0 and epoch < epochs - 1:
                    dead = hits == 0
                    if dead.any():
                        toy.restart_codes(dead, latents, generator)
                        restarted += int(dead.sum())
                    hits.zero_()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            log({"tokenizer.loss": float(np.mean(losses))}, epoch)
    model.eval()
    return {"tokenizer.final_loss": float(np.mean(losses)), "tokenizer.restarted_codes": restarted,
            "tokenizer.steps": total}


@torch.no_grad()
def tokenize(toy, images, copies: int, generator, batch_size: int = 500) -> dict:
    """Token data of `copies` versions of the images (the first unshifted): dict of (copies, N, ...) tensors."""
    versions = []
    for copy in range(copies):
        shifted = images if copy == 0 else data.random_shift(images, AUGMENT_SHIFT, generator)
        chunks = [toy.encode(chunk) for chunk in shifted.split(batch_size)]
        versions.append({key: torch.cat([c[key] for c in chunks]) for key in chunks[0]})
    return {key: torch.stack([v[key] for v in versions]) for key in versions[0]}


def train_teacher(toy, tokens: dict, labels, epochs: int, lr: float, batch_size: int, generator, log,
                  label: str) -> dict:
    """Teacher forcing on the cached tokens (class dropout inside the model's train mode), AdamW with
    warm-up + cosine; each epoch visits every digit once, in a randomly chosen tokenized copy."""
    model = toy.teacher.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    copies, n = next(iter(tokens.values())).shape[:2]
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with tqdm(total=total, desc=f"[teacher] {label} AR teacher", unit="step") as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            losses = []
            for batch in order.split(batch_size):
                copy = torch.randint(0, copies, (len(batch),), generator=generator)
                _set_lr(optimizer, lr_at(step, total, lr))
                loss = toy.teacher_loss({k: v[copy, batch] for k, v in tokens.items()}, labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            log({"teacher.loss": float(np.mean(losses))}, epoch)
    model.eval()
    return {"teacher.final_loss": float(np.mean(losses)), "teacher.steps": total}


@torch.no_grad()
def teacher_test_loss(toy, tokens: dict, labels, batch_size: int = 250) -> float:
    """Mean teacher-forced cross-entropy on the (unshifted) test tokens, eval mode (no class dropout)."""
    toy.teacher.eval()
    total, n = 0.0, len(labels)
    for batch in torch.arange(n).split(batch_size):
        total += toy.teacher_loss({k: v[0, batch] for k, v in tokens.items()}, labels[batch]).item() * len(batch)
    return total / n


# --------------------------------------------------------------------------------------------------
# Gates and pictures
# --------------------------------------------------------------------------------------------------
def same_class_diversity(images, labels) -> float:
    """Mean pairwise L2 distance (one channel, pixels in [-1, 1]) between images of the same class, averaged
    over the classes: a mode-collapsed sampler scores far below the real digits."""
    grey = images[:, 0].flatten(1).double()
    per_class = []
    for c in labels.unique():
        x = grey[labels == c]
        if len(x) > 1:
            per_class.append(torch.cdist(x, x).sum().item() / (len(x) * (len(x) - 1)))
    return float(np.mean(per_class))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    import warnings

    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a collapsed sampler has a singular covariance: that is what it measures
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def distribution_metrics(classifier, samples, labels, train_x, test_x, test_y) -> dict:
    """The teacher's samples against the test digits: same-class diversity ratio, and the Frechet distance in
    the gate classifier's features relative to the real-vs-real floor (as many train digits vs the test ones).
    The classifier only gates here; the evaluation's FID uses an independent judge."""
    def features(x):
        return torch.cat([classifier.features(chunk) for chunk in x.split(500)])

    classifier.eval()
    reference = features(test_x)
    spread = torch.linspace(0, len(train_x) - 1, min(len(samples), len(train_x))).long()  # the split is sorted
    floor = frechet_distance(features(train_x[spread]), reference)  # by class: take every class alike
    fid = frechet_distance(features(samples), reference)
    return {"sample_diversity": same_class_diversity(samples, labels) / same_class_diversity(test_x, test_y),
            "sample_fid": fid, "real_fid": floor, "sample_fid_ratio": fid / max(floor, 1e-12)}


def gate_table(name: str, values: dict, gates) -> tuple[str, list]:
    rows, failed = [], []
    checks = [(key, ">=") for key in ("classifier_accuracy", "reconstruction_accuracy", "sample_accuracy",
                                      "sample_diversity", "caption_agreement")] + [("sample_fid_ratio", "<=")]
    for key, sense in checks:
        threshold = getattr(gates, key)
        if not threshold:
            continue  # 0 = not checked
        value = values[key]
        ok = value >= threshold if sense == ">=" else value <= threshold
        if not ok:
            failed.append(f"{key} {value:.4f} {'<' if sense == '>=' else '>'} {threshold:.4f}")
        rows.append(f"  {key:<25} {value:>7.4f}   {sense} {threshold:.4f}   {'PASS' if ok else 'FAIL'}")
    header = (f"[teacher] {name}: quality gates ({'enforced' if gates.enforce else 'reported only'})\n"
              f"  {'gate':<25} {'value':>7}   threshold   result")
    return "\n".join([header, *rows]), failed


def reconstruction_grid(originals, reconstructions, labels):
    """Two digits per class: a row of originals, the row of their reconstructions below, twice."""
    first = torch.stack([torch.nonzero(labels == c)[:2, 0] for c in range(int(labels.max()) + 1)], dim=1)
    rows = [t[first[i]] for i in range(2) for t in (originals, reconstructions)]
    return data.image_grid(torch.cat(rows), nrow=first.shape[1])


def samples_grid(images, labels, per_class: int = 10):
    """One row per class (0 at the top), up to `per_class` samples each."""
    num_classes = int(labels.max()) + 1
    per_class = min(per_class, min(int((labels == c).sum()) for c in range(num_classes)))
    rows = [images[labels == c][:per_class] for c in range(num_classes)]
    return data.image_grid(torch.cat(rows), nrow=per_class)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def caption_conditions(params: Params, setting: Setting) -> dict | None:
    """toy-t2i: the text-features stage's captions of the train digits (row i = train digit i) and of the test digits,
    as Captions, with the digit classes and attribute bins of the evaluation captions; None for class conditions."""
    if not setting.text_to_image:
        return None
    from dd.conditions import conditions_for
    from dd.prompts import read_prompts, text_features_dir
    from dd.toy_captions import AttributeBins

    prompts = read_prompts(text_features_dir(params, setting), setting)
    if setting.prompts.source != "toy-digits":
        raise StageError(f"settings.{setting.name}: a toy teacher trains on the toy digits' captions; set "
                         f"prompts.source: toy-digits")
    train, evaluation = conditions_for(params, setting, "train"), conditions_for(params, setting, "eval")
    return {"train": train(torch.arange(train.count)), "eval": evaluation,
            "bins": AttributeBins(**{k: tuple(v) for k, v in prompts["attribute_bins"].items()}),
            "eval_attributes": {k: torch.tensor(v) for k, v in prompts["eval"]["attributes"].items()}}


@torch.no_grad()
def caption_agreement(samples, rows, captions: dict) -> dict:
    """Share of samples whose measured attribute bins (dd.toy_captions, no network) equal their caption's, per
    attribute (chance 1/3) and all three at once (chance 1/27)."""
    measured = captions["bins"].bins(samples)
    agree = {name: measured[name] == captions["eval_attributes"][name][rows] for name in measured}
    result = {f"caption_{name}_agreement": value.float().mean().item() for name, value in agree.items()}
    result["caption_agreement"] = float(np.mean(list(result.values())))
    result["caption_all_agreement"] = torch.stack(list(agree.values())).all(0).float().mean().item()
    return result


def train_toy_teacher(params: Params, setting: Setting, final_dir: Path) -> Path:
    """Train classifier, tokenizer and AR teacher of a toy setting into `final_dir`; returns it."""
    teacher = setting.teacher
    if teacher.source != "train" or teacher.train is None or teacher.gates is None:
        raise StageError(f"setting '{setting.name}' does not train its teacher (teacher.source: {teacher.source}); "
                         f"run `dd fetch --setting {setting.name}`")
    train, gates, sampling = teacher.train, teacher.gates, setting.teacher_sampling
    tok_kwargs = tokenizer_kwargs(setting)
    model_kwargs = teacher_kwargs(setting, tok_kwargs)
    final_dir = Path(final_dir)
    threads_before = torch.get_num_threads()
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)
    try:
        with stage_run(params, setting, "teacher", {"teacher.threads": torch.get_num_threads()}) as mlflow:
            with atomic_dir(final_dir) as out:
                _train_into(out, mlflow, setting, tok_kwargs, model_kwargs, caption_conditions(params, setting))
            mlflow.log_artifact(str(final_dir / "teacher.json"))
    finally:
        torch.set_num_threads(threads_before)
    return final_dir


def _train_into(out: Path, mlflow, setting: Setting, tok_kwargs: dict, model_kwargs: dict,
                captions: dict | None = None) -> None:
    """captions (toy-t2i, caption_conditions): the AR teacher learns each train digit from its caption instead of
    its class label; its gate samples are conditioned on the evaluation captions, their digit is the class."""
    train, gates, sampling = setting.teacher.train, setting.teacher.gates, setting.teacher_sampling
    name = setting.name
    timings, metrics = {}, {}
    started = time.perf_counter()

    def log(values: dict, step: int | None = None):
        mlflow.log_metrics(values, step=step)

    def timed(key: str, since: float) -> float:
        timings[key] = time.perf_counter() - since
        return time.perf_counter()

    _seed_everything(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    train_x, train_y = data.load_mnist("train", setting.image_size)
    test_x, test_y = data.load_mnist("test", setting.image_size)

    # 1. the judge
    t = time.perf_counter()
    print(f"[teacher] {name}: digit classifier ({train.classifier_epochs} epochs)", flush=True)
    classifier, clf_metrics = data.train_classifier(seed=train.seed, epochs=train.classifier_epochs,
                                                    config=data.DigitClassifierConfig(image_size=setting.image_size))
    data.save_classifier(classifier, out / FILES["classifier"])
    metrics["classifier_accuracy"] = clf_metrics["test_accuracy"]
    metrics["classifier.train_accuracy"] = clf_metrics["train_accuracy"]
    t = timed("classifier", t)

    # 1b. the toy judge of the evaluate stage (dd.judge): own architecture and seed; no training step reads it
    judge_model, judge_metrics = judge.train_judge(setting.image_size, epochs=train.judge_epochs)
    judge.save_judge(judge_model, out / FILES["judge"], judge_metrics)
    metrics["judge.test_accuracy"] = judge_metrics["test_accuracy"]
    t = timed("judge", t)

    # 2. tokenizer
    tokenizer, ar_model = build_models(setting.family, tok_kwargs, model_kwargs)
    toy = make_toy(setting.family, tokenizer, ar_model)
    metrics.update(train_tokenizer(toy, train_x, train.tokenizer_epochs, train.tokenizer_lr,
                                   train.tokenizer_batch_size, generator, log, name))
    _save_module(tokenizer, out / FILES["tokenizer"])
    t = timed("tokenizer", t)

    # 3. tokens, reconstruction gate, AR teacher
    train_tokens = tokenize(toy, train_x, train.teacher_token_copies, generator)
    test_tokens = tokenize(toy, test_x, 1, generator)
    codes = next(v for k, v in train_tokens.items() if k in ("tokens", "targets"))
    metrics["tokenizer.codebook_usage"] = codes[0].unique().numel() / toy.vocab_size
    with torch.no_grad():
        reconstructions = torch.cat([toy.reconstruct(chunk) for chunk in test_x.split(250)])
    metrics["reconstruction_accuracy"] = (data.classify(classifier, reconstructions) == test_y).float().mean().item()
    metrics["tokenizer.test_mse"] = F.mse_loss(reconstructions, test_x).item()
    reconstruction_grid(test_x, reconstructions, test_y).save(out / FILES["reconstructions"])
    t = timed("tokenize", t)

    condition = train_y if captions is None else captions["train"]
    metrics.update(train_teacher(toy, train_tokens, condition, train.teacher_epochs, train.teacher_lr,
                                 train.teacher_batch_size, generator, log, name))
    # toy-t2i: evaluation prompt i is the caption of test digit i
    metrics["teacher.test_loss"] = teacher_test_loss(
        toy, test_tokens, test_y if captions is None else captions["eval"](torch.arange(len(test_y))))
    _save_module(ar_model, out / FILES["teacher"])
    t = timed("teacher", t)

    # 4. sample gate: balanced labels, fixed seed
    labels = torch.arange(gates.num_samples) % setting.num_classes
    sample_generator = torch.Generator().manual_seed(train.seed)
    if captions is None:
        samples = torch.cat([toy.sample(chunk, sampling, sample_generator) for chunk in labels.split(SAMPLE_BATCH)])
    else:  # evaluation captions spread over the set (it is sorted by digit); the class is each caption's digit
        from dd.conditions import spread

        rows = spread(captions["eval"].count, gates.num_samples)
        labels = captions["eval"].classes(rows)
        samples = torch.cat([toy.sample(captions["eval"](chunk), sampling, sample_generator)
                             for chunk in rows.split(SAMPLE_BATCH)])
        metrics.update(caption_agreement(samples, rows, captions))
    metrics["sample_accuracy"] = (data.classify(classifier, samples) == labels).float().mean().item()
    metrics.update(distribution_metrics(classifier, samples, labels, train_x, test_x, test_y))
    samples_grid(samples, labels).save(out / FILES["samples"])
    t = timed("samples", t)
    timings["total"] = time.perf_counter() - started

    log({**metrics, **{f"seconds.{k}": v for k, v in timings.items()}})
    for key in ("samples", "reconstructions"):
        mlflow.log_artifact(str(out / FILES[key]))
    table, failed = gate_table(name, metrics, gates)
    print(table, flush=True)
    if captions is not None:
        print(f"[teacher] {name}: samples' attributes agree with their captions: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("caption_")) + " (chance 0.333, all 0.037)",
            flush=True)
    print(f"[teacher] {name}: codebook usage {metrics['tokenizer.codebook_usage']:.3f}, "
          f"teacher test loss {metrics['teacher.test_loss']:.3f}, "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    write_json(out / FILES["metrics"], metrics)
    write_json(out / "teacher.json", {
        "setting": name, "family": setting.family, "source": "train", "image_size": setting.image_size,
        "num_classes": setting.num_classes,
        "tokenizer": {"class": type(tokenizer).__name__, "kwargs": tok_kwargs},
        "model": {"class": type(ar_model).__name__, "kwargs": model_kwargs},
        "files": FILES, "metrics": metrics, "timings_s": timings,
        "teacher_sampling": dataclasses.asdict(sampling), "train": dataclasses.asdict(train),
        "gates": {**dataclasses.asdict(gates), "passed": not failed}})
    if gates.enforce and failed:
        raise StageError(f"setting '{name}': teacher quality gates failed: {'; '.join(failed)}. "
                         f"Raise the training budget in params.yaml (teacher.train) or set "
                         f"teacher.gates.enforce: false to keep a weak teacher")


# --------------------------------------------------------------------------------------------------
# The toy gate of the distilled student (the teacher's gates are above, in train_toy_teacher)
# --------------------------------------------------------------------------------------------------
TOY_DD1_GATE = 0.85  # toy result asked of DD 1-step samples (share classified as their class); reported, not enforced


@torch.no_grad()
def toy_gate(ema, teacher: Teacher, setting: Setting, classifier, conditions=None) -> dict:
    """DD 1-step (and 2-step) samples of the toy student, judged by the digit classifier: the share assigned to
    their conditioning class (balanced labels, as many as the teacher's gate drew, the setting's sample seed).
    conditions (toy-t2i): the evaluation captions (dd.conditions), rows spread over the set (sorted by digit); their
    digit is the class.
    Run by the distill stage (and dd.ablation) on the student it trained."""
    from dd import sampling

    ops = sampling.student_ops(ema)
    cfg = setting.distill
    n = setting.teacher.gates.num_samples if setting.teacher.gates else setting.sample.num_samples
    if conditions is None:
        labels = classes = torch.arange(n) % setting.num_classes
    else:
        from dd.conditions import spread

        labels = spread(conditions.count, n)
        classes = conditions.classes(labels)
    result = {}
    for name, method in sampling.methods_for(setting.name, cfg.t_list, cfg.split).items():
        if method.teacher_start is not None:
            continue
        images = torch.cat([x.cpu() for _, x in sampling.sample_batches(ops, method, labels, setting.sample.seed,
                                                                        setting.sample.batch_size, teacher,
                                                                        conditions=conditions)])
        result[f"{name}.class_accuracy"] = sampling.class_accuracy(classifier, images, classes)
    return result
