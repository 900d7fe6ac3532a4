"""The `dd` command: one subcommand per pipeline stage, plus `settings`.

Thin by design: parse, load params.yaml (typed, validated), call the stage, map errors to exit codes.
Exit codes: 0 success; 1 a stage failed (the message says why); 2 bad input (params file, setting
name, arguments). Snakemake and dvc.yaml call nothing but these subcommands.
"""
from __future__ import annotations

import argparse
import sys

from dd.config import ConfigError, load_params
from dd.errors import StageError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _common(parser: argparse.ArgumentParser, setting: bool = True) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    if setting:
        parser.add_argument("--setting", required=True, help="setting name (see `dd settings`)")


def cmd_settings(args) -> int:
    params = load_params(args.params)
    width = max(len(n) for n in params.settings)
    for name, s in params.settings.items():
        kind = "paper" if s.paper_row else "toy"
        print(f"{name:<{width}}  {s.family:<8}  {kind:<5}  teacher:{s.teacher.source:<5}  {s.description}")
    return 0


def cmd_fetch(args) -> int:
    from dd.teacher_stage import fetch_teacher

    params = load_params(args.params)
    fetch_teacher(params, params.setting(args.setting), include_dd=not args.no_dd)
    return 0


def cmd_teacher(args) -> int:
    from dd.teacher_stage import run_teacher_stage

    params = load_params(args.params)
    run_teacher_stage(params, params.setting(args.setting))
    return 0


def cmd_text_features(args) -> int:
    from dd.prompts import run_text_features_stage

    params = load_params(args.params)
    run_text_features_stage(params, params.setting(args.setting), device=args.device)
    return 0


def cmd_pairs(args) -> int:
    from dd.pairs import merge_pairs, parse_shards, run_pairs_stage

    params = load_params(args.params)
    setting = params.setting(args.setting)
    if args.merge and args.shards:
        raise ConfigError("dd pairs: give --shards (make one range) or --merge (join the ranges), not both")
    if args.merge:
        merge_pairs(params, setting)
    else:
        run_pairs_stage(params, setting, device=args.device,
                        shards=None if args.shards is None else parse_shards(args.shards))
    return 0


def cmd_distill(args) -> int:
    from dd.distill import run_distill_stage

    params = load_params(args.params)
    run_distill_stage(params, params.setting(args.setting), device=args.device, micro_batch=args.micro_batch)
    return 0


def cmd_report_setting(args) -> int:
    from dd.report import run_setting_report

    params = load_params(args.params)
    run_setting_report(params, params.setting(args.setting), track=not args.no_track)
    return 0


def cmd_report(args) -> int:
    from dd.report import run_report

    params = load_params(args.params)
    if args.only == "table3":  # the text-to-image settings (pipeline.text_to_image): their own target and job
        run_report(params, args.setting or list(params.pipeline.text_to_image), tables=(3,), figures=False)
        return 0
    tables = {"figures": (), "tables": (1, 2)}.get(args.only, (1, 2, 3))
    run_report(params, args.setting or None, tables=tables, figures=args.only not in ("tables",))
    return 0


def cmd_plan(args) -> int:
    from dd.plan import print_plan

    params = load_params(args.params)
    print_plan(params, params.setting(args.setting), gpu=args.gpu)
    return 0


# the commands that compute: their torch thread count comes from apply_threads, the same under Snakemake and DVC
THREADED_COMMANDS = ("teacher", "text-features", "pairs", "distill", "sample", "bench", "evaluate",
                     "ablation")


def apply_threads(params) -> int:
    """torch CPU threads of a stage, the same under Snakemake and DVC: DD_NUM_THREADS, else pipeline.num_threads,
    else OMP_NUM_THREADS, else every core this process may use. Returns the count set."""
    import os

    import torch

    wanted = os.environ.get("DD_NUM_THREADS") or params.pipeline.num_threads or os.environ.get("OMP_NUM_THREADS")
    try:
        threads = int(wanted) if wanted else len(os.sched_getaffinity(0))
    except ValueError:
        raise ConfigError(f"DD_NUM_THREADS / OMP_NUM_THREADS must be a whole number, got {wanted!r}") from None
    if threads < 1:
        raise ConfigError(f"the thread count must be >= 1, got {threads} (DD_NUM_THREADS, pipeline.num_threads or "
                          f"OMP_NUM_THREADS)")
    torch.set_num_threads(threads)
    return threads


def cmd_sample(args) -> int:
    from dd.sample_stage import run_sample_stage

    params = load_params(args.params)
    setting = params.setting(args.setting)
    run_sample_stage(params, setting, args.method, device=args.device)
    return 0


def cmd_bench(args) -> int:
    from dd.latency import run_bench

    params = load_params(args.params)
    setting = params.setting(args.setting)
    rows = run_bench(params, setting, methods=args.method or None, device=args.device, repeats=args.repeats,
                     warmup=args.warmup, batch_size=args.batch_size, random_weights=args.random_weights)
    if args.json:
        from dd.atomic import write_json

        write_json(args.json, rows)
        print(f"[bench] -> {args.json}")
    return 0


