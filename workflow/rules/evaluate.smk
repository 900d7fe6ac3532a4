# Evaluate stage (src/dd/evaluate.py): one method's samples -> results/{setting}/metrics/{method}.json (FID, IS or
# class accuracy, precision, recall, ...) and the method's latency (src/dd/latency.py, which runs the method again:
# hence the sample stage's inputs). The job owns the cores (cpu_threads) so that no other job skews the latency.
rule evaluate:
    input:
        unpack(method_inputs),
        samples="results/{setting}/samples/{method}",
        code=CODE["evaluate"],
    output:
        "results/{setting}/metrics/{method}.json",
    wildcard_constraints:
        method="|".join(ALL_METHODS),
    params:
        block=setting_block("sample", "teacher_sampling", "distill"),
    log:
        "results/logs/{setting}/evaluate-{method}.log",
    threads: cpu_threads
    resources:
        gpu=gpus,
    shell:
        "{DD} evaluate --setting {wildcards.setting} --method {wildcards.method} 2>&1 | tee {log}"
