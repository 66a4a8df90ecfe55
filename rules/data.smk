# Data phase: raw source -> NIfTI + dataset.json -> preprocessed fast-load store (per shard) -> merged manifest.
# Jobs grow with shards, not cases: nothing here lists case files at parse time.


rule synth:
    """Embedded default data: a synthetic CT phantom dataset, generated from its card (source.kind: synthetic)."""
    output:
        f"{DATA}/raw/{{dataset}}/SOURCE.json",
    wildcard_constraints:
        dataset=ids_of_kind("synthetic"),
    log:
        f"{LOGS}/synth/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/synth/{{dataset}}.tsv"
    params:
        out=lambda wc: f"{DATA}/raw/{wc.dataset}",
        config=cfg_for("synth"),
    # the data phase first (about a minute of CPU on the laptop): priorities do not pass to a job's inputs, so
    # without this the pre-training stages wait for a pool's conversion queued behind scratch fine-tunes
    priority: 95
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco synth --config {params.config} --dataset {wildcards.dataset} --out {params.out} > {log} 2>&1"


rule convert:
    """DICOM series / MSD / nnU-Net / AbdomenAtlas raw layout -> NIfTI + MSD-style dataset.json."""
    input:
        f"{DATA}/raw/{{dataset}}/SOURCE.json",
    output:
        f"{DATA}/nifti/{{dataset}}/dataset.json",
    log:
        f"{LOGS}/convert/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/convert/{{dataset}}.tsv"
    params:
        raw=lambda wc: f"{DATA}/raw/{wc.dataset}",
        out=lambda wc: f"{DATA}/nifti/{wc.dataset}",
        fmt=lambda wc: card_format(wc.dataset),
        config=cfg_for("convert"),
    priority: 95
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco convert --config {params.config} --input {params.raw} --format {params.fmt} --dataset {wildcards.dataset}"
        " --out {params.out} > {log} 2>&1"


rule preprocess:
    """SPEC 1 pre-processing of one shard (case i goes to shard i % N): fast-load store + shard manifest."""
    input:
        f"{DATA}/nifti/{{dataset}}/dataset.json",
    output:
        f"{DATA}/prep/{{dataset}}/shard-{{shard}}/manifest.parquet",
    log:
        f"{LOGS}/preprocess/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{LOGS}/benchmarks/preprocess/{{dataset}}/shard-{{shard}}.tsv"
    params:
        out=lambda wc: f"{DATA}/prep/{wc.dataset}",
        config=cfg_for("preprocess"),
        shards=lambda wc: shards_for(wc.dataset),
    priority: 95
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco preprocess --config {params.config} --dataset-json {input} --out {params.out} --dataset {wildcards.dataset}"
        " --shard {wildcards.shard} --num-shards {params.shards} > {log} 2>&1"


rule merge_manifest:
    """One manifest per dataset (rejected cases keep their row and reason)."""
    input:
        lambda wc: shard_manifests(wc.dataset),
    output:
        f"{DATA}/prep/{{dataset}}/manifest.parquet",
    log:
        f"{LOGS}/merge_manifest/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/merge_manifest/{{dataset}}.tsv"
    priority: 95
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco merge-manifest --inputs {input} --out {output} > {log} 2>&1"


rule preprocess_all:
    """Every dataset of the config, preprocessed (target: `snakemake preprocess_all`)."""
    input:
        [prep_manifest(d) for d in ALL_DATASETS],


ALL_TARGETS.extend(rules.preprocess_all.input)
