# Segment your own scans with a fine-tuned run (thin rule over `voco predict`). Put scans in data/predict/<batch>/
# (NIfTI files, or one sub-folder per DICOM series) and ask for the masks of one run:
#   snakemake --profile config/profiles/local results/predict/<batch>/<dataset>/<init>/<method>/n<N>-s<seed>
# The run is fine-tuned first if it is not there yet. Masks keep each scan's own affine and shape; predict.json lists
# every scan (ok / failed with the reason).


rule predict:
    """Masks for every scan of data/predict/{batch}/ from one fine-tuned run (its own pre-processing)."""
    input:
        scans=f"{DATA}/predict/{{batch}}",
        model=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/model.pt",
        run=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/run.json",
    output:
        directory(f"{RESULTS}/predict/{{batch}}/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}"),
    log:
        f"{LOGS}/predict/{{batch}}/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/predict/{{batch}}/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.tsv"
    wildcard_constraints:
        batch=r"[A-Za-z0-9_.-]+",
    params:
        voco=VOCO,
        config=cfg_for("predict"),
        run=lambda wc, input: os.path.dirname(input.run),
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
        "OMP_NUM_THREADS={threads} {params.voco} predict --config {params.config} -i {input.scans}"
        " -o {output} --run {params.run} > {log} 2>&1"