def cmd_methods(args) -> int:
    from dd.methods import all_methods, sample_jobs, setting_jobs

    params = load_params(args.params, check_methods=False)
    if args.yaml:
        print("  methods:")
        for key, job in sample_jobs(params).items():
            print(f"    {key}: {{setting: {job['setting']}, method: {job['method']}, upstream: {job['upstream']}, "
                  f"conditions: {job['conditions']}}}")
        print("  stages:")
        for key, job in setting_jobs(params).items():
            print(f"    {key}: {{setting: {job['setting']}, conditions: {job['conditions']}}}")
        return 0
    names = [args.setting] if args.setting else list(params.settings)
    for name in names:
        print(f"{name}: {' '.join(all_methods(params.setting(name)))}")
    return 0


def cmd_evaluate(args) -> int:
    from dd.evaluate import run_evaluate_stage

    params = load_params(args.params)
    run_evaluate_stage(params, params.setting(args.setting), args.method, device=args.device,
                       latency=not args.no_latency)
    return 0


def cmd_summary(args) -> int:
    from dd.evaluate import run_summary

    params = load_params(args.params)
    run_summary(params, params.setting(args.setting))
    return 0


def cmd_ablation(args) -> int:
    from dd.ablation import run_ablation_stage

    params = load_params(args.params)
    run_ablation_stage(params, params.setting(args.setting))
    return 0


def cmd_ablation_report(args) -> int:
    from dd.ablation import REPORT, write_report

    params = load_params(args.params)
    write_report(params, args.setting or params.pipeline.ablation, params.path.parent / REPORT)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("settings", help="list the settings of the params file")
    _common(p, setting=False)
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("fetch", help="download a paper setting's official checkpoints into results/<setting>/teacher")
    _common(p)
    p.add_argument("--no-dd", action="store_true", help="skip the released DD student checkpoint")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("teacher", help="teacher stage: fetch (paper rows) or train (toy settings)")
    _common(p)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("text-features", help="text-to-image settings: the prompts (training / evaluation) and their "
                                             "caption features, encoded once (resumable)")
    _common(p)
    p.add_argument("--device", default=None, help="torch device of the text encoder (default: cuda if available)")
    p.set_defaults(func=cmd_text_features)

    p = sub.add_parser("pairs", help="pairs stage: noise -> token trajectories of the teacher (resumable)")
    _common(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--shards", default=None, metavar="START:STOP",
                   help="make only shards START..STOP-1 into results/<setting>/pairs.parts/ (one of N independent jobs)")
    p.add_argument("--merge", action="store_true", help="join the finished shard ranges into results/<setting>/pairs")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("distill", help="distill stage: train the DD student on the pairs (resumable; multi-GPU: "
                                       "accelerate launch --multi_gpu --num_processes N -m dd distill ...)")
    _common(p)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="accumulate gradients over micro-batches of this size per process (memory only)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="sample stage: N images of one method as uint8 shards + manifest (resumable)")
    _common(p)
    p.add_argument("--method", required=True, help="teacher, skip-<n>, onestep, dd-1step, dd-2step, pre-trained-n-m "
                                                   "(`dd methods` lists a setting's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="latency (s/image, steady state) of the teacher and the DD rows, with speed-ups")
    _common(p)
    p.add_argument("--method", action="append", help="time this method (repeatable; default: teacher + DD rows)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches (median reported; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the setting's sample.batch_size")
    p.add_argument("--random-weights", action="store_true",
                   help="time the architectures with random weights (automatic when nothing is trained)")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("methods", help="list every sampling method of each setting, in table order")
    _common(p, setting=False)
    p.add_argument("--setting", default=None, help="one setting (default: all)")
    p.add_argument("--yaml", action="store_true", help="print the pipeline.methods block params.yaml needs for DVC")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("evaluate", help="evaluate stage: FID / IS or class accuracy / precision / recall / latency of "
                                        "one method's samples -> results/<setting>/metrics/<method>.json")
    _common(p)
    p.add_argument("--method", required=True, help="a method of the setting (`dd methods`)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement (latency_s: null)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="print (and log to MLflow) the table of every method of a setting from its "
                                       "metrics files ('not run' where missing)")
    _common(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("report-setting", help="report stage, per setting: collect its metrics, draw its sample grid "
                                              "and training curves -> reports/settings/<setting>/")
    _common(p)
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_report_setting)

    p = sub.add_parser("report", help="report stage: reports/table1-3.md/.csv and reports/figures/fid_vs_latency.png "
                                      "from the per-setting reports (missing inputs read 'not run')")
    _common(p, setting=False)
    p.add_argument("--setting", action="append", help="a setting to report (repeatable; default: pipeline.settings)")
    p.add_argument("--only", choices=["tables", "table3", "figures"],
                   help="write only tables 1-2 (of pipeline.settings), only table 3 (of pipeline.text_to_image) or "
                        "only the figure")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ablation", help="toy ablation of the distill recipe (loss terms, t2, pair count, training "
                                        "length), judged by dd.judge -> results/ablation/<setting>/")
    _common(p)
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("ablation-report", help="reports/toy_ablation.md/.csv from every toy setting's ablation")
    _common(p, setting=False)
    p.add_argument("--setting", action="append", help="a toy setting (repeatable; default: pipeline.ablation)")
    p.set_defaults(func=cmd_ablation_report)

    p = sub.add_parser("plan", help="estimated cost of each stage of a setting (GPU-hours; sources named)")
    _common(p)
    p.add_argument("--gpu", default="A800", help="GPU the estimate is for (the paper's costs are 8xA800)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in THREADED_COMMANDS:
            apply_threads(load_params(args.params))
        return args.func(args)
    except ConfigError as err:
        print(f"dd: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageError as err:  # includes dd.hub.HubError
        print(f"dd {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
