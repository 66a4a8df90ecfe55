# Downstream phase (SPEC 6): fine-tune every dataset x init x method x N x seed of the config, evaluate each run,
# then one report over all of them. Thin rules over `voco finetune`, `voco evaluate`, `voco report`; the run grid
# comes from voco.eval.plan (tested by pytest).
#
# Re-run one dataset's evaluation alone from the cached checkpoints (docs/downstream.md):
#   snakemake --cores 2 --forcerun evaluate -- results/<dataset>/report/report.md
import os
import sys

sys.path.insert(0, str(REPO / "src"))  # the plan is pure Python: importable even where voco is not installed
from voco.eval import plan as downstream_plan

# VOCO_CFG (not the plain `config`): a card may narrow its own grid, below the user's overrides (plan.grid)
DOWNSTREAM_SUMMARIES = downstream_plan.summaries(VOCO_CFG, CARDS, DOWNSTREAM)


wildcard_constraints:
    init=downstream_plan.init_wildcard(config),  # scratch | our stages | released names | file-<stem> (voco.inits)
    method="plain|medcontext",
    n=r"all|\d+",
    seed=r"\d+",


rule finetune:
    """Fine-tune one (dataset, init, method, N, seed): model.pt + run.json + transfer.json + training curves."""
    input:
        manifest=lambda wc: prep_manifest(wc.dataset),
        init=lambda wc: downstream_plan.init_checkpoint(config, wc.init),
        leakage=leakage_gate,  # audit.enforce: no fine-tuning from a pre-trained init before its dataset is cleared
    output:
        model=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/model.pt",
        run=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/run.json",
        transfer=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/transfer.json",
        metrics=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/metrics.jsonl",
        progress=report(
            f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/progress.png",
            category="Training curves",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "init": "{init}", "method": "{method}", "N": "{n}", "seed": "{seed}"},
        ),
    log:
        f"{LOGS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.tsv"
    params:
        voco=VOCO,
        config=cfg_for("finetune"),
        prep=lambda wc: f"{DATA}/prep/{wc.dataset}",
        out=lambda wc: downstream_plan.run_dir(RUNS, wc.dataset, wc.init, wc.method, wc.n, wc.seed),
        init_path=lambda wc, input: f"--init-path {input.init}" if input.init else "",
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
        "exec env OMP_NUM_THREADS={threads} {params.voco} finetune --config {params.config} --dataset {wildcards.dataset}"
        " --init {wildcards.init} --method {wildcards.method} --n-train {wildcards.n} --seed {wildcards.seed}"
        " --prep {params.prep} --out {params.out} {params.init_path} > {log} 2>&1"


rule evaluate:
    """Sliding-window inference + Dice / HD95 / NSD (or accuracy / AUC) of one run on its held-out cases."""
    input:
        model=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/model.pt",
        run=f"{RUNS}/finetune/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/run.json",
        manifest=lambda wc: prep_manifest(wc.dataset),
        dataset_json=f"{DATA}/nifti/{{dataset}}/dataset.json",
    output:
        summary=f"{RESULTS}/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/summary.json",
        cases=f"{RESULTS}/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}/cases.csv",
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{dataset}}/{{init}}/{{method}}/n{{n}}-s{{seed}}.tsv"
    params:
        voco=VOCO,
        config=cfg_for("evaluate"),
        prep=lambda wc: f"{DATA}/prep/{wc.dataset}",
        run=lambda wc: downstream_plan.run_dir(RUNS, wc.dataset, wc.init, wc.method, wc.n, wc.seed),
        out=lambda wc: downstream_plan.result_dir(RESULTS, wc.dataset, wc.init, wc.method, wc.n, wc.seed),
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
        "OMP_NUM_THREADS={threads} {params.voco} evaluate --config {params.config} --dataset {wildcards.dataset}"
        " --run {params.run} --prep {params.prep} --dataset-json {input.dataset_json} --out {params.out} > {log} 2>&1"


rule evaluate_dataset:
    """Every configured run of one dataset evaluated, with that dataset's own tables (results/<dataset>/report/)."""
    input:
        lambda wc: downstream_plan.summaries(VOCO_CFG, CARDS, [wc.dataset]),
    output:
        f"{RESULTS}/{{dataset}}/report/report.md",
        f"{RESULTS}/{{dataset}}/report/table.csv",
    log:
        f"{LOGS}/evaluate_dataset/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate_dataset/{{dataset}}.tsv"
    params:
        voco=VOCO,
        config=cfg_for("evaluate_dataset"),
        results=lambda wc: RESULTS,
        runs=lambda wc: RUNS,
        out=lambda wc: f"{RESULTS}/{wc.dataset}/report",
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
        "{params.voco} report --config {params.config} --results {params.results} --runs {params.runs}"
        " --dataset {wildcards.dataset} --out {params.out} > {log} 2>&1"


rule report:
    """Paper-style tables (init x method rows, dataset columns, mean +- sd over seeds), curves and transfer reports."""
    input:
        summaries=DOWNSTREAM_SUMMARIES,
        transfer=downstream_plan.run_files(VOCO_CFG, CARDS, DOWNSTREAM, "transfer.json"),
        metrics=downstream_plan.run_files(VOCO_CFG, CARDS, DOWNSTREAM, "metrics.jsonl"),
        leakage=f"{RESULTS}/leakage/report.json",
        # curation / pseudo-label quality tables, when the omni stages feed an init of this report
        omni=(
            rules.omni_all.input
            if any(i in ("stage1", "stage2") for i in config["finetune"]["inits"])
            else []
        ),
    output:
        md=report(f"{RESULTS}/report/report.md", category="Downstream report", labels={"file": "report.md"}),
        table=report(f"{RESULTS}/report/table.csv", category="Downstream report", labels={"file": "table.csv"}),
        results=report(f"{RESULTS}/report/results.csv", category="Downstream report", labels={"file": "results.csv"}),
        transfer=report(f"{RESULTS}/report/transfer.csv", category="Downstream report", labels={"file": "transfer.csv"}),
        efficiency=report(
            f"{RESULTS}/report/label_efficiency.png", category="Downstream report", labels={"file": "label efficiency"}
        ),
        curves=report(
            f"{RESULTS}/report/training_curves.png", category="Downstream report", labels={"file": "training curves"}
        ),
        summary=f"{RESULTS}/report/report.json",
    log:
        f"{LOGS}/report/report.log",
    benchmark:
        f"{LOGS}/benchmarks/report/report.tsv"
    params:
        voco=VOCO,
        config=cfg_for("report"),
        results=lambda wc: RESULTS,
        runs=lambda wc: RUNS,
        out=lambda wc, output: os.path.dirname(output.md),
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
        "{params.voco} report --config {params.config} --results {params.results} --runs {params.runs}"
        " --out {params.out} > {log} 2>&1"


rule evaluate_all:
    """Every configured downstream run fine-tuned and evaluated (no report)."""
    input:
        DOWNSTREAM_SUMMARIES,


ALL_TARGETS.append(f"{RESULTS}/report/report.md")
# every dataset's own tables too (what `dvc repro evaluate@<dataset>` targets, so that it adopts a finished run)
ALL_TARGETS.extend(f"{RESULTS}/{d}/report/report.md" for d in sorted({r[0] for r in downstream_plan.runs(VOCO_CFG, CARDS, DOWNSTREAM)}))
