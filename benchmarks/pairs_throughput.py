"""Pairs/s of the pairs stage's inner step (Teacher.flow_tokens: the teacher run in AR order with the flow
map in place of every draw) and its overhead over plain ancestral sampling of the same teacher, same batch,
same sampling settings: ratio = time(pairs) / time(plain sampling). Target: <= 1.3 at full size.

Teachers with random weights: the toy settings' architectures (params.yaml toy-var / toy-llamagen) and the
full-size VAR-d16 (+ VQVAE) and LlamaGen-B (+ VQ-16), with each setting's teacher_sampling and flow solver.
Random weights give flatter distributions than trained ones (VAR's official init head, and LlamaGen's
zero-init head replaced by N(0, 0.02) as in benchmarks/teacher_sampling.py), so the flow map's work per
token (support size, steps to decide) is on the high side of a trained teacher's.

    python benchmarks/pairs_throughput.py [--devices cpu cuda] [--llamagen-b-tokens 32] [--threads N] [--repeats 3] [--no-write]

On a CPU, LlamaGen-B's 256 sequential steps are slow: `--llamagen-b-tokens N` times the first N tokens
of both runs and extrapolates pairs/s linearly (per-token cost grows slightly with position, so pairs/s
is a slight over-estimate; the ratio is measured on the same prefix). Plain and pairs runs alternate
--repeats times and the fastest of each is reported. The flow-solver share is the time
spent inside dd.flow.tokens_from_noise during the pairs run (the rest is the teacher). VAR's sampler also
decodes the image after the last scale; both runs pay that, and its time is listed separately.
"""
import argparse
import time

import torch

from common import machine, write_section
import dd.teacher as teacher_module
from dd.config import load_params
from dd.teacher import TEACHERS
from dd.models.build import build_models, setting_model_kwargs

SETUPS = [  # (label, setting whose architecture + sampling + flow are used, batch)
    ("toy-var (random weights)", "toy-var", 16),
    ("toy-llamagen (random weights)", "toy-llamagen", 16),
    ("VAR-d16 (random weights)", "var-d16", 4),
    ("LlamaGen-B (random weights)", "llamagen-b", 8),
]


def build_teacher(setting, device):
    torch.manual_seed(0)
    tokenizer, model = build_models(setting.family, *setting_model_kwargs(setting))
    if setting.family == "var":
        model.init_weights()
    else:
        torch.nn.init.normal_(model.output.weight, std=0.02)
    return TEACHERS[setting.family](tokenizer.to(device), model.to(device), setting.teacher_sampling)


class SolverClock:
    """Wraps dd.flow.tokens_from_noise as the teacher module sees it and adds up its wall time."""

    def __init__(self, device):
        self.device, self.seconds, self.inner = device, 0.0, teacher_module.tokens_from_noise

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def bench(label, setting, batch, device, steps_limit, repeats):
    teacher = build_teacher(setting, device)
    solver = dict(setting.flow.solver)
    steps = teacher.num_steps if steps_limit is None else min(steps_limit, teacher.num_steps)
    tokens_timed = teacher.step_starts[steps]
    labels = torch.randint(0, teacher.num_classes, (batch,), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator(device).manual_seed(0)

    def pairs_run():  # what dd.pairs does per batch: CPU noise, the flow-map trajectory
        noise = torch.randn(batch, teacher.num_tokens, teacher.token_dim, generator=torch.Generator().manual_seed(1))
        teacher.flow_tokens(noise, labels, solver, num_steps=steps)

    teacher.flow_tokens(torch.randn(batch, teacher.num_tokens, teacher.token_dim), labels, solver, num_steps=1)  # warm-up
    # Interleaved repeats, best of each: on a shared machine a slow spell during one run would otherwise
    # move the ratio by tens of percent.
    plain, pairs, solver_seconds = float("inf"), float("inf"), 0.0
    for _ in range(repeats):
        plain = min(plain, timed(lambda: teacher.sample_tokens(labels, generator=generator, num_steps=steps), device))
        clock = SolverClock(device)
        teacher_module.tokens_from_noise = clock
        try:
            seconds = timed(pairs_run, device)
        finally:
            teacher_module.tokens_from_noise = clock.inner
        if seconds < pairs:
            pairs, solver_seconds = seconds, clock.seconds
    decode = 0.0
    if setting.family == "var" and steps == teacher.num_steps:
        pn = teacher.model.patch_nums[-1]
        f_hat = torch.zeros(batch, teacher.token_dim, pn, pn, device=device)
        decode = timed(lambda: teacher.tokenizer.fhat_to_img(f_hat), device)
    scale = teacher.num_tokens / tokens_timed
    row = {"model": label, "device": device.type, "batch": batch, "pairs_per_s": batch / (pairs * scale),
           "plain_s": plain * scale, "pairs_s": pairs * scale, "ratio": pairs / plain,
           "solver_share": solver_seconds / pairs, "decode_s": decode,
           "note": "" if tokens_timed == teacher.num_tokens else
           f"first {tokens_timed} of {teacher.num_tokens} tokens timed, times extrapolated"}
    print(f"{label:<32} {device.type:<4} batch {batch:>3}: {row['pairs_per_s']:9.3f} pairs/s, plain "
          f"{row['plain_s']:8.2f}s, pairs {row['pairs_s']:8.2f}s, ratio {row['ratio']:.3f}, flow solver "
          f"{100 * row['solver_share']:.0f}% of pairs time, decode {decode:.2f}s {row['note']}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--llamagen-b-tokens", type=int, default=32, help="CPU only; CUDA times all 256")
    parser.add_argument("--only", nargs="+", help="setting names to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a "
                        "shared, loaded machine 1 avoids thread-pool stalls that swamp small kernels")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain/pairs runs; the best of each counts")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params("params.yaml")
    rows = []
    for device in map(torch.device, args.devices):
        for label, name, batch in SETUPS:
            if args.only and name not in args.only:
                continue
            limit = args.llamagen_b_tokens if name == "llamagen-b" and device.type == "cpu" else None
            rows.append(bench(label, params.setting(name), batch, device, limit, args.repeats))
    if args.no_write:
        return
    lines = [
        "`python benchmarks/pairs_throughput.py` — Teacher.flow_tokens (the pairs stage's inner step) against plain "
        "ancestral sampling of the same teacher, same batch, same teacher_sampling; random weights; fp32; default "
        f"flow solver (params.yaml `flow.solver: {{}}`); best of {args.repeats} interleaved runs of each.",
        f"Machine: {machine()}",
        "",
        "| model | device | batch | pairs/s | plain sampling (s) | pairs (s) | ratio pairs/plain | flow solver share | VAR image decode in both (s) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['device']} | {r['batch']} | {r['pairs_per_s']:.3f} | {r['plain_s']:.2f} | "
                     f"{r['pairs_s']:.2f} | {r['ratio']:.3f} | {100 * r['solver_share']:.0f}% | "
                     f"{r['decode_s']:.2f} | {r['note']} |")
    write_section("Pairs throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
