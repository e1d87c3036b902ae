#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md still owes, in priority order, for one lease of a two-GPU host: each step
# is bounded by `timeout`, so one slow step (torch.compile's warm-up, say) cannot eat the others, and each writes
# its JSON under OUT as soon as it ends. The target must be reachable offline (a staged .gguf file or directory).
#
#   TARGET=/root/m/smollm2.gguf OUT=$OUT bash bench/gpu_sweep.sh
#
# 1. at the same time, on one GPU each (about 5 minutes):
#    cuda:0  the feature drafter's step and whole 5-token greedy drafts, graphed and eager
#            (bench/feature_runner_gpu.py), then drafting cost against the target's step (bench/drafter_cost.py)
#    cuda:1  one user, speculation off, layer by layer, compiled, with greedy decode chunks (bench/decode_path.py)
# 2. one user across GPUs (drafter cuda:0, verifier cuda:1): off, the default drafter, n-gram, with transformers'
#    generate and assisted generation on the same pair
# 3. the whole stack across GPUs at 64 and 256 users, off against the default drafter
# 4. the shipped drafter's tau at temperature 0.7 on the H200, if the lease still runs
set -u
target=${TARGET:-smollm2-135m-instruct}
out=${OUT:-out/gpu-sweep}
mkdir -p "$out"
step() {  # step SECONDS COMMAND...: run it, bounded, and say how it ended
  local limit=$1
  shift
  echo "== $(date +%T) $*"
  timeout "$limit" "$@"
  echo "== rc=$? $(date +%T)"
}
{
  step 120 python3 bench/feature_runner_gpu.py --device cuda:0 --json "$out/feature_runner.json"
  step 150 python3 bench/drafter_cost.py --device cuda:0 --target "$target" \
    --drafters drafters/smollm2-135m-instruct-feature drafters/smollm2-135m-instruct --json "$out/drafter_cost.json"
} > "$out/cuda0.log" 2>&1 &
step 330 python3 bench/decode_path.py --device cuda:1 --compile yes --target "$target" \
  --max-new-tokens 128 --prompt-count 8 --out "$out/decode-path"
wait
cat "$out/cuda0.log"
step 330 python3 -m specdec.cli bench --target "$target" --verifier-device cuda:1 --drafter-device cuda:0 \
  --modes off,model,ngram --concurrency 1 --requests 16 --max-new-tokens 128 --baselines --baseline-prompts 4 \
  --out "$out/bench-one-user"
step 360 python3 -m specdec.cli bench --target "$target" --verifier-device cuda:1 --drafter-device cuda:0 \
  --modes off,model --concurrency 64,256 --requests 256 --max-new-tokens 64 --out "$out/bench-load"
# 4. if the lease still runs: the shipped drafter's tau at temperature 0.7 on the H200 (its greedy tau was measured)
step 200 python3 -m specdec.cli eval-drafter --target "$target" --drafter drafters/smollm2-135m-instruct-feature \
  --prompts bench/prompts/chat.jsonl --temperature 0.7 --max-new-tokens 128 --device cuda:1 --json "$out/eval_t07.json"
