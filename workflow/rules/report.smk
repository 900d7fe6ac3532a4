# Report stage (src/dd/report.py), in two steps so that every job has a fixed list of inputs under both tools:
#   report_setting: one setting's metrics collected (null = not run), its same-noise sample grid (teacher / dd-2step
#                   / dd-1step) and its training curves from MLflow -> reports/settings/{setting}/
#   report:         reports/table1-2.md/.csv beside the paper's numbers (reports/paper_numbers.csv)
#   report_table3:  reports/table3.md/.csv of the text-to-image settings (pipeline.text_to_image)
#   report_figures: the paper's Fig. 3 (FID against seconds per image) -> reports/figures/fid_vs_latency.png
rule report_setting:
    input:
        metrics=lambda wildcards: metrics_files([wildcards.setting]),
        samples=expand("results/{{setting}}/samples/{method}", method=GRID_METHODS),
        student="results/{setting}/student",
        code=CODE["report_setting"],
    output:
        directory("reports/settings/{setting}"),
    params:
        block=setting_block("sample"),
    log:
        "results/logs/{setting}/report.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        "{DD} report-setting --setting {wildcards.setting} 2>&1 | tee {log}"


rule report:
    input:
        settings=expand("reports/settings/{setting}", setting=PIPELINE),
        code=CODE["report"],
    output:
        expand("reports/table{n}.{ext}", n=(1, 2), ext=("md", "csv")),
    params:
        settings=json.dumps(PIPELINE),
    log:
        "results/logs/report.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        "{DD} report --only tables 2>&1 | tee {log}"


rule report_table3:
    # Table 3 from the text-to-image settings (pipeline.text_to_image), apart from tables 1-2 so that
    # reproduce_table1 never waits for them
    input:
        settings=expand("reports/settings/{setting}", setting=T2I),
        code=CODE["report"],
    output:
        expand("reports/table3.{ext}", ext=("md", "csv")),
    params:
        settings=json.dumps(T2I),
    log:
        "results/logs/report_table3.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        "{DD} report --only table3 2>&1 | tee {log}"


rule report_figures:
    input:
        settings=expand("reports/settings/{setting}", setting=PIPELINE),
        code=CODE["report"],
    output:
        "reports/figures/fid_vs_latency.png",
    params:
        settings=json.dumps(PIPELINE),
    log:
        "results/logs/report_figures.log",
    threads: 1
    resources:
        gpu=0,
    shell:
        "{DD} report --only figures 2>&1 | tee {log}"
