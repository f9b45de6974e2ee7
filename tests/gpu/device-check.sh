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

post() { # operation, json body
  if command -v curl >/dev/null; then
    curl -s -XPOST "http://$API/v1/$1" -H 'content-type: application/json' -d "$2"
  else
    python3 -c 'import sys,urllib.request as u
r=u.Request("http://'"$API"'/v1/"+sys.argv[1],data=sys.argv[2].encode(),method="POST")
try: print(u.urlopen(r).read().decode())
except Exception as e: print(e.read().decode())' "$1" "$2"
  fi
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
post registerjobdefinition "$(printf '{"jobDefinitionName":"probe","type":"container","containerProperties":{"image":"none","command":["sh","-c",%s],"resourceRequirements":[{"type":"VCPU","value":"1"},{"type":"MEMORY","value":"256"}]}}' "$(python3 -c 'import json,sys;print(json.dumps(sys.argv[1]))' "$PROBE" 2>/dev/null || echo '"true"')")"
echo
submit() { post submitjob "{\"jobName\":\"$1\",\"jobQueue\":\"default\",\"jobDefinition\":\"probe\",\"containerOverrides\":$2}" | field jobId; }
t0=$(date +%s%N)
ONE=$(submit one-gpu '{"resourceRequirements":[{"type":"GPU","value":"1"}]}')
NONE=$(submit no-gpu '{}')
SNEAKY=$(submit sneaky '{"environment":[{"name":"NVIDIA_VISIBLE_DEVICES","value":"all"},{"name":"CUDA_VISIBLE_DEVICES","value":"0"}]}')
for id in "$ONE" "$NONE" "$SNEAKY"; do
  for _ in $(seq 1 300); do
    st=$(post describejobs "{\"jobs\":[\"$id\"]}" | field status)
    case "$st" in SUCCEEDED|FAILED) break;; esac
    sleep 0.05
  done
  echo "== job $id: $st"
  cat "$OUT/dev/agent/logs/$id/1.log" 2>/dev/null
done
echo "all three ended within $(( ($(date +%s%N) - t0) / 1000000 )) ms of the first submit"
post describejobs "{\"jobs\":[\"$ONE\"]}" > "$OUT/one-gpu.json"
kill -INT $DEV; wait $DEV; echo "muster dev exited $?"
