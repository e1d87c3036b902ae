# lease 1 (eleventh session): where a speculating round's time goes at 64 users (phases), proactive on/off,
# one GPU against two
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
export SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000
lp() {
  local name=$1; shift
  echo "== $name $(date +%T)"
  timeout 130 python3 bench/load_profile.py --target $t --concurrency 64 --requests 192 --max-new-tokens 64 \
    --phases-only --out /root/lp/$name "$@" 2>&1 | grep -v -e "^WARNING" -e "^  warnings.warn" | tail -32
  cp /root/lp/$name/load_profile.json $OUT/$name.json 2>/dev/null
}
{
lp off_a --device cuda:1 --mode off
lp spec2gpu --device cuda:1 --drafter-device cuda:0 --mode $F
SPECDEC_PROACTIVE=no lp spec2gpu_noahead --device cuda:1 --drafter-device cuda:0 --mode $F
lp spec1gpu --device cuda:0 --mode $F
SPECDEC_PROACTIVE=no lp spec1gpu_noahead --device cuda:0 --mode $F
lp off_b --device cuda:0 --mode off
echo "== done $(date +%T)"
} 2>&1 | tee $OUT/lease1.log
