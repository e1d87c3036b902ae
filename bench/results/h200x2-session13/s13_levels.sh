# thirteenth session: 64-user levels across GPUs, each with its own settings.
# Each argument: "ENV=V[,ENV=V...]:modes:requests:timeout_s" (modes: F = the fused drafter; ENV part "-" = none)
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then devs="--verifier-device cuda:1 --drafter-device cuda:0"; else devs="--verifier-device cuda:0 --drafter-device cuda:0"; fi
i=0
for level in "$@"; do
  IFS=: read -r envs modes n limit <<< "$level"; [ "$envs" = "-" ] && envs=SPECDEC_LEVEL=plain
  modes=${modes//F/$F}
  i=$((i + 1)); tag="l${i}_n$n"
  echo "== $tag [$envs] $modes, $n requests $devs $(date +%T)" | tee -a $OUT/levels.txt
  env ${envs//,/ } SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout "$limit" python3 -m specdec.cli bench \
    --target $t --modes "$modes" --max-new-tokens 64 --out /root/b/$tag $devs --concurrency 64 --requests "$n" 2>&1 \
    | grep -v -e "^WARNING" -e "warnings.warn" | grep -e " x64" -e "draft\|verify\|tick\|queue\|round\|counters\|gc\|ahead\|respond" \
    | tee -a $OUT/levels.txt
  cp /root/b/$tag/results.json $OUT/$tag.json 2>/dev/null
done
echo "== done $(date +%T)" | tee -a $OUT/levels.txt
