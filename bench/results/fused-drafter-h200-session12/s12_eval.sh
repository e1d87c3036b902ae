# twelfth session: greedy tau on the prompt set, the continuation against the shipped drafter, same host
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
echo "== eval $(date +%T)"
tar czf $OUT/fd6a.tgz -C /root fd6a
timeout 400 python3 -m specdec.cli eval-drafter --target /root/m/smollm2.gguf --prompts .gpu/chat.jsonl \
  --max-new-tokens 128 --drafter /root/fd6a drafters/smollm2-135m-instruct-fused --device cuda:0 \
  --json $OUT/evalA.json > /root/evalA.log 2>&1
echo "rc $? == done $(date +%T)"
tr '\r' '\n' < /root/evalA.log | grep -v -e "^WARNING" -e "warnings.warn" | tail -25
