# background on the device: train two feature drafters on cuda:0 (data written on both GPUs), then evaluate them
export PYTHONPATH=/root/site:/root/src SPECDEC_CACHE_DIR=/root/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /root/src
date
python3 -m specdec.cli train-drafter --target /root/m/smollm2.gguf --target-name smollm2-135m-instruct \
  --out /root/out/fd3 --work-dir /root/ts3 --layers feature,feature2 --device cuda:0 --gen-devices cuda:0,cuda:1 \
  --data-prompts 40960 --gen-tokens 256 --gen-batch-size 2048 --batch-size 32 --lr 8e-4 --steps 100000 \
  --total-minutes 15 --draft-vocab 16384 --save-every 500
echo TRAIN_DONE rc=$?
date
python3 -m specdec.cli eval-drafter --target /root/m/smollm2.gguf --drafter /root/out/fd3/feature /root/out/fd3/feature2 \
  --prompts /root/src/chat.jsonl --max-new-tokens 128 --device cuda:0 --json /root/out/eval3.json
echo EVAL_DONE rc=$?
date
