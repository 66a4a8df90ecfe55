#!/usr/bin/env bash
# GPU readiness check: on a machine with CUDA GPU(s), in under 8 minutes,
#   1. SwinUNETR-B VoCo pre-training and fine-tuning steps under bf16 autocast at 64^3 and 96^3, our window attention
#      and MONAI's: steps/s, crops/s, peak GPU memory, model FLOPs utilisation;
#   2. the real CLI on synthetic phantoms: voco synth -> preprocess -> pretrain (SwinUNETR-B, amp) -> finetune, a few
#      steps each, and a 2-process DDP pre-training when two GPUs are visible.
# Results: printed tables, and $OUT/gpu_check.json (OUT defaults to a new folder under /tmp).
#
#   benchmarks/gpu_check.sh                 # the check (needs CUDA)
#   benchmarks/gpu_check.sh --smoke         # toy sizes on the CPU: the script parses and its paths run (tests do this)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-$(mktemp -d /tmp/voco-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
SMOKE=()
LIMIT=330
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=(--smoke --cpu --ddp-smoke)
  LIMIT=1500  # a busy 2-core CPU: minutes per SwinUNETR step
  shift
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $PY (use --smoke for the CPU smoke run)" >&2
  exit 2
fi
if command -v nvidia-smi > /dev/null; then nvidia-smi -L || true; fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count())'
start=$(date +%s)
# budget: throughput ~3 min, pipeline ~4 min on one modern GPU; each part has its own time limit
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py throughput "${SMOKE[@]}" --json "$OUT/throughput.json" "$@"
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py pipeline "${SMOKE[@]}" --work "$OUT/pipeline" --timeout 240 \
  --json "$OUT/pipeline.json" "$@"
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {k: json.loads((out / f"{k}.json").read_text())[k] for k in ("throughput", "pipeline")}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=2) + "\n")
PYEOF
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT/gpu_check.json"
