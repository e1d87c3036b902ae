# thirteenth session: the drafter's gather window at 64 users across GPUs. Levels: "gather_ms:modes:requests:timeout_s"
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then devs="--verifier-device cuda:1 --drafter-device cuda:0"; else devs="--verifier-device cuda:0 --drafter-device cuda:0"; fi
for level in "$@"; do
  IFS=: read -r g modes n limit <<< "$level"
  modes=${modes//F/$F}
  tag="g${g}_$(echo "$modes" | tr -c 'a-z0-9\n' '_' | cut -c1-12)_$n"
  echo "== $tag gather $g ms, $modes, $n requests $devs $(date +%T)" | tee -a $OUT/gather.txt
  SPECDEC_DRAFT_GATHER_MS=$g SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout "$limit" python3 -m specdec.cli bench \
    --target $t --modes "$modes" --max-new-tokens 64 --out /root/b/$tag $devs --concurrency 64 --requests "$n" 2>&1 \
    | grep -v -e "^WARNING" -e "warnings.warn" | grep -e " x64" -e "draft\|verify\|tick\|queue\|round\|counters" \
    | tee -a $OUT/gather.txt
  cp /root/b/$tag/results.json $OUT/$tag.json 2>/dev/null
done
echo "== done $(date +%T)" | tee -a $OUT/gather.txt
