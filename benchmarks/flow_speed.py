"""Cost per token of dd.flow.tokens_from_noise (default solver) on the flow-solver cases, at the two batch sizes
the pairs stage uses it with: a LlamaGen-size AR step on a CPU (8 rows) and a large batch (256 rows). With
--compare-with SRC (the src/ folder of another checkout, e.g. a git worktree of an older commit) it times both
implementations interleaved on the same noise and reports whether they return the same tokens.

    git worktree add /tmp/before <commit> && python benchmarks/flow_speed.py --compare-with /tmp/before/src

Times are the best of --repeats passes (a shared machine adds noise, rarely removes it).
"""
import argparse
import importlib.util
import time
from pathlib import Path

import torch

from common import machine, write_section
from dd.flow import tokens_from_noise
from flow_solver import CASES, make_case

BATCHES = {8: 20, 256: 1}  # rows per call: calls per pass


def load_other(src: Path):
    spec = importlib.util.spec_from_file_location("flow_other", src / "dd" / "flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokens_from_noise


def best_time(fn, calls, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = torch.cat([fn(z, p, cb)[0] for z, p, cb in calls])
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, help="src/ folder of another checkout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="record the table in RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    other = load_other(args.compare_with) if args.compare_with else None
    rows = []
    for case in CASES:
        codebook, p = make_case(case)
        for batch, count in BATCHES.items():
            gen = torch.Generator().manual_seed(3)
            calls = [(torch.randn(batch, codebook.shape[1], generator=gen), p.expand(batch, -1), codebook)
                     for _ in range(count)]
            tokens = batch * count
            now, out = best_time(tokens_from_noise, calls, args.repeats)
            row = {"case": case, "batch": batch, "now": 1e3 * now / tokens}
            if other is not None:
                before, out_before = best_time(other, calls, args.repeats)
                row.update(before=1e3 * before / tokens, same=int((out == out_before).sum()), tokens=tokens)
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if not args.write:
        return
    head = "| case | rows per call | ms/token |" + (" ms/token before | speed-up | same tokens |" if other else "")
    lines = [f"`python benchmarks/flow_speed.py{' --compare-with ' + str(args.compare_with) if other else ''}` "
             f"(default solver, best of {args.repeats}). Machine: {machine()}", "", head,
             "|---|---|---|" + ("---|---|---|" if other else "")]
    for r in rows:
        line = f"| {r['case']} | {r['batch']} | {r['now']:.2f} |"
        if other:
            line += f" {r['before']:.2f} | {r['before'] / r['now']:.2f}x | {r['same']}/{r['tokens']} |"
        lines.append(line)
    write_section("Flow-map cost per token", "\n".join(lines))


if __name__ == "__main__":
    main()
