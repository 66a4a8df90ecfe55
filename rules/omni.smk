# Omni-supervised pre-training (SPEC 3) and SuPreM (SPEC 5):
#   labelled sources -> vocomni (ensemble curation) -> pretrain_stage1 (SSL + DiceCE)
#   -> pseudolabel (stage-1 model, per shard) -> pseudolabel_merge -> pretrain_stage2 (SSL + DiceCE + pseudo DiceCE)
#   labelled sources -> pretrain_suprem (supervised only)
# Every training rule resumes from its run folder's last.pt (the shared loop); checkpoints are the outputs. last.pt is
# not an output: it survives a failed or pre-empted attempt (Snakemake removes only outputs) and the job removes it
# once all its outputs exist. The VoComni ensemble members live in runs/vocomni/member-<k>/ the same way (their
# final.pt / curves are outputs; their last.pt survives a retry), so a retried curation resumes every member.

VOCOMNI_SOURCES = voco_dag.vocomni_sources(config, CARDS)
OMNI = config["pretrain"]["omni"]
UNLABELLED = voco_dag.unlabelled(config, CARDS)
OMNI_RUN = f"{RUNS}/pretrain/{config['pretrain']['run']}"
VOCOMNI_DIR = OMNI["labelled"] or f"{DATA}/vocomni"


# the stores' folders (a store's folder holds its manifest.parquet), space-separated
_dirs = lambda paths: " ".join(str(Path(p).parent) for p in paths)
# stage 2 reads the merged pseudo-labels unless it makes its own on the fly (stage2_pseudo: online)
STAGE2_PSEUDO = (
    [] if OMNI["stage2_pseudo"] == "online" else [f"{OMNI_RUN}/pseudo/{d}/manifest.parquet" for d in UNLABELLED]
)


rule vocomni:
    """VoComni curation: ensemble of supervised models completes the sources' partial labels; unsure volumes dropped."""
    input:
        prep=[prep_manifest(d) for d in VOCOMNI_SOURCES],
    output:
        manifest=f"{VOCOMNI_DIR}/manifest.parquet",
        table=f"{VOCOMNI_DIR}/curation.parquet",
        plot=report(f"{VOCOMNI_DIR}/curation.png", category="VoComni curation"),
        summary=f"{RESULTS}/omni/curation.json",
        members=expand(
            f"{RUNS}/vocomni/member-{{k}}/{{f}}",
            k=range(len(config["vocomni"]["members"])),
            f=["final.pt", "metrics.jsonl", "progress.png"],
        ),
    log:
        f"{LOGS}/vocomni/vocomni.log",
    benchmark:
        f"{LOGS}/benchmarks/vocomni/vocomni.tsv"
    params:
        config=cfg_for("vocomni"),
        prep=lambda wc, input: _dirs(input.prep),
        out=lambda wc, output: Path(output.manifest).parent,
        work=lambda wc, output: Path(output.members[0]).parent.parent,  # runs/vocomni (member-<k>/ below it)
    # the omni chain (VoComni -> stage 1 -> pseudo-labels -> stage 2) is the run's critical path: scheduled
    # before the pre-training that runs beside it and before fine-tuning (scratch fine-tunes fill the other cores)
    priority: 90
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
        "exec env OMP_NUM_THREADS={threads} voco vocomni --config {params.config} --prep {params.prep} --out {params.out} --work {params.work}"
        " --report {output.summary} > {log} 2>&1"


rule pretrain_stage1:
    """Omni stage 1: L_SSL on the pre-training corpus + DiceCE on VoComni crops (9:1 pos:neg, through the decoder)."""
    input:
        labelled=f"{VOCOMNI_DIR}/manifest.parquet",
        prep=[prep_manifest(d) for d in PRETRAIN],
    output:
        final=f"{OMNI_RUN}/stage1/final.pt",
        backbone=f"{OMNI_RUN}/stage1/backbone.pt",
        summary=f"{OMNI_RUN}/stage1/summary.json",
        metrics=f"{OMNI_RUN}/stage1/metrics.jsonl",
        progress=report(f"{OMNI_RUN}/stage1/progress.png", category="Pre-training", labels={"stage": "stage1"}),
    log:
        f"{LOGS}/pretrain_stage1/{config['pretrain']['run']}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain_stage1/{config['pretrain']['run']}.tsv"
    params:
        config=cfg_for("pretrain_stage1"),
        prep=lambda wc, input: _dirs(input.prep),
        labelled=lambda wc, input: Path(input.labelled).parent,
        out=lambda wc, output: Path(output.final).parent,
        nproc=nproc_param,
        nodes=nodes_param,
    priority: 90
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "exec env OMP_NUM_THREADS={threads} voco pretrain --config {params.config} --stage 1 --prep {params.prep} --labelled {params.labelled} --out {params.out}"
        " --nproc {params.nproc} --nodes {params.nodes} > {log} 2>&1"


rule pseudolabel:
    """Stage-1 model labels one shard of an unlabelled dataset (sliding window) + per-volume confidence."""
    input:
        ckpt=f"{OMNI_RUN}/stage1/final.pt",
        prep=f"{DATA}/prep/{{dataset}}/manifest.parquet",
    output:
        f"{OMNI_RUN}/pseudo/{{dataset}}/shard-{{shard}}/manifest.parquet",
    log:
        f"{LOGS}/pseudolabel/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{LOGS}/benchmarks/pseudolabel/{{dataset}}/shard-{{shard}}.tsv"
    wildcard_constraints:
        dataset="|".join(UNLABELLED) or "(?!x)x",
    params:
        config=cfg_for("pseudolabel"),
        prep=lambda wc, input: Path(input.prep).parent,
        out=lambda wc, output: Path(output[0]).parent.parent,
        shards=lambda wc: shards_for(wc.dataset),
    priority: 90
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
        "OMP_NUM_THREADS={threads} voco pseudolabel --config {params.config} --ckpt {input.ckpt} --prep {params.prep} --out {params.out}"
        " --shard {wildcards.shard} --num-shards {params.shards} > {log} 2>&1"


