"""Toy fidelity: FID, same-class diversity and class accuracy of a toy setting's samples, judged by an
independent network (issue 12).

The judge is a small CNN of another architecture than the pipeline's digit classifier (strided 5x5 convs,
GroupNorm, GELU, global average pooling; the classifier uses 3x3 convs, BatchNorm, max-pooling and a linear
embedding), trained here on the 4000 train digits with its own seed and shifted copies. No training step of
the pipeline sees it (the perceptual term of the toy uses its own network): it only measures.

Per method, n samples (balanced labels unless they come from the pairs):
  real      : n train digits vs the 1000 test digits (the real-vs-real floor)
  recon     : the tokenizer's reconstructions of those n train digits (what the teacher can reach)
  teacher   : the teacher's samples = the first n pairs' tokens (the flow map draws from the teacher's p)
  dd-1step / dd-2step : the student of results/<S>/student (the distill t_list and split)
  onestep*  : every token drawn independently from its per-class, per-position frequency in the pairs
FID   : Frechet distance of the judge's features to those of the 1000 test digits.
div   : mean pairwise L2 distance (pixels in [-1, 1], one channel) between samples of the same class,
        averaged over classes.
acc   : share of samples the judge assigns to their conditioning class.

Usage: .venv/bin/python benchmarks/toy_fidelity.py --setting toy-llamagen [--params params.yaml]
       [--n 2000] [--student results/toy-llamagen/student] [--json out.json]
Once dd.judge / dd.evaluate exist (the evaluate stage), prefer them; this tool stays the measurement used
while the toy recipe was tuned (params.yaml comments quote its numbers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from dd import data

JUDGE_SEED = 1234  # the classifier of the teacher stage uses the setting's train seed (0)
JUDGE_EPOCHS = 12


class JudgeNet(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> features (B, 96) -> logits (B, 10). Grey input: channel 0 only."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 5, padding=2), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 5, stride=2, padding=2), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.GELU())
        self.head = nn.Linear(2 * width, 10)

    def features(self, x):
        return self.trunk(x[:, :1]).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def judge_path(image_size: int) -> Path:
    return Path(__file__).resolve().parent.parent / "results" / "toy_judge" / f"judge-{image_size}-{JUDGE_SEED}.pt"


def train_judge(image_size: int) -> JudgeNet:
    """Train (or load the cached) judge on the train digits; prints its test accuracy."""
    path = judge_path(image_size)
    net = JudgeNet()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    torch.manual_seed(JUDGE_SEED)
    net = JudgeNet()
    generator = torch.Generator().manual_seed(JUDGE_SEED)
    x, y = data.load_mnist("train", image_size)
    tx, ty = data.load_mnist("test", image_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = JUDGE_EPOCHS * (len(x) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    net.train()
    for _ in range(JUDGE_EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(64)[: len(x) // 64]:
            loss = F.cross_entropy(net(data.random_shift(x[batch], 1, generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    with torch.no_grad():
        acc = (net(tx).argmax(1) == ty).float().mean().item()
    print(f"[judge] trained: test accuracy {acc:.4f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


@torch.no_grad()
def judge_features(net, images):
    feats, logits = [], []
    for chunk in images.split(500):
        f = net.features(chunk)
        feats.append(f)
        logits.append(net.head(f))
    return torch.cat(feats).double().numpy(), torch.cat(logits).argmax(1)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def diversity(images, labels) -> float:
    grey = images[:, 0].flatten(1).double()
    per_class = []
    for c in labels.unique():
        x = grey[labels == c]
        if len(x) < 2:
            continue
        d = torch.cdist(x, x)
        per_class.append((d.sum() / (len(x) * (len(x) - 1))).item())
    return float(np.mean(per_class))


def measure(net, reference_feats, images, labels) -> dict:
    feats, predicted = judge_features(net, images.float().clamp(-1, 1))
    return {"fid": frechet(feats, reference_feats), "diversity": diversity(images, labels),
            "class_acc": (predicted == labels).float().mean().item(), "n": len(labels)}


def load_pairs(folder: Path, n: int):
    from safetensors.torch import load_file
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    cat = {k: torch.cat([s[k] for s in shards]) for k in ("labels", "tokens", "noise")}
    return cat


def onestep_star_tokens(tokens, labels, n_classes: int, vocab: int, out_labels, generator):
    """Each position drawn independently from its per-class, per-position frequency."""
    out = torch.empty(len(out_labels), tokens.shape[1], dtype=torch.long)
    for c in range(n_classes):
        counts = F.one_hot(tokens[labels == c], vocab).sum(0).double()  # (L, V)
        rows = out_labels == c
        draws = torch.multinomial(counts, int(rows.sum()), replacement=True, generator=generator)  # (L, m)
        out[rows] = draws.T
    return out


def decode_batches(teacher, tokens):
    return torch.cat([teacher.decode_tokens(chunk) for chunk in tokens.split(250)])


def run(params_path: str, setting_name: str, n: int, student: str | None, methods: list[str]) -> dict:
    from dd import sampling
    from dd.config import load_params
    from dd.models.students import load_student
    from dd.pairs import pairs_dir
    from dd.teacher import load_teacher
    from dd.teacher_stage import teacher_dir

    params = load_params(params_path)
    setting = params.settings[setting_name]
    size = setting.image_size
    net = train_judge(size)
    test_x, test_y = data.load_mnist("test", size)
    ref, _ = judge_features(net, test_x)
    results = {}
    if "real" in methods:
        train_x, train_y = data.load_mnist("train", size)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:n]
        results["real"] = measure(net, ref, train_x[pick], train_y[pick])
        results["real"]["diversity_test"] = diversity(test_x, test_y)
    if set(methods) <= {"real"}:
        return results
    if "recon" in methods:  # the tokenizer's reconstructions of train digits: the teachers' floor
        from dd.toy_teacher import LlamaGenToy, VarToy, load_toy_teacher
        tokenizer, model, _, info = load_toy_teacher(teacher_dir(params, setting))
        toy = (LlamaGenToy if info["family"] == "llamagen" else VarToy)(tokenizer, model)
        train_x, train_y = data.load_mnist("train", size)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:n]
        with torch.no_grad():
            recon = torch.cat([toy.reconstruct(chunk) for chunk in train_x[pick].split(250)])
        results["recon"] = measure(net, ref, recon, train_y[pick])
    teacher = load_teacher(setting, teacher_dir(params, setting))
    pairs = load_pairs(pairs_dir(params, setting), n)
    if "teacher" in methods:
        results["teacher"] = measure(net, ref, decode_batches(teacher, pairs["tokens"][:n]), pairs["labels"][:n])
    labels = torch.arange(n) % setting.num_classes
    if "onestep*" in methods:
        vocab = teacher.codebook.shape[0]
        toks = onestep_star_tokens(pairs["tokens"], pairs["labels"], setting.num_classes, vocab, labels,
                                   torch.Generator().manual_seed(1))
        results["onestep*"] = measure(net, ref, decode_batches(teacher, toks), labels)
    student_dir = Path(student) if student else params.stage_dir(setting, "student")
    if (student_dir / "student.json").is_file():
        model = load_student(student_dir, teacher)
        ops = sampling.student_ops(model)
        cfg = setting.distill
        for name, method in sampling.methods_for(setting.name, cfg.t_list, cfg.split).items():
            if method.teacher_start is not None or name not in methods:
                continue
            images = torch.cat([x.cpu() for _, x in sampling.sample_batches(ops, method, labels, setting.sample.seed,
                                                                            250, teacher)])
            results[name] = measure(net, ref, images, labels)
    return results


def table(setting: str, results: dict) -> str:
    teacher_fid = results.get("teacher", {}).get("fid")
    lines = [f"| setting | method | FID | vs teacher | class acc | diversity |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['fid'] / teacher_fid:.2f}" if teacher_fid else "-"
        lines.append(f"| {setting} | {name} | {r['fid']:.2f} | {ratio} | {r['class_acc']:.3f} | {r['diversity']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--setting", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--student", default=None)
    parser.add_argument("--methods", default="real,recon,teacher,onestep*,dd-1step,dd-2step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    results = run(args.params, args.setting, args.n, args.student, args.methods.split(","))
    print(table(args.setting, results))
    print(f"[toy_fidelity] {time.perf_counter() - started:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
