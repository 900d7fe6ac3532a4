"""Run dd.distill.train_student on a tiny teacher and saved pairs, as a separate process (plain python, or under
`accelerate launch` for DDP). Used by tests/test_distill.py; the main process writes the loss log and the final
weights to --out (.json and .safetensors).

    python tests/distill_worker.py --family var --pairs P.safetensors --work DIR --out OUT [--kill-at STEP]
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dd_tiny import tiny_distill, tiny_teacher  # noqa: E402

from dd.distill import train_student  # noqa: E402
from dd.pairs import TensorPairs  # noqa: E402


def run(family: str, pairs_file: Path, work: Path, out: Path, drop_path: float, overrides: dict,
        kill_at: int | None = None):
    # one thread, in the test process and in these workers alike: tiny models run faster so on a shared
    # machine, and the same thread count keeps the float results comparable
    torch.set_num_threads(1)
    teacher = tiny_teacher(family, drop_path_rate=drop_path)
    pairs = TensorPairs(**load_file(pairs_file))
    cfg = tiny_distill(**overrides)

    def crash(step, record):
        if step == kill_at:  # SIGKILL: no cleanup, no finally blocks, like a killed job
            os.kill(os.getpid(), signal.SIGKILL)

    result = train_student(teacher, pairs, cfg, work, cpu=True, progress=False,
                           callback=crash if kill_at is not None else None)
    from accelerate import PartialState

    if PartialState().is_main_process:
        save_file({k: v.contiguous() for k, v in result.ema.state_dict().items()}, str(out.with_suffix(".safetensors")))
        out.with_suffix(".json").write_text(json.dumps({"history": result.history, "resumed_from": result.resumed_from,
                                                         "num_processes": result.num_processes}))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--overrides", default="{}", help="tiny_distill overrides as JSON")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    run(args.family, args.pairs, args.work, args.out, args.drop_path, json.loads(args.overrides), args.kill_at)
