#!/usr/bin/env bash
# Run by Snakemake (--software-deployment-method conda) inside the freshly built envs/voco.yaml environment, from the
# workflow's working directory (the repository root): installs this package so that rules find the `voco` command.
# --no-deps: the environment already holds every pinned dependency; VOCO_SRC overrides where the package lives.
set -euo pipefail
python -m pip install --no-deps -e "${VOCO_SRC:-$PWD}"
