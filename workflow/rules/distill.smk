# Distill stage: train the DD student on the teacher's pairs (src/dd/distill.py). Resumable: a killed job
# leaves results/{setting}/student.partial/ (not declared, so Snakemake keeps it) and the rerun continues there.
# Paper rows ask for GPUs; with gpu > 1 (e.g. `set-resources: distill: {gpu: 8}` in a profile) the job runs
# under `accelerate launch --multi_gpu --num_processes <gpu>` (same global batch, split over the processes).


def distill_command(wildcards, resources):
    gpus = int(resources.gpu)
    if gpus > 1:
        return (f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {gpus} "
                f"--num_machines 1 --mixed_precision bf16 --dynamo_backend no -m dd")
    return DD


rule distill:
    input:
        teacher="results/{setting}/teacher",
        pairs="results/{setting}/pairs",
        conditions=conditions,
        code=CODE["distill"],
    output:
        directory("results/{setting}/student"),
    params:
        block=setting_block("distill", "sample"),
        command=distill_command,
    log:
        "results/logs/{setting}/distill.log",
    threads: cpu_threads
    resources:
        gpu=lambda wildcards: 1 if config["settings"][wildcards.setting]["paper_row"] else 0,
    shell:
        "{params.command} distill --setting {wildcards.setting} 2>&1 | tee {log}"
