# Pairs stage: noise -> token trajectories of the teacher with the flow map (src/dd/pairs.py). Resumable:
# a killed job leaves results/{setting}/pairs.partial/ (not declared, so Snakemake keeps it) and the rerun
# keeps its verified shards; pairs/ appears only when every shard is done.
#
# On a cluster the pair set can be made by N independent jobs over shard ranges (`--config pairs_jobs=N`):
# pairs_part makes results/{setting}/pairs.parts/shards-{start}-{stop}/ (`dd pairs --shards start:stop`, one GPU
# each, resumable the same way) and pairs_merge joins them into results/{setting}/pairs (`dd pairs --merge`,
# byte-identical to one job on the same device). DVC and the default (pairs_jobs=1) run the single `pairs` job.
import math

PAIRS_JOBS = int(config.get("pairs_jobs", 1))


def pairs_gpus(wildcards):
    return 1 if config["settings"][wildcards.setting]["paper_row"] else 0


def pairs_parts(wildcards):
    """The part folders of a setting: its shards split into at most PAIRS_JOBS contiguous ranges."""
    from dd.pairs import part_name

    p = PARAMS.setting(wildcards.setting).pairs
    shards = math.ceil(p.num_pairs / p.shard_size)
    jobs = min(PAIRS_JOBS, shards)
    bounds = [round(i * shards / jobs) for i in range(jobs + 1)]
    return [f"results/{wildcards.setting}/pairs.parts/{part_name(a, b)}" for a, b in zip(bounds, bounds[1:])]


if PAIRS_JOBS > 1:

    rule pairs_part:
        input:
            "results/{setting}/teacher",
            conditions=conditions,
            code=CODE["pairs"],
        output:
            temp(directory("results/{setting}/pairs.parts/shards-{start}-{stop}")),
        wildcard_constraints:
            start="[0-9]+",
            stop="[0-9]+",
        params:
            block=setting_block("teacher_sampling", "flow", "pairs"),
        log:
            "results/logs/{setting}/pairs-{start}-{stop}.log",
        threads: cpu_threads
        resources:
            gpu=pairs_gpus,
        shell:
            "{DD} pairs --setting {wildcards.setting} --shards {wildcards.start}:{wildcards.stop} 2>&1 | tee {log}"

    rule pairs_merge:
        input:
            pairs_parts,
        output:
            directory("results/{setting}/pairs"),
        params:
            block=setting_block("teacher_sampling", "flow", "pairs"),
        log:
            "results/logs/{setting}/pairs-merge.log",
        threads: 1
        resources:
            gpu=0,
        shell:
            "{DD} pairs --setting {wildcards.setting} --merge 2>&1 | tee {log}"

else:

    rule pairs:
        input:
            "results/{setting}/teacher",
            conditions=conditions,
            code=CODE["pairs"],
        output:
            directory("results/{setting}/pairs"),
        params:
            block=setting_block("teacher_sampling", "flow", "pairs"),
        log:
            "results/logs/{setting}/pairs.log",
        threads: cpu_threads
        resources:
            gpu=pairs_gpus,
        shell:
            "{DD} pairs --setting {wildcards.setting} 2>&1 | tee {log}"
