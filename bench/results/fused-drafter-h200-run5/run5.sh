# on the device, in the background: train feature + fused drafters (text written on both GPUs, training on cuda:0),
# evaluate them; cuda:1 measures the stack once the text is written
cd /root/repo
. .gpu/s/env.sh
export PYTHONPATH=/root/site:/root/repo
mkdir -p /root/sweep
t=/root/m/smollm2.gguf
step() { local limit=$1; shift; echo "== $(date +%T) $*"; timeout "$limit" "$@"; echo "== rc=$? $(date +%T)"; }
{
date
python3 -m specdec.cli train-drafter --target $t --target-name smollm2-135m-instruct \
  --out /root/sweep/fd5 --work-dir /root/ts5 --layers feature,fused --init-from drafters/smollm2-135m-instruct-feature \
  --device cuda:0 --gen-devices cuda:0,cuda:1 --data-prompts 65536 --gen-tokens 256 --gen-batch-size 2048 \
  --batch-size 32 --lr 5e-4 --steps 100000 --total-minutes 17 --draft-vocab 16384 --save-every 500 --seed 5
echo TRAIN_DONE rc=$?
date
python3 -m specdec.cli eval-drafter --target $t --drafter /root/sweep/fd5/feature /root/sweep/fd5/fused \
  --prompts .gpu/chat.jsonl --max-new-tokens 128 --device cuda:0 --json /root/sweep/eval5.json
echo EVAL_DONE rc=$?
date
} > /root/sweep/train.log 2>&1 &
while [ ! -f /root/ts5/data.pt ]; do sleep 5; done
sleep 20
{
step 240 python3 -m specdec.cli bench --target $t --verifier-device cuda:1 --drafter-device cuda:1 \
  --modes off,model=drafters/smollm2-135m-instruct-feature --concurrency 64,256 --requests 256 --max-new-tokens 64 \
  --out /root/sweep/bench-load-1gpu
step 420 env SPECDEC_COMPILE_MODE=max-autotune-no-cudagraphs python3 bench/decode_path.py --device cuda:1 \
  --compile yes --target $t --max-new-tokens 128 --prompt-count 8 --out /root/sweep/decode-path-autotune
step 300 python3 bench/decode_path.py --device cuda:1 --compile yes --target $t --max-new-tokens 128 --prompt-count 8 \
  --out /root/sweep/decode-path
echo SWEEP_DONE
} > /root/sweep/bench.log 2>&1
