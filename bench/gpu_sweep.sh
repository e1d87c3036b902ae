#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md still owes, in priority order, for one lease of a two-GPU host: each step
# is bounded by `timeout`, so one slow step (torch.compile's warm-up, say) cannot eat the others, and each writes
# its JSON under OUT as soon as it ends. The target must be reachable offline (a staged .gguf file or directory).
# OUT must outlive the calls that poll it (on the lent machine $OUT is emptied before each call: use a folder of
# its own and copy it into $OUT at the end).
#
#   TARGET=/root/m/smollm2.gguf OUT=/root/sweep bash bench/gpu_sweep.sh
#
# 1. the whole stack across GPUs (drafter cuda:0, verifier cuda:1) at 64 and 256 users, off against the default
#    drafter, with the chunk rule that keeps many users in one pass (re-measures the load bars)
# 2. the same at 64 users with speculation never shed (the verifiers' advice raised to 256 sessions): does
#    speculation now pay under load, where verifying 6 tokens costs ~1.3x one?
# 3. one user, speculation off, compiled, layer by layer (bench/decode_path.py): the 800 bar
# 4. the same with torch.compile's max-autotune-no-cudagraphs mode (SPECDEC_COMPILE_MODE): a faster step?
# 5. one user across GPUs, off against the default drafter, both compiled
set -u
target=${TARGET:-smollm2-135m-instruct}
out=${OUT:-out/gpu-sweep}
feature=drafters/smollm2-135m-instruct-feature
mkdir -p "$out"
step() {  # step SECONDS COMMAND...: run it, bounded, and say how it ended
  local limit=$1
  shift
  echo "== $(date +%T) $*"
  timeout "$limit" "$@"
  echo "== rc=$? $(date +%T)"
}
across=(--target "$target" --verifier-device cuda:1 --drafter-device cuda:0)
step 200 python3 -m specdec.cli bench "${across[@]}" --modes off,model=$feature --concurrency 64,256 \
  --requests 256 --max-new-tokens 64 --out "$out/bench-load"
step 150 env SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=256 python3 -m specdec.cli bench "${across[@]}" \
  --modes off,model=$feature --concurrency 64 --requests 128 --max-new-tokens 64 --out "$out/bench-load-unshed"
step 300 python3 bench/decode_path.py --device cuda:1 --compile yes --target "$target" \
  --max-new-tokens 128 --prompt-count 8 --out "$out/decode-path"
step 420 env SPECDEC_COMPILE_MODE=max-autotune-no-cudagraphs python3 bench/decode_path.py --device cuda:1 \
  --compile yes --target "$target" --max-new-tokens 128 --prompt-count 8 --out "$out/decode-path-autotune"
step 400 env SPECDEC_COMPILE=yes python3 -m specdec.cli bench "${across[@]}" --modes off,model=$feature \
  --concurrency 1 --requests 16 --max-new-tokens 128 --out "$out/bench-one-user-compiled"
