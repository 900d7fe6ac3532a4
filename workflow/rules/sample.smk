# Sample stage (src/dd/sample_stage.py): N images of one method of one setting -> results/{setting}/samples/{method}/
# (uint8 shards + manifest). Resumable: a killed job leaves results/{setting}/samples/{method}.partial/ (not declared,
# so Snakemake keeps it) and the rerun keeps its verified shards. The methods of a setting and the one upstream folder
# each reads besides the teacher's (pairs for onestep, student for DD rows from the distill stage) come from
# dd.methods, the same function that writes params.yaml pipeline.methods for dvc.yaml.
from dd.methods import upstream as method_upstream

ALL_METHODS = sorted({m for names in METHODS.values() for m in names})


def method_inputs(wildcards):
    """teacher folder + the method's upstream folder + the stage's code (the same deps as dvc.yaml)."""
    setting = PARAMS.setting(wildcards.setting)
    return {"teacher": f"results/{wildcards.setting}/teacher",
            "upstream": f"results/{wildcards.setting}/{method_upstream(setting, wildcards.method)}",
            "conditions": conditions_input(setting)}


def gpus(wildcards):
    return 1 if config["settings"][wildcards.setting]["paper_row"] else 0


rule sample:
    input:
        unpack(method_inputs),
        code=CODE["sample"],
    output:
        directory("results/{setting}/samples/{method}"),
    wildcard_constraints:
        method="|".join(ALL_METHODS),
    params:
        block=setting_block("sample", "teacher_sampling", "distill"),
    log:
        "results/logs/{setting}/sample-{method}.log",
    threads: cpu_threads
    resources:
        gpu=gpus,
    shell:
        "{DD} sample --setting {wildcards.setting} --method {wildcards.method} 2>&1 | tee {log}"
