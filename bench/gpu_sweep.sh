#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md still owes, in priority order, for one lease of a two-GPU host: each step
# is bounded by `timeout`, so one slow step (torch.compile's warm-up, say) cannot eat the others, and each writes
# its JSON under OUT as soon as it ends. The target must be reachable offline (a staged .gguf file or directory).
#
#   TARGET=/root/m/smollm2.gguf OUT=$OUT bash bench/gpu_sweep.sh
#
# 1. the feature drafter's step and whole 5-token greedy drafts, graphed and eager (bench/feature_runner_gpu.py)
# 2. drafting cost against the target's step (bench/drafter_cost.py): issue 3's c <= 1/6 bar
# 3. one user, speculation off, layer by layer, compiled, with decode chunks (bench/decode_path.py): the 800 bar
# 4. the whole stack across GPUs (drafter cuda:0, verifier cuda:1), off against the default drafter, 1/64/256 users
set -u
target=${TARGET:-smollm2-135m-instruct}
out=${OUT:-out/gpu-sweep}
mkdir -p "$out"
step() {  # step SECONDS COMMAND...: run it, bounded, and say how it ended
  local limit=$1
  shift
  echo "== $(date +%T) $*"
  timeout "$limit" "$@"
  echo "== rc=$?"
}
step 120 python3 bench/feature_runner_gpu.py --device cuda:0 --json "$out/feature_runner.json"
step 150 python3 bench/drafter_cost.py --device cuda:0 --target "$target" \
  --drafters drafters/smollm2-135m-instruct-feature drafters/smollm2-135m-instruct --json "$out/drafter_cost.json"
step 300 env SPECDEC_COMPILE=yes python3 bench/decode_path.py --device cuda:1 --compile yes --target "$target" \
  --max-new-tokens 128 --prompt-count 8 --out "$out/decode-path"
step 420 python3 -m specdec.cli bench --target "$target" --verifier-device cuda:1 --drafter-device cuda:0 \
  --modes off,model --concurrency 1,64,256 --requests 256 --max-new-tokens 64 --out "$out/bench"
