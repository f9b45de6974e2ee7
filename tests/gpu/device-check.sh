#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and no Rust or Docker: the release `muster`
# binary built elsewhere, run here with the process executor.
#   1. `muster agent --print-inventory` lists the GPUs NVML reports (UUID, model, memory);
#   2. `muster dev --executor process` offers them, and jobs see exactly the GPUs they asked
#      for through CUDA (cuDeviceGetCount), whatever they put in their own environment.
# Usage: tests/gpu/device-check.sh [path/to/muster] [output dir]
set -uo pipefail
MUSTER="${1:-target/release/muster}"
OUT="${2:-${OUT:-/tmp/muster-gpu-check}}"
mkdir -p "$OUT"
API=127.0.0.1:7070

echo "== inventory"
"$MUSTER" agent --print-inventory | tee "$OUT/inventory.json"
command -v nvidia-smi >/dev/null && nvidia-smi -L

# Every call is signed (SigV4) with the root key `muster dev` writes, through `muster api`:
# the nodes refuse unsigned requests.
post() { # operation, json body
  AWS_SHARED_CREDENTIALS_FILE="$OUT/dev/aws/credentials" AWS_CONFIG_FILE="$OUT/dev/aws/config" \
    AWS_ENDPOINT_URL_BATCH="http://$API" "$MUSTER" api "$1" "$2" 2>&1 | tr -d '\n '
}
field() { grep -o "\"$1\":\"[^\"]*\"" | head -1 | cut -d'"' -f4; }

echo "== muster dev (process executor)"
MUSTER_LOG=warn,muster=info "$MUSTER" dev --executor process --data-dir "$OUT/dev" --api-addr "$API" \
  > "$OUT/dev.out" 2> "$OUT/dev.err" &
DEV=$!
for _ in $(seq 1 200); do grep -q "ready" "$OUT/dev.out" && break; sleep 0.1; done
cat "$OUT/dev.out"

# Counts the CUDA devices the job can see, through the driver API.
PROBE='echo NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; python3 -c "import ctypes; c=ctypes.CDLL(\"libcuda.so.1\"); n=ctypes.c_int(); print(\"cuInit\", c.cuInit(0)); print(\"cuDeviceGetCount\", c.cuDeviceGetCount(ctypes.byref(n)), \"devices\", n.value)"'
post RegisterJobDefinition "$(printf '{"jobDefinitionName":"probe","type":"container","containerProperties":{"image":"none","command":["sh","-c",%s],"resourceRequirements":[{"type":"VCPU","value":"1"},{"type":"MEMORY","value":"256"}]}}' "$(python3 -c 'import json,sys;print(json.dumps(sys.argv[1]))' "$PROBE" 2>/dev/null || echo '"true"')")"
echo
submit() { post SubmitJob "{\"jobName\":\"$1\",\"jobQueue\":\"default\",\"jobDefinition\":\"probe\",\"containerOverrides\":$2}" | field jobId; }
t0=$(date +%s%N)
ONE=$(submit one-gpu '{"resourceRequirements":[{"type":"GPU","value":"1"}]}')
NONE=$(submit no-gpu '{}')
SNEAKY=$(submit sneaky '{"environment":[{"name":"NVIDIA_VISIBLE_DEVICES","value":"all"},{"name":"CUDA_VISIBLE_DEVICES","value":"0"}]}')
declare -A SEEN
for id in "$ONE" "$NONE" "$SNEAKY"; do
  for _ in $(seq 1 300); do
    st=$(post DescribeJobs "{\"jobs\":[\"$id\"]}" | field status)
    case "$st" in SUCCEEDED|FAILED) break;; esac
    sleep 0.05
  done
  echo "== job $id: $st"
  cat "$OUT/dev/agent/logs/$id/1.log" 2>/dev/null
  SEEN[$id]=$(grep -o "devices [0-9]*" "$OUT/dev/agent/logs/$id/1.log" 2>/dev/null | awk '{print $2}')
done
echo "all three ended within $(( ($(date +%s%N) - t0) / 1000000 )) ms of the first submit"
post DescribeJobs "{\"jobs\":[\"$ONE\"]}" > "$OUT/one-gpu.json"
kill -INT $DEV; wait $DEV; echo "muster dev exited $?"

# The verdict, on the last line: every GPU job saw exactly what it asked for.
GPUS=$(grep -o '"uuid"' "$OUT/inventory.json" | wc -l)
if [ "$GPUS" -lt 1 ]; then
  echo "device-check: FAIL: the inventory lists no GPU"
elif [ "${SEEN[$ONE]:-}" = 1 ] && [ "${SEEN[$NONE]:-}" = 0 ] && [ "${SEEN[$SNEAKY]:-}" = 0 ]; then
  echo "device-check: PASS: $GPUS GPUs found; the one-GPU job saw 1 device, the others 0"
else
  echo "device-check: FAIL: devices seen: one-gpu=${SEEN[$ONE]:-none} no-gpu=${SEEN[$NONE]:-none} sneaky=${SEEN[$SNEAKY]:-none}"
fi
