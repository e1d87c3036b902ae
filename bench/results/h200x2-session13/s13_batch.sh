# thirteenth session: the drafter's batch with new sessions' prompts on the GPU, profiled
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
echo "== drafter_batch $(date +%T)"
timeout 150 python3 bench/drafter_batch.py --device cuda:0 --target /root/m/smollm2.gguf --running 16 --new 0,1,4,16 \
  --prompt 150 --profile --json $OUT/drafter_batch.json 2>&1 | grep -v -e "^WARNING" -e "warnings.warn" | tee $OUT/drafter_batch.txt
