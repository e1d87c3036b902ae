# twelfth session, call 1 after staging: the training text for a longer fused-drafter run (seed 6, new prompts)
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
{
echo "== gen $(date +%T)"
timeout 560 python3 -m specdec.cli train-drafter --target /root/m/smollm2.gguf --target-name smollm2-135m-instruct \
  --out /root/fd6a --work-dir /root/ts6a --layers fused --init-from drafters/smollm2-135m-instruct-fused \
  --device cuda:0 --gen-devices cuda:0 --data-prompts 36864 --gen-tokens 256 --gen-batch-size 2048 \
  --batch-size 32 --lr 2e-4 --steps 0 --draft-vocab 16384 --save-every 500 --seed 6
echo "rc $?"
ls -la /root/ts6a /root/fd6a
echo "== done $(date +%T)"
} 2>&1 | tr '\r' '\n' | grep -v -e "^WARNING" -e "warnings.warn" | tee $OUT/gen.log | tail -40
