# Pairs stage: noise -> token trajectories of the teacher with the flow map (src/dd/pairs.py). Resumable:
# a killed job leaves results/{setting}/pairs.partial/ (not declared, so Snakemake keeps it) and the rerun
# keeps its verified shards; pairs/ appears only when every shard is done.
rule pairs:
    input:
        "results/{setting}/teacher",
        code=CODE["pairs"],
    output:
        directory("results/{setting}/pairs"),
    params:
        block=setting_block("teacher_sampling", "flow", "pairs"),
    log:
        "results/logs/{setting}/pairs.log",
    threads: cpu_threads
    resources:
        gpu=lambda wildcards: 1 if config["settings"][wildcards.setting]["paper_row"] else 0,
    shell:
        "{DD} pairs --setting {wildcards.setting} 2>&1 | tee {log}"
