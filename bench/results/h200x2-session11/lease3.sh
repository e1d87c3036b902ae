# lease 3 (eleventh session): the greedy drafting loop as one graph
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
{
timeout 60 python3 bench/gpu_paths.py --device cuda:0 2>&1 | grep -v -e "^WARNING" | tail -10
echo "== spec1gpu $(date +%T)"
SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 170 python3 bench/load_profile.py --target $t --device cuda:0 \
  --mode $F --concurrency 64 --requests 384 --max-new-tokens 64 --seconds 10 --rate 200 --top 30 \
  --out /root/lp/spec1gpu 2>&1 | grep -v -e "^WARNING" -e "^  warnings.warn" | tail -150
cp /root/lp/spec1gpu/load_profile.json $OUT/spec1gpu.json
grep -h "captured" /root/lp/spec1gpu/*.log | cut -c1-200
echo "== bench2gpu $(date +%T)"
SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 200 python3 -m specdec.cli bench --target $t --modes off,$F \
  --max-new-tokens 64 --out /root/b/bench2gpu --verifier-device cuda:1 --drafter-device cuda:0 --concurrency 64 \
  --requests 512 2>&1 | grep -v -e "^WARNING" -e "^  warnings.warn" | grep -e "x64" -e "draft\|verify\|tick\|queue\|round"
cp /root/b/bench2gpu/results.json $OUT/bench2gpu.json
echo "== done $(date +%T)"
} 2>&1 | tee $OUT/lease3.log
