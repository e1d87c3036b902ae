#!/usr/bin/env bash
# Seventeenth session, nvidia-h200-x2: where bf16 greedy output parts from speculation off's (written before the run).
#   A: off's reference answers from 64 users (--concurrency 64,1): if the many-row passes round alike, speculating at
#      64 users agrees with off at 64 users far more (predicted >= 55 of 64) than with off at one user (26 of 64)
#   B: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False in every process (split-K partial
#      sums reduced in fp32): one user speculating against off at one user, predicted 25 -> 35-45 of 64
# Run after bench/gpu_stage.sh's calls: bash bench/results/h200x2-session17/agree_bf16.sh
set -uo pipefail
. .gpu/env.sh && bash .gpu/setup.sh final || exit 1
F=model=drafters/smollm2-135m-instruct-fused
run() {  # NAME CONCURRENCY
  SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 280 python3 -m specdec.cli bench --target /root/m/smollm2.gguf \
    --modes "off,$F" --concurrency "$2" --requests 64 --max-new-tokens 128 --out "/root/b/$1" \
    --verifier-device cuda:0 --drafter-device cuda:0 2>&1 | grep -e " x[0-9]" -e "greedy output" | tee "$OUT/$1.txt"
  cp "/root/b/$1/results.json" "$OUT/$1.json" 2>/dev/null
}
echo "== A $(date +%T)"; run agree_64_first 64,1
mkdir -p /root/fp32reduce
cat > /root/fp32reduce/sitecustomize.py <<'PY'
import torch
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
PY
echo "== B $(date +%T)"; PYTHONPATH=/root/fp32reduce:$PYTHONPATH run agree_fp32_reduce 1,64
echo "== done $(date +%T)"
