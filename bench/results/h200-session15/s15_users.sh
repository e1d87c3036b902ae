# fifteenth session, one H200: one user and 256 users, speculation off against the fused drafter, both tiers on
# cuda:0 (the two-GPU kind was not lent). After bench/gpu_stage.sh's staging calls:
#   . .gpu/env.sh && bash .gpu/setup.sh final && bash bench/results/h200-session15/s15_users.sh
t=/root/m/smollm2.gguf
F=model=drafters/smollm2-135m-instruct-fused
run() {  # tag concurrency requests new-tokens modes
  echo "== $1 $(date +%T)" | tee -a "$OUT/users.txt"
  timeout 280 python3 -m specdec.cli bench --target $t --modes "$5" --concurrency "$2" --requests "$3" \
    --max-new-tokens "$4" --verifier-device cuda:0 --drafter-device cuda:0 --out "/root/b/$1" 2>&1 \
    | grep -e " x$2 " | tee -a "$OUT/users.txt"
  cp "/root/b/$1/results.json" "$OUT/$1.json" 2>/dev/null
}
run u1 1 12 128 "off,$F"
run u256 256 768 64 "off,$F"
echo "== done $(date +%T)" | tee -a "$OUT/users.txt"
