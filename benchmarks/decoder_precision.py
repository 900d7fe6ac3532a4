"""The VQ decoders in float32 and under `sample.decoder_dtype: bfloat16`: time and how far the images move.

    python benchmarks/decoder_precision.py [--batch 1] [--repeats 3] [--threads 2] [--no-write]

Full-size decoders with random weights (VAR-d16's VQVAE, ch 160; LlamaGen's VQ-16, ch 128; 256x256 images), driven
through the Teacher seam exactly as the sample stage decodes (Teacher.decode_tokens, decoder_dtype set as
build_sampler sets it). Per decoder: seconds per image in float32 and bfloat16 (one warm-up call each, then the
median of --repeats calls, the two precisions alternating), and on the same random tokens the difference of the
uint8 images (the sample stage's to_uint8): mean absolute difference in uint8 levels, the share of pixel values that
change, and the largest change. Random weights make images of no meaning; the FID cost on trained models is measured
on the toy settings (RESULTS.md, after the side-by-side run with --decoder-dtype bfloat16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def teachers():
    """(name, teacher, random tokens maker) of the two full-size decoders; the AR models on the meta device."""
    from dd.config import TeacherSampling
    from dd.models.llamagen import LlamaGenGPT, gpt_config
    from dd.models.llamagen_vq import VQ_CONFIGS, VQModel
    from dd.models.var import VAR, var_config_for_depth
    from dd.models.var_vqvae import VQVAE
    from dd.teacher import LlamaGenTeacher, VarTeacher

    sampling = TeacherSampling(temperature=1.0, cfg_interval=-1, cfg=1.0, top_k=0, top_p=1.0)
    torch.manual_seed(0)
    vae = VQVAE().eval()
    with torch.device("meta"):
        var = VAR(var_config_for_depth(16))
    yield "VAR VQVAE (VAR-d16)", VarTeacher(vae, var, sampling)
    vq = VQModel(VQ_CONFIGS["VQ-16"]).eval()
    with torch.device("meta"):
        gpt = LlamaGenGPT(gpt_config("GPT-B"))
    yield "LlamaGen VQ-16", LlamaGenTeacher(vq, gpt, sampling)


def measure(teacher, batch: int, repeats: int) -> dict:
    from dd.sample_stage import to_uint8

    tokens = torch.randint(0, teacher.vocab_size, (batch, teacher.num_tokens), generator=torch.Generator().manual_seed(1))
    images, seconds = {}, {"float32": [], "bfloat16": []}
    with torch.inference_mode():
        for dtype in seconds:  # warm-up, and the images compared below
            teacher.decoder_dtype = dtype
            images[dtype] = to_uint8(teacher.decode_tokens(tokens))
        for _ in range(repeats):
            for dtype in seconds:
                teacher.decoder_dtype = dtype
                started = time.perf_counter()
                teacher.decode_tokens(tokens)
                seconds[dtype].append((time.perf_counter() - started) / batch)
    teacher.decoder_dtype = "float32"
    diff = (images["bfloat16"].int() - images["float32"].int()).abs().float()
    fp32, bf16 = statistics.median(seconds["float32"]), statistics.median(seconds["bfloat16"])
    return {"fp32": fp32, "bf16": bf16, "ratio": bf16 / fp32, "mean_levels": diff.mean().item(),
            "changed": (diff > 0).float().mean().item(), "max_levels": int(diff.max().item())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("decoder_precision: --batch, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    lines = ["| decoder (256x256, random weights) | B | float32 s/img | bfloat16 s/img | bf16 / fp32 | mean abs diff "
             "(uint8 levels) | pixel values changed | largest change (levels) |", "|---|---|---|---|---|---|---|---|"]
    for name, teacher in teachers():
        r = measure(teacher, args.batch, args.repeats)
        lines.append(f"| {name} | {args.batch} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['ratio']:.2f} | "
                     f"{r['mean_levels']:.2f} | {r['changed']:.1%} | {r['max_levels']} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, write_section
    body = (f"`python benchmarks/decoder_precision.py --batch {args.batch} --repeats {args.repeats} --threads "
            f"{args.threads}` — Teacher.decode_tokens in float32 and with decoder_dtype bfloat16 (bf16 autocast), "
            f"one warm-up call each, median of {args.repeats} alternating calls. Machine: {machine()}.\n\n" + table)
    write_section("Decoder precision: float32 and bfloat16 (sample.decoder_dtype)", body)


if __name__ == "__main__":
    main()
