#!/usr/bin/env bash
# The next GPU lease's first item (docs/benchmarks.md, "For the next GPU lease", 00) in two calls of under 10
# minutes each, on nvidia-h200-x2 after `bench/gpu_stage.sh`'s staging calls (this script is the last call's):
#
#   checks  (~3 min): the CUDA paths against the CPU (bench/gpu_paths.py, the drafter's prompt graphs among them),
#           then a batch of drafts with new sessions' prompts of fresh lengths, eager prompts against the prompt
#           graphs (bench/drafter_batch.py --cold; predicted p90 ~75 ms -> ~8 ms)
#   levels  (~6 min): a warm-up level, then 64 users off and speculating (the fused drafter), the tiers on two GPUs
#           (predicted: wide drafter batches 31 -> ~8 ms mean, speculating +20-30%, ~0.9x off; the verifier's
#           prefill ticks p99 117-154 -> under 30 ms)
#
# Results go to $OUT: checks.txt, drafter_batch_{no,yes}.json, levels.txt and one JSON a level.
#   . .gpu/env.sh && bash .gpu/setup.sh final && bash bench/gpu_next.sh checks
set -uo pipefail
part=${1:?usage: gpu_next.sh checks|levels}
model=/root/m/smollm2.gguf
case "$part" in
  checks)
    { python3 bench/gpu_paths.py --device cuda:0
      for graphs in no yes; do
        echo "== drafter_batch --prompt-graphs $graphs $(date +%T)"
        python3 bench/drafter_batch.py --device cuda:0 --target $model --new 1,4 --prompt 20-120 --cold \
          --repeats 40 --prompt-graphs $graphs --json "$OUT/drafter_batch_$graphs.json"
      done
    } 2>&1 | grep -v -e "^WARNING" -e "warnings.warn" | tee "$OUT/checks.txt" ;;
  levels)
    # "ENV:modes:requests:timeout_s" as s13_levels.sh reads them; F = the fused drafter
    bash bench/results/h200x2-session13/s13_levels.sh "-:F:128:150" "-:off:384:170" "-:F:384:200" ;;
  *) echo "unknown part: $part (checks or levels)" >&2; exit 2 ;;
esac
