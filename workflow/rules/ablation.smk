# Toy ablation of the distill recipe (src/dd/ablation.py): per toy setting of params.yaml pipeline.ablation, students
# trained with the recipe changed in one place (loss terms, t_list[1], pair count; the recipe judged at 1/4 and 1/2
# of its steps for the training length), judged by the evaluate stage's judge -> results/ablation/{setting}/; then
# reports/toy_ablation.md/.csv. Resumable: a killed job leaves results/ablation/{setting}.partial/ (finished variants
# and the checkpoints of the one in progress), which the rerun continues.
rule ablation:
    input:
        teacher="results/{setting}/teacher",
        pairs="results/{setting}/pairs",
        teacher_metrics="results/{setting}/metrics/teacher.json",
        onestep_metrics="results/{setting}/metrics/onestep.json",
        code=CODE["ablation"],
    output:
        directory("results/ablation/{setting}"),
    params:
        block=setting_block("distill", "sample"),
    log:
        "results/logs/{setting}/ablation.log",
    threads: cpu_threads
    resources:
        gpu=0,
    shell:
        "{DD} ablation --setting {wildcards.setting} 2>&1 | tee {log}"


rule ablation_report:
    input:
        ablations=expand("results/ablation/{setting}", setting=ABLATION),
        code=CODE["ablation"],
    output:
        "reports/toy_ablation.md",
        "reports/toy_ablation.csv",
    params:
        settings=json.dumps(ABLATION),
    log:
        "results/logs/ablation_report.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        "{DD} ablation-report 2>&1 | tee {log}"