rule pseudolabel_merge:
    """Join the pseudo-label shards; low-confidence volumes are rejected (left out of stage 2) and listed."""
    input:
        lambda wc: [f"{OMNI_RUN}/pseudo/{wc.dataset}/shard-{k}/manifest.parquet" for k in range(shards_for(wc.dataset))],
    output:
        manifest=f"{OMNI_RUN}/pseudo/{{dataset}}/manifest.parquet",
        low=f"{OMNI_RUN}/pseudo/{{dataset}}/low_confidence.csv",
        summary=f"{RESULTS}/omni/pseudo_{{dataset}}.json",
    log:
        f"{LOGS}/pseudolabel_merge/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/pseudolabel_merge/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(UNLABELLED) or "(?!x)x",
    params:
        config=cfg_for("pseudolabel_merge"),
        out=lambda wc, output: Path(output.manifest).parent,
        shards=lambda wc: shards_for(wc.dataset),
    priority: 90
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
        "voco pseudolabel --config {params.config} --merge --out {params.out} --num-shards {params.shards} --report {output.summary}"
        " > {log} 2>&1"


rule pretrain_stage2:
    """Omni stage 2 from stage 1's checkpoint (global step carried over): L_SSL + DiceCE labelled + DiceCE pseudo."""
    input:
        init=f"{OMNI_RUN}/stage1/final.pt",
        labelled=f"{VOCOMNI_DIR}/manifest.parquet",
        pseudo=STAGE2_PSEUDO,
        prep=[prep_manifest(d) for d in PRETRAIN],
    output:
        final=f"{OMNI_RUN}/stage2/final.pt",
        backbone=f"{OMNI_RUN}/stage2/backbone.pt",
        summary=f"{OMNI_RUN}/stage2/summary.json",
        metrics=f"{OMNI_RUN}/stage2/metrics.jsonl",
        progress=report(f"{OMNI_RUN}/stage2/progress.png", category="Pre-training", labels={"stage": "stage2"}),
    log:
        f"{LOGS}/pretrain_stage2/{config['pretrain']['run']}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain_stage2/{config['pretrain']['run']}.tsv"
    params:
        config=cfg_for("pretrain_stage2"),
        prep=lambda wc, input: _dirs(input.prep),
        labelled=lambda wc, input: Path(input.labelled).parent,
        pseudo=lambda wc, input: Path(input.init).parent.parent / "pseudo",
        out=lambda wc, output: Path(output.final).parent,
        nproc=nproc_param,
        nodes=nodes_param,
    priority: 90
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "exec env OMP_NUM_THREADS={threads} voco pretrain --config {params.config} --stage 2 --prep {params.prep} --labelled {params.labelled} --pseudo {params.pseudo}"
        " --init {input.init} --out {params.out} --nproc {params.nproc} --nodes {params.nodes} > {log} 2>&1"


rule pretrain_suprem:
    """SuPreM: supervised-only pre-training on the labelled sources (loss masked to each source's classes)."""
    input:
        prep=[prep_manifest(d) for d in VOCOMNI_SOURCES],
        labelled=[f"{VOCOMNI_DIR}/manifest.parquet"] if config["pretrain"]["suprem"]["labels"] == "vocomni" else [],
    output:
        final=f"{OMNI_RUN}/suprem/final.pt",
        backbone=f"{OMNI_RUN}/suprem/backbone.pt",
        summary=f"{OMNI_RUN}/suprem/summary.json",
        metrics=f"{OMNI_RUN}/suprem/metrics.jsonl",
        progress=report(f"{OMNI_RUN}/suprem/progress.png", category="Pre-training", labels={"stage": "suprem"}),
    log:
        f"{LOGS}/pretrain_suprem/{config['pretrain']['run']}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain_suprem/{config['pretrain']['run']}.tsv"
    params:
        config=cfg_for("pretrain_suprem"),
        prep=lambda wc, input: _dirs(input.prep),
        labelled=VOCOMNI_DIR,
        out=lambda wc, output: Path(output.final).parent,
        nproc=nproc_param,
        nodes=nodes_param,
    priority: 40
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=0,
    conda:
        CONDA_ENV
    container:
        CONTAINER
    shell:
        "exec env OMP_NUM_THREADS={threads} voco pretrain --config {params.config} --method suprem --prep {params.prep} --labelled {params.labelled} --out {params.out}"
        " --nproc {params.nproc} --nodes {params.nodes} > {log} 2>&1"


rule omni_all:
    """Named partial target: everything of the omni phase (curation, both stages, pseudo-labels, SuPreM)."""
    input:
        f"{RESULTS}/omni/curation.json",
        f"{OMNI_RUN}/stage2/final.pt",
        f"{OMNI_RUN}/suprem/final.pt",
        [f"{RESULTS}/omni/pseudo_{d}.json" for d in UNLABELLED] if OMNI["stage2_pseudo"] != "online" else [],


ALL_TARGETS.extend(rules.omni_all.input)


rule pretrain_all:
    """Named partial target: the pre-training runs the fine-tuning inits need (the DVC `pretrain` stage's target)."""
    input:
        voco_dag.pretrain_targets(config, CARDS),
