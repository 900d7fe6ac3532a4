# Text-features stage (src/dd/prompts.py), text-to-image settings only: the prompts (training prompts for the pairs,
# evaluation prompts for the samples) and their caption features, encoded once -> results/{setting}/text_features/.
# Every later stage of the setting reads them (rule input `conditions`); none runs the text encoder again.
rule text_features:
    input:
        code=CODE["text_features"],
    output:
        directory("results/{setting}/text_features"),
    wildcard_constraints:
        setting="|".join(name for name in SETTINGS if PARAMS.setting(name).text_to_image) or "^$",
    params:
        block=setting_block("image_size", "prompts"),
    log:
        "results/logs/{setting}/text_features.log",
    threads: cpu_threads
    resources:
        gpu=lambda wildcards: 1 if config["settings"][wildcards.setting]["paper_row"] else 0,
    shell:
        "{DD} text-features --setting {wildcards.setting} 2>&1 | tee {log}"
