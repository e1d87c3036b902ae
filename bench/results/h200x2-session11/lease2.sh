# lease 2 (eleventh session): after the drafter's wide rows on their own, graphs warmed in both tiers (prefills
# too) and drafting ahead only on an idle drafter
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
lp() {
  local name=$1; shift
  echo "== $name $(date +%T)"
  SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 150 python3 bench/load_profile.py --target $t \
    --concurrency 64 --requests 384 --max-new-tokens 64 --phases-only --out /root/lp/$name "$@" 2>&1 \
    | grep -v -e "^WARNING" -e "^  warnings.warn" | tail -34
  cp /root/lp/$name/load_profile.json $OUT/$name.json 2>/dev/null
}
bench() {
  local name=$1; shift
  echo "== $name $(date +%T)"
  timeout 200 python3 -m specdec.cli bench --target $t --modes off,$F --max-new-tokens 64 --out /root/b/$name "$@" 2>&1 \
    | grep -v -e "^WARNING" -e "^  warnings.warn" | grep -v "^ *[a-z_]*: " | tail -14
  cp /root/b/$name/results.json $OUT/$name.json 2>/dev/null
}
{
lp spec1gpu --device cuda:0 --mode $F
lp off1gpu --device cuda:0 --mode off
SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 bench bench2gpu_x64 --verifier-device cuda:1 --drafter-device cuda:0 \
  --concurrency 64 --requests 512
bench bench1gpu_default_advice --verifier-device cuda:0 --drafter-device cuda:0 --concurrency 64,256 --requests 512
grep -h "captured\|CUDA graphs" /root/lp/*/verifier.log /root/lp/*/drafter.log | cut -c1-240
timeout 100 python3 bench/gpu_paths.py --device cuda:0 2>&1 | grep -v -e "^WARNING" | tail -12
echo "== done $(date +%T)"
} 2>&1 | tee $OUT/lease2.log
