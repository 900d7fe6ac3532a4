# Teacher stage: download the official checkpoints (paper rows) or train the toy teacher.
rule teacher:
    input:
        conditions=conditions,
        code=CODE["teacher"],
    output:
        directory("results/{setting}/teacher"),
    params:
        block=setting_block("family", "image_size", "num_classes", "teacher", "teacher_sampling"),
    log:
        "results/logs/{setting}/teacher.log",
    threads: cpu_threads
    resources:
        gpu=0,
    shell:
        "{DD} teacher --setting {wildcards.setting} 2>&1 | tee {log}"  # bash pipefail: a failing stage fails the job
