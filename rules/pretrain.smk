# VoCo self-supervised pre-training (SPEC 2): the preprocessed pre-training corpus -> runs/pretrain/<run>/ssl/.
# The run resumes from its folder's last.pt (the shared loop), so a killed or pre-empted job continues where it was;
# on SIGTERM / SIGUSR1 it finishes its step, writes last.pt and exits 75 (interrupted, resumable; the SLURM profile
# retries such jobs). Multi-GPU: give the rule gpu=N (e.g. `--set-resources pretrain_ssl:gpu=4` or the SLURM profile);
# with N > 1 the command re-runs itself under `torchrun --nproc_per_node=<GPUs visible to the job>` (DDP).
# Multi-node: give it nodes=M as well (SLURM profile); then `srun` starts torchrun on each of the M nodes of the job
# (c10d rendezvous on the first). The omni stages and SuPreM (rules/omni.smk) take the same two resources.
# Training rules `exec` the voco command: SLURM signals every process of the job step, and the shell Snakemake wraps
# a command in would die on SIGTERM and orphan the training (which cgroup tracking then kills before it checkpoints).

# (the `--nproc` / `--nodes` values come from nproc_param / nodes_param in rules/common.smk)


SSL_RUN = f"{RUNS}/pretrain/{config['pretrain']['run']}/ssl"


rule pretrain_ssl:
    """VoCo / VoCo-v1 self-supervised pre-training on every pre-training store (region-balanced sampling)."""
    input:
        prep=[prep_manifest(d) for d in PRETRAIN],
    output:
        final=f"{SSL_RUN}/final.pt",
        backbone=f"{SSL_RUN}/backbone.pt",
        summary=f"{SSL_RUN}/summary.json",
        metrics=f"{SSL_RUN}/metrics.jsonl",
        progress=report(
            f"{SSL_RUN}/progress.png",
            category="Pre-training",
            labels={"stage": "ssl", "method": config["pretrain"]["method"]},
        ),
    log:
        f"{LOGS}/pretrain_ssl/{config['pretrain']['run']}.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain_ssl/{config['pretrain']['run']}.tsv"
    params:
        prep=lambda wc, input: " ".join(str(Path(p).parent) for p in input.prep),
        out=lambda wc, output: Path(output.final).parent,
        method=config["pretrain"]["method"],
        # more than one GPU: `auto` = as many DDP processes (torchrun) as GPUs visible to the job; else one process
        nproc=nproc_param,
        nodes=nodes_param,
        voco=VOCO,
        config=cfg_for("pretrain_ssl"),
    priority: 50
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
        "exec env OMP_NUM_THREADS={threads} {params.voco} pretrain --method {params.method} --prep {params.prep}"
        " --out {params.out} --nproc {params.nproc} --nodes {params.nodes} --config {params.config} > {log} 2>&1"


ALL_TARGETS.extend([f"{SSL_RUN}/final.pt", f"{SSL_RUN}/backbone.pt", f"{SSL_RUN}/summary.json"])
