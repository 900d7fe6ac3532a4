"""Images/s of the full-size teacher architectures with random weights: VAR-d16 (+ its VQVAE) and
LlamaGen-B (+ VQ-16), at batch 1 and 16, with the paper's sampling settings (cfg 2.0; VAR top-k 900
top-p 0.95; LlamaGen top-k 8000). CPU always, CUDA where present. Results go to RESULTS.md.

    python benchmarks/teacher_sampling.py [--batches 1 16] [--devices cpu cuda] [--llamagen-tokens 256]

On a CPU, LlamaGen-B's 256 sequential steps at batch 16 take minutes: `--llamagen-tokens N` times
only the first N tokens and extrapolates linearly (cached attention makes the per-token cost grow
slightly with position, so the extrapolation is a slight under-estimate; the table says so).
"""
import argparse
import time

import torch

from common import machine, write_section
from dd.models.llamagen import LlamaGenGPT, generate, gpt_config
from dd.models.llamagen_vq import VQ_CONFIGS, VQModel
from dd.models.var import VAR, var_config_for_depth
from dd.models.var_vqvae import VQVAE


def build(device):
    torch.manual_seed(0)
    vae = VQVAE().to(device).eval()
    var = VAR(var_config_for_depth(16)).to(device).eval()
    var.init_weights()
    vq = VQModel(VQ_CONFIGS["VQ-16"]).to(device).eval()
    gpt = LlamaGenGPT(gpt_config("GPT-B", block_size=256, num_classes=1000)).to(device).eval()
    gpt.init_weights()
    # Official init zeroes the output layer (uniform logits); a small random head makes top-k meaningful.
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    return vae, var, vq, gpt


def timed(fn, device, repeats=1):
    fn()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def bench(device, batches, llamagen_tokens):
    vae, var, vq, gpt = build(device)
    rows = []
    for batch in batches:
        labels = torch.randint(0, 1000, (batch,), device=device)
        gen = torch.Generator(device).manual_seed(0)
        repeats = 3 if device.type == "cuda" else 1
        t = timed(lambda: var.sample(vae, labels, cfg=2.0, top_k=900, top_p=0.95, generator=gen), device, repeats)
        rows.append(("VAR-d16 (10 scales, with decode)", device.type, batch, batch / t, ""))

        n = 256 if device.type == "cuda" else llamagen_tokens
        t_tok = timed(lambda: generate(gpt, labels, n, cfg_scale=2.0, top_k=8000, generator=gen), device, repeats)
        t_tok *= 256 / n
        tokens = torch.randint(0, 16384, (batch, 256), device=device)
        t_dec = timed(lambda: vq.decode_code(tokens, (batch, 8, 16, 16)), device, repeats)
        note = "" if n == 256 else f"first {n} of 256 tokens timed, extrapolated"
        rows.append(("LlamaGen-B (256 tokens, with decode)", device.type, batch, batch / (t_tok + t_dec), note))
        for row in rows[-2:]:
            print(f"{row[0]:<40} {row[1]:<5} batch {row[2]:>3}: {row[3]:8.3f} images/s {row[4]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--llamagen-tokens", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    rows = []
    for device in args.devices:
        rows += bench(torch.device(device), args.batches, args.llamagen_tokens)
    table = ["| model | device | batch | images/s | note |", "|---|---|---|---|---|"]
    table += [f"| {m} | {d} | {b} | {ips:.3f} | {note} |" for m, d, b, ips, note in rows]
    body = (f"`python benchmarks/teacher_sampling.py` — random weights, cfg 2.0, paper top-k/top-p, fp32.\n"
            f"Machine: {machine()}\n\n" + "\n".join(table))
    print(body)
    if not args.no_write:
        write_section(f"Teacher sampling ({', '.join(args.devices)})", body)


if __name__ == "__main__":
    main()
