#!/usr/bin/env bash
# The next GPU lease's first items (docs/benchmarks.md, "For the next GPU lease", 00) in calls of under 10 minutes
# each, after `bench/gpu_stage.sh`'s staging calls (this script is the last call's), on nvidia-h200-x2 (the tiers on
# two GPUs) or one H200 (both on cuda:0). checks and levels ran in the fifteenth session on one H200:
#
#   checks  (~3 min): the CUDA paths against the CPU (bench/gpu_paths.py, the drafter's prompt graphs among them),
#           then a batch of drafts with new sessions' prompts of fresh lengths, eager prompts against the prompt
#           graphs (bench/drafter_batch.py --cold; predicted p90 ~75 ms -> ~8 ms)
#   levels  (~6 min): a warm-up level, then 64 users off and speculating (the fused drafter), the tiers on two GPUs
#           (predicted: wide drafter batches 31 -> ~8 ms mean, speculating +20-30%, ~0.9x off; the verifier's
#           prefill ticks p99 117-154 -> under 30 ms)
#   agree   (~4 min): one user and 64, off and the fused drafter: each row's greedy tokens against off's (bf16 on
#           a GPU: a verify pass and a decode step run different kernels; the CPU gives 8 of 8 the same everywhere)
#   compiled (~5 min): the 800 bar's command (bench/decode_path.py, one user, speculation off, every layer up to
#           the whole stack) with SPECDEC_COMPILE=yes: the capture check's fix on a GPU (fifteenth session: the
#           compiled verifier refused its greedy graphs) and the bar again (797 tokens/s in the ninth session, 842
#           in the sixteenth; DECODE_PATH_TIMEOUT lowers its 560 s limit for a lease with less time left)
#   compiled-bench (~8 min, after compiled on the same machine): one user through specdec bench, compiled, off and
#           the fused drafter (a cold compiled verifier took over 300 s to serve in the sixteenth session)
#   one     (~6 min): one user, the tiers on two GPUs where there are two (the bar's shape: >= 2.5x off): off, n-grams,
#           the fused drafter's chains and its 2x2 trees, and transformers' generate and assisted generation beside
#           them (--baselines); predicted, written before the run: chains ~0.6-0.8x off (0.59x on one GPU in the
#           fifteenth session), trees no better (their drafting levels cost more than the tau they add at one user)
#   trees   (~6 min): 64 users, draft length 4: chains against 2x2 trees advised by the verifier (15 tokens a tree:
#           since the fifteenth session they verify in the chains' one pass, not 16 passes of 4 rows a tick), off
#           beside them (predicted, written before any run: tau 2.0 -> 2.4-2.6, rounds +10-15%, speculating
#           +5-15% over chains, ~0.95-1.05x off on one GPU)
#
# Results go to $OUT: checks.txt, drafter_batch_{no,yes}.json, levels.txt and one JSON a level, compiled.txt.
# Each call is whole by itself (a machine goes back 30 s after a call, and each call's copy of the tree brings the
# generated code afresh): carry [.gpu/setup.sh, .gpu/env.sh, .gpu/model.sha256, specdec/v1] and run
#   bash bench/gpu_next.sh checks
set -uo pipefail
part=${1:?usage: gpu_next.sh checks|levels|one|trees|agree|compiled|compiled-bench}
. .gpu/env.sh && bash .gpu/setup.sh final || { echo "not staged: run bench/gpu_stage.sh's calls first" >&2; exit 1; }
model=/root/m/smollm2.gguf
# the tiers on two GPUs where there are two (the deployment's shape), else both on the one
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then devs="--verifier-device cuda:1 --drafter-device cuda:0"
else devs="--verifier-device cuda:0 --drafter-device cuda:0"; fi
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
  trees)
    # one run, one verifier advising 2x2 trees: off, chains (F@off) and the advised trees (F), each mode's processes
    # serving two 64-user levels, the first of which captures what the warm-ups did not (the drafter's tree levels)
    F=model=drafters/smollm2-135m-instruct-fused
    SPECDEC_K=4 SPECDEC_ADVISE_DRAFT_TREE=2x2 SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 560 \
      python3 -m specdec.cli bench --target $model --modes "off,$F@off,$F" --concurrency 64,64 --requests 384 \
      --max-new-tokens 64 --out /root/b/trees $devs 2>&1 | grep -v -e "^WARNING" -e "warnings.warn" \
      | grep -e " x64" -e "draft\|verify\|tick\|round" | tee "$OUT/trees.txt"
    cp /root/b/trees/results.json "$OUT/trees.json" 2>/dev/null ;;
  one)
    F=model=drafters/smollm2-135m-instruct-fused
    timeout 560 python3 -m specdec.cli bench --target $model --modes "off,ngram,$F@off,$F@2x2" --concurrency 1 \
      --requests 16 --max-new-tokens 128 --baselines --baseline-prompts 4 --out /root/b/one $devs 2>&1 \
      | grep -v -e "^WARNING" -e "warnings.warn" | tail -40 | tee "$OUT/one.txt"
    cp /root/b/one/results.json "$OUT/one.json" 2>/dev/null ;;
  agree)
    # losslessness on the GPU: every request's greedy tokens against speculation off's for the same prompt, at one
    # user and at 64 (speculation forced on there), bf16, graphed; `SPECDEC_COMPILE=yes bash ... agree` compiled
    F=model=drafters/smollm2-135m-instruct-fused
    SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 560 python3 -m specdec.cli bench --target $model \
      --modes "off,$F" --concurrency 1,64 --requests 64 --max-new-tokens 128 --out /root/b/agree \
      --verifier-device cuda:0 --drafter-device cuda:0 2>&1 | grep -v -e "^WARNING" -e "warnings.warn" \
      | grep -e " x[0-9]" -e "greedy output" | tee "$OUT/agree.txt"
    cp /root/b/agree/results.json "$OUT/agree.json" 2>/dev/null ;;
  compiled)
    # the 800 bar's own command (ninth session: 797 tokens/s at layer 5), compiled: the capture check's fix on a GPU
    timeout ${DECODE_PATH_TIMEOUT:-560} python3 bench/decode_path.py --device cuda:0 --compile yes --target $model \
      --max-new-tokens 128 --prompt-count 4 --decode-ahead-steps 2 --out /root/b/decode_path 2>&1 \
      | grep -v -e "^WARNING" -e "warnings.warn" | tail -40 | tee "$OUT/compiled.txt"
    cp /root/b/decode_path/*.json "$OUT/" 2>/dev/null
    grep -h "captured\|capture check\|does not match" /root/b/decode_path/*.log > "$OUT/compiled_logs.txt" 2>/dev/null ;;
  compiled-bench)
    # after `compiled` on the same machine (its inductor cache): one user through specdec bench, off and the fused
    # drafter, compiled; the verifier's start-up (compile + captures) took over 300 s cold in the sixteenth session
    SPECDEC_COMPILE=yes SPECDEC_START_TIMEOUT=400 timeout 580 python3 -m specdec.cli bench --target $model \
      --concurrency 1 --requests 8 --modes off,model=drafters/smollm2-135m-instruct-fused --max-new-tokens 128 \
      --out /root/b/compiled --verifier-device cuda:0 --drafter-device cuda:0 2>&1 \
      | grep -v -e "^WARNING" -e "warnings.warn" | tail -40 | tee "$OUT/compiled_bench.txt"
    cp /root/b/compiled/results.json "$OUT/compiled_bench.json" 2>/dev/null
    grep -h "captured\|capture check\|does not match" /root/b/compiled/*.log > "$OUT/compiled_bench_logs.txt" 2>/dev/null ;;
  *) echo "unknown part: $part (checks, levels, one, trees, agree, compiled or compiled-bench)" >&2; exit 2 ;;
esac
