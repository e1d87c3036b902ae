#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md still owes, in priority order, for one lease of a two-GPU host: each step
# is bounded by `timeout`, so one slow step (torch.compile's warm-up, say) cannot eat the others, and each writes
# its JSON under OUT as soon as it ends. The target must be reachable offline (a staged .gguf file or directory).
# OUT must outlive the calls that poll it (on the lent machine $OUT is emptied before each call: use a folder of
# its own and copy it into $OUT at the end).
#
#   TARGET=/root/m/smollm2.gguf OUT=/root/sweep bash bench/gpu_sweep.sh
#
# 1. graphed passes returning three layers' outputs (the fused drafter's) against eager: never run on a GPU yet
# 2. one user across GPUs (drafter cuda:0, verifier cuda:1), off against the fused drafter (the default) and the
#    last-layer one
# 3. 64 users with speculation never shed (the verifiers' advice raised to 256 sessions), across GPUs
# 4. the load bars across GPUs with the every-session chunk rule (measured on one GPU only, sixth session)
set -u
target=${TARGET:-smollm2-135m-instruct}
out=${OUT:-out/gpu-sweep}
feature=drafters/smollm2-135m-instruct-feature
fused=drafters/smollm2-135m-instruct-fused
mkdir -p "$out"
step() {  # step SECONDS COMMAND...: run it, bounded, and say how it ended
  local limit=$1
  shift
  echo "== $(date +%T) $*"
  timeout "$limit" "$@"
  echo "== rc=$? $(date +%T)"
}
across=(--target "$target" --verifier-device cuda:1 --drafter-device cuda:0)
step 240 python3 bench/gpu_engine.py --model "$target" --out "$out/gpu-engine" --skip-8b
step 300 python3 -m specdec.cli bench "${across[@]}" --modes off,model=$fused,model=$feature --concurrency 1 \
  --requests 16 --max-new-tokens 128 --out "$out/bench-one-user"
step 150 env SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=256 python3 -m specdec.cli bench "${across[@]}" \
  --modes off,model=$fused --concurrency 64 --requests 128 --max-new-tokens 64 --out "$out/bench-load-unshed"
step 240 python3 -m specdec.cli bench "${across[@]}" --modes off,model=$fused --concurrency 64,256 \
  --requests 256 --max-new-tokens 64 --out "$out/bench-load"
