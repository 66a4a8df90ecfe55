# Sources phase: real datasets into data/raw/{dataset} (SOURCE.json written last), and the leakage audit.
# Which rule makes data/raw/{dataset}/SOURCE.json depends on the card's source kind (wildcard constraints):
#   synthetic                -> rule synth (rules/data.smk)
#   http | huggingface       -> rule download (checked, resumable)
#   manual                   -> rule download, which fails with the card's instructions until a local copy is given
#   local, or download.local -> rule link (the user's folder, symlinked; SOURCE.json beside the links)

LOCAL_COPIES = dict(config.get("download", {}).get("local", {}))
LOCAL_IDS = [d for d in ALL_DATASETS if source_kind(d) != "synthetic" and (d in LOCAL_COPIES or source_kind(d) == "local")]
DOWNLOAD_IDS = [
    d for d in ALL_DATASETS if d not in LOCAL_IDS and source_kind(d) in ("http", "huggingface", "manual")
]
NO_MATCH = "(?!x)x"  # a wildcard constraint that never matches (no dataset of that kind)


rule download:
    """Fetch a dataset from its card's source (Hugging Face files / HTTP archive with checksum); manual cards explain."""
    output:
        f"{DATA}/raw/{{dataset}}/SOURCE.json",
    wildcard_constraints:
        dataset="|".join(DOWNLOAD_IDS) or NO_MATCH,
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/download/{{dataset}}.tsv"
    params:
        out=lambda wc: f"{DATA}/raw/{wc.dataset}",
        config=cfg_for("download"),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 24 * 60 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco download --config {params.config} --dataset {wildcards.dataset} --out {params.out} > {log} 2>&1"


rule link:
    """Use the user's local copy (card source.kind local, or download.local.<id>): symlinks + SOURCE.json."""
    output:
        f"{DATA}/raw/{{dataset}}/SOURCE.json",
    wildcard_constraints:
        dataset="|".join(LOCAL_IDS) or NO_MATCH,
    log:
        f"{LOGS}/link/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/link/{{dataset}}.tsv"
    params:
        out=lambda wc: f"{DATA}/raw/{wc.dataset}",
        config=cfg_for("link"),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco download --config {params.config} --dataset {wildcards.dataset} --out {params.out} > {log} 2>&1"


rule leakage_index:
    """Fingerprints of the whole pre-training corpus, computed once (every per-dataset audit reads them)."""
    input:
        pretrain=[prep_manifest(d) for d in PRETRAIN],
    output:
        f"{RESULTS}/leakage/pretrain_index.parquet",
    log:
        f"{LOGS}/leakage_index/leakage_index.log",
    benchmark:
        f"{LOGS}/benchmarks/leakage_index/leakage_index.tsv"
    priority: 100
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco audit-leakage --pretrain {input.pretrain} --index-out {output} --workers {threads} > {log} 2>&1"


rule audit_leakage_dataset:
    """One downstream dataset's evaluation cases (test split, or the validation carve-out of training) vs the corpus.
    With audit.enforce an overlap fails this job, and with it every fine-tuning of the dataset from a pre-trained
    init (scheduled first: priority)."""
    input:
        index=f"{RESULTS}/leakage/pretrain_index.parquet",
        downstream=lambda wc: prep_manifest(wc.dataset),
    output:
        report=f"{RESULTS}/leakage/{{dataset}}.json",
        table=f"{RESULTS}/leakage/{{dataset}}.md",
    wildcard_constraints:
        dataset="|".join(DOWNSTREAM) or NO_MATCH,
    log:
        f"{LOGS}/audit_leakage/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/audit_leakage/{{dataset}}.tsv"
    params:
        config=cfg_for("audit_leakage_dataset"),
        fail="--fail-on-overlap" if AUDIT_ENFORCE else "",
    priority: 100
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco audit-leakage --config {params.config} --index {input.index} --downstream {input.downstream}"
        " --out {output.report} {params.fail} > {log} 2>&1"


rule audit_leakage:
    """The leakage report over every downstream dataset (JSON + Markdown), merged from the per-dataset audits."""
    input:
        [f"{RESULTS}/leakage/{d}.json" for d in DOWNSTREAM],
    output:
        report=f"{RESULTS}/leakage/report.json",
        table=f"{RESULTS}/leakage/report.md",
    log:
        f"{LOGS}/audit_leakage/audit_leakage.log",
    benchmark:
        f"{LOGS}/benchmarks/audit_leakage/audit_leakage.tsv"
    priority: 100
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "voco audit-leakage --merge {input} --out {output.report} > {log} 2>&1"


if DOWNSTREAM:
    ALL_TARGETS.append(f"{RESULTS}/leakage/report.json")
