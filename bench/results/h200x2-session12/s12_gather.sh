# twelfth session: the drafter's gather window at 64 users (0 = as before, 3 ms)
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then devs="--verifier-device cuda:1 --drafter-device cuda:0"; else devs="--verifier-device cuda:0 --drafter-device cuda:0"; fi
for g in 3 0; do
  echo "== gather $g ms $devs $(date +%T)" | tee -a $OUT/gather.txt
  SPECDEC_DRAFT_GATHER_MS=$g SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 115 python3 -m specdec.cli bench \
    --target $t --modes $F --max-new-tokens 64 --out /root/b/g$g $devs --concurrency 64 --requests 384 2>&1 \
    | grep -v -e "^WARNING" -e "warnings.warn" | grep -e " x64" -e "draft\|verify\|tick\|queue\|round\|counters" \
    | tee -a $OUT/gather.txt
  cp /root/b/g$g/results.json $OUT/gather$g.json
done
echo "== done $(date +%T)"
