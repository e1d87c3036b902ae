# twelfth session: 64 users with the drafter trained on, as the eleventh session's lease 3 (advice raised)
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then devs="--verifier-device cuda:1 --drafter-device cuda:0"; else devs="--verifier-device cuda:0 --drafter-device cuda:0"; fi
echo "== b64 $devs $(date +%T)"
SPECDEC_ADVISE_SPECULATION_MAX_SESSIONS=1000 timeout 330 python3 -m specdec.cli bench --target $t --modes off,$F \
  --max-new-tokens 64 --out /root/b/b64 $devs --concurrency 64 --requests 512 2>&1 | grep -v -e "^WARNING" \
  -e "warnings.warn" | grep -e " x64" -e "draft\|verify\|tick\|queue\|round" | tee $OUT/b64.txt
cp /root/b/b64/results.json $OUT/b64.json
echo "== done $(date +%T)"
