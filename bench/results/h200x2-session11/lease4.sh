# lease 4 (eleventh session): the next draft asked for before the response, the deployment's shape
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
{
echo "== spec2gpu $(date +%T)"
SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 150 python3 bench/load_profile.py --target $t --device cuda:1 \
  --drafter-device cuda:0 --mode $F --concurrency 64 --requests 384 --max-new-tokens 64 --phases-only \
  --out /root/lp/spec2gpu 2>&1 | grep -v -e "^WARNING" -e "^  warnings.warn" | tail -24
cp /root/lp/spec2gpu/load_profile.json $OUT/spec2gpu.json
echo "== done $(date +%T)"
} 2>&1 | tee $OUT/lease4.log
