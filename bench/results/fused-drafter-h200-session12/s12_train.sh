# twelfth session: the shipped fused drafter trained on on the new text (one H200)
. .gpu/env.sh
export PYTHONPATH=/root/site:$PWD
bash .gpu/setup.sh || exit 1
echo "== train $(date +%T)"
timeout 580 python3 -m specdec.cli train-drafter --target /root/m/smollm2.gguf --target-name smollm2-135m-instruct \
  --layers fused --init-from drafters/smollm2-135m-instruct-fused --batch-size 32 --steps 100000 --max-minutes 8.2 \
  --draft-vocab 16384 --save-every 500 --seed 6 --resume --out /root/fd6a --work-dir /root/ts6a --device cuda:0 \
  --lr 3e-4 > /root/trainA.log 2>&1
echo "rc $? == done $(date +%T)"
tr '\r' '\n' < /root/trainA.log | grep -v -e "^WARNING" -e "warnings.warn" > $OUT/trainA.log
grep -v "train-drafter:" $OUT/trainA.log | tail -15; grep "train-drafter:" $OUT/trainA.log | tail -2
ls -la /root/fd6a
